"""The LUKS engine: cryptsetup, driven through the project's one command runner.

Every passphrase reaches cryptsetup on stdin (`--key-file=-`, read to EOF, no newline stripped) or,
for the second key of luksAddKey, through an anonymous pipe. Never argv, environment, or a file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from csi_luks.luks.errors import (
    CipherUnavailable,
    CryptsetupMissing,
    CryptsetupTimeout,
    DeviceBusy,
    DeviceMapperUnavailable,
    DeviceNotFound,
    KeySlotError,
    LuksDeviceIOError,
    LuksError,
    NotLuksDevice,
    WrongPassphrase,
)
from csi_luks.luks.naming import mapper_path
from csi_luks.luks.options import FormatOptions, OpenOptions
from csi_luks.luks.status import LuksHeader, MappingStatus, parse_dump, parse_status
from csi_luks.luks.sysfs import SYS_BLOCK, DmDevice, find_dm_device, loop_backing_file
from csi_luks.system.device_io import read_error, reports_io_error
from csi_luks.system.kernel import device_mapper_registered
from csi_luks.system.programs import CRYPTSETUP
from csi_luks.system.runner import (
    CommandError,
    CommandNotFound,
    CommandResult,
    CommandTimeout,
    Runner,
    SecretPipe,
)

if TYPE_CHECKING:
    from csi_luks.kms.kdf import KDFSlots

log = logging.getLogger(__name__)

Passphrase = bytes | str

# Told of every cryptsetup call: (operation, seconds, the LuksError it raised or None). Metrics use it.
CallObserver = Callable[[str, float, LuksError | None], None]

# cryptsetup's documented exit codes.
_EXIT_WRONG_PASSPHRASE = 2
_EXIT_WRONG_DEVICE = 4
_EXIT_BUSY = 5

_UNLOCKED_SLOT = re.compile(r"Key slot (\d+) unlocked")
# cryptsetup's words when the kernel cannot run a cipher: its crypto API check (luksFormat, before any
# write, where the kernel offers AF_ALG), or dm-crypt refusing the table (an open, or luksFormat's key
# slot encryption where it falls back to dm-crypt: after the header is written, hence check_cipher).
_CIPHER_UNAVAILABLE = re.compile(
    r"Cipher \S+ \(key size \d+ bits\) is not available|Required kernel crypto interface not available"
    r"|Check that kernel supports \S+ cipher"
)
_SLOT_PROBLEM = re.compile(r"Key ?slot \d+ is (not active|full|invalid)|please select another", re.IGNORECASE)


def _bytes(passphrase: Passphrase) -> bytes:
    data = passphrase.encode() if isinstance(passphrase, str) else passphrase
    if not data:
        raise ValueError("passphrase must not be empty")
    return data


def classify(error: CommandError, operation: str) -> LuksError:
    """Turn a failed cryptsetup call into a typed error; stderr is already redacted by the runner."""
    if isinstance(error, CommandNotFound):
        return CryptsetupMissing(f"{operation}: cryptsetup is not installed", stderr=error.stderr)
    if isinstance(error, CommandTimeout):
        return CryptsetupTimeout(
            f"{operation}: cryptsetup did not finish within {error.timeout:g}s", stderr=error.stderr
        )
    stderr, rc = error.stderr, error.returncode
    if "Cannot initialize device-mapper" in stderr:
        return DeviceMapperUnavailable(
            f"{operation}: the kernel has no device-mapper", stderr=stderr, returncode=rc
        )
    if _CIPHER_UNAVAILABLE.search(stderr):
        return CipherUnavailable(
            f"{operation}: the kernel cannot run this cipher", stderr=stderr, returncode=rc
        )
    if reports_io_error(stderr):
        return LuksDeviceIOError(f"{operation}: I/O error from the device", stderr=stderr, returncode=rc)
    # "No usable keyslot is available" (exit 1): the header has no complete key slot at all, e.g. a
    # luksFormat killed inside its own writes; no passphrase opens it.
    if (
        rc == _EXIT_WRONG_PASSPHRASE
        or "No key available with this passphrase" in stderr
        or "No usable keyslot is available" in stderr
    ):
        return WrongPassphrase(
            f"{operation}: no key slot opens with this passphrase", stderr=stderr, returncode=rc
        )
    if _SLOT_PROBLEM.search(stderr):
        return KeySlotError(f"{operation}: key slot refused", stderr=stderr, returncode=rc)
    if "is not a valid LUKS device" in stderr:
        return NotLuksDevice(f"{operation}: not a LUKS device", stderr=stderr, returncode=rc)
    if "does not exist or access denied" in stderr or "is not active" in stderr:
        return DeviceNotFound(f"{operation}: device not found", stderr=stderr, returncode=rc)
    if rc == _EXIT_BUSY or "still in use" in stderr or "already exists" in stderr:
        return DeviceBusy(f"{operation}: device busy", stderr=stderr, returncode=rc)
    if rc == _EXIT_WRONG_DEVICE:
        return DeviceNotFound(f"{operation}: device not found", stderr=stderr, returncode=rc)
    return LuksError(f"{operation} failed (exit {rc})", stderr=stderr, returncode=rc)


class _AskCryptsetup(Exception):
    """sysfs cannot answer: `cryptsetup status` must."""


class Cryptsetup:
    """LUKS2 operations on block devices (and, for header work, plain image files)."""

    def __init__(
        self,
        runner: Runner | None = None,
        binary: str = CRYPTSETUP,
        timeout: float = 120.0,
        observer: CallObserver | None = None,
        sys_block: Path | None = SYS_BLOCK,
        kdf_slots: KDFSlots | None = None,
    ):
        """sys_block: where open mappings are looked up without a process (is_open, open_mapping_of,
        close); None to ask `cryptsetup status` every time. kdf_slots: the process's bound on memory-hard
        derivations, which every command given a passphrase waits for (its PBKDF is one: Ceph-CSI's
        argon2id takes 32 MiB a call, and a node staging its volumes after a reboot runs one per volume)."""
        self.runner = runner or Runner()
        self.binary = binary
        self.timeout = timeout
        self.observer = observer
        self.sys_block = sys_block
        self.kdf_slots = kdf_slots

    def _run(
        self,
        operation: str,
        args: list[str | SecretPipe],
        *,
        passphrase: Passphrase | None = None,
        check: bool = True,
        derives: bool = True,
    ) -> CommandResult:
        """derives: a command given a passphrase runs a PBKDF, and waits for a KDF slot (not the cipher
        check, whose random key goes to dm-crypt as it is)."""
        stdin = _bytes(passphrase) if passphrase is not None else None
        slots = self.kdf_slots if passphrase is not None and derives else None
        try:
            with slots.held(self.timeout) if slots is not None else contextlib.nullcontext():
                started = time.monotonic()  # the command's own time, not its wait for a slot
                result = self.runner.run([self.binary, *args], stdin=stdin, timeout=self.timeout, check=check)
        except TimeoutError as exc:
            raise CryptsetupTimeout(
                f"{operation}: not started: {exc} (cryptsetup commands stuck on other devices?); retry later"
            ) from None
        except CommandError as exc:
            error = classify(exc, operation)
            self._observe(operation, started, error)
            raise error from None
        self._observe(operation, started, None)
        return result

    def _run_on(
        self,
        device: str,
        operation: str,
        args: list[str | SecretPipe],
        *,
        passphrase: Passphrase,
        derives: bool = True,
    ) -> CommandResult:
        """_run for an operation on device, whose unreadable blocks make it a LuksDeviceIOError."""
        try:
            return self._run(operation, args, passphrase=passphrase, derives=derives)
        except LuksError as exc:
            raise _device_fault(exc, device) from None

    def _observe(self, operation: str, started: float, error: LuksError | None) -> None:
        if self.observer is not None:
            self.observer(operation, time.monotonic() - started, error)

    def version(self) -> str:
        return self._run("version", ["--version"]).stdout.strip()

    def format(self, device: str, passphrase: Passphrase, options: FormatOptions | None = None) -> None:
        """Write a new LUKS2 header (destroys whatever the device held: callers check first)."""
        opts = options or FormatOptions()
        args: list[str | SecretPipe] = [
            "luksFormat",
            "--type", "luks2",
            "--batch-mode",
            "--cipher", opts.cipher,
            "--key-size", str(opts.key_size),
            "--hash", opts.hash,
            *opts.pbkdf_args(),
            "--key-slot", str(opts.key_slot),
            "--key-file=-",
        ]  # fmt: skip
        if opts.sector_size is not None:
            args += ["--sector-size", str(opts.sector_size)]
        if opts.label is not None:
            args += ["--label", opts.label]
        args.append(device)
        self._run_on(device, "luksFormat", args, passphrase=passphrase)
        log.info("formatted %s as LUKS2 (%s, %d-bit key, %s)", device, opts.cipher, opts.key_size, opts.pbkdf)

    def check_cipher(self, device: str, options: FormatOptions) -> None:
        """CipherUnavailable unless the kernel's dm-crypt runs options' cipher, key size and sector size.

        A read-only plain mapping of device under a throwaway random key, closed at once: the kernel builds
        the cipher as it would for the volume, and nothing is written to the device (luksFormat's own
        check needs the kernel's AF_ALG interface; without it, it finds out only after writing the header).
        """
        name = f"csi-luks-cipher-check-{os.getpid()}-{secrets.token_hex(4)}"
        args: list[str | SecretPipe] = [
            "open", "--type", "plain", "--readonly", "--cipher", options.cipher,
            "--key-size", str(options.key_size), "--hash", "sha256", "--key-file=-",
        ]  # fmt: skip
        if options.sector_size is not None:
            args += ["--sector-size", str(options.sector_size)]
        key = secrets.token_bytes(options.key_size // 8)
        try:
            self._run_on(device, "cipher check", [*args, device, name], passphrase=key, derives=False)
        except (LuksDeviceIOError, CryptsetupTimeout, CryptsetupMissing, DeviceMapperUnavailable):
            raise
        except LuksError as exc:
            # The kernel refused the table, whose only choices are the cipher, key size and sector size
            # (cryptsetup says just "reload ioctl ... failed": ENOENT for a cipher it does not have).
            if "reload ioctl" not in exc.stderr:
                raise
            sector = f", {options.sector_size}-byte sectors" if options.sector_size else ""
            raise CipherUnavailable(
                f"cipher check: the kernel's dm-crypt refused {options.cipher} with a {options.key_size}-bit "
                f"key{sector}",
                stderr=exc.stderr,
                returncode=exc.returncode,
            ) from None
        self.close(name)

    def is_luks(self, device: str) -> bool:
        """True when device holds a LUKS header; DeviceNotFound when it does not exist."""
        result = self._run("isLuks", ["isLuks", device], check=False)
        if result.returncode == 0:
            return True
        if result.returncode == _EXIT_WRONG_DEVICE:
            raise DeviceNotFound("isLuks: device not found", stderr=result.stderr, returncode=4)
        return False

    def verify_passphrase(self, device: str, passphrase: Passphrase) -> int:
        """The key slot the passphrase opens; WrongPassphrase if none does. Maps nothing."""
        result = self._run(
            "verify passphrase",
            ["open", "--test-passphrase", "--verbose", "--key-file=-", device],
            passphrase=passphrase,
        )
        match = _UNLOCKED_SLOT.search(result.stdout + result.stderr)
        if match is None:
            raise LuksError("verify passphrase: cryptsetup did not name the unlocked key slot")
        return int(match.group(1))

    def slot_of(self, device: str, passphrase: Passphrase | None) -> int | None:
        """The key slot the passphrase opens; None when none does, or there is no passphrase or header."""
        if passphrase is None:
            return None
        try:
            return self.verify_passphrase(device, passphrase)
        except (WrongPassphrase, NotLuksDevice):
            return None

    def open(self, device: str, name: str, passphrase: Passphrase, options: OpenOptions | None = None) -> str:
        """Map device as /dev/mapper/NAME and return that path. Idempotent for the same device.

        The key goes to dm-crypt directly (--disable-keyring), so a later resize needs no passphrase.
        """
        existing = self.open_mapping_of(device, name)
        if existing:
            return existing
        args: list[str | SecretPipe] = [
            "open", "--type", "luks2", "--disable-keyring", "--key-file=-",
            *(options or OpenOptions()).args(), device, name,
        ]  # fmt: skip
        self._run_on(device, "luksOpen", args, passphrase=passphrase)
        log.info("opened %s as %s", device, mapper_path(name))
        return mapper_path(name)

    def refresh(self, name: str, passphrase: Passphrase, options: OpenOptions) -> None:
        """Reload an open mapping with options' flags (those not given are dropped; with persistent, the
        header's stored flags become exactly these). Needs the passphrase: the key is not in the keyring."""
        args: list[str | SecretPipe] = [
            "refresh", "--disable-keyring", "--key-file=-", *options.args(), name,
        ]  # fmt: skip
        self._run("refresh", args, passphrase=passphrase)
        log.info("refreshed %s (%s)", mapper_path(name), " ".join(options.args()) or "no flags")

    def open_mapping_of(self, device: str, name: str) -> str | None:
        """The mapping's path if NAME is already open on device; None if it is not open at all.

        DeviceBusy if the name is taken by another device (two volumes must never share a mapping).
        Read from sysfs (the mapping's slaves/ and, for a loop device, its image file: what `cryptsetup
        status` reports as device and loop); through cryptsetup where sysfs cannot tell.
        """
        try:
            found = self._sysfs_mapping(name)
            if found is None:
                return None
            backing = self._backing(found)
        except _AskCryptsetup:
            current = self.status(name)
            if not current.active:
                return None
            backing = [current.device, *filter(None, [current.loop_file])] if current.device else []
        if _same_device(backing, device):
            return mapper_path(name)
        holder = backing[0] if backing else "another device"
        raise DeviceBusy(f"open: mapping {name} already exists for {holder}, not for {device}")

    def is_open(self, name: str) -> bool:
        """Whether the mapping NAME exists: from sysfs; by `cryptsetup status` where sysfs cannot tell."""
        try:
            return self._sysfs_mapping(name) is not None
        except _AskCryptsetup:
            return self.status(name).active

    def _sysfs_mapping(self, name: str) -> DmDevice | None:
        """The dm-crypt mapping NAME from sysfs, None if no device-mapper device has that name.

        _AskCryptsetup when sysfs cannot tell: not mounted or unreadable, a kernel without device-mapper,
        or a device of that name that cryptsetup did not make (its UUID does not start with CRYPT-),
        whose status cryptsetup reports.
        """
        if self.sys_block is None:
            raise _AskCryptsetup
        try:
            found = find_dm_device(name, self.sys_block)
            # No mapping on a kernel without device-mapper: cryptsetup says so (DeviceMapperUnavailable),
            # as callers expect (close: nothing to close; NodeGetVolumeStats: FAILED_PRECONDITION).
            if found is None and not device_mapper_registered():
                raise _AskCryptsetup
        except OSError:
            raise _AskCryptsetup from None
        if found is not None and not found.is_crypt:
            raise _AskCryptsetup
        return found

    def _backing(self, mapping: DmDevice) -> list[str]:
        """The device a mapping sits on, and its image file for a loop device; _AskCryptsetup unless the
        mapping's table uses exactly one device (a LUKS mapping's does)."""
        if len(mapping.slaves) != 1:
            raise _AskCryptsetup
        slave = mapping.slaves[0]
        backing = [f"/dev/{slave}"]
        if slave.startswith("loop") and self.sys_block is not None:  # set: _sysfs_mapping found it
            image = loop_backing_file(slave, self.sys_block)
            if image:
                backing.append(image)
        return backing

    def close(self, name: str, deferred: bool = False) -> None:
        """Remove the mapping; a mapping that does not exist is already closed.

        deferred: if the mapping is still held open, device-mapper removes it when its last holder closes.

        So is every mapping of a kernel without device-mapper: NodeUnstageVolume of a volume never
        staged (the CO's cleanup) succeeds on such a node. Another reason cryptsetup cannot reach
        device-mapper (no privileges, no /dev/mapper/control) may hide an open mapping, and stays an error.
        """
        try:
            active = self.is_open(name)
        except DeviceMapperUnavailable:
            with contextlib.suppress(OSError):
                if not device_mapper_registered():
                    return
            raise
        if not active:
            return
        self._run("luksClose", ["close", "--deferred", name] if deferred else ["close", name])
        log.info("closed %s%s", mapper_path(name), " (deferred)" if deferred else "")

    def status(self, name: str) -> MappingStatus:
        result = self._run("status", ["status", name], check=False)
        if result.returncode not in (0, _EXIT_WRONG_DEVICE):
            raise classify(
                CommandError(result.argv, result.returncode, result.stdout, result.stderr), "status"
            )
        return parse_status(name, result.stdout)

    def resize(
        self, name: str, size_sectors: int | None = None, passphrase: Passphrase | None = None
    ) -> None:
        """Grow (or set) the mapping's size; by default it follows the underlying device.

        A passphrase is needed only when the key was put in the kernel keyring at open; ours is not.
        """
        args: list[str | SecretPipe] = ["resize"]
        if size_sectors is not None:
            args += ["--size", str(size_sectors)]
        if passphrase is not None:
            args.append("--key-file=-")
        args.append(name)
        try:
            self._run("resize", args, passphrase=passphrase)
        except LuksError as exc:
            # cryptsetup says nothing when it cannot read the header of the device under the mapping.
            device = None
            with contextlib.suppress(LuksError):
                device = self.status(name).device
            raise _device_fault(exc, device) from None
        log.info("resized %s", mapper_path(name))

    def add_key(self, device: str, passphrase: Passphrase, new_passphrase: Passphrase, slot: int) -> None:
        """Add new_passphrase in the given (free) slot, authorised by an existing passphrase."""
        if not 0 <= slot <= 31:
            raise KeySlotError(f"luksAddKey: slot {slot} out of range 0-31")
        # Our KDF settings for the new slot too, or cryptsetup would benchmark argon2 with its RAM-sized
        # default (see options.py).
        args: list[str | SecretPipe] = [
            "luksAddKey", "--batch-mode", "--key-file=-", "--key-slot", str(slot),
            *FormatOptions().pbkdf_args(), device, SecretPipe(_bytes(new_passphrase)),
        ]  # fmt: skip
        self._run("luksAddKey", args, passphrase=passphrase)
        log.info("added a key in slot %d of %s", slot, device)

    def kill_slot(self, device: str, slot: int, remaining_passphrase: Passphrase) -> None:
        """Wipe a key slot. remaining_passphrase must open another slot, so access is never lost."""
        opened = self.verify_passphrase(device, remaining_passphrase)
        if opened == slot:
            raise KeySlotError(
                f"luksKillSlot: refusing to wipe slot {slot}: the remaining passphrase opens only that "
                "slot, and the volume would be locked out"
            )
        self._run(
            "luksKillSlot",
            ["luksKillSlot", "--batch-mode", "--key-file=-", device, str(slot)],
            passphrase=remaining_passphrase,
        )
        log.info("wiped key slot %d of %s", slot, device)

    def header_backup(self, device: str, file: str) -> None:
        """Write the device's LUKS header and key-slot area to file, which must not exist yet.

        The copy holds the key slots as they are on disk (each wrapped by its passphrase): no secret
        is in it that the device does not already hold.
        """
        self._run(
            "luksHeaderBackup", ["luksHeaderBackup", "--batch-mode", device, "--header-backup-file", file]
        )
        log.info("backed up the LUKS header of %s", device)

    def header_restore(self, device: str, file: str) -> None:
        """Write a header backup back onto device (replacing its header and key slots)."""
        self._run(
            "luksHeaderRestore", ["luksHeaderRestore", "--batch-mode", device, "--header-backup-file", file]
        )
        log.info("restored the LUKS header of %s", device)

    def active_slots(self, device: str) -> list[int]:
        """The key slots in use, in order."""
        return sorted(self.dump(device).keyslots)

    def dump(self, device: str) -> LuksHeader:
        """The device's LUKS2 header (no secrets: volume key and slot material are not dumped)."""
        meta = self._run("luksDump", ["luksDump", "--dump-json-metadata", device]).stdout
        text = self._run("luksDump", ["luksDump", device]).stdout
        return parse_dump(meta, text)


def _device_fault(error: LuksError, device: str | None) -> LuksError:
    """error naming device when it is an I/O error; or a LuksDeviceIOError when it is one cryptsetup gives
    for an unreadable device too (no message, or "not a valid LUKS device") and the device's first block
    cannot be read."""
    if device is None:
        return error
    if isinstance(error, LuksDeviceIOError):
        if device in str(error):
            return error
        # cryptsetup's words ("Device wipe error, offset 0.") do not say which device.
        named = LuksDeviceIOError(f"{error}; the device is {device}", returncode=error.returncode)
        named.stderr = error.stderr
        return named
    if type(error) not in (LuksError, NotLuksDevice):
        return error
    problem = read_error(device)
    if problem is None:
        return error
    fault = LuksDeviceIOError(
        f"{error}; I/O error from the device {device}: {problem}", returncode=error.returncode
    )
    fault.stderr = error.stderr  # already in the message
    return fault


def _same_device(backing: list[str], device: str) -> bool:
    """Whether device is the one a mapping sits on (backing: that device, then its image file if any)."""
    wanted = os.path.realpath(device)
    return wanted in (os.path.realpath(path) for path in backing)

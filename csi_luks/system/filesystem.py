"""Filesystems on block devices: probe (blkid), mkfs, mount, unmount, grow."""

from __future__ import annotations

import errno
import logging
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

from csi_luks import timing
from csi_luks.system import mount_syscalls
from csi_luks.system.device_io import DeviceIOError, read_error, reports_io_error
from csi_luks.system.fs_limits import raise_if_too_small
from csi_luks.system.programs import (
    BLKID,
    E2FSCK,
    FSTRIM,
    MKFS_EXT4,
    MKFS_XFS,
    MOUNT,
    RESIZE2FS,
    SYNC,
    UMOUNT,
    XFS_GROWFS,
    XFS_REPAIR,
)
from csi_luks.system.runner import CommandError, CommandResult, Runner

log = logging.getLogger(__name__)
SUPPORTED_FILESYSTEMS = ("ext4", "xfs")
_BLKID_NOTHING_FOUND = 2
_MAX_STACKED_MOUNTS = 16


@dataclass(frozen=True)
class Probe:
    """What blkid finds on a device: a filesystem, a LUKS header, a partition table, or nothing."""

    type: str | None  # e.g. "ext4", "xfs", "crypto_LUKS"
    partition_table: str | None = None
    uuid: str | None = None

    @property
    def empty(self) -> bool:
        return self.type is None and self.partition_table is None

    @property
    def is_luks(self) -> bool:
        return self.type == "crypto_LUKS"


_E2FSCK_OPERATIONAL = 8  # e.g. no superblock anywhere it looked
_E2FSCK_FROM_BACKUP = "trying backup blocks"


@dataclass(frozen=True)
class Check:
    """What a read-only filesystem check found."""

    clean: bool
    summary: str  # the checker's verdict, with the command an operator repeats to repair
    output: str


class Filesystems:
    def __init__(self, runner: Runner | None = None) -> None:
        self.runner = runner or Runner()

    def probe(self, device: str) -> Probe:
        # -p: low-level probing of the device itself, bypassing blkid's cache (which may be stale).
        result = self.runner.run(
            [BLKID, "-p", "-o", "export", "-s", "TYPE", "-s", "PTTYPE", "-s", "UUID", device], check=False
        )
        if result.returncode == _BLKID_NOTHING_FOUND:
            problem = read_error(device)
            if problem is not None:  # blkid finds "nothing" on a device it cannot read, too
                raise DeviceIOError(f"probing {device}: I/O error from the device: {problem}")
            return Probe(type=None)
        if result.returncode != 0:
            self._run_on(device, "probing", [BLKID, "-p", device])  # raises with blkid's own message
        values = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
        return Probe(type=values.get("TYPE"), partition_table=values.get("PTTYPE"), uuid=values.get("UUID"))

    def mkfs(self, device: str, fstype: str) -> str:
        """Make the filesystem; its UUID, chosen here so that no probe has to read it back."""
        if fstype not in SUPPORTED_FILESYSTEMS:
            raise ValueError(f"filesystem {fstype!r} is not supported; use one of {SUPPORTED_FILESYSTEMS}")
        filesystem_uuid = str(uuid.uuid4())
        # ext4: no lazy init, so the volume's first minutes are not spent zeroing inode tables in the
        # background; the device is fresh ciphertext either way.
        args = [MKFS_EXT4, "-q", "-F", "-U", filesystem_uuid, "-E", "lazy_itable_init=0,lazy_journal_init=0"]
        if fstype == "xfs":
            args = [MKFS_XFS, "-q", "-m", f"uuid={filesystem_uuid}"]
        try:
            self._run_on(device, f"mkfs.{fstype}", [*args, device], timeout=600)
        except CommandError as exc:
            raise_if_too_small(device, fstype, exc)  # below mkfs's minimum: OUT_OF_RANGE, not INTERNAL
            raise
        return filesystem_uuid

    def mount(
        self, source: str, target: str, fstype: str | None = None, options: list[str] | None = None
    ) -> None:
        """Mount by system call where mount(8) would make just that one; otherwise, or where the kernel
        refuses, by mount(8), whose error (the node service reads it) is then the caller's."""
        Path(target).mkdir(parents=True, exist_ok=True)
        args = [MOUNT]
        if fstype:
            args += ["-t", fstype]
        if options:
            args += ["-o", ",".join(options)]
        if not self._mounted_by_system_call(source, target, fstype, options or []):
            self.runner.run([*args, source, target])

    def bind_mount(self, source: str, target: str, readonly: bool, target_is_file: bool = False) -> None:
        """Bind source (a directory, or a block device onto a file) at target; idempotent."""
        path = Path(target)
        if target_is_file:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(exist_ok=True)
        else:
            path.mkdir(parents=True, exist_ok=True)
        if self.is_mounted(target):
            if readonly and not os.statvfs(target).f_flag & os.ST_RDONLY:
                # A read-only bind is two system calls: a crash between them left it writable. Finish it.
                self.runner.run([MOUNT, "-o", "remount,bind,ro", target])
            return
        options = ["bind,ro" if readonly else "bind"]
        if not self._mounted_by_system_call(source, target, None, options):
            self.runner.run([MOUNT, "-o", *options, source, target])

    def _mounted_by_system_call(
        self, source: str, target: str, fstype: str | None, options: list[str]
    ) -> bool:
        """Whether mount(2) mounted it: only options that are kernel flags, and a type unless a bind."""
        flags = mount_syscalls.kernel_flags(options)
        if flags is None or not (fstype or flags & mount_syscalls.MS_BIND):
            return False
        try:
            with timing.system_call("mount(2)"):
                mount_syscalls.mount(source, target, fstype, flags)
        except OSError as exc:
            log.debug("mount(2) of %s at %s failed (%s); running mount", source, target, exc)
            return False
        return True

    def check(self, device: str, fstype: str) -> Check:
        """Check the filesystem on device read-only (nothing is written): e2fsck -n, trying ext4's backup
        superblocks when the primary is gone, or xfs_repair -n."""
        if fstype == "xfs":
            result = self.runner.run([XFS_REPAIR, "-n", device], check=False, timeout=3600)
            output = f"{result.stdout}{result.stderr}"
            if result.returncode == 0:
                return Check(True, "xfs_repair -n found no problem", output)
            return Check(
                False,
                f"xfs_repair -n found problems (exit {result.returncode}): repair with `xfs_repair {device}`",
                output,
            )
        if fstype != "ext4":
            raise ValueError(f"filesystem {fstype!r} is not supported; use one of {SUPPORTED_FILESYSTEMS}")
        # e2fsck tries the backup superblocks by itself when the primary is unreadable, and says so.
        result = self.runner.run([E2FSCK, "-n", "-f", device], check=False, timeout=3600)
        output = f"{result.stdout}{result.stderr}"
        from_backup = _E2FSCK_FROM_BACKUP in output
        if result.returncode == 0 and not from_backup:
            return Check(True, "e2fsck -n found no problem", output)
        if result.returncode & _E2FSCK_OPERATIONAL:
            return Check(
                False,
                f"no ext4 superblock found, neither the primary nor a backup (exit {result.returncode})",
                output,
            )
        where = (
            "the primary superblock is damaged; e2fsck read a backup one" if from_backup else "errors found"
        )
        return Check(False, f"{where}: repair with `e2fsck -f -y {device}` (or -b 8193 / -b 32768)", output)

    def device_size(self, device: str) -> int:
        fd = os.open(device, os.O_RDONLY)
        try:
            return os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)

    def unmount(self, target: str, lazy: bool = False) -> None:
        """Unmount target until nothing is mounted there: a mount stacked on ours (a repeated bind, a
        mount a crash left under a retried one) would otherwise keep the path busy.

        lazy: detach the mounts from the tree now, the kernel lets go of them when no process uses them.
        """
        for _ in range(_MAX_STACKED_MOUNTS):
            if not self.is_mounted(target):
                return
            try:
                with timing.system_call("umount2(2)"):
                    mount_syscalls.unmount(target, lazy)
                continue
            except OSError as exc:
                log.debug("umount2 of %s failed (%s); running umount", target, exc)
            self.runner.run([UMOUNT, "--lazy", target] if lazy else [UMOUNT, target])
        raise OSError(errno.EBUSY, f"still mounted after {_MAX_STACKED_MOUNTS} unmounts", target)

    def is_mounted(self, target: str) -> bool:
        try:
            os.lstat(target)
        except FileNotFoundError:
            return False  # nothing there to be mounted on (a first stage's new staging path): no table read
        except OSError:
            pass  # a mount whose filesystem fails its stat is still in the table
        wanted = os.path.realpath(target)
        with open("/proc/self/mountinfo") as mountinfo:
            return any(_mountinfo_path(line.split()[4]) == wanted for line in mountinfo)

    def grow(self, device: str, mountpoint: str, fstype: str) -> None:
        """Grow a mounted filesystem to fill its (already grown) device."""
        if fstype == "xfs":
            self._run_on(device, "growing the filesystem (xfs_growfs)", [XFS_GROWFS, mountpoint], timeout=600)
        else:
            self._run_on(device, "growing the filesystem (resize2fs)", [RESIZE2FS, device], timeout=600)

    def trim(self, mountpoint: str, device: str) -> int:
        """fstrim: discard the mounted filesystem's free blocks; the bytes it reports trimmed (what the
        filesystem passed down, not what the storage freed).

        The filesystem is synced first (`sync -f`, a journal commit): ext4 gives a deleted file's blocks
        back to the free-space map fstrim reads only when the transaction that freed them commits (up to
        5 s later), so an fstrim right after a delete would skip them."""
        self._run_on(device, "committing the filesystem's journal (sync -f)", [SYNC, "-f", mountpoint],
                     timeout=600)  # fmt: skip
        result = self._run_on(
            device, "discarding free blocks (fstrim)", [FSTRIM, "-v", mountpoint], timeout=3600
        )
        match = re.search(r"\((\d+) bytes\) trimmed", result.stdout)
        return int(match.group(1)) if match else 0

    def _run_on(self, device: str, step: str, argv: list[str], timeout: float | None = None) -> CommandResult:
        """Run a command on device; a failure the device's I/O errors caused is a DeviceIOError."""
        try:
            return self.runner.run(argv, timeout=timeout)
        except CommandError as exc:
            if reports_io_error(f"{exc.stderr}\n{exc.stdout}"):
                raise DeviceIOError(f"{step} {device}: I/O error from the device: {exc}") from exc
            raise


def _mountinfo_path(field: str) -> str:
    """A mount point as mountinfo writes it, decoded: the kernel escapes space, tab, newline and backslash
    as octal (a staging path "a b" is "a\\040b" there), which a plain comparison never matches."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)

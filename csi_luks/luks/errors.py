"""Typed failures of the LUKS engine. Messages carry cryptsetup's stderr, already redacted."""

from __future__ import annotations

from csi_luks.system.device_io import DeviceIOError


class LuksError(Exception):
    """A cryptsetup operation failed."""

    def __init__(self, message: str, *, stderr: str = "", returncode: int | None = None) -> None:
        self.stderr = stderr
        self.returncode = returncode
        detail = stderr.strip()
        super().__init__(f"{message}: {detail}" if detail else message)


class WrongPassphrase(LuksError):
    """No key slot opens with the given passphrase."""


class NotLuksDevice(LuksError):
    """The device holds no LUKS header."""


class DeviceNotFound(LuksError):
    """The device (or the mapping) does not exist or cannot be accessed."""


class DeviceBusy(LuksError):
    """The device or mapping is in use (mounted, held open, or the name is taken)."""


class CryptsetupMissing(LuksError):
    """The cryptsetup binary is not installed on this machine."""


class CryptsetupTimeout(LuksError):
    """cryptsetup ran past its deadline and was killed."""


class KeySlotError(LuksError):
    """A key-slot change was refused (slot in use, out of range, or it would lock the volume out)."""


class DeviceMapperUnavailable(LuksError):
    """The kernel has no device-mapper (dm_mod/dm_crypt not loaded, or /dev/mapper/control missing)."""


class LuksDeviceIOError(LuksError, DeviceIOError):
    """The device returned I/O errors to cryptsetup (the storage failed, not the LUKS operation)."""


class CipherUnavailable(LuksError):
    """The kernel cannot run the cipher (and key size) asked for; luksFormat checks before writing."""

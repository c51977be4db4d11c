"""The LUKS engine: a typed wrapper around the cryptsetup CLI."""

from csi_luks.luks.cryptsetup import Cryptsetup, Passphrase
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
from csi_luks.luks.naming import mapper_name, mapper_path
from csi_luks.luks.options import FormatOptions, OpenOptions
from csi_luks.luks.status import KeySlot, LuksHeader, MappingStatus

__all__ = [
    "CipherUnavailable",
    "Cryptsetup",
    "CryptsetupMissing",
    "CryptsetupTimeout",
    "DeviceBusy",
    "DeviceMapperUnavailable",
    "DeviceNotFound",
    "FormatOptions",
    "KeySlot",
    "KeySlotError",
    "LuksDeviceIOError",
    "LuksError",
    "LuksHeader",
    "MappingStatus",
    "NotLuksDevice",
    "OpenOptions",
    "Passphrase",
    "WrongPassphrase",
    "mapper_name",
    "mapper_path",
]

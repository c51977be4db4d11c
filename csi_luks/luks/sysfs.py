"""Device-mapper devices as sysfs shows them: no process, no privileges.

/sys/block/dm-N/dm/name is the mapping's name (/dev/mapper/NAME), dm/uuid the UUID its maker gave it
(cryptsetup's: `CRYPT-<type>-<header UUID without dashes>-<name>`, e.g. CRYPT-LUKS2-...), and slaves/
holds one entry per device its table uses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SYS_BLOCK = Path("/sys/block")
CRYPT_UUID_PREFIX = "CRYPT-"  # every mapping cryptsetup makes (LUKS1, LUKS2, plain, ...)


@dataclass(frozen=True)
class DmDevice:
    """One device-mapper device."""

    name: str  # the mapping's name
    device: str  # the kernel's, e.g. dm-3
    uuid: str  # "" when its maker gave none
    slaves: tuple[str, ...]  # kernel names of the devices its table uses, e.g. ("loop0",)

    @property
    def is_crypt(self) -> bool:
        return self.uuid.startswith(CRYPT_UUID_PREFIX)


def dm_devices(sys_block: Path = SYS_BLOCK) -> dict[str, str]:
    """name -> dm-N of every device-mapper device; OSError when sys_block cannot be listed."""
    devices = {}
    for entry in os.scandir(sys_block):
        if entry.name.startswith("dm-"):
            name = _read(sys_block / entry.name / "dm" / "name")
            if name is not None:  # None: removed meanwhile
                devices[name] = entry.name
    return devices


def find_dm_device(name: str, sys_block: Path = SYS_BLOCK) -> DmDevice | None:
    """The device-mapper device named NAME, None if there is none; OSError when sys_block cannot be
    listed, or the device's table cannot be read (so that the caller asks device-mapper itself)."""
    device = dm_devices(sys_block).get(name)
    if device is None:
        return None
    uuid = _read(sys_block / device / "dm" / "uuid")
    try:
        slaves = tuple(sorted(os.listdir(sys_block / device / "slaves")))
    except FileNotFoundError:
        return None  # removed meanwhile
    return DmDevice(name=name, device=device, uuid=uuid or "", slaves=slaves)


def loop_backing_file(device: str, sys_block: Path = SYS_BLOCK) -> str | None:
    """The image file behind loop device `device` (a kernel name, e.g. loop0), None if it has none."""
    return _read(sys_block / device / "loop" / "backing_file")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().rstrip("\n")
    except OSError:
        return None

"""Stale mappings: dm-crypt mappings of ours whose backing device is gone (rbd unmapped, nbd disconnected).

Read from sysfs only, no process: NodeGetVolumeStats asks on every call and the metrics on every scrape.
device-mapper lists each device a table uses under /sys/block/dm-N/slaves/ and names dm-N under that
device's holders/. The device a mapping was made on is gone when the link leads nowhere (its disk was
deleted), when the device there no longer names dm-N as a holder (deleted, and its name reused by a new
device), when it has size 0 (nbd disconnected), or, for a loop device, when its image file was deleted or
it has no image at all.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from csi_luks.luks.naming import MAPPER_PREFIX
from csi_luks.luks.sysfs import SYS_BLOCK, dm_devices
from csi_luks.system.loop import DELETED_MARK

log = logging.getLogger(__name__)

_RESTAGE = "unstage and restage the volume"


@dataclass(frozen=True)
class StaleMapping:
    """A mapping whose backing device is gone, and why, in words an operator can act on."""

    name: str  # the mapping's name (/dev/mapper/NAME)
    device: str  # the dm device, e.g. dm-3
    problem: str  # what happened to the backing device, and what to do

    @property
    def message(self) -> str:
        return f"dm-crypt mapping {self.name} {self.problem}"


class StaleMappings:
    """Finds our mappings (names with the mapper prefix) whose backing device is gone."""

    def __init__(
        self,
        sys_block: Path = SYS_BLOCK,
        prefix: str = MAPPER_PREFIX,
        is_ours: Callable[[str], bool] | None = None,
    ) -> None:
        """is_ours: whether a mapping name (prefix included) is one of this plugin's volumes; by default
        every name with the prefix is."""
        self.sys_block = sys_block
        self.prefix = prefix
        self.is_ours = is_ours or (lambda _name: True)

    def find(self) -> list[StaleMapping]:
        """Every stale mapping of ours, by name."""
        found = []
        for name, device in sorted(self._mappings().items()):
            problem = self._problem(device)
            if problem is not None:
                found.append(StaleMapping(name, device, problem))
        return found

    def check(self, name: str) -> StaleMapping | None:
        """The mapping NAME if it exists and is stale; None if it is healthy or does not exist."""
        device = self._mappings().get(name)
        if device is None:
            return None
        problem = self._problem(device)
        return None if problem is None else StaleMapping(name, device, problem)

    def _mappings(self) -> dict[str, str]:
        """name -> dm-N of each mapping of ours."""
        try:
            devices = dm_devices(self.sys_block)
        except OSError:
            return {}
        return {
            name: device
            for name, device in devices.items()
            if name.startswith(self.prefix) and self.is_ours(name)
        }

    def _problem(self, device: str) -> str | None:
        slaves = self.sys_block / device / "slaves"
        try:
            backing = sorted(os.listdir(slaves))
        except FileNotFoundError:
            return None  # the mapping was removed meanwhile: not stale, gone
        except OSError as exc:
            log.warning("cannot read %s: %s", slaves, exc.strerror)
            return None
        if not backing:
            return f"has no backing device left; {_RESTAGE}"
        for slave in backing:
            problem = _backing_problem(slaves / slave, slave, device)
            if problem is not None:
                return problem
        return None


def _backing_problem(link: Path, slave: str, holder: str) -> str | None:
    path = f"/dev/{slave}"
    target = Path(os.path.realpath(link))
    if not target.is_dir():
        return f"has lost its backing device {path} ({_how_lost(slave)}?); {_RESTAGE}"
    if not (target / "holders" / holder).exists():
        return f"has lost its backing device {path} ({_how_lost(slave)}?; the name is reused); {_RESTAGE}"
    if _read(target / "size") == "0":
        return f"has lost its backing device {path} (size 0: {_how_lost(slave)}?); {_RESTAGE}"
    if slave.startswith("loop"):
        image = _read(target / "loop" / "backing_file")
        if image is None:
            return f"has lost its backing device {path} (the loop device has no image file); {_RESTAGE}"
        if image.endswith(DELETED_MARK):
            return (
                f"is on {path}, whose image file {image.removesuffix(DELETED_MARK)} was deleted: copy the "
                "data off before unstaging, the device is the last reference to it"
            )
    return None


def _how_lost(slave: str) -> str:
    if slave.startswith("rbd"):
        return "unmapped"
    if slave.startswith("nbd"):
        return "disconnected"
    return "detached"


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None

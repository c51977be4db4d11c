"""Loop devices over image files (losetup), found again after a restart from the kernel's own table."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from csi_luks.system.programs import LOSETUP
from csi_luks.system.runner import Runner

SYS_BLOCK = Path("/sys/block")
DELETED_MARK = " (deleted)"  # the kernel's mark on a backing file that was unlinked while attached


class LoopDevices:
    def __init__(self, runner: Runner | None = None, sys_block: Path = SYS_BLOCK) -> None:
        self.runner = runner or Runner()
        self.sys_block = sys_block

    def find(self, backing_file: str) -> str | None:
        """The loop device backing_file is attached to, if any (no in-memory state needed)."""
        wanted = os.path.realpath(backing_file)
        for device, back in self._table():
            back = back.removesuffix(DELETED_MARK)
            if back and os.path.realpath(back) == wanted:
                return device
        return None

    def _table(self) -> Iterator[tuple[str, str]]:
        """(device, backing file) of each attached loop device.

        Read from sysfs, where losetup reads it too, without a process per call (DeleteVolume asks twice);
        through losetup where /sys/block cannot be listed.
        """
        try:
            names = sorted(e.name for e in os.scandir(self.sys_block) if e.name.startswith("loop"))
        except OSError:
            listing = self.runner.run([LOSETUP, "--list", "--json", "--output", "NAME,BACK-FILE"]).stdout
            for device in json.loads(listing or '{"loopdevices": []}').get("loopdevices", []):
                yield str(device["name"]), device.get("back-file") or ""
            return
        for name in names:
            try:
                back = (self.sys_block / name / "loop" / "backing_file").read_text().rstrip("\n")
            except OSError:
                continue  # not attached (no loop/ directory), or detached meanwhile
            yield f"/dev/{name}", back

    def attach(self, backing_file: str) -> str:
        """Attach (idempotently) and return the device path."""
        existing = self.find(backing_file)
        if existing:
            return existing
        # Direct I/O: a write the storage refuses fails the writer (luksFormat, mkfs) at once. Buffered, the
        # loop device's writes land in the backing file's page cache and a failed writeback is lost
        # (cryptsetup ignores the fsync error): luksFormat "succeeds" with no header on the disk.
        direct_io = ["--direct-io=on"] if _opens_for_direct_io(backing_file) else []
        return self.runner.run([LOSETUP, "--find", "--show", *direct_io, backing_file]).stdout.strip()

    def detach(self, device: str) -> None:
        self.runner.run([LOSETUP, "--detach", device])

    def refresh_size(self, device: str) -> None:
        """Make the loop device pick up a grown backing file."""
        self.runner.run([LOSETUP, "--set-capacity", device])


def _opens_for_direct_io(path: str) -> bool:
    """Whether path opens with O_DIRECT, as losetup --direct-io=on opens it (tmpfs before Linux 6.6 refuses
    with EINVAL, and losetup would then fail instead of falling back to buffered I/O)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return False  # losetup's own open reports a missing or unreadable file
    os.close(fd)
    return True

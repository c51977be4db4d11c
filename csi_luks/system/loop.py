"""Loop devices over image files (losetup), found again after a restart from the kernel's own table."""

from __future__ import annotations

import json
import os

from csi_luks.system.programs import LOSETUP
from csi_luks.system.runner import Runner


class LoopDevices:
    def __init__(self, runner: Runner | None = None) -> None:
        self.runner = runner or Runner()

    def find(self, backing_file: str) -> str | None:
        """The loop device backing_file is attached to, if any (no in-memory state needed)."""
        listing = self.runner.run([LOSETUP, "--list", "--json", "--output", "NAME,BACK-FILE"]).stdout
        wanted = os.path.realpath(backing_file)
        for device in json.loads(listing or '{"loopdevices": []}').get("loopdevices", []):
            back = (device.get("back-file") or "").removesuffix(" (deleted)")
            if back and os.path.realpath(back) == wanted:
                return str(device["name"])
        return None

    def attach(self, backing_file: str) -> str:
        """Attach (idempotently) and return the device path."""
        existing = self.find(backing_file)
        if existing:
            return existing
        return self.runner.run([LOSETUP, "--find", "--show", backing_file]).stdout.strip()

    def detach(self, device: str) -> None:
        self.runner.run([LOSETUP, "--detach", device])

    def refresh_size(self, device: str) -> None:
        """Make the loop device pick up a grown backing file."""
        self.runner.run([LOSETUP, "--set-capacity", device])

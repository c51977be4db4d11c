"""A device-mapper device between a volume's image and the loop device NodeStage attaches, to make the
storage under a volume fail or slow down without any test hook in the product: the image is renamed
beside itself and attached to a loop device of our own, a dm device (`linear`) maps that loop, and the
image path becomes a symlink to /dev/mapper/<dm device>, so the plugin's losetup builds the volume's loop
over the dm device. Loading another table (`error`, `flakey`, `delay`) changes what the storage does;
`linear` again restores it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

SECTOR = 512


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=120).stdout.strip()


@dataclass
class FaultLayer:
    """A dm device under one volume's loop device (see the module's docstring)."""

    image: Path
    name: str
    loop: str = ""

    @property
    def real(self) -> Path:
        return self.image.with_name("volume.real.img")

    def install(self) -> None:
        self.image.rename(self.real)
        self.loop = _run("losetup", "--find", "--show", str(self.real))
        _run("dmsetup", "create", self.name, "--table", self._linear())
        self.image.symlink_to(f"/dev/mapper/{self.name}")

    def _sectors(self) -> int:
        return int(_run("blockdev", "--getsz", self.loop))

    def _linear(self) -> str:
        return f"0 {self._sectors()} linear {self.loop} 0"

    def _load(self, table: str) -> None:
        os.sync()
        _run("dmsetup", "suspend", self.name)
        _run("dmsetup", "load", self.name, "--table", table)
        _run("dmsetup", "resume", self.name)
        # Cached pages would hide a read fault from a device attached since before it.
        Path("/proc/sys/vm/drop_caches").write_text("3\n")

    def clear(self) -> None:
        self._load(self._linear())

    def fail_all(self) -> None:
        self._load(f"0 {self._sectors()} error")

    def delay_writes(self, milliseconds: int) -> None:
        """Every write waits that long in the device (dm-delay); reads do not."""
        self._load(f"0 {self._sectors()} delay {self.loop} 0 0 {self.loop} 0 {milliseconds}")

    def fail_writes(self, from_sector: int = 0) -> None:
        """Writes from from_sector on fail; reads, and writes before it, work."""
        sectors = self._sectors()
        flakey = f"{from_sector} {sectors - from_sector} flakey {self.loop} {from_sector} 0 1 1 error_writes"
        self._load(f"0 {from_sector} linear {self.loop} 0\n{flakey}" if from_sector else flakey)

    @contextmanager
    def image_in_place(self) -> Iterator[None]:
        """The real image at its path meanwhile (ControllerExpandVolume grows that file), then the dm device
        grown to its new size."""
        self.image.unlink()
        self.real.rename(self.image)
        try:
            yield
        finally:
            self.image.rename(self.real)
            self.image.symlink_to(f"/dev/mapper/{self.name}")
            _run("losetup", "--set-capacity", self.loop)
            self.clear()

    def digest(self) -> str:
        return hashlib.sha256(self.real.read_bytes()).hexdigest()

    def remove(self) -> None:
        with suppress(subprocess.CalledProcessError):
            self.clear()
        if self.image.is_symlink():
            self.image.unlink()
            self.real.rename(self.image)
        subprocess.run(["dmsetup", "remove", self.name], check=False, timeout=120)
        subprocess.run(["losetup", "--detach", self.loop], check=False, timeout=120)

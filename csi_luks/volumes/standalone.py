"""The standalone backend: each volume a sparse image file plus a metadata file, attached as a loop device.

For a single machine (and the demo). Layout: <state_dir>/volumes/<id>/{volume.img, meta.json, .lock}.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from csi_luks.system.loop import LoopDevices
from csi_luks.volumes.base import (
    BackendUnavailable,
    VolumeBackend,
    VolumeInfo,
    VolumeInUse,
    VolumeNotFound,
)

_NAMESPACE = uuid.UUID("6f1c1e52-4b0e-4c8e-9f5e-3f1d2a7c9b10")
_ID = re.compile(r"^sa-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
IMAGE, META, LOCK = "volume.img", "meta.json", ".lock"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes) -> None:
    """Temp file in the same directory, fsync, rename, fsync the directory: old or new, never torn."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    _fsync_dir(path.parent)


class StandaloneBackend(VolumeBackend):
    def __init__(self, state_dir: Path | str, loops: LoopDevices | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.loops = loops or LoopDevices()

    # --- paths ---------------------------------------------------------------------------------------

    @property
    def _volumes(self) -> Path:
        return self.state_dir / "volumes"

    def _dir(self, volume_id: str) -> Path:
        # Never build a path from an id we did not make: "../../etc" is simply not a volume.
        if not _ID.match(volume_id):
            raise VolumeNotFound(f"{volume_id!r} is not a standalone volume id")
        return self._volumes / volume_id

    def image_path(self, volume_id: str) -> Path:
        return self._dir(volume_id) / IMAGE

    @contextlib.contextmanager
    def _locked(self, volume_id: str) -> Iterator[Path]:
        """Serialise metadata read-modify-write across processes (controller and node may be two)."""
        directory = self._dir(volume_id)
        try:
            fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        except FileNotFoundError:
            raise VolumeNotFound(f"volume {volume_id} does not exist") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield directory
        finally:
            os.close(fd)

    def _read_meta(self, directory: Path) -> dict[str, Any]:
        try:
            meta: dict[str, Any] = json.loads((directory / META).read_text())
        except FileNotFoundError:
            raise VolumeNotFound(f"volume {directory.name} does not exist") from None
        return meta

    def _write_meta(self, directory: Path, meta: Mapping[str, Any]) -> None:
        write_atomically(directory / META, json.dumps(meta, sort_keys=True).encode())

    # --- the interface -------------------------------------------------------------------------------

    def volume_id_for(self, name: str) -> str:
        return f"sa-{uuid.uuid5(_NAMESPACE, name)}"

    def create(self, volume_id: str, name: str, size_bytes: int, metadata: Mapping[str, str]) -> VolumeInfo:
        if size_bytes <= 0:
            raise ValueError("size must be positive")
        directory = self._dir(volume_id)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BackendUnavailable(f"cannot create {directory}: {exc.strerror}") from exc
        with self._locked(volume_id):
            if not (directory / META).exists():
                self._write_meta(directory, {"name": name, "size": size_bytes, "metadata": dict(metadata)})
            meta = self._read_meta(directory)
            # A crash may have come before the image was made (or fully sized): finish the job.
            image = directory / IMAGE
            with open(image, "ab") as f:
                if os.fstat(f.fileno()).st_size < meta["size"]:
                    f.truncate(meta["size"])
                    os.fsync(f.fileno())
        return self.get(volume_id)

    def get(self, volume_id: str) -> VolumeInfo:
        directory = self._dir(volume_id)
        meta = self._read_meta(directory)
        try:
            size = (directory / IMAGE).stat().st_size
        except FileNotFoundError:
            raise VolumeNotFound(f"volume {volume_id} has no image (its creation did not finish)") from None
        return VolumeInfo(
            volume_id=volume_id, name=meta["name"], size_bytes=size, metadata=dict(meta["metadata"])
        )

    def list(self) -> list[VolumeInfo]:
        if not self._volumes.is_dir():
            return []
        found = []
        for entry in sorted(self._volumes.iterdir()):
            if _ID.match(entry.name):
                with contextlib.suppress(VolumeNotFound):
                    found.append(self.get(entry.name))
        return found

    def delete(self, volume_id: str) -> None:
        try:
            directory = self._dir(volume_id)
        except VolumeNotFound:
            return
        if not directory.exists():
            return
        if self.find_attachment(volume_id) is not None:
            raise VolumeInUse(f"volume {volume_id} is attached; detach it first")
        # The metadata goes first, so a crash mid-way leaves a torn directory that list() skips and a
        # retried delete removes.
        with contextlib.suppress(FileNotFoundError):
            (directory / META).unlink()
        shutil.rmtree(directory, ignore_errors=True)
        _fsync_dir(self._volumes)

    def resize(self, volume_id: str, size_bytes: int) -> int:
        with self._locked(volume_id) as directory:
            meta = self._read_meta(directory)
            if size_bytes > meta["size"]:
                meta["size"] = size_bytes
                self._write_meta(directory, meta)
            with open(directory / IMAGE, "r+b") as f:
                if os.fstat(f.fileno()).st_size < meta["size"]:
                    f.truncate(meta["size"])
                    os.fsync(f.fileno())
            return int(meta["size"])

    def set_metadata(self, volume_id: str, key: str, value: str) -> None:
        with self._locked(volume_id) as directory:
            meta = self._read_meta(directory)
            meta["metadata"][key] = value
            self._write_meta(directory, meta)

    def remove_metadata(self, volume_id: str, key: str) -> None:
        with self._locked(volume_id) as directory:
            meta = self._read_meta(directory)
            if meta["metadata"].pop(key, None) is not None:
                self._write_meta(directory, meta)

    def attach(self, volume_id: str) -> str:
        self.get(volume_id)
        return self.loops.attach(str(self.image_path(volume_id)))

    def find_attachment(self, volume_id: str) -> str | None:
        return self.loops.find(str(self.image_path(volume_id)))

    def detach(self, volume_id: str) -> None:
        device = self.find_attachment(volume_id)
        if device is not None:
            self.loops.detach(device)

    def refresh_attachment_size(self, volume_id: str) -> None:
        device = self.find_attachment(volume_id)
        if device is not None:
            self.loops.refresh_size(device)

    def free_bytes(self) -> int | None:
        try:
            stats = os.statvfs(self.state_dir if self.state_dir.exists() else self.state_dir.parent)
        except OSError as exc:
            raise BackendUnavailable(f"cannot read {self.state_dir}: {exc.strerror}") from exc
        return stats.f_bavail * stats.f_frsize

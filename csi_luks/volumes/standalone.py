"""The standalone backend: each volume a sparse image file plus a metadata file, attached as a loop device.

For a single machine (and the demo). Layout, under the state directory:

    volumes/<id>/volume.img   the volume's bytes (sparse)
    volumes/<id>/meta.json    {"name": ..., "size": ..., "metadata": {...}}; its presence makes the volume
    volumes/<id>/header.backup  the LUKS header backup of an encrypted volume (luksHeaderBackup's image)
    volumes/<id>/.lock        flock'ed around every read-modify-write (controller and node may be two
                              processes sharing the directory)

A copy (a snapshot, a clone, a restore) is `cp --reflink=auto --sparse=always` of the source image: an
instant, atomic copy-on-write clone where the file system supports it (XFS, btrfs), else a sparse copy,
which is point-in-time only if nothing writes to the source meanwhile.

Nothing is kept in memory: a new instance (a restarted plugin) finds volumes from the files and their
attachments from the kernel's loop table. Every step is crash safe: meta.json is replaced atomically, the
image appears at its full size in one rename, and a delete removes a volume in one rename.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import mmap
import os
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from csi_luks.crash import Step
from csi_luks.quoting import quoted
from csi_luks.system.loop import LoopDevices, backing_file_id
from csi_luks.system.programs import CP
from csi_luks.system.runner import CommandError, Runner
from csi_luks.volumes.base import (
    BackendUnavailable,
    CapacityOutOfRange,
    HeaderImage,
    MalformedId,
    VolumeBackend,
    VolumeBackendError,
    VolumeInfo,
    VolumeInUse,
    VolumeNotFound,
    header_chunks,
)

log = logging.getLogger(__name__)

# Fixed forever: every existing volume id was derived from it.
_NAMESPACE = uuid.UUID("6f1c1e52-4b0e-4c8e-9f5e-3f1d2a7c9b10")
_VOLUME_PREFIX, _SNAPSHOT_PREFIX = "sa-", "sa-snap-"  # disjoint: a name never gives both kinds one id
# Matched with fullmatch ("$" would accept a trailing newline). Snapshots made before the prefixes were
# split have volume-form ids, which stay valid.
_ID = re.compile(r"sa-(snap-)?[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
IMAGE, META, LOCK, HEADER_BACKUP = "volume.img", "meta.json", ".lock", "header.backup"
# A deleted volume's directory is renamed to this prefix, then removed; never a volume id (leading dot).
_TRASH = ".deleted-"
# create() retries when a concurrent delete removes the directory between its mkdir and its lock.
_CREATE_ATTEMPTS = 5


class _DirectoryGone(VolumeNotFound):
    """The volume directory vanished (or was never made) before its lock could be taken."""


class _CorruptMetadata(VolumeBackendError):
    """meta.json exists but is not what this backend writes."""


def _unavailable(exc: OSError, path: Path, doing: str) -> BackendUnavailable:
    return BackendUnavailable(f"standalone backend: cannot {doing} {path}: {exc.strerror or exc}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[tuple[int, str]]:
    """A new file beside path (mode 0600: DEKs live here), its fd and name for the block to fill, fsync
    and close; then renamed over path and the directory fsynced: old or new, never torn. A block that
    fails leaves path as it was and no temporary file."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        yield fd, temp
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    _fsync_dir(path.parent)


def write_atomically(path: Path, data: bytes) -> None:
    """data in place of path's content, atomically (_replacing)."""
    with _replacing(path) as (fd, _), os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_streamed_atomically(path: Path, chunks: Iterable[bytes | memoryview]) -> None:
    """write_atomically, for content given in chunks (each written before the next is asked for), past
    the page cache: direct I/O where the file system allows it, so that a 16 MiB header backup is never
    held in memory, cached or dirty, while 16 stages write theirs at once."""
    with _replacing(path) as (fd, _), contextlib.closing(_DirectWriter(fd)) as writer:
        for chunk in chunks:
            writer.write(chunk)
        os.fsync(fd)


class _DirectWriter:
    """Writes to fd through a page-aligned buffer with O_DIRECT; buffered where the file system refuses
    O_DIRECT or a chunk is not a whole number of pages (then its pages are dropped once on disk)."""

    _BUFFER = 1 << 20

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffered = False
        self.offset = 0  # what is written: a direct write refused midway goes on buffered from here
        try:
            self.buffer = memoryview(mmap.mmap(-1, self._BUFFER))
        except BaseException:
            os.close(fd)
            raise
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
        except OSError:
            self.buffered = True

    def write(self, chunk: bytes | memoryview) -> None:
        view = memoryview(chunk).cast("B")
        while view:
            part, view = view[: self._BUFFER], view[self._BUFFER :]
            if not self.buffered and len(part) % mmap.PAGESIZE == 0:
                self.buffer[: len(part)] = part
                start = self.offset
                try:
                    self._write_all(self.buffer[: len(part)])
                    continue
                except OSError as exc:
                    if exc.errno != errno.EINVAL:  # EINVAL: this file system takes no direct writes
                        raise
                part = part[self.offset - start :]  # what the direct writes did not take
            self._go_buffered()
            self._write_all(part)

    def _write_all(self, data: memoryview) -> None:
        while data:
            written = os.pwrite(self.fd, data, self.offset)
            self.offset += written
            data = data[written:]

    def _go_buffered(self) -> None:
        if not self.buffered:
            fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            self.buffered = True

    def close(self) -> None:
        """Close the file, dropping what buffered writes left cached (a hint: call it after the fsync)."""
        try:
            if self.buffered:
                with contextlib.suppress(OSError):
                    os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(self.fd)


@dataclass
class _Meta:
    name: str
    size: int  # the size the image must have at least (create's size, raised by resize)
    metadata: dict[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        return json.dumps(
            {"name": self.name, "size": self.size, "metadata": self.metadata}, sort_keys=True, indent=1
        ).encode()

    @classmethod
    def decode(cls, path: Path, text: str) -> _Meta:
        try:
            raw: Any = json.loads(text)
        except ValueError as exc:
            raise _CorruptMetadata(f"{path} is not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise _CorruptMetadata(f"{path} does not hold a JSON object")
        name, size, metadata = raw.get("name"), raw.get("size", 0), raw.get("metadata", {})
        if (
            not isinstance(name, str)
            or not isinstance(size, int)
            or not isinstance(metadata, dict)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
        ):
            raise _CorruptMetadata(f"{path} is not standalone volume metadata")
        return cls(name=name, size=size, metadata=dict(metadata))


def _remove_tree(path: str) -> None:
    """rmtree that tolerates another delete sweeping the same trash concurrently."""

    def ignore_missing(func: Callable[..., Any], name: str, exc: BaseException) -> None:
        if not isinstance(exc, FileNotFoundError):
            raise exc

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=ignore_missing)
    else:
        shutil.rmtree(path, onerror=lambda func, name, info: ignore_missing(func, name, info[1]))


class StandaloneBackend(VolumeBackend):
    def __init__(
        self, state_dir: Path | str, loops: LoopDevices | None = None, runner: Runner | None = None
    ) -> None:
        # Absolute: the loop table records the backing file's path, and find() must match it from any cwd.
        self.state_dir = Path(os.path.abspath(state_dir))
        self.loops = loops if loops is not None else LoopDevices()
        self.runner = runner or Runner()

    # --- paths ---------------------------------------------------------------------------------------

    @property
    def _volumes(self) -> Path:
        return self.state_dir / "volumes"

    def _dir(self, volume_id: str) -> Path:
        # Never build a path from an id we did not make: "../../etc" is simply not a volume.
        self.check_id(volume_id)
        return self._volumes / volume_id

    def image_path(self, volume_id: str) -> Path:
        return self._dir(volume_id) / IMAGE

    def used_bytes(self, volume_id: str) -> int | None:
        """The sparse image's allocated blocks: a discard through the loop device punches holes in it."""
        self.check_id(volume_id)
        try:
            return os.stat(self.image_path(volume_id)).st_blocks * 512
        except FileNotFoundError:
            raise VolumeNotFound(f"volume {volume_id} does not exist") from None

    # --- locking and files ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, directory: Path) -> Iterator[None]:
        """Hold the volume's flock; _DirectoryGone if the directory does not exist (any more)."""
        lock = directory / LOCK
        while True:
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            except FileNotFoundError:
                raise _DirectoryGone(f"volume {directory.name} does not exist") from None
            except OSError as exc:
                raise _unavailable(exc, lock, "open") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                # A delete renames the directory away while holding this lock: whoever waited on the
                # old file must not go on in a directory that is no longer the volume's.
                held = os.fstat(fd)
                try:
                    now = os.stat(lock, follow_symlinks=False)
                except FileNotFoundError:
                    now = None
                if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                    yield
                    return
            finally:
                os.close(fd)

    @staticmethod
    def _read_meta(directory: Path) -> _Meta | None:
        """The volume's metadata, or None when there is none (no volume, or a torn create)."""
        path = directory / META
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _unavailable(exc, path, "read") from exc
        return _Meta.decode(path, text)

    @staticmethod
    def _write_meta(directory: Path, meta: _Meta) -> None:
        path = directory / META
        try:
            write_atomically(path, meta.encode())
        except OSError as exc:
            raise _unavailable(exc, path, "write") from exc

    def _info(self, volume_id: str, directory: Path) -> VolumeInfo:
        meta = self._read_meta(directory)
        if meta is None:
            raise VolumeNotFound(f"volume {volume_id} does not exist")
        image = directory / IMAGE
        try:
            size = image.stat().st_size
        except FileNotFoundError:
            # meta.json without an image: a CreateVolume that did not finish (its retry completes it).
            raise VolumeNotFound(f"volume {volume_id} does not exist (its creation did not finish)") from None
        except OSError as exc:
            raise _unavailable(exc, image, "stat") from exc
        return VolumeInfo(volume_id=volume_id, name=meta.name, size_bytes=size, metadata=dict(meta.metadata))

    def _make_dir(self, directory: Path) -> None:
        try:
            # Private all the way down (the README's promise): parents=True alone would make the state
            # directory itself with the umask's mode.
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._volumes.mkdir(mode=0o700, exist_ok=True)
            directory.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise _unavailable(exc, directory, "create") from exc

    def _make_image(self, directory: Path, size: int, source: Path | None = None) -> None:
        """A sparse image of the full size (a copy of source, grown), appearing in one rename."""
        image = directory / IMAGE
        for stale in directory.glob(f".{IMAGE}.*"):  # left by a crash in an earlier attempt
            stale.unlink(missing_ok=True)
        with _replacing(image) as (fd, temp):
            try:
                if source is not None:
                    self.runner.run(
                        [CP, "--reflink=auto", "--sparse=always", "--", str(source), temp], timeout=3600
                    )
                    size = max(size, os.stat(source).st_size)
                os.ftruncate(fd, size)
                os.fsync(fd)
            finally:
                os.close(fd)

    @staticmethod
    def _grow_image(image: Path, size: int) -> int:
        """Extend the image to size if it is smaller (sparse); returns its size afterwards."""
        fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
        try:
            current = os.fstat(fd).st_size
            if size > current:
                os.ftruncate(fd, size)
                os.fsync(fd)
                current = size
            return current
        finally:
            os.close(fd)

    def _sweep_trash(self) -> None:
        """Remove every directory of a deleted volume (left by a crash or a failure in an earlier delete).

        A scan of all volumes: only a delete that finds its volume gone already (a retry) pays for it.
        """
        try:
            trash = [e.path for e in os.scandir(self._volumes) if e.name.startswith(_TRASH)]
        except FileNotFoundError:
            return
        except OSError as exc:
            raise _unavailable(exc, self._volumes, "list") from exc
        for path in trash:
            self._remove_trash(path)

    @staticmethod
    def _remove_trash(path: str) -> None:
        try:
            _remove_tree(path)
        except OSError as exc:
            raise _unavailable(exc, Path(path), "remove") from exc

    # --- the interface -------------------------------------------------------------------------------

    def volume_id_for(
        self, name: str, parameters: Mapping[str, str], like: str | None = None, snapshot: bool = False
    ) -> str:
        return f"{_SNAPSHOT_PREFIX if snapshot else _VOLUME_PREFIX}{uuid.uuid5(_NAMESPACE, name)}"

    def check_id(self, object_id: str) -> None:
        if not _ID.fullmatch(object_id):
            raise MalformedId(f"{quoted(object_id)} is not a standalone volume or snapshot id")

    def check_capacity(self, size_bytes: int) -> None:
        """Thin provisioning: a sparse image may promise more than the free space, but never more than
        the whole file system holding it (it could never be filled) nor than one file may hold there.

        The file size limit is tried on an unnamed temporary file (O_TMPFILE where the file system has
        it) beside the images: the file system's own answer, and nothing is left behind, even by a crash.
        """
        super().check_capacity(size_bytes)
        where = self._nearest_dir()
        try:
            stats = os.statvfs(where)
        except OSError as exc:
            raise _unavailable(exc, where, "stat") from exc
        if size_bytes > stats.f_blocks * stats.f_frsize:
            raise CapacityOutOfRange(
                f"{size_bytes} bytes is more than the whole file system of {where} "
                f"({stats.f_blocks * stats.f_frsize} bytes)"
            )
        try:
            with tempfile.TemporaryFile(dir=where) as probe:
                os.ftruncate(probe.fileno(), size_bytes)
        except OSError as exc:
            if exc.errno in (errno.EFBIG, errno.EINVAL):
                raise CapacityOutOfRange(
                    f"{size_bytes} bytes is more than a file on the file system of {where} can hold"
                ) from None
            raise _unavailable(exc, where, "size a file in") from exc

    def create(
        self,
        volume_id: str,
        name: str,
        size_bytes: int,
        metadata: Mapping[str, str],
        source_id: str | None = None,
        parameters: Mapping[str, str] | None = None,
    ) -> VolumeInfo:
        if size_bytes <= 0:
            raise ValueError(f"a volume's size must be positive, not {size_bytes}")
        directory = self._dir(volume_id)
        source = None
        if source_id is not None:
            self.get(source_id)  # VolumeNotFound before anything is made
            source = self.image_path(source_id)
        for _ in range(_CREATE_ATTEMPTS):
            self._make_dir(directory)
            try:
                with self._locked(directory):
                    return self._complete(volume_id, directory, name, size_bytes, metadata, source)
            except _DirectoryGone:
                continue  # a concurrent delete removed the directory we just made: make it again
        raise VolumeBackendError(f"volume {volume_id} kept disappearing while being created")

    def _complete(
        self,
        volume_id: str,
        directory: Path,
        name: str,
        size_bytes: int,
        metadata: Mapping[str, str],
        source: Path | None,
    ) -> VolumeInfo:
        """Under the lock: create what is missing, in order (meta.json, a copy's header backup, then the
        image, whose presence completes the volume)."""
        image = directory / IMAGE
        try:
            meta = self._read_meta(directory)
            if meta is None or not image.exists():
                # No complete volume: nothing has used it, so (re)start from this request. An image
                # without meta.json is a leftover and is never handed out again.
                image.unlink(missing_ok=True)
                meta = _Meta(name=name, size=size_bytes, metadata=dict(metadata))
                with Step("standalone-create", "meta"):
                    self._write_meta(directory, meta)
                if source is not None and (source.parent / HEADER_BACKUP).exists():
                    # The copy's header is the source's: so is its backup. Before the image: a complete
                    # volume is never handed out without it.
                    with Step("standalone-create", "header-backup"):
                        write_atomically(
                            directory / HEADER_BACKUP, (source.parent / HEADER_BACKUP).read_bytes()
                        )
                with Step("standalone-create", "image"):
                    self._make_image(directory, meta.size, source)
            else:
                # An existing volume is returned unchanged; an image short of its recorded size (a crash
                # while growing it) is finished first.
                self._grow_image(image, meta.size)
        except OSError as exc:
            raise _unavailable(exc, directory, "create the volume in") from exc
        except CommandError as exc:
            raise VolumeBackendError(f"volume {volume_id}: copying {source} failed: {exc}") from exc
        return self._info(volume_id, directory)

    def get(self, volume_id: str) -> VolumeInfo:
        return self._info(volume_id, self._dir(volume_id))

    def list(self) -> list[VolumeInfo]:
        try:
            ids = sorted(e.name for e in os.scandir(self._volumes) if _ID.fullmatch(e.name))
        except FileNotFoundError:
            return []  # nothing was ever created
        except OSError as exc:
            raise _unavailable(exc, self._volumes, "list") from exc
        found = []
        for volume_id in ids:
            try:
                found.append(self._info(volume_id, self._volumes / volume_id))
            except VolumeNotFound:
                continue  # torn (creation or deletion in progress, or crashed)
            except _CorruptMetadata as exc:
                log.error("skipping volume %s in the listing: %s", volume_id, exc)
        return found

    def delete(self, volume_id: str) -> None:
        if not _ID.fullmatch(volume_id):
            return  # not ours, so not there
        directory = self._volumes / volume_id
        if not os.path.lexists(directory):
            self._sweep_trash()  # a retry: finish whatever an earlier attempt left
            return
        try:
            with self._locked(directory):
                device = self.loops.find(str(directory / IMAGE))
                if device is not None:
                    raise VolumeInUse(f"volume {volume_id} is attached to {device}; detach it first")
                # One rename takes the whole volume away: a crash after it leaves only trash, which the
                # retried delete sweeps, never half a volume. Waiters on the lock see it move.
                trash = self._volumes / f"{_TRASH}{volume_id}.{uuid.uuid4().hex}"
                try:
                    with Step("standalone-delete", "rename"):
                        os.rename(directory, trash)
                        _fsync_dir(self._volumes)
                except OSError as exc:
                    raise _unavailable(exc, directory, "delete") from exc
        except _DirectoryGone:
            self._sweep_trash()  # deleted concurrently
            return
        # Only this volume's trash: a scan of the whole directory would cost every delete more with
        # every volume there is.
        with Step("standalone-delete", "sweep"):
            self._remove_trash(str(trash))

    def resize(self, volume_id: str, size_bytes: int) -> int:
        directory = self._dir(volume_id)
        with self._locked(directory):
            meta = self._read_meta(directory)
            image = directory / IMAGE
            if meta is None or not image.exists():
                raise VolumeNotFound(f"volume {volume_id} does not exist")
            # meta.json first: a crash before the image grew is finished by a retried resize or create.
            recorded = meta.size
            if size_bytes > recorded:
                meta.size = size_bytes
                with Step("standalone-resize", "record-size"):
                    self._write_meta(directory, meta)
            try:
                with Step("standalone-resize", "grow"):
                    return self._grow_image(image, meta.size)
            except OSError as exc:
                if meta.size != recorded:
                    # A refused grow leaves the volume as it was: a recorded size the image never reaches
                    # would fail every later resize and create retry.
                    meta.size = recorded
                    self._write_meta(directory, meta)
                if exc.errno == errno.EFBIG:
                    raise CapacityOutOfRange(
                        f"volume {volume_id}: {size_bytes} bytes is too large a file"
                    ) from None
                raise _unavailable(exc, image, "grow") from exc

    def set_metadata(self, volume_id: str, key: str, value: str) -> None:
        self._update_metadata(volume_id, key, value)

    def remove_metadata(self, volume_id: str, key: str) -> None:
        self._update_metadata(volume_id, key, None)

    def _update_metadata(self, volume_id: str, key: str, value: str | None) -> None:
        """Read-modify-write of meta.json under the volume's flock; value None removes the key."""
        directory = self._dir(volume_id)
        with self._locked(directory):
            meta = self._read_meta(directory)
            if meta is None or not (directory / IMAGE).exists():
                # Only a complete volume (what get() returns) has metadata to change.
                raise VolumeNotFound(f"volume {volume_id} does not exist")
            updated = dict(meta.metadata)
            if value is None:
                updated.pop(key, None)
            else:
                updated[key] = value
            if updated != meta.metadata:
                meta.metadata = updated
                self._write_meta(directory, meta)

    def attach(self, volume_id: str) -> str:
        directory = self._dir(volume_id)
        # Under the lock, so a delete in another process cannot remove the volume as it is attached.
        with self._locked(directory):
            self._info(volume_id, directory)  # only a complete volume
            return self.loops.attach(str(directory / IMAGE))

    def find_attachment(self, volume_id: str) -> str | None:
        if not _ID.fullmatch(volume_id):
            return None  # not ours, so not attached
        # From the kernel's loop table, not memory; this also finds a loop device whose image was removed.
        return self.loops.find(str(self._volumes / volume_id / IMAGE))

    def in_use(self, volume_id: str) -> str | None:
        # One machine: a loop device over the image is the only attachment there is.
        device = self.find_attachment(volume_id)
        return None if device is None else f"attached to {device} on this machine"

    @contextlib.contextmanager
    def delete_guard(self, volume_id: str) -> Iterator[None]:
        """The volume's key lock: an operator's rotate, header restore or migrate of a volume that is not
        attached writes the image file itself, with no loop device for in_use() to see."""
        with self.key_operation(volume_id, "DeleteVolume"):
            yield

    def detach(self, volume_id: str) -> None:
        device = self.find_attachment(volume_id)
        if device is not None:
            self.loops.detach(device)

    def never_written(self, volume_id: str, device: str) -> bool:
        """The image has no data extent at all (SEEK_DATA finds none): every byte is a hole, so nothing
        was ever written. Only for a device over this very image file (not one left over a deleted
        image of the same name), flushed first, so a write still on its way to the image counts. A file
        system without SEEK_DATA reports the whole file as data: False, and the node probes."""
        try:
            image_fd = os.open(self.image_path(volume_id), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False  # the probe reads the device and says what is wrong with it
        try:
            image = os.fstat(image_fd)
            if backing_file_id(device) != (image.st_dev, image.st_ino):
                return False
            device_fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(device_fd)
            finally:
                os.close(device_fd)
            os.lseek(image_fd, 0, os.SEEK_DATA)
        except OSError as exc:
            return exc.errno == errno.ENXIO  # no data from offset 0 to the end; anything else: probe
        finally:
            os.close(image_fd)
        return False

    def refresh_attachment_size(self, volume_id: str) -> None:
        device = self.find_attachment(volume_id)
        if device is not None:
            self.loops.refresh_size(device)

    keeps_header_backups = True

    def store_header_backup(self, volume_id: str, data: HeaderImage) -> None:
        directory = self._dir(volume_id)
        with self._locked(directory):
            self._info(volume_id, directory)  # only a complete volume
            try:
                write_streamed_atomically(directory / HEADER_BACKUP, header_chunks(data))
            except OSError as exc:
                raise _unavailable(exc, directory / HEADER_BACKUP, "write") from exc

    def fetch_header_backup(self, volume_id: str) -> bytes | None:
        path = self._dir(volume_id) / HEADER_BACKUP
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _unavailable(exc, path, "read") from exc

    def remove_header_backup(self, volume_id: str) -> None:
        if not _ID.fullmatch(volume_id):
            return
        path = self._volumes / volume_id / HEADER_BACKUP
        try:
            path.unlink(missing_ok=True)
            _fsync_dir(path.parent)
        except FileNotFoundError:
            return  # no volume directory: nothing to destroy
        except OSError as exc:
            raise _unavailable(exc, path, "remove") from exc

    @contextlib.contextmanager
    def key_device(self, volume_id: str) -> Iterator[str]:
        """The loop device while attached; else the image file itself (cryptsetup changes key slots in
        a plain file directly, no loop device needed)."""
        attached = self.find_attachment(volume_id)
        directory = self._dir(volume_id)
        self._info(volume_id, directory)
        yield attached if attached is not None else str(directory / IMAGE)

    def free_bytes(self) -> int | None:
        path = self._nearest_dir()
        try:
            stats = os.statvfs(path)
        except OSError as exc:
            raise _unavailable(exc, path, "stat") from exc
        return stats.f_bavail * stats.f_frsize

    def _nearest_dir(self) -> Path:
        """Where images are, or will be: before the first volume the state directory may not exist yet,
        and is then made in its parent (on that file system)."""
        for path in (self._volumes, self.state_dir, self.state_dir.parent):
            if path.is_dir():
                return path
        raise BackendUnavailable(f"standalone backend: the state directory {self.state_dir} does not exist")

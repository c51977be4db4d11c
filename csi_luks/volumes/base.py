"""The volume backend interface, shared by the standalone (loop file) and RBD backends.

A backend keeps no in-memory state that a restarted plugin would need: volumes, their metadata and
their attachments are all found again from the backend itself (files, image metadata, the kernel).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from csi_luks.key_lock import key_operation_lock
from csi_luks.quoting import quoted

MAX_BYTES = 2**63 - 1  # off_t, and CSI's int64 capacities


# A header backup image: its bytes, or its chunks in order (streamed from the device).
HeaderImage = bytes | Iterable[bytes | memoryview]


def header_chunks(data: HeaderImage) -> Iterable[bytes | memoryview]:
    return [data] if isinstance(data, bytes) else data


class VolumeBackendError(Exception):
    """A backend operation failed."""


class VolumeNotFound(VolumeBackendError):
    """No volume with that id exists."""


class MalformedId(VolumeNotFound):
    """An id this backend never makes (so nothing of it exists): never made into a path or an argument."""


class CapacityOutOfRange(VolumeBackendError):
    """A size the backend cannot hold (a file larger than its file system allows, an image beyond RBD's)."""


class VolumeInUse(VolumeBackendError):
    """The volume is attached or mapped and cannot be deleted or detached now."""


class BackendUnavailable(VolumeBackendError):
    """The storage behind the backend cannot be reached (cluster down, state directory missing)."""


class BackendPermissionDenied(VolumeBackendError):
    """The storage refused the request's credentials (a wrong cephx key, missing caps)."""


class BackendRequestError(VolumeBackendError):
    """The request cannot be served as given: an unknown cluster, a bad parameter, no credentials."""


class HeaderBackupUnsupported(VolumeBackendError):
    """This backend keeps no LUKS header backups."""


@dataclass(frozen=True)
class VolumeInfo:
    volume_id: str
    name: str
    size_bytes: int  # the backing store's size (for encrypted volumes this includes the LUKS header)
    metadata: dict[str, str] = field(default_factory=dict)


class VolumeBackend(ABC):
    """Create, find, resize and delete volumes; keep per-volume metadata; attach them as block devices."""

    state_dir: Path  # the node's own directory for this backend's files
    # StorageClass parameters this backend reads (the controller refuses any other unknown key).
    parameter_keys: tuple[str, ...] = ()
    # Whether list() and free_bytes() work without a request's credentials (ListVolumes, ListSnapshots
    # and GetCapacity carry none).
    can_list: bool = True

    def for_request(self, secrets: Mapping[str, str], *, one_request: bool = True) -> VolumeBackend:
        """This backend acting with a request's credentials (RBD: its cephx user); by default itself.

        one_request: the result serves one request, short, under the volume's lock, so it may trust what
        it read of a volume until the request ends (RBD: no rbd call repeated). An operator command that
        lives through many volumes and other processes' changes passes False.
        """
        return self

    @abstractmethod
    def volume_id_for(
        self, name: str, parameters: Mapping[str, str], like: str | None = None, snapshot: bool = False
    ) -> str:
        """The deterministic id a CreateVolume (or with snapshot, a CreateSnapshot) of this name gets.

        parameters are the StorageClass's (where to place the volume); like is an existing object whose
        placement the new one shares (a snapshot lives beside its source volume). Volume and snapshot ids
        never coincide, whatever the names.
        """

    def check_id(self, object_id: str) -> None:
        """MalformedId unless object_id has the form of an id this backend makes (volume or snapshot).

        Every RPC passes its ids through this before anything builds a path or a command from them.
        The default allows only printable names without path separators; backends check their grammar.
        """
        if (
            not object_id.isprintable()
            or "/" in object_id
            or object_id in (".", "..")
            or len(object_id) > 256
        ):
            raise MalformedId(f"{quoted(object_id)} is not a volume or snapshot id of this backend")

    def check_capacity(self, size_bytes: int) -> None:
        """CapacityOutOfRange if a volume of size_bytes (backing store) cannot exist; nothing is made.

        The default: sizes are signed 64-bit in every system call and tool on the way.
        """
        if size_bytes > MAX_BYTES:
            raise CapacityOutOfRange(f"{size_bytes} bytes is more than any volume can hold ({MAX_BYTES})")

    @abstractmethod
    def create(
        self,
        volume_id: str,
        name: str,
        size_bytes: int,
        metadata: Mapping[str, str],
        source_id: str | None = None,
        parameters: Mapping[str, str] | None = None,
    ) -> VolumeInfo:
        """Create the volume with initial metadata. If it exists already, return it unchanged.

        With source_id, the new volume starts as a point-in-time copy of that volume's content (not its
        metadata), grown to size_bytes; it does not depend on the source afterwards, so either may be
        deleted first. VolumeNotFound if the source does not exist.
        """

    @abstractmethod
    def get(self, volume_id: str) -> VolumeInfo:
        """The volume, or VolumeNotFound."""

    @abstractmethod
    def list(self) -> list[VolumeInfo]:
        """Every volume, sorted by volume id."""

    @abstractmethod
    def delete(self, volume_id: str) -> None:
        """Remove the volume and its metadata (a missing one is already deleted); VolumeInUse if attached."""

    @abstractmethod
    def resize(self, volume_id: str, size_bytes: int) -> int:
        """Grow the backing store to at least size_bytes; never shrinks. Returns the new size."""

    @abstractmethod
    def set_metadata(self, volume_id: str, key: str, value: str) -> None:
        """Set one metadata key, atomically (a crash leaves the old or the new value, never a torn file)."""

    @abstractmethod
    def remove_metadata(self, volume_id: str, key: str) -> None:
        """Remove one metadata key; a missing key is not an error."""

    @abstractmethod
    def attach(self, volume_id: str) -> str:
        """Attach the volume as a block device on this machine and return its path. Idempotent."""

    @abstractmethod
    def find_attachment(self, volume_id: str) -> str | None:
        """The device path of an existing attachment (found from the system, not from memory)."""

    @abstractmethod
    def in_use(self, volume_id: str) -> str | None:
        """Where the volume is in use (attached or open), from the storage and the system, not from
        memory; None when nowhere. Never answers from a cache: DeleteVolume's decision rests on it."""

    def fresh_metadata(self, volume_id: str) -> dict[str, str]:
        """The volume's metadata as stored now (not as this request read it earlier); VolumeNotFound."""
        return dict(self.get(volume_id).metadata)

    @contextlib.contextmanager
    def delete_guard(self, volume_id: str) -> Iterator[None]:
        """Held by DeleteVolume from its intent to the shred. By default nothing: every user of a volume
        shows in in_use()."""
        yield

    @abstractmethod
    def detach(self, volume_id: str) -> None:
        """Detach the volume; a volume that is not attached is already detached."""

    @abstractmethod
    def refresh_attachment_size(self, volume_id: str) -> None:
        """Make an attached device pick up a grown backing store (loop: set-capacity; krbd: nothing)."""

    @abstractmethod
    def free_bytes(self) -> int | None:
        """Capacity left for new volumes, if the backend knows it (GetCapacity)."""

    # --- space reclaim (csi-addons ReclaimSpace) -----------------------------------------------------

    def used_bytes(self, volume_id: str) -> int | None:
        """Bytes the volume's thinly provisioned backing store really occupies (what a reclaim frees);
        None when the backend cannot tell (RBD without the request's credentials)."""
        return None

    def never_written(self, volume_id: str, device: str) -> bool:
        """Whether the backend can prove that no byte of the volume, attached at device, was ever written
        (stronger than any probe for signatures: there is nothing to find). False when it cannot tell, and
        the node probes the device instead."""
        return False

    def sparsify(self, volume_id: str) -> bool:
        """Free the backing store's zero-filled extents; False when there is nothing for the backend to do
        (the standalone backend frees a sparse file's blocks as the node discards them)."""
        return False

    # --- LUKS header backups and key work (operations/) ----------------------------------------------

    # Whether the backend keeps a copy of each encrypted volume's LUKS header beside it.
    keeps_header_backups: bool = False

    def store_header_backup(self, volume_id: str, data: HeaderImage) -> None:
        """Keep a luksHeaderBackup image (whole, or its chunks in order) with the volume, replacing an
        older one atomically. A chunk may be a view of a buffer the next one reuses: each is written out
        or copied before the next is asked for (the image is streamed from the device, not held whole)."""
        raise HeaderBackupUnsupported(f"the {type(self).__name__} keeps no LUKS header backups")

    def fetch_header_backup(self, volume_id: str) -> bytes | None:
        """The volume's header backup; None when there is none."""
        return None

    def remove_header_backup(self, volume_id: str) -> None:  # noqa: B027 - nothing kept, nothing to do
        """Destroy the volume's header backup; a missing one is already destroyed."""

    @contextlib.contextmanager
    def key_operation(self, volume_id: str, operation: str) -> Iterator[None]:
        """Exclusive, across processes on this node, for a change to the volume's key slots or DEK
        (raises locks.KeyOperationBusy when another holds it)."""
        self.check_id(volume_id)
        with key_operation_lock(self.state_dir / "key-locks", volume_id, operation):
            yield

    @contextlib.contextmanager
    def key_device(self, volume_id: str) -> Iterator[str]:
        """A path cryptsetup can change the volume's key slots through: its attachment while it is
        attached (staged), else an attachment made for the duration."""
        attached = self.find_attachment(volume_id)
        if attached is not None:
            yield attached
            return
        device = self.attach(volume_id)
        try:
            yield device
        finally:
            self.detach(volume_id)

    # --- work the backend does on its own (`csi-luks status`) ----------------------------------------

    def background_work(self, volume_id: str) -> str | None:
        """What the backend still owes the volume's backing store in the background (an RBD clone's
        flatten), said for an operator; None when nothing."""
        return None

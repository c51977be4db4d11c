"""The csi-addons ReclaimSpace services: give a thin backing store back the blocks a filesystem freed.

- NodeReclaimSpace (node plugin): a journal commit (sync -f), then fstrim of the staged filesystem. On an
  encrypted volume the discards pass through dm-crypt only when its mapping allows them
  (`encryptionDiscard`, or `csi-luks luks-flags VOLUME --discard on`); without that, nothing can be
  freed, and the answer says so (FAILED_PRECONDITION naming the way to turn it on) rather than reporting
  an unchanged usage as if the reclaim had run. A raw block volume is refused: only the workload knows
  which of its blocks are free.
- ControllerReclaimSpace (controller plugin): librbd's sparsify on RBD (no process); nothing to do on the
  standalone backend, whose loop devices punch the discarded blocks out of the sparse file at once.

Both answer the backing store's usage before and after (sparse file blocks, `rbd du`'s used bytes read
through librbd) when the backend can tell.
"""

from __future__ import annotations

import logging

import grpc

from csi_luks.csiaddons import reclaimspace_pb2 as pb
from csi_luks.csiaddons import reclaimspace_pb2_grpc as pb_grpc
from csi_luks.errors import failed_precondition, invalid_argument, not_found
from csi_luks.locks import OperationLocks
from csi_luks.luks import Cryptsetup, mapper_name, mapper_path
from csi_luks.quoting import quoted
from csi_luks.services.validation import checked_id
from csi_luks.system.filesystem import Filesystems
from csi_luks.volume_metadata import VolumeRecord
from csi_luks.volumes.base import VolumeBackend, VolumeNotFound

log = logging.getLogger(__name__)

_DISCARDS = "discards"  # the flag `cryptsetup status` lists for a mapping that passes discards down


def _usage(backend: VolumeBackend, volume_id: str) -> pb.StorageConsumption | None:
    used = backend.used_bytes(volume_id)
    return None if used is None else pb.StorageConsumption(usage_bytes=used)


def _record(backend: VolumeBackend, volume_id: str) -> VolumeRecord:
    try:
        record = VolumeRecord.parse(backend.get(volume_id).metadata)
    except VolumeNotFound:
        raise not_found(f"volume {volume_id} does not exist") from None
    if record.is_snapshot:
        raise not_found(f"{volume_id} is a snapshot, not a volume")
    return record


class ReclaimSpaceNodeService(pb_grpc.ReclaimSpaceNodeServicer):  # type: ignore[misc]
    def __init__(
        self, backend: VolumeBackend, locks: OperationLocks, cryptsetup: Cryptsetup, filesystems: Filesystems
    ) -> None:
        self.backend = backend
        self.locks = locks
        self.cryptsetup = cryptsetup
        self.filesystems = filesystems

    def NodeReclaimSpace(
        self, request: pb.NodeReclaimSpaceRequest, context: grpc.ServicerContext
    ) -> pb.NodeReclaimSpaceResponse:
        backend = self.backend.for_request(request.secrets)
        volume_id = checked_id(backend, request.volume_id, "volume_id")
        path = request.staging_target_path or request.volume_path
        if not path:
            raise invalid_argument("staging_target_path or volume_path is required")
        if request.volume_capability.WhichOneof("access_type") == "block":
            raise failed_precondition(
                f"volume {volume_id} is a raw block volume: only its workload knows which blocks are free "
                "(run fstrim or blkdiscard on what it keeps there); nothing was discarded"
            )
        with self.locks.hold(volume_id, "NodeReclaimSpace"):
            # Node calls find a staged volume from what this node recorded at its stage.
            record = _record(self.backend.for_request({}), volume_id)
            if not self.filesystems.is_mounted(path):
                raise failed_precondition(
                    f"volume {volume_id} is not staged at {quoted(path)}: fstrim needs its mounted filesystem"
                )
            if record.encrypted:
                mapper = mapper_name(volume_id)
                status = self.cryptsetup.status(mapper)
                if not status.active:
                    raise failed_precondition(f"volume {volume_id} is not staged on this node")
                if _DISCARDS not in status.flags:
                    raise failed_precondition(
                        f"volume {volume_id}: nothing can be reclaimed: its dm-crypt mapping {mapper} does "
                        "not pass discards down (the volume was made without encryptionDiscard), so freed "
                        "blocks stay allocated in the backing store. Turn it on with `csi-luks luks-flags "
                        f"{volume_id} --discard on` (applied at once to a staged volume), then reclaim "
                        "again; discards let the storage see which blocks are free"
                    )
                device = mapper_path(mapper)
            else:
                device = backend.find_attachment(volume_id) or path
            before = _usage(backend, volume_id)
            trimmed = self.filesystems.trim(path, device)
            after = _usage(backend, volume_id)
            log.info(
                "volume %s: fstrim passed %d bytes of free blocks down; backing store %s -> %s bytes",
                volume_id, trimmed, _bytes(before), _bytes(after),
            )  # fmt: skip
            return pb.NodeReclaimSpaceResponse(pre_usage=before, post_usage=after)


class ReclaimSpaceControllerService(pb_grpc.ReclaimSpaceControllerServicer):  # type: ignore[misc]
    def __init__(self, backend: VolumeBackend, locks: OperationLocks) -> None:
        self.backend = backend
        self.locks = locks

    def ControllerReclaimSpace(
        self, request: pb.ControllerReclaimSpaceRequest, context: grpc.ServicerContext
    ) -> pb.ControllerReclaimSpaceResponse:
        backend = self.backend.for_request(request.secrets)
        volume_id = checked_id(backend, request.volume_id, "volume_id")
        with self.locks.hold(volume_id, "ControllerReclaimSpace"):
            _record(backend, volume_id)
            before = _usage(backend, volume_id)
            done = backend.sparsify(volume_id)
            after = _usage(backend, volume_id) if done else before
            log.info(
                "volume %s: %s; backing store %s -> %s bytes",
                volume_id, "sparsified" if done else "nothing to sparsify on this backend",
                _bytes(before), _bytes(after),
            )  # fmt: skip
            return pb.ControllerReclaimSpaceResponse(pre_usage=before, post_usage=after)


def _bytes(usage: pb.StorageConsumption | None) -> str:
    return "unknown" if usage is None else str(usage.usage_bytes)

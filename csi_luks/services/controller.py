"""CSI Controller service: create, delete, expand, snapshot, clone and describe volumes and their DEKs."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime

import grpc
from google.protobuf import timestamp_pb2

from csi_luks.crash import Step
from csi_luks.csi import csi_pb2, csi_pb2_grpc
from csi_luks.encryption import VolumeEncryption, volume_encryption
from csi_luks.errors import CsiError, failed_precondition, invalid_argument, not_found
from csi_luks.kms.base import KMSContext
from csi_luks.kms.config import KMSConfig
from csi_luks.locks import OperationLocks
from csi_luks.luks.parameters import (
    PARAMETER_KEYS,
    LuksParameterError,
    LuksParameters,
)
from csi_luks.quoting import quoted, quoted_list
from csi_luks.services.validation import (
    capability_problem,
    capacity_from_range,
    checked_id,
    parse_bool,
    require,
    require_plain_text,
    unknown_keys,
    validate_capabilities,
)
from csi_luks.system.fs_limits import too_small
from csi_luks.volume_metadata import (
    CAPACITY,
    CREATED,
    DELETING,
    ENCRYPTED,
    FILESYSTEM,
    KIND,
    KIND_SNAPSHOT,
    KMS_ID,
    NAME,
    PVC_NAMESPACE,
    SOURCE,
    SOURCE_STATE,
    STATE,
    EncryptionState,
    VolumeRecord,
    backing_bytes,
    luks_metadata,
)
from csi_luks.volumes.base import MalformedId, VolumeBackend, VolumeInfo, VolumeNotFound

log = logging.getLogger(__name__)

PARAM_ENCRYPTED = "encrypted"
PARAM_KMS_ID = "encryptionKMSID"
PARAM_PVC_NAMESPACE = "csi.storage.k8s.io/pvc/namespace"
KNOWN_PARAMETERS = (PARAM_ENCRYPTED, PARAM_KMS_ID, *PARAMETER_KEYS)
_PAGE_AFTER = "after:"  # ListVolumes tokens: "after:<last volume id returned>"

RPC = csi_pb2.ControllerServiceCapability.RPC.Type
CAPABILITIES = (
    RPC.CREATE_DELETE_VOLUME,
    RPC.EXPAND_VOLUME,
    RPC.LIST_VOLUMES,
    RPC.GET_CAPACITY,
    RPC.CREATE_DELETE_SNAPSHOT,
    RPC.LIST_SNAPSHOTS,
    RPC.CLONE_VOLUME,
    RPC.SINGLE_NODE_MULTI_WRITER,
)
# Served only by backends that can list without a request's credentials (not RBD: these calls carry none).
LISTING_CAPABILITIES = (RPC.LIST_VOLUMES, RPC.LIST_SNAPSHOTS, RPC.GET_CAPACITY)


class ControllerService(csi_pb2_grpc.ControllerServicer):  # type: ignore[misc]
    def __init__(
        self, backend: VolumeBackend, kms_config: KMSConfig, locks: OperationLocks, max_copies: int = 4
    ) -> None:
        self.backend = backend
        # A copy (snapshot, clone, restore) holds a gRPC worker for as long as the data takes: a bound keeps
        # workers free for everything else (Probe included), and the CO retries what is refused.
        self.max_copies = max_copies
        self.copy_slots = threading.BoundedSemaphore(max_copies)
        # The backend's own StorageClass parameters are known too (RBD: clusterID, pool, ...).
        self.known_parameters = KNOWN_PARAMETERS + backend.parameter_keys
        self.kms_config = kms_config
        self.locks = locks

    @contextmanager
    def _copy_slot(self, what: str) -> Iterator[None]:
        if not self.copy_slots.acquire(blocking=False):
            raise CsiError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.max_copies} copies are in flight already; {what} waits for a retry",
            )
        try:
            yield
        finally:
            self.copy_slots.release()

    @staticmethod
    def _context(secrets: Mapping[str, str], record: VolumeRecord) -> KMSContext:
        return KMSContext(secrets=dict(secrets), pvc_namespace=record.pvc_namespace)

    def CreateVolume(
        self, request: csi_pb2.CreateVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.CreateVolumeResponse:
        name = require_plain_text(require(request.name, "name"), "name")
        backend = self.backend.for_request(request.secrets)
        validate_capabilities(request.volume_capabilities)
        parameters = dict(request.parameters)
        unknown = unknown_keys(parameters, self.known_parameters)
        if unknown:
            known = ", ".join(self.known_parameters)
            raise invalid_argument(f"unknown StorageClass parameters {quoted_list(unknown)}; known: {known}")
        for key, value in parameters.items():  # metadata values reach rbd's argv
            require_plain_text(value, f"parameter {quoted(key)}")
        encrypted = parse_bool(parameters, PARAM_ENCRYPTED, default=False)
        kms_id = parameters.get(PARAM_KMS_ID, "")
        if kms_id and not encrypted:
            raise invalid_argument(f'{PARAM_KMS_ID} is set but {PARAM_ENCRYPTED} is not "true"')
        if encrypted:
            self.kms_config.entry(kms_id)  # unknown id -> INVALID_ARGUMENT naming the known ids
        luks = _luks_parameters(parameters, encrypted)
        requested_source = _source_of(request, backend)
        volume_id = backend.volume_id_for(name, parameters)
        pvc_namespace = parameters.get(PARAM_PVC_NAMESPACE)

        with self.locks.hold(volume_id, f"CreateVolume {quoted(name)}"):
            existing = self._info_or_none(backend, volume_id)
            if existing is not None:
                record = VolumeRecord.parse(existing.metadata)
                if record.is_snapshot:
                    # Only a snapshot made while snapshot ids came from "snapshot:" + name can be here.
                    raise CsiError(
                        grpc.StatusCode.ALREADY_EXISTS,
                        f"the id of volume name {quoted(name)}, {volume_id}, belongs to snapshot "
                        f"{quoted(record.name)}; use another name",
                    )
                if not (record.encrypted and record.state is None):
                    # Complete: a retry is answered from the volume alone, even if its source is gone now.
                    requested = requested_source[1] if requested_source else None
                    capacity = _capacity(request, record.capacity if requested else None)
                    self._check_same(name, record, capacity, encrypted, kms_id, requested, luks)
                    return csi_pb2.CreateVolumeResponse(
                        volume=self._volume(volume_id, record.capacity, record, _echoed_source(request))
                    )
            try:
                source_id, source = self._content_source(backend, requested_source)
            except CsiError as exc:
                if existing is not None and exc.code == grpc.StatusCode.NOT_FOUND:
                    # An unfinished copy whose source is gone can never be finished: do not leak it.
                    backend.delete(volume_id)
                raise
            if source is not None and source.encrypted != encrypted:
                kinds = ("unencrypted", "encrypted")
                raise invalid_argument(
                    f"{kinds[source.encrypted]} source {source_id} cannot become an {kinds[encrypted]} "
                    f"volume: set {PARAM_ENCRYPTED} in the StorageClass to match the source"
                )
            if (
                source is not None
                and encrypted
                and self.kms_config.shares_one_passphrase(kms_id)
                and not self.kms_config.shares_one_passphrase(source.kms_id)
            ):
                # The copy carries the source's LUKS header, which opens only with the source's own DEK;
                # a secrets-type class opens every volume with its one passphrase and stores no DEK.
                raise invalid_argument(
                    f"source {source_id} has a DEK of its own (KMS {source.kms_id!r}), which a class of the "
                    f'"secrets" type cannot keep: the copy could never be opened; use a class whose '
                    f"{PARAM_KMS_ID} names a KMS"
                )
            capacity = _capacity(request, source.capacity if source else None)
            _check_filesystem_fits(request.volume_capabilities, capacity)
            if source is not None and capacity < source.capacity:
                raise CsiError(
                    grpc.StatusCode.OUT_OF_RANGE,
                    f"the source {source_id} holds {source.capacity} bytes; a copy cannot be smaller "
                    f"({capacity} bytes)",
                )
            backend.check_capacity(backing_bytes(capacity, encrypted))
            # The source stays locked while it is copied: deleting or expanding it meanwhile gets ABORTED.
            with (
                self.locks.hold(source_id, f"CreateVolume {quoted(name)} from {source_id}")
                if source_id
                else nullcontext()
            ):
                created = False
                info = existing
                encryption = None
                if info is None:
                    if encrypted:
                        encryption = self._accessible_encryption(
                            backend, volume_id, kms_id, request.secrets, pvc_namespace
                        )
                    metadata = _new_metadata(name, capacity, encrypted, kms_id, pvc_namespace)
                    if source is not None and source_id is not None:
                        metadata.update(_copy_marks(source_id, source))
                    else:
                        metadata.update(luks_metadata(luks))
                    with (
                        self._copy_slot(f"CreateVolume {quoted(name)}") if source_id else nullcontext(),
                        Step("create-volume", "backing-store"),
                    ):
                        info = backend.create(
                            volume_id,
                            name,
                            backing_bytes(capacity, encrypted),
                            metadata,
                            source_id=source_id,
                            parameters=parameters,
                        )
                    created = True
                record = VolumeRecord.parse(info.metadata)
                self._check_same(name, record, capacity, encrypted, kms_id, source_id, luks)
                if encrypted and record.state is None:
                    try:
                        self._prepare_key(backend, volume_id, record, request.secrets, encryption)
                    except Exception:
                        if created:  # leave no half-created volume behind
                            backend.delete(volume_id)
                        raise
                return csi_pb2.CreateVolumeResponse(
                    volume=self._volume(volume_id, record.capacity, record, _echoed_source(request))
                )

    def _content_source(
        self, backend: VolumeBackend, source: tuple[str, str] | None
    ) -> tuple[str | None, VolumeRecord | None]:
        """The snapshot or volume to copy, if any, checked to exist and to be complete."""
        if source is None:
            return None, None
        kind, source_id = source
        return source_id, self._source_record(backend, kind, source_id, "the content source")

    def _source_record(self, backend: VolumeBackend, kind: str, source_id: str, role: str) -> VolumeRecord:
        """A snapshot or volume to copy: NOT_FOUND if missing, FAILED_PRECONDITION if not ready."""
        record = self._find(backend, source_id, snapshot=kind == "snapshot")
        if record is None:
            raise not_found(f"{kind} {source_id} ({role}) does not exist")
        if record.encrypted and record.state is None:
            raise failed_precondition(f"{kind} {source_id} is not ready: its key was never prepared")
        return record

    def _info_or_none(self, backend: VolumeBackend, object_id: str) -> VolumeInfo | None:
        try:
            return backend.get(object_id)
        except VolumeNotFound:
            return None

    def _find(self, backend: VolumeBackend, object_id: str, snapshot: bool) -> VolumeRecord | None:
        """A volume's or a snapshot's record; None if there is none of that kind with this id."""
        info = self._info_or_none(backend, object_id)
        record = VolumeRecord.parse(info.metadata) if info is not None else None
        return record if record is not None and record.is_snapshot == snapshot else None

    def _accessible_encryption(
        self,
        backend: VolumeBackend,
        volume_id: str,
        kms_id: str,
        secrets: Mapping[str, str],
        pvc_namespace: str | None,
    ) -> VolumeEncryption:
        """The new volume's encryption, its KMS asked for access first: a KMS that refuses this volume's
        credentials, or is down, fails CreateVolume before the backing store is made (the provisioner
        retries a refused claim for ever, and each retry would otherwise create and delete an image)."""
        context = KMSContext(secrets=dict(secrets), pvc_namespace=pvc_namespace)
        encryption = volume_encryption(self.kms_config, kms_id, context, backend)
        encryption.kms.check_access(volume_id)
        return encryption

    def _prepare_key(
        self,
        backend: VolumeBackend,
        volume_id: str,
        record: VolumeRecord,
        secrets: Mapping[str, str],
        encryption: VolumeEncryption | None = None,
    ) -> None:
        """A new DEK, or for a copy the source's DEK re-wrapped for this volume's KMS; then the state.
        encryption: the volume's, if the call built it already (the KMS configuration is read once)."""
        if encryption is None:
            encryption = volume_encryption(
                self.kms_config, record.kms_id, self._context(secrets, record), backend
            )
        if record.source is None:
            with Step("prepare-key", "new-dek"):
                encryption.new_passphrase(volume_id)
            state = EncryptionState.PREPARED
        else:
            try:
                source = VolumeRecord.parse(backend.get(record.source).metadata)
            except VolumeNotFound:
                raise not_found(
                    f"the content source {record.source} of {volume_id} was deleted before the copy finished"
                ) from None
            source_encryption = volume_encryption(
                self.kms_config, source.kms_id, self._context(secrets, source), backend
            )
            with Step("prepare-key", "copy-dek"):
                source_encryption.copy_to(record.source, encryption, volume_id)
            assert record.source_state is not None  # noqa: S101 - _copy_marks sets both
            state = record.source_state
        with Step("prepare-key", "mark-state"):
            backend.set_metadata(volume_id, STATE, state.value)
        log.info(
            "volume %s (%s): DEK %s with KMS %r",
            volume_id,
            record.name,
            "stored" if record.source is None else f"copied from {record.source}",
            record.kms_id or "secrets",
        )

    @staticmethod
    def _check_same(
        name: str,
        record: VolumeRecord,
        capacity: int,
        encrypted: bool,
        kms_id: str,
        source_id: str | None,
        luks: LuksParameters,
    ) -> None:
        if record.source != source_id:
            raise CsiError(
                grpc.StatusCode.ALREADY_EXISTS,
                f"volume {quoted(name)} exists with content source {record.source or 'none'}, "
                f"not {source_id or 'none'}",
            )
        if record.capacity != capacity:
            raise CsiError(
                grpc.StatusCode.ALREADY_EXISTS,
                f"volume {quoted(name)} exists with {record.capacity} bytes, not the {capacity} asked for",
            )
        if record.encrypted != encrypted or record.kms_id != kms_id:
            raise CsiError(
                grpc.StatusCode.ALREADY_EXISTS,
                f"volume {quoted(name)} exists with encrypted={record.encrypted}, KMS {record.kms_id!r}; "
                "the request asks for other parameters",
            )
        # A copy carries its source's header, so its source's parameters, whatever its class asks for.
        if source_id is None and record.luks != luks:
            raise CsiError(
                grpc.StatusCode.ALREADY_EXISTS,
                f"volume {quoted(name)} exists with LUKS parameters {record.luks.describe()}; the request "
                f"asks for {luks.describe()}",
            )

    @staticmethod
    def _volume(
        volume_id: str,
        capacity: int,
        record: VolumeRecord,
        content_source: csi_pb2.VolumeContentSource | None = None,
    ) -> csi_pb2.Volume:
        volume_context = {PARAM_ENCRYPTED: "true" if record.encrypted else "false"}
        if record.encrypted:
            volume_context[PARAM_KMS_ID] = record.kms_id
            # What the volume's header really has (a copy: its source's), under the class's names.
            volume_context.update(record.luks.class_values())
        return csi_pb2.Volume(
            volume_id=volume_id,
            capacity_bytes=capacity,
            volume_context=volume_context,
            content_source=content_source,
        )

    @staticmethod
    def _could_exist(backend: VolumeBackend, object_id: str, call: str) -> bool:
        """Whether the id has the backend's form; one that has not names nothing, so deleting it succeeds."""
        try:
            backend.check_id(object_id)
        except MalformedId:
            log.info("%s of %s: not an id of this backend, so nothing to do", call, quoted(object_id))
            return False
        return True

    def DeleteVolume(
        self, request: csi_pb2.DeleteVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.DeleteVolumeResponse:
        backend = self.backend.for_request(request.secrets)
        volume_id = require(request.volume_id, "volume_id")
        if not self._could_exist(backend, volume_id, "DeleteVolume"):
            return csi_pb2.DeleteVolumeResponse()
        with self.locks.hold(volume_id, "DeleteVolume"):
            try:
                info = backend.get(volume_id)
            except VolumeNotFound:
                # Unknown, or torn by a crash inside CreateVolume (before any DEK was stored): sweep
                # whatever files are left, and succeed.
                backend.delete(volume_id)
                return csi_pb2.DeleteVolumeResponse()
            record = VolumeRecord.parse(info.metadata)
            if record.is_snapshot:
                # Not OK: the caller would think a snapshot it still holds is gone. The argument is wrong
                # whatever the state, so INVALID_ARGUMENT rather than FAILED_PRECONDITION.
                raise invalid_argument(
                    f"{volume_id} is a snapshot, not a volume: delete it with DeleteSnapshot"
                )
            with backend.delete_guard(volume_id):
                self._refuse_if_in_use(backend, volume_id)
                self._delete(backend, volume_id, record, request.secrets)
            log.info("volume %s deleted", volume_id)
            return csi_pb2.DeleteVolumeResponse()

    @staticmethod
    def _refuse_if_in_use(backend: VolumeBackend, volume_id: str) -> None:
        """Record the intent to delete, durably, and only then look for users (attached, mapped on any
        node); in use: take the intent back and refuse. A NodeStage attaches first and reads the intent
        afterwards, so of the two at least one sees the other: never a DEK shredded under a stage."""
        with Step("delete", "mark-deleting"):
            backend.set_metadata(volume_id, DELETING, datetime.now(UTC).isoformat(timespec="seconds"))
        where = backend.in_use(volume_id)
        if where is None:
            return
        with Step("delete", "unmark-deleting"):
            backend.remove_metadata(volume_id, DELETING)
        raise failed_precondition(
            f"volume {volume_id} is in use ({where}); nothing was deleted: unstage it (or unmap it) first"
        )

    def _delete(
        self, backend: VolumeBackend, object_id: str, record: VolumeRecord, secrets: Mapping[str, str]
    ) -> None:
        """Crypto-shred a volume or snapshot (its DEKs, then its header backup), then remove the object.

        A KMS that fails (down: UNAVAILABLE) fails the call before any data is touched: the CO retries.
        """
        if record.encrypted:
            # The DEKs go first: a crash after them leaves an object that a retry deletes, never a key
            # with nothing to open.
            encryption = volume_encryption(
                self.kms_config, record.kms_id, self._context(secrets, record), backend
            )
            with Step("delete", "remove-dek"):
                encryption.remove(object_id)
            with Step("delete", "remove-header-backup"):
                backend.remove_header_backup(object_id)
        with Step("delete", "remove-data"):
            backend.delete(object_id)

    def ControllerExpandVolume(
        self, request: csi_pb2.ControllerExpandVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerExpandVolumeResponse:
        backend = self.backend.for_request(request.secrets)
        if not request.HasField("capacity_range"):
            raise invalid_argument("capacity_range is required")
        if request.HasField("volume_capability"):
            validate_capabilities([request.volume_capability])
        volume_id = checked_id(backend, request.volume_id, "volume_id")
        with self.locks.hold(volume_id, "ControllerExpandVolume"):
            record = VolumeRecord.parse(self._get(backend, volume_id).metadata)
            capacity = capacity_from_range(request.capacity_range, True, current=record.capacity)
            if capacity > record.capacity:
                backend.check_capacity(backing_bytes(capacity, record.encrypted))
                with Step("controller-expand", "resize"):
                    backend.resize(volume_id, backing_bytes(capacity, record.encrypted))
                with Step("controller-expand", "record-capacity"):
                    backend.set_metadata(volume_id, CAPACITY, str(capacity))
                log.info("volume %s grown to %d bytes", volume_id, capacity)
            # The node must grow the attachment, the dm-crypt mapping and the filesystem.
            return csi_pb2.ControllerExpandVolumeResponse(
                capacity_bytes=max(capacity, record.capacity), node_expansion_required=True
            )

    def ValidateVolumeCapabilities(
        self, request: csi_pb2.ValidateVolumeCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ValidateVolumeCapabilitiesResponse:
        backend = self.backend.for_request(request.secrets)
        if not request.volume_capabilities:
            raise invalid_argument("volume_capabilities is required")
        volume_id = checked_id(backend, request.volume_id, "volume_id")
        self._get(backend, volume_id)
        for capability in request.volume_capabilities:
            problem = capability_problem(capability)
            if problem:
                return csi_pb2.ValidateVolumeCapabilitiesResponse(message=problem)
        return csi_pb2.ValidateVolumeCapabilitiesResponse(
            confirmed=csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed(
                volume_context=request.volume_context,
                volume_capabilities=request.volume_capabilities,
                parameters=request.parameters,
            )
        )

    def ListVolumes(
        self, request: csi_pb2.ListVolumesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ListVolumesResponse:
        page, next_token = self._page(
            self.backend,
            request.max_entries,
            request.starting_token,
            lambda info, record: not record.is_snapshot,
        )
        return csi_pb2.ListVolumesResponse(
            entries=[
                csi_pb2.ListVolumesResponse.Entry(
                    volume=self._volume(info.volume_id, record.capacity, record)
                )
                for info, record in page
            ],
            next_token=next_token,
        )

    def _page(
        self,
        backend: VolumeBackend,
        max_entries: int,
        token: str,
        wanted: Callable[[VolumeInfo, VolumeRecord], bool],
    ) -> tuple[list[tuple[VolumeInfo, VolumeRecord]], str]:
        self._require_listing("listing volumes and snapshots")
        """One page of the objects `wanted` selects, and the token of the next page ("" after the last)."""
        if max_entries < 0:
            raise invalid_argument("max_entries must not be negative")
        # The token names the last object returned (ids are listed in order), so objects created or
        # deleted between pages neither repeat nor hide the ones after it.
        after = self._page_start(token)
        remaining = [
            (info, record)
            for info in backend.list()
            if info.volume_id > after and wanted(info, record := VolumeRecord.parse(info.metadata))
        ]
        page = remaining[:max_entries] if max_entries else remaining
        more = len(page) < len(remaining)
        return page, _PAGE_AFTER + page[-1][0].volume_id if more and page else ""

    @staticmethod
    def _page_start(token: str) -> str:
        """The id a page starts after ("" for the first page); ABORTED for a token we did not make."""
        if not token:
            return ""
        if not token.startswith(_PAGE_AFTER):
            raise CsiError(grpc.StatusCode.ABORTED, f"starting_token {quoted(token)} is not valid")
        return token[len(_PAGE_AFTER) :]

    def GetCapacity(
        self, request: csi_pb2.GetCapacityRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetCapacityResponse:
        self._require_listing("GetCapacity")
        for capability in request.volume_capabilities:
            if capability_problem(capability):
                return csi_pb2.GetCapacityResponse(available_capacity=0)
        return csi_pb2.GetCapacityResponse(available_capacity=self.backend.free_bytes() or 0)

    def ControllerGetCapabilities(
        self, request: csi_pb2.ControllerGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerGetCapabilitiesResponse:
        return csi_pb2.ControllerGetCapabilitiesResponse(
            capabilities=[
                csi_pb2.ControllerServiceCapability(rpc=csi_pb2.ControllerServiceCapability.RPC(type=kind))
                for kind in CAPABILITIES
                if self.backend.can_list or kind not in LISTING_CAPABILITIES
            ]
        )

    def _require_listing(self, call: str) -> None:
        if not self.backend.can_list:
            raise CsiError(
                grpc.StatusCode.UNIMPLEMENTED,
                f"{call} is not available with the {type(self.backend).__name__}: it needs credentials "
                "that this call does not carry",
            )

    def _get(self, backend: VolumeBackend, volume_id: str) -> VolumeInfo:
        try:
            info = backend.get(volume_id)
        except VolumeNotFound:
            raise not_found(f"volume {volume_id} does not exist") from None
        if VolumeRecord.parse(info.metadata).is_snapshot:
            raise not_found(f"{volume_id} is a snapshot, not a volume")
        return info

    # --- snapshots -----------------------------------------------------------------------------------

    def CreateSnapshot(
        self, request: csi_pb2.CreateSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.CreateSnapshotResponse:
        name = require_plain_text(require(request.name, "name"), "name")
        backend = self.backend.for_request(request.secrets)
        # csi-snapshotter --extra-create-metadata adds csi.storage.k8s.io/volumesnapshot/* keys: ignored.
        unknown = unknown_keys(request.parameters, ())
        if unknown:
            raise invalid_argument(f"CreateSnapshot takes no parameters, got {quoted_list(unknown)}")
        source_id = checked_id(backend, request.source_volume_id, "source_volume_id")
        snapshot_id = backend.volume_id_for(name, {}, like=source_id, snapshot=True)
        with (
            self.locks.hold(snapshot_id, f"CreateSnapshot {quoted(name)}"),
            self.locks.hold(source_id, f"CreateSnapshot {quoted(name)} of {source_id}"),
        ):
            created = False
            info = self._info_or_none(backend, snapshot_id)
            if info is None:
                source = self._source_record(backend, "volume", source_id, "the snapshot's source")
                metadata = {
                    **_new_metadata(
                        name, source.capacity, source.encrypted, source.kms_id, source.pvc_namespace
                    ),
                    KIND: KIND_SNAPSHOT,
                    CREATED: str(time.time_ns()),
                    **_copy_marks(source_id, source),
                }
                with (
                    self._copy_slot(f"CreateSnapshot {quoted(name)}"),
                    Step("create-snapshot", "backing-store"),
                ):
                    info = backend.create(
                        snapshot_id, name, source.backing_bytes, metadata, source_id=source_id
                    )
                created = True
            record = VolumeRecord.parse(info.metadata)
            if not record.is_snapshot or record.source != source_id:
                raise CsiError(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"snapshot {quoted(name)} exists with source volume {record.source}, not {source_id}",
                )
            if record.encrypted and record.state is None:
                # The snapshot keeps its own copy of the DEK, so it outlives its source volume.
                try:
                    self._prepare_key(backend, snapshot_id, record, request.secrets)
                except Exception:
                    if created:
                        backend.delete(snapshot_id)
                    raise
            log.info("snapshot %s (%s) of volume %s ready", snapshot_id, name, source_id)
            return csi_pb2.CreateSnapshotResponse(snapshot=self._snapshot(snapshot_id, record))

    @staticmethod
    def _snapshot(snapshot_id: str, record: VolumeRecord) -> csi_pb2.Snapshot:
        created = timestamp_pb2.Timestamp()
        created.FromNanoseconds(record.created_ns)
        return csi_pb2.Snapshot(
            size_bytes=record.capacity,
            snapshot_id=snapshot_id,
            source_volume_id=record.source or "",
            creation_time=created,
            ready_to_use=True,
        )

    def DeleteSnapshot(
        self, request: csi_pb2.DeleteSnapshotRequest, context: grpc.ServicerContext
    ) -> csi_pb2.DeleteSnapshotResponse:
        backend = self.backend.for_request(request.secrets)
        snapshot_id = require(request.snapshot_id, "snapshot_id")
        if not self._could_exist(backend, snapshot_id, "DeleteSnapshot"):
            return csi_pb2.DeleteSnapshotResponse()
        with self.locks.hold(snapshot_id, "DeleteSnapshot"):
            try:
                record = VolumeRecord.parse(backend.get(snapshot_id).metadata)
            except VolumeNotFound:
                backend.delete(snapshot_id)  # sweep what a crash in CreateSnapshot left
                return csi_pb2.DeleteSnapshotResponse()
            if not record.is_snapshot:
                raise invalid_argument(
                    f"{snapshot_id} is a volume, not a snapshot: delete it with DeleteVolume"
                )
            self._delete(backend, snapshot_id, record, request.secrets)
            log.info("snapshot %s deleted", snapshot_id)
            return csi_pb2.DeleteSnapshotResponse()

    def ListSnapshots(
        self, request: csi_pb2.ListSnapshotsRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ListSnapshotsResponse:
        backend = self.backend.for_request(request.secrets)
        self._require_listing("ListSnapshots")
        for filter_id in (request.snapshot_id, request.source_volume_id):
            if filter_id and not self._could_exist(backend, filter_id, "ListSnapshots"):
                return csi_pb2.ListSnapshotsResponse()  # no such object, so no such snapshot

        def wanted(info: VolumeInfo, record: VolumeRecord) -> bool:
            return (
                record.is_snapshot
                and request.snapshot_id in ("", info.volume_id)
                and request.source_volume_id in ("", record.source)
            )

        page, next_token = self._page(backend, request.max_entries, request.starting_token, wanted)
        return csi_pb2.ListSnapshotsResponse(
            entries=[
                csi_pb2.ListSnapshotsResponse.Entry(snapshot=self._snapshot(info.volume_id, record))
                for info, record in page
            ],
            next_token=next_token,
        )


def _source_of(request: csi_pb2.CreateVolumeRequest, backend: VolumeBackend) -> tuple[str, str] | None:
    """(kind, id) of the snapshot or volume the request names as its content source, checked for form only."""
    if not request.HasField("volume_content_source"):
        return None
    content = request.volume_content_source
    kind = content.WhichOneof("type")
    if kind == "snapshot":
        field = "volume_content_source.snapshot.snapshot_id"
        return kind, checked_id(backend, content.snapshot.snapshot_id, field)
    if kind == "volume":
        return kind, checked_id(backend, content.volume.volume_id, "volume_content_source.volume.volume_id")
    raise invalid_argument("volume_content_source names neither a snapshot nor a volume")


def _check_filesystem_fits(capabilities: Iterable[csi_pb2.VolumeCapability], capacity: int) -> None:
    """OUT_OF_RANGE if a filesystem the capabilities name cannot be made on a volume of this capacity
    (the dm-crypt mapping of an encrypted volume has exactly the capacity)."""
    for capability in capabilities:
        if capability.WhichOneof("access_type") == "mount":
            problem = too_small(capability.mount.fs_type or "ext4", capacity)
            if problem is not None:
                raise CsiError(grpc.StatusCode.OUT_OF_RANGE, problem)


def _echoed_source(request: csi_pb2.CreateVolumeRequest) -> csi_pb2.VolumeContentSource | None:
    """The content source a CreateVolume answer must carry: the request's own (CSI spec; external-provisioner
    deletes a volume provisioned for a PVC dataSource whose answer lacks it)."""
    return request.volume_content_source if request.HasField("volume_content_source") else None


def _capacity(request: csi_pb2.CreateVolumeRequest, copied: int | None) -> int:
    """The requested capacity; a copy without a capacity range gets its source's (copied)."""
    if copied is not None and not request.HasField("capacity_range"):
        return copied
    return capacity_from_range(request.capacity_range, request.HasField("capacity_range"))


def _new_metadata(
    name: str, capacity: int, encrypted: bool, kms_id: str, pvc_namespace: str | None
) -> dict[str, str]:
    """What a new volume or snapshot records about itself."""
    return {
        NAME: name,
        CAPACITY: str(capacity),
        ENCRYPTED: "true" if encrypted else "false",
        KMS_ID: kms_id,
        **({PVC_NAMESPACE: pvc_namespace} if pvc_namespace else {}),
    }


def _luks_parameters(parameters: Mapping[str, str], encrypted: bool) -> LuksParameters:
    """The class's LUKS parameters, checked: INVALID_ARGUMENT naming the allowed values."""
    try:
        luks = LuksParameters.from_parameters(parameters)
    except LuksParameterError as exc:
        raise invalid_argument(str(exc)) from None
    if luks.any and not encrypted:
        given = [key for key in PARAMETER_KEYS if parameters.get(key)]
        raise invalid_argument(
            f'{quoted_list(given)} apply to encrypted volumes only: set {PARAM_ENCRYPTED} "true"'
        )
    return luks


def _copy_marks(source_id: str, source: VolumeRecord) -> dict[str, str]:
    """Metadata of a copy: where it came from, and the source's state read before its content was copied."""
    marks = {SOURCE: source_id}
    if source.state is not None:
        marks[SOURCE_STATE] = source.state.value
    if source.filesystem is not None:  # the copy holds the same filesystem: never made again either
        marks[FILESYSTEM] = source.filesystem.value()
    marks.update(luks_metadata(source.luks))  # and the same LUKS header
    return marks

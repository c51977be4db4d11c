"""CSI Controller service: create, delete, expand and describe volumes and their DEKs."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import grpc

from csi_luks.csi import csi_pb2, csi_pb2_grpc
from csi_luks.encryption import volume_encryption
from csi_luks.errors import CsiError, invalid_argument, not_found
from csi_luks.kms.base import KMSContext
from csi_luks.kms.config import KMSConfig
from csi_luks.locks import OperationLocks
from csi_luks.services.validation import (
    capability_problem,
    capacity_from_range,
    parse_bool,
    require,
    unknown_keys,
    validate_capabilities,
)
from csi_luks.volume_metadata import (
    CAPACITY,
    ENCRYPTED,
    KMS_ID,
    NAME,
    PVC_NAMESPACE,
    STATE,
    EncryptionState,
    VolumeRecord,
    backing_bytes,
)
from csi_luks.volumes.base import VolumeBackend, VolumeInfo, VolumeNotFound

log = logging.getLogger(__name__)

PARAM_ENCRYPTED = "encrypted"
PARAM_KMS_ID = "encryptionKMSID"
PARAM_PVC_NAMESPACE = "csi.storage.k8s.io/pvc/namespace"
KNOWN_PARAMETERS = (PARAM_ENCRYPTED, PARAM_KMS_ID)
_PAGE_AFTER = "after:"  # ListVolumes tokens: "after:<last volume id returned>"

RPC = csi_pb2.ControllerServiceCapability.RPC.Type
CAPABILITIES = (
    RPC.CREATE_DELETE_VOLUME,
    RPC.EXPAND_VOLUME,
    RPC.LIST_VOLUMES,
    RPC.GET_CAPACITY,
    RPC.SINGLE_NODE_MULTI_WRITER,
)


class ControllerService(csi_pb2_grpc.ControllerServicer):  # type: ignore[misc]
    def __init__(self, backend: VolumeBackend, kms_config: KMSConfig, locks: OperationLocks) -> None:
        self.backend = backend
        self.kms_config = kms_config
        self.locks = locks

    @staticmethod
    def _context(secrets: Mapping[str, str], record: VolumeRecord) -> KMSContext:
        return KMSContext(secrets=dict(secrets), pvc_namespace=record.pvc_namespace)

    def CreateVolume(
        self, request: csi_pb2.CreateVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.CreateVolumeResponse:
        name = require(request.name, "name")
        validate_capabilities(request.volume_capabilities)
        if request.HasField("volume_content_source"):
            raise invalid_argument("creating a volume from a snapshot or another volume is not supported yet")
        parameters = dict(request.parameters)
        unknown = unknown_keys(parameters, KNOWN_PARAMETERS)
        if unknown:
            raise invalid_argument(
                f"unknown StorageClass parameters {unknown}; known: {', '.join(KNOWN_PARAMETERS)}"
            )
        encrypted = parse_bool(parameters, PARAM_ENCRYPTED, default=False)
        kms_id = parameters.get(PARAM_KMS_ID, "")
        if kms_id and not encrypted:
            raise invalid_argument(f'{PARAM_KMS_ID} is set but {PARAM_ENCRYPTED} is not "true"')
        if encrypted:
            self.kms_config.entry(kms_id)  # unknown id -> INVALID_ARGUMENT naming the known ids
        capacity = capacity_from_range(request.capacity_range, request.HasField("capacity_range"))
        volume_id = self.backend.volume_id_for(name)
        pvc_namespace = parameters.get(PARAM_PVC_NAMESPACE)

        with self.locks.hold(volume_id, f"CreateVolume {name}"):
            created = False
            try:
                info = self.backend.get(volume_id)
            except VolumeNotFound:
                info = self.backend.create(
                    volume_id,
                    name,
                    backing_bytes(capacity, encrypted),
                    {
                        NAME: name,
                        CAPACITY: str(capacity),
                        ENCRYPTED: "true" if encrypted else "false",
                        KMS_ID: kms_id,
                        **({PVC_NAMESPACE: pvc_namespace} if pvc_namespace else {}),
                    },
                )
                created = True
            record = VolumeRecord.parse(info.metadata)
            self._check_same(name, record, capacity, encrypted, kms_id)
            if encrypted and record.state is None:
                try:
                    encryption = volume_encryption(
                        self.kms_config, kms_id, self._context(request.secrets, record), self.backend
                    )
                    encryption.new_passphrase(volume_id)
                    self.backend.set_metadata(volume_id, STATE, EncryptionState.PREPARED.value)
                except Exception:
                    if created:  # leave no half-created volume behind
                        self.backend.delete(volume_id)
                    raise
                log.info("volume %s (%s): DEK stored with KMS %r", volume_id, name, kms_id or "secrets")
            return csi_pb2.CreateVolumeResponse(volume=self._volume(volume_id, record.capacity, record))

    @staticmethod
    def _check_same(name: str, record: VolumeRecord, capacity: int, encrypted: bool, kms_id: str) -> None:
        if record.capacity != capacity:
            raise CsiError(
                grpc.StatusCode.ALREADY_EXISTS,
                f"volume {name} exists with {record.capacity} bytes, not the {capacity} asked for",
            )
        if record.encrypted != encrypted or record.kms_id != kms_id:
            raise CsiError(
                grpc.StatusCode.ALREADY_EXISTS,
                f"volume {name} exists with encrypted={record.encrypted}, KMS {record.kms_id!r}; "
                "the request asks for other parameters",
            )

    @staticmethod
    def _volume(volume_id: str, capacity: int, record: VolumeRecord) -> csi_pb2.Volume:
        volume_context = {PARAM_ENCRYPTED: "true" if record.encrypted else "false"}
        if record.encrypted:
            volume_context[PARAM_KMS_ID] = record.kms_id
        return csi_pb2.Volume(volume_id=volume_id, capacity_bytes=capacity, volume_context=volume_context)

    def DeleteVolume(
        self, request: csi_pb2.DeleteVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.DeleteVolumeResponse:
        volume_id = require(request.volume_id, "volume_id")
        with self.locks.hold(volume_id, "DeleteVolume"):
            try:
                info = self.backend.get(volume_id)
            except VolumeNotFound:
                # Unknown, or torn by a crash inside CreateVolume (before any DEK was stored): sweep
                # whatever files are left, and succeed.
                self.backend.delete(volume_id)
                return csi_pb2.DeleteVolumeResponse()
            record = VolumeRecord.parse(info.metadata)
            if self.backend.find_attachment(volume_id):
                raise CsiError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"volume {volume_id} is still attached on this machine; unstage it first",
                )
            if record.encrypted:
                # The DEK goes first: a crash after it leaves a volume that a retry deletes, never a
                # key with no volume.
                volume_encryption(
                    self.kms_config, record.kms_id, self._context(request.secrets, record), self.backend
                ).remove(volume_id)
            self.backend.delete(volume_id)
            log.info("volume %s deleted", volume_id)
            return csi_pb2.DeleteVolumeResponse()

    def ControllerExpandVolume(
        self, request: csi_pb2.ControllerExpandVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerExpandVolumeResponse:
        volume_id = require(request.volume_id, "volume_id")
        if not request.HasField("capacity_range"):
            raise invalid_argument("capacity_range is required")
        if request.HasField("volume_capability"):
            validate_capabilities([request.volume_capability])
        with self.locks.hold(volume_id, "ControllerExpandVolume"):
            record = VolumeRecord.parse(self._get(volume_id).metadata)
            capacity = capacity_from_range(request.capacity_range, True, current=record.capacity)
            if capacity > record.capacity:
                self.backend.resize(volume_id, backing_bytes(capacity, record.encrypted))
                self.backend.set_metadata(volume_id, CAPACITY, str(capacity))
                log.info("volume %s grown to %d bytes", volume_id, capacity)
            # The node must grow the attachment, the dm-crypt mapping and the filesystem.
            return csi_pb2.ControllerExpandVolumeResponse(
                capacity_bytes=max(capacity, record.capacity), node_expansion_required=True
            )

    def ValidateVolumeCapabilities(
        self, request: csi_pb2.ValidateVolumeCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ValidateVolumeCapabilitiesResponse:
        volume_id = require(request.volume_id, "volume_id")
        if not request.volume_capabilities:
            raise invalid_argument("volume_capabilities is required")
        self._get(volume_id)
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
        if request.max_entries < 0:
            raise invalid_argument("max_entries must not be negative")
        # The token names the last volume returned (ids are listed in order), so volumes created or
        # deleted between pages neither repeat nor hide the ones after it.
        after = ""
        if request.starting_token:
            if not request.starting_token.startswith(_PAGE_AFTER):
                raise CsiError(
                    grpc.StatusCode.ABORTED, f"starting_token {request.starting_token!r} is not valid"
                )
            after = request.starting_token[len(_PAGE_AFTER) :]
        remaining = [info for info in self.backend.list() if info.volume_id > after]
        page = remaining[: request.max_entries] if request.max_entries else remaining
        more = len(page) < len(remaining)
        return csi_pb2.ListVolumesResponse(
            entries=[csi_pb2.ListVolumesResponse.Entry(volume=self._volume_of(info)) for info in page],
            next_token=_PAGE_AFTER + page[-1].volume_id if more and page else "",
        )

    def _volume_of(self, info: VolumeInfo) -> csi_pb2.Volume:
        record = VolumeRecord.parse(info.metadata)
        return self._volume(info.volume_id, record.capacity, record)

    def GetCapacity(
        self, request: csi_pb2.GetCapacityRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetCapacityResponse:
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
            ]
        )

    def _get(self, volume_id: str) -> VolumeInfo:
        try:
            return self.backend.get(volume_id)
        except VolumeNotFound:
            raise not_found(f"volume {volume_id} does not exist") from None

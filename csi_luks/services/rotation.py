"""The csi-addons EncryptionKeyRotation service (`EncryptionKeyRotationController`), served by the node
plugin: EncryptionKeyRotate rotates a volume's DEK with the crash-safe protocol of operations/rotation.py,
whether the volume is staged on this node (through its attached device) or not (attached for the call).
"""

from __future__ import annotations

import logging

import grpc

from csi_luks.csiaddons import encryptionkeyrotation_pb2 as pb
from csi_luks.csiaddons import encryptionkeyrotation_pb2_grpc as pb_grpc
from csi_luks.encryption import volume_encryption
from csi_luks.errors import invalid_argument, not_found
from csi_luks.kms.base import KMSContext
from csi_luks.kms.config import KMSConfig
from csi_luks.locks import OperationLocks
from csi_luks.luks import Cryptsetup
from csi_luks.operations.rotation import KeyRotation
from csi_luks.services.validation import checked_id
from csi_luks.volume_metadata import VolumeRecord
from csi_luks.volumes.base import VolumeBackend, VolumeNotFound

log = logging.getLogger(__name__)


class EncryptionKeyRotationService(pb_grpc.EncryptionKeyRotationControllerServicer):  # type: ignore[misc]
    def __init__(
        self, backend: VolumeBackend, kms_config: KMSConfig, locks: OperationLocks, cryptsetup: Cryptsetup
    ) -> None:
        self.backend = backend
        self.kms_config = kms_config
        self.locks = locks
        self.cryptsetup = cryptsetup

    def EncryptionKeyRotate(
        self, request: pb.EncryptionKeyRotateRequest, context: grpc.ServicerContext
    ) -> pb.EncryptionKeyRotateResponse:
        backend = self.backend.for_request(request.secrets)
        volume_id = checked_id(backend, request.volume_id, "volume_id")
        if request.encryption_key:
            raise invalid_argument(
                "encryption_key must be empty: csi-luks generates every DEK itself (256 random bits)"
            )
        with self.locks.hold(volume_id, "EncryptionKeyRotate"):
            try:
                record = VolumeRecord.parse(backend.get(volume_id).metadata)
            except VolumeNotFound:
                raise not_found(f"volume {volume_id} does not exist") from None
            if record.is_snapshot:
                raise not_found(f"{volume_id} is a snapshot, not a volume")
            context_ = KMSContext(secrets=dict(request.secrets), pvc_namespace=record.pvc_namespace)
            encryption = volume_encryption(self.kms_config, record.kms_id, context_, backend)
            with backend.key_device(volume_id) as device:
                result = KeyRotation(self.cryptsetup, backend, encryption).rotate(volume_id, device)
            log.info("volume %s: DEK rotated by EncryptionKeyRotate (key slot %d)", volume_id, result.slot)
            return pb.EncryptionKeyRotateResponse()

"""VolumeEncryption: one volume's KMS and DEK store; makes, fetches and removes its passphrase."""

from __future__ import annotations

import secrets

from csi_luks.kms.base import DEKStore, EncryptionKMS, KMSContext
from csi_luks.kms.config import KMSConfig
from csi_luks.kms.dek_store import MetadataDEKStore
from csi_luks.volumes.base import VolumeBackend

DEK_BYTES = 32  # 256 random bits, encoded base64url (43 characters)


class VolumeEncryption:
    def __init__(self, kms: EncryptionKMS, store: DEKStore) -> None:
        self.kms = kms
        self.store = store

    def new_passphrase(self, volume_id: str) -> None:
        dek = secrets.token_urlsafe(DEK_BYTES)
        self.store.store_dek(volume_id, self.kms.encrypt_dek(volume_id, dek))

    def get_passphrase(self, volume_id: str) -> str:
        return self.kms.decrypt_dek(volume_id, self.store.fetch_dek(volume_id))

    def remove(self, volume_id: str) -> None:
        self.store.remove_dek(volume_id)


def volume_encryption(
    config: KMSConfig, kms_id: str, context: KMSContext, backend: VolumeBackend
) -> VolumeEncryption:
    kms = config.build(kms_id, context)
    return VolumeEncryption(kms, kms.integrated_dek_store or MetadataDEKStore(backend))

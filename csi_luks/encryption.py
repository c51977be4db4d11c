"""One volume's encryption: its KMS and DEK store, and the passphrase they produce."""

from __future__ import annotations

import contextlib
import secrets

from csi_luks.kms.base import DEKNotFound, DEKStore, EncryptionKMS, KeyRotationUnsupported, KMSContext
from csi_luks.kms.config import KMSConfig
from csi_luks.kms.dek_store import MetadataDEKStore
from csi_luks.volumes.base import VolumeBackend

DEK_BYTES = 32  # 256 random bits: a KDF work factor adds nothing on top (see the README's LUKS defaults)


def new_dek() -> str:
    """A fresh DEK, base64url without padding (43 characters), so it is also a printable passphrase."""
    return secrets.token_urlsafe(DEK_BYTES)


class VolumeEncryption:
    """Generates, fetches and removes a volume's LUKS passphrase. The passphrase is never kept here."""

    def __init__(self, kms: EncryptionKMS, store: DEKStore) -> None:
        self.kms = kms
        self.store = store

    def __repr__(self) -> str:
        return f"VolumeEncryption(kms={self.kms.kms_id!r} {type(self.kms).__name__}, store={self.store!r})"

    def new_passphrase(self, volume_id: str) -> None:
        """Generate a DEK and store it wrapped; replaces a DEK that no LUKS header uses yet."""
        self.store.store_dek(volume_id, self.kms.encrypt_dek(volume_id, new_dek()))

    def get_passphrase(self, volume_id: str) -> str:
        return self.kms.decrypt_dek(volume_id, self.store.fetch_dek(volume_id))

    def copy_to(self, volume_id: str, target: VolumeEncryption, target_volume_id: str) -> None:
        """Give target_volume_id this volume's DEK (its cloned header opens with it), under target's KMS."""
        dek = self.get_passphrase(volume_id)
        target.store.store_dek(target_volume_id, target.kms.encrypt_dek(target_volume_id, dek))

    def remove(self, volume_id: str) -> None:
        """Destroy the volume's DEKs: a rotation's pending one, then the current one."""
        with contextlib.suppress(KeyRotationUnsupported):  # no per-volume DEK, so none pending either
            self.store.pending_store().remove_dek(volume_id)
        self.store.remove_dek(volume_id)

    # --- key rotation (operations/rotation.py) -------------------------------------------------------

    def new_pending_passphrase(self, volume_id: str) -> None:
        """Generate the volume's next DEK and store it, wrapped, as its pending DEK."""
        pending = self.store.pending_store()
        pending.store_dek(volume_id, self.kms.encrypt_dek(volume_id, new_dek()))

    def get_pending_passphrase(self, volume_id: str) -> str | None:
        """The pending DEK of a rotation under way; None when there is none."""
        try:
            wrapped = self.store.pending_store().fetch_dek(volume_id)
        except DEKNotFound:
            return None
        return self.kms.decrypt_dek(volume_id, wrapped)

    def make_current(self, volume_id: str, dek: str) -> None:
        """Store dek as the volume's current DEK (the previous one is replaced)."""
        self.store.store_dek(volume_id, self.kms.encrypt_dek(volume_id, dek))

    def forget_previous_versions(self, volume_id: str) -> None:
        self.store.forget_previous_versions(volume_id)

    def remove_pending(self, volume_id: str) -> None:
        self.store.pending_store().remove_dek(volume_id)

    def close(self) -> None:
        self.kms.close()


def volume_encryption(
    config: KMSConfig, kms_id: str, context: KMSContext, backend: VolumeBackend
) -> VolumeEncryption:
    kms = config.build(kms_id, context)
    return VolumeEncryption(kms, kms.integrated_dek_store or MetadataDEKStore(backend))

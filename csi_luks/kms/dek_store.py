"""DEKStore keeping each (wrapped) DEK in its volume's own metadata."""

from __future__ import annotations

from csi_luks.kms.base import DEKNotFound, DEKStore
from csi_luks.volumes.base import VolumeBackend

DEK_KEY = "csi-luks/dek"


class MetadataDEKStore(DEKStore):
    def __init__(self, backend: VolumeBackend, key: str = DEK_KEY) -> None:
        self.backend = backend
        self.key = key

    def store_dek(self, volume_id: str, dek: str) -> None:
        self.backend.set_metadata(volume_id, self.key, dek)

    def fetch_dek(self, volume_id: str) -> str:
        value = self.backend.get(volume_id).metadata.get(self.key)
        if not value:
            raise DEKNotFound(f"volume {volume_id} has no DEK in its metadata ({self.key})")
        return value

    def remove_dek(self, volume_id: str) -> None:
        self.backend.remove_metadata(volume_id, self.key)

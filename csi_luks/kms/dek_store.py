"""A DEK store in the volume's own metadata, for KMSs that wrap DEKs rather than keep them."""

from __future__ import annotations

import contextlib

from csi_luks.kms.base import DEKNotFound, DEKStore
from csi_luks.volumes.base import VolumeBackend, VolumeNotFound

DEK_KEY = "csi-luks/dek"
DEK_PENDING_KEY = "csi-luks/dek-pending"  # the next DEK while a key rotation is under way


class MetadataDEKStore(DEKStore):
    """Keeps the wrapped DEK beside the volume, so it lives and dies with it."""

    def __init__(self, backend: VolumeBackend, key: str = DEK_KEY) -> None:
        self.backend = backend
        self.key = key

    def __repr__(self) -> str:
        return f"MetadataDEKStore({type(self.backend).__name__}, key={self.key!r})"

    def pending_store(self) -> DEKStore:
        return MetadataDEKStore(self.backend, DEK_PENDING_KEY)

    def store_dek(self, volume_id: str, dek: str) -> None:
        self.backend.set_metadata(volume_id, self.key, dek)

    def fetch_dek(self, volume_id: str) -> str:
        dek = self.backend.get(volume_id).metadata.get(self.key)
        if not dek:
            raise DEKNotFound(f"volume {volume_id} has no DEK in its metadata (key {self.key!r})")
        return dek

    def remove_dek(self, volume_id: str) -> None:
        with contextlib.suppress(VolumeNotFound):  # no volume, no DEK
            self.backend.remove_metadata(volume_id, self.key)

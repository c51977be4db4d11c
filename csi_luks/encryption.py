"""One volume's encryption: its KMS and DEK store, and the passphrase they produce."""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from csi_luks.kms.base import (
    DEKNotFound,
    DEKStore,
    EncryptionKMS,
    KeyRotationUnsupported,
    KMSCallObserver,
    KMSContext,
)
from csi_luks.kms.config import TYPE_KEY, KMSConfig
from csi_luks.kms.dek_store import MetadataDEKStore
from csi_luks.volumes.base import VolumeBackend

DEK_BYTES = 32  # 256 random bits: a KDF work factor adds nothing on top (see the README's LUKS defaults)


def new_dek() -> str:
    """A fresh DEK, base64url without padding (43 characters), so it is also a printable passphrase."""
    return secrets.token_urlsafe(DEK_BYTES)


_P = ParamSpec("_P")
_T = TypeVar("_T")


class VolumeEncryption:
    """Generates, fetches and removes a volume's LUKS passphrase. The passphrase is never kept here.

    Every KMS and DEK store call of the plugin goes through here, so this is where they are timed for
    the observer (metrics): one choke point rather than one in each backend.
    """

    def __init__(
        self,
        kms: EncryptionKMS,
        store: DEKStore,
        kms_type: str = "",
        observer: KMSCallObserver | None = None,
    ) -> None:
        self.kms = kms
        self.store = store
        self.kms_type = kms_type or type(kms).__name__
        self.observer = observer

    def _call(self, operation: str, call: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        if self.observer is None:
            return call(*args, **kwargs)
        started = time.monotonic()
        try:
            result = call(*args, **kwargs)
        except Exception as exc:
            self.observer(self.kms_type, operation, time.monotonic() - started, exc)
            raise
        self.observer(self.kms_type, operation, time.monotonic() - started, None)
        return result

    def _wrap(self, volume_id: str, dek: str) -> str:
        return self._call("wrap", self.kms.encrypt_dek, volume_id, dek)

    def _unwrap(self, volume_id: str, wrapped: str) -> str:
        return self._call("unwrap", self.kms.decrypt_dek, volume_id, wrapped)

    def _store(self, store: DEKStore, volume_id: str, wrapped: str) -> None:
        self._call("store", store.store_dek, volume_id, wrapped)

    def _fetch(self, store: DEKStore, volume_id: str) -> str:
        return self._call("fetch", store.fetch_dek, volume_id)

    def _remove(self, store: DEKStore, volume_id: str) -> None:
        self._call("remove", store.remove_dek, volume_id)

    def __repr__(self) -> str:
        return f"VolumeEncryption(kms={self.kms.kms_id!r} {type(self.kms).__name__}, store={self.store!r})"

    def new_passphrase(self, volume_id: str) -> None:
        """Generate a DEK and store it wrapped; replaces a DEK that no LUKS header uses yet."""
        self._store(self.store, volume_id, self._wrap(volume_id, new_dek()))

    def get_passphrase(self, volume_id: str) -> str:
        return self._unwrap(volume_id, self._fetch(self.store, volume_id))

    def copy_to(self, volume_id: str, target: VolumeEncryption, target_volume_id: str) -> None:
        """Give target_volume_id this volume's DEK (its cloned header opens with it), under target's KMS."""
        dek = self.get_passphrase(volume_id)
        target._store(target.store, target_volume_id, target._wrap(target_volume_id, dek))

    def remove(self, volume_id: str) -> None:
        """Destroy the volume's DEKs: a rotation's pending one, then the current one."""
        with contextlib.suppress(KeyRotationUnsupported):  # no per-volume DEK, so none pending either
            self._remove(self.store.pending_store(), volume_id)
        self._remove(self.store, volume_id)

    # --- key rotation (operations/rotation.py) -------------------------------------------------------

    def new_pending_passphrase(self, volume_id: str) -> None:
        """Generate the volume's next DEK and store it, wrapped, as its pending DEK."""
        pending = self.store.pending_store()
        self._store(pending, volume_id, self._wrap(volume_id, new_dek()))

    def get_pending_passphrase(self, volume_id: str) -> str | None:
        """The pending DEK of a rotation under way; None when there is none."""
        try:
            wrapped = self._fetch(self.store.pending_store(), volume_id)
        except DEKNotFound:
            return None
        return self._unwrap(volume_id, wrapped)

    def make_current(self, volume_id: str, dek: str) -> None:
        """Store dek as the volume's current DEK (the previous one is replaced)."""
        self._store(self.store, volume_id, self._wrap(volume_id, dek))

    def forget_previous_versions(self, volume_id: str) -> None:
        self.store.forget_previous_versions(volume_id)

    def remove_pending(self, volume_id: str) -> None:
        self._remove(self.store.pending_store(), volume_id)

    def close(self) -> None:
        self.kms.close()


def volume_encryption(
    config: KMSConfig, kms_id: str, context: KMSContext, backend: VolumeBackend
) -> VolumeEncryption:
    kms = config.build(kms_id, context)
    store = kms.integrated_dek_store or MetadataDEKStore(backend)
    if config.observer is None:
        return VolumeEncryption(kms, store)
    return VolumeEncryption(kms, store, config.entry(kms_id)[TYPE_KEY], config.observer)

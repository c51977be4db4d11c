"""KMS type "secrets" (alias "default"): the LUKS passphrase is the request's `encryptionPassphrase`.

As ceph-csi's SecretsKMS: nothing is generated or stored per volume; every volume of a StorageClass
opens with the passphrase of the Secret the class references. The KMS is its own DEK store.
"""

from __future__ import annotations

from collections.abc import Mapping

from csi_luks.kms.base import (
    DEKStore,
    EncryptionKMS,
    KeyRotationUnsupported,
    KMSContext,
    MissingSecret,
    register,
)

PASSPHRASE_KEY = "encryptionPassphrase"  # noqa: S105 - the secret's name, not a secret


@register("secrets", "default", shared_passphrase=True)
def _build(kms_id: str, config: Mapping[str, str], context: KMSContext) -> EncryptionKMS:
    return SecretsKMS(kms_id, context)


class SecretsKMS(EncryptionKMS, DEKStore):
    def __init__(self, kms_id: str, context: KMSContext) -> None:
        super().__init__(kms_id)
        self._secrets = context.secrets  # kept out of repr: the passphrase is one of them

    def __repr__(self) -> str:
        return f"SecretsKMS({self.kms_id!r})"

    @property
    def integrated_dek_store(self) -> DEKStore:
        return self

    def encrypt_dek(self, volume_id: str, plain_dek: str) -> str:
        return plain_dek

    def decrypt_dek(self, volume_id: str, encrypted_dek: str) -> str:
        return encrypted_dek

    def store_dek(self, volume_id: str, dek: str) -> None:
        """Nothing to store: the passphrase lives in the Kubernetes Secret."""

    def fetch_dek(self, volume_id: str) -> str:
        passphrase = self._secrets.get(PASSPHRASE_KEY)
        if passphrase:
            return passphrase
        # Key names are not secret, and a misspelt one is the usual cause.
        present = ", ".join(repr(k) for k in sorted(self._secrets)) or "none"
        problem = "is empty" if passphrase == "" else "is missing"
        raise MissingSecret(
            f"volume {volume_id}: secret key {PASSPHRASE_KEY!r} {problem} from the request (KMS id "
            f"{self.kms_id!r}, type secrets; the request's secret keys: {present}); the StorageClass must "
            "reference a Secret holding it through csi.storage.k8s.io/node-stage-secret-name and "
            "-namespace (and csi.storage.k8s.io/provisioner-secret-name and -namespace for controller calls)"
        )

    def remove_dek(self, volume_id: str) -> None:
        """Nothing to remove: the Secret is shared by the class's volumes."""

    def pending_store(self) -> DEKStore:
        raise KeyRotationUnsupported(
            f"KMS {self.kms_id!r} is of type secrets: every volume of the StorageClass opens with the one "
            "passphrase of its Secret, so there is no per-volume key to rotate; use a KMS type with "
            "per-volume DEKs (local, metadata, vault, vault-transit, ...) for volumes whose key must rotate"
        )

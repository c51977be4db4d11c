"""KMS type `secrets` (alias `default`): the passphrase is the request's `encryptionPassphrase` secret.

Like ceph-csi's SecretsKMS: every volume of the StorageClass shares that passphrase, and the KMS is
its own (empty) DEK store.
"""

from __future__ import annotations

from collections.abc import Mapping

from csi_luks.kms.base import DEKStore, EncryptionKMS, KMSContext, MissingSecret, register

PASSPHRASE_KEY = "encryptionPassphrase"  # noqa: S105 - the name of the secret, not a secret


class SecretsKMS(EncryptionKMS, DEKStore):
    def __init__(self, kms_id: str, context: KMSContext) -> None:
        super().__init__(kms_id)
        self._secrets = context.secrets

    @property
    def integrated_dek_store(self) -> DEKStore:
        return self

    def encrypt_dek(self, volume_id: str, plain_dek: str) -> str:
        return plain_dek

    def decrypt_dek(self, volume_id: str, encrypted_dek: str) -> str:
        return encrypted_dek

    def store_dek(self, volume_id: str, dek: str) -> None:
        """Nothing to store: the passphrase comes with every request."""

    def fetch_dek(self, volume_id: str) -> str:
        value = self._secrets.get(PASSPHRASE_KEY)
        if not value:
            raise MissingSecret(
                f"volume {volume_id}: KMS {self.kms_id or 'secrets'!r} needs the secret key "
                f"{PASSPHRASE_KEY!r}; reference a Secret holding it in the StorageClass "
                "(csi.storage.k8s.io/node-stage-secret-name and -namespace)"
            )
        return value

    def remove_dek(self, volume_id: str) -> None:
        """Nothing stored, nothing to remove."""


@register("secrets", "default")
def _build(kms_id: str, entry: Mapping[str, str], context: KMSContext) -> EncryptionKMS:
    return SecretsKMS(kms_id, context)

"""KMS type `metadata`: a passphrase (Kubernetes Secret, or the request's secrets) wraps each volume's DEK.

KEK = scrypt(passphrase, salt = volume id, N=2^15, r=8, p=1, 32 bytes; 32 MiB of memory, so a bounded
number run at once: kdf.py); AES-256-GCM wraps the DEK, and
the result {"dek": b64, "nonce": b64} is kept in the volume's metadata. The salt makes every volume's
KEK different, so one leaked wrapped DEK says nothing about another.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from csi_luks.kms import kdf
from csi_luks.kms.base import (
    DEKDecryptError,
    EncryptionKMS,
    KMSConfigError,
    KMSContext,
    MissingSecret,
    register,
)

PASSPHRASE_KEY = "encryptionPassphrase"  # noqa: S105 - the name of the secret, not a secret
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
NONCE_BYTES = 12


def derive_kek(passphrase: str, volume_id: str) -> bytes:
    scrypt = Scrypt(salt=volume_id.encode(), length=32, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
    secret = passphrase.encode()
    return kdf.SLOTS.run(lambda: scrypt.derive(secret))


class MetadataKMS(EncryptionKMS):
    def __init__(self, kms_id: str, entry: Mapping[str, str], context: KMSContext) -> None:
        super().__init__(kms_id)
        self._entry = dict(entry)
        self._context = context
        self._cached: str | None = None

    @property
    def _passphrase(self) -> str:
        # Looked up on first use only: removing a DEK (DeleteVolume) needs no passphrase, and must work
        # after the Secret is gone.
        if self._cached is None:
            self._cached = _passphrase(self.kms_id, self._entry, self._context)
        return self._cached

    def __repr__(self) -> str:
        return f"MetadataKMS({self.kms_id!r})"

    def encrypt_dek(self, volume_id: str, plain_dek: str) -> str:
        nonce = os.urandom(NONCE_BYTES)
        sealed = AESGCM(derive_kek(self._passphrase, volume_id)).encrypt(nonce, plain_dek.encode(), None)
        return json.dumps(
            {"dek": base64.b64encode(sealed).decode(), "nonce": base64.b64encode(nonce).decode()}
        )

    def decrypt_dek(self, volume_id: str, encrypted_dek: str) -> str:
        try:
            wrapped = json.loads(encrypted_dek)
            sealed = base64.b64decode(wrapped["dek"], validate=True)
            nonce = base64.b64decode(wrapped["nonce"], validate=True)
            return AESGCM(derive_kek(self._passphrase, volume_id)).decrypt(nonce, sealed, None).decode()
        except (InvalidTag, ValueError, KeyError, TypeError, binascii.Error):
            raise DEKDecryptError(
                f"volume {volume_id}: its DEK does not decrypt with the passphrase of KMS {self.kms_id!r} "
                "(the Secret changed, or the volume's metadata was altered)"
            ) from None


def _passphrase(kms_id: str, entry: Mapping[str, str], context: KMSContext) -> str:
    secret_name = entry.get("secretName")
    if secret_name:
        namespace = entry.get("secretNamespace") or context.pvc_namespace
        if not namespace:
            raise KMSConfigError(
                f"KMS {kms_id!r}: key 'secretNamespace' is not set and the request names no PVC namespace"
            )
        from csi_luks.kms.kube_api import read_secret

        data = read_secret(secret_name, namespace, f"KMS {kms_id!r}")
        value = data.get(PASSPHRASE_KEY)
        if not value:
            raise MissingSecret(f"KMS {kms_id!r}: Secret {namespace}/{secret_name} has no {PASSPHRASE_KEY!r}")
        return value
    value = context.secrets.get(PASSPHRASE_KEY)
    if not value:
        raise MissingSecret(
            f"KMS {kms_id!r}: no {PASSPHRASE_KEY!r} in the request's secrets, and no 'secretName' configured"
        )
    return value


@register("metadata")
def _build(kms_id: str, entry: Mapping[str, str], context: KMSContext) -> EncryptionKMS:
    return MetadataKMS(kms_id, entry, context)

"""KMS type `local`: DEKs wrapped with AES-256-GCM under a key file on this machine (the standalone default).

The wrapped DEK lives in the volume's metadata as {"dek": b64, "nonce": b64}; the volume id is the
associated data, so a wrapped DEK copied onto another volume does not decrypt there.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from csi_luks.kms.base import DEKDecryptError, EncryptionKMS, KMSConfigError, KMSContext, register

DEFAULT_KEY_FILE = "/var/lib/csi-luks/local-kek"
KEY_BYTES = 32
NONCE_BYTES = 12


class LocalKMS(EncryptionKMS):
    def __init__(self, kms_id: str, key_file: Path) -> None:
        super().__init__(kms_id)
        self.key_file = key_file

    def _load_key(self) -> bytes:
        try:
            info = self.key_file.stat()
            key = self.key_file.read_bytes()
        except FileNotFoundError:
            raise KMSConfigError(
                f"KMS {self.kms_id!r}: key file {self.key_file} is missing; without it no volume of this "
                "KMS can be opened (restore it from a backup)"
            ) from None
        if stat.S_IMODE(info.st_mode) & 0o077:
            raise KMSConfigError(
                f"KMS {self.kms_id!r}: key file {self.key_file} must not be readable by others"
            )
        if len(key) != KEY_BYTES:
            raise KMSConfigError(f"KMS {self.kms_id!r}: key file {self.key_file} must hold {KEY_BYTES} bytes")
        return key

    def _create_key(self) -> None:
        """Create the key file once; of two concurrent creators exactly one wins (link is atomic)."""
        self.key_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, temp = tempfile.mkstemp(dir=self.key_file.parent, prefix=".kek.")
        try:
            os.write(fd, os.urandom(KEY_BYTES))
            os.fsync(fd)
            os.close(fd)
            with contextlib.suppress(FileExistsError):
                os.link(temp, self.key_file)
        finally:
            os.unlink(temp)
        dir_fd = os.open(self.key_file.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def encrypt_dek(self, volume_id: str, plain_dek: str) -> str:
        if not self.key_file.exists():
            try:
                self._create_key()
            except OSError as exc:
                raise KMSConfigError(
                    f"KMS {self.kms_id!r}: cannot create key file {self.key_file}: {exc.strerror}"
                ) from None
        nonce = os.urandom(NONCE_BYTES)
        ciphertext = AESGCM(self._load_key()).encrypt(nonce, plain_dek.encode(), volume_id.encode())
        return json.dumps(
            {"dek": base64.b64encode(ciphertext).decode(), "nonce": base64.b64encode(nonce).decode()}
        )

    def decrypt_dek(self, volume_id: str, encrypted_dek: str) -> str:
        key = self._load_key()
        try:
            wrapped = json.loads(encrypted_dek)
            ciphertext = base64.b64decode(wrapped["dek"], validate=True)
            nonce = base64.b64decode(wrapped["nonce"], validate=True)
            return AESGCM(key).decrypt(nonce, ciphertext, volume_id.encode()).decode()
        except (InvalidTag, ValueError, KeyError, TypeError, binascii.Error):
            raise DEKDecryptError(
                f"volume {volume_id}: its DEK does not decrypt with the key of KMS {self.kms_id!r} "
                f"({self.key_file}): wrong key file, or the volume's metadata was altered"
            ) from None


@register("local")
def _build(kms_id: str, entry: Mapping[str, str], context: KMSContext) -> EncryptionKMS:
    return LocalKMS(kms_id, Path(entry.get("keyFile", DEFAULT_KEY_FILE)))

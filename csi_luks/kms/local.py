"""KMS type "local": DEKs wrapped with AES-256-GCM under a key-encryption key (KEK) in a file.

The key file (config key `keyFile`) holds 32 random bytes and is created, mode 0600, the first time a
DEK is wrapped; unwrapping never creates it, since a new key could not open any existing volume. The
volume id is the GCM associated data, so a wrapped DEK copied to another volume's metadata fails.
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

from csi_luks.kms.base import (
    DEKDecryptError,
    EncryptionKMS,
    KMSConfigError,
    KMSContext,
    KMSObjectNotFound,
    register,
)

KEY_FILE_KEY = "keyFile"
DEFAULT_KEY_FILE = "/var/lib/csi-luks/local-kek"
KEK_BYTES = 32  # AES-256
NONCE_BYTES = 12  # the GCM standard nonce; random is safe far beyond any volume count


@register("local")
def _build(kms_id: str, config: Mapping[str, str], context: KMSContext) -> EncryptionKMS:
    key_file = config.get(KEY_FILE_KEY, DEFAULT_KEY_FILE)
    if not os.path.isabs(key_file):
        # A relative path would depend on the plugin's working directory.
        raise KMSConfigError(f"KMS id {kms_id!r}, key {KEY_FILE_KEY!r}: must be an absolute path")
    return LocalKMS(kms_id, key_file)


class LocalKMS(EncryptionKMS):
    def __init__(self, kms_id: str, key_file: str | os.PathLike[str]) -> None:
        super().__init__(kms_id)
        self.key_file = Path(key_file)

    def __repr__(self) -> str:
        return f"LocalKMS({self.kms_id!r}, key_file={str(self.key_file)!r})"

    def encrypt_dek(self, volume_id: str, plain_dek: str) -> str:
        kek = self._read_key(create=True)
        nonce = os.urandom(NONCE_BYTES)
        wrapped = AESGCM(kek).encrypt(nonce, plain_dek.encode(), volume_id.encode())
        return json.dumps({"dek": _b64(wrapped), "nonce": _b64(nonce)})

    def decrypt_dek(self, volume_id: str, encrypted_dek: str) -> str:
        kek = self._read_key(create=False)
        try:
            document = json.loads(encrypted_dek)
            wrapped = base64.b64decode(document["dek"], validate=True)
            nonce = base64.b64decode(document["nonce"], validate=True)
            if len(nonce) != NONCE_BYTES:
                raise ValueError("bad nonce length")
            return AESGCM(kek).decrypt(nonce, wrapped, volume_id.encode()).decode()
        except InvalidTag:
            reason = (
                "the key file is not the one it was wrapped with, or the DEK belongs to another volume "
                "or was altered"
            )
        except (ValueError, TypeError, KeyError, binascii.Error):  # JSONDecodeError is a ValueError
            reason = "the stored DEK is not a wrapped DEK of the local KMS"
        raise DEKDecryptError(
            f"the DEK of volume {volume_id} does not decrypt with KMS {self.kms_id!r} "
            f"(key file {self.key_file}): {reason}"
        )

    # --- the key file ----------------------------------------------------------------------------------

    def _read_key(self, create: bool) -> bytes:
        try:
            return self._load_key()
        except FileNotFoundError:
            if not create:
                # The request is fine, the node is not (FAILED_PRECONDITION, not INVALID_ARGUMENT): an
                # operator restores the file, and the CO's retry succeeds.
                raise KMSObjectNotFound(
                    f"key file {self.key_file} of KMS {self.kms_id!r} is missing; it is created with the "
                    "first volume, so it was removed or keyFile changed: restore it from a backup"
                ) from None
        self._create_key()
        try:
            return self._load_key()  # the winner's key, if another process created it first
        except FileNotFoundError:  # e.g. a dangling symlink at the path: link saw it, open does not
            raise KMSConfigError(
                f"key file {self.key_file} of KMS {self.kms_id!r} cannot be created: the path exists "
                "but does not open (a dangling symlink?)"
            ) from None

    def _load_key(self) -> bytes:
        """The KEK; FileNotFoundError only when the file is absent."""
        try:
            with open(self.key_file, "rb") as f:
                st = os.fstat(f.fileno())
                if not stat.S_ISREG(st.st_mode):
                    raise KMSConfigError(f"key file {self.key_file} of KMS {self.kms_id!r} is not a file")
                if st.st_mode & 0o077:
                    raise KMSConfigError(
                        f"key file {self.key_file} of KMS {self.kms_id!r} must not be readable by others or "
                        f"its group (mode {stat.S_IMODE(st.st_mode):04o}); chmod it 0600"
                    )
                key = f.read(KEK_BYTES + 1)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise KMSConfigError(
                f"cannot read key file {self.key_file} of KMS {self.kms_id!r}: {exc.strerror}"
            ) from None
        if len(key) != KEK_BYTES:
            size = f"{len(key)} bytes" if len(key) <= KEK_BYTES else "more than 32 bytes"
            raise KMSConfigError(
                f"key file {self.key_file} of KMS {self.kms_id!r} holds {size}, not {KEK_BYTES}"
            )
        return key

    def _create_key(self) -> None:
        """Write a new key under a temporary name and link it into place: the first creator wins."""
        directory = self.key_file.parent
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            fd, temporary = tempfile.mkstemp(prefix=".local-kek-", suffix=".tmp", dir=directory)  # 0600
        except OSError as exc:
            raise KMSConfigError(
                f"cannot create key file {self.key_file} of KMS {self.kms_id!r}: {exc.strerror}"
            ) from None
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(KEK_BYTES))
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):  # a concurrent creator won: its key stays
                os.link(temporary, self.key_file)  # unlike rename, never replaces
            _fsync_directory(directory)  # the link must outlive a crash before any DEK wrapped with it
        except OSError as exc:
            raise KMSConfigError(
                f"cannot create key file {self.key_file} of KMS {self.kms_id!r}: {exc.strerror}"
            ) from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")

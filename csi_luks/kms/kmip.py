"""KMS type `kmip`: each DEK wrapped by a key on a KMIP server (an HSM or enterprise key manager).

Ceph-CSI's `kmip` type, with its configuration keys and Secret keys, so a volume's wrapped DEK moves
between the two plugins unchanged:

- entry: `KMIP_ENDPOINT` (host:port), `KMIP_SECRET_NAME` (default ceph-csi-kmip-credentials),
  `TLS_SERVER_NAME`, `READ_TIMEOUT` and `WRITE_TIMEOUT` (seconds, default 10), `USE_CRYPTO_RPC`
  (default true); csi-luks adds `KMIP_SECRET_NAMESPACE` (default: the plugin's own namespace, where
  Ceph-CSI looks).
- Secret: `CA_CERT`, `CLIENT_CERT`, `CLIENT_KEY` (PEM; mutual TLS, the client certificate is the
  identity the KMIP server authorizes) and `UNIQUE_IDENTIFIER` (the wrapping key's id on the server).

Every call connects (TLS 1.2 or later), negotiates KMIP 1.4 with DiscoverVersions, and then:
- `USE_CRYPTO_RPC` true: the server wraps and unwraps (Encrypt/Decrypt, AES-CBC with PKCS#5 padding
  and a random 16-byte IV); the key never leaves the server.
- `USE_CRYPTO_RPC` false: Get fetches the key and the DEK is sealed here with AES-256-GCM (random
  12-byte nonce), for servers without Encrypt/Decrypt (IBM GKLM).
Either way the volume's metadata holds Ceph-CSI's JSON `{"dek": base64, "nonce": base64}`; the nonce's
length says which of the two sealed it, so a DEK unwraps after the mode is switched.

The client key never touches a file system: it reaches OpenSSL through an anonymous memory file
(memfd), closed once loaded. PyKMIP's own loggers stay at WARNING: at DEBUG they print every message
on the wire, DEKs included.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import json
import logging
import os
import socket
import ssl
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from csi_luks.kms.base import (
    DEKDecryptError,
    EncryptionKMS,
    KMSConfigError,
    KMSContext,
    KMSObjectNotFound,
    KMSPermissionDenied,
    KMSRequestRefused,
    KMSTLSError,
    KMSUnavailable,
    MissingSecret,
    register,
)
from csi_luks.kms.entry_values import flag, seconds
from csi_luks.kms.vault_tls import plugin_namespace

if TYPE_CHECKING:
    from kmip.core import enums
else:
    enums = None  # PyKMIP (and its SQLAlchemy) costs a second to import: only once a kmip KMS is used

# PyKMIP logs every request and response in hex at DEBUG: never let a DEK reach a log that way.
logging.getLogger("kmip").setLevel(logging.WARNING)

T = TypeVar("T")

ENDPOINT = "KMIP_ENDPOINT"
SECRET_NAME = "KMIP_SECRET_NAME"  # noqa: S105 - the name of a configuration key
SECRET_NAMESPACE = "KMIP_SECRET_NAMESPACE"  # noqa: S105 - a csi-luks addition
TLS_SERVER_NAME = "TLS_SERVER_NAME"
READ_TIMEOUT = "READ_TIMEOUT"
WRITE_TIMEOUT = "WRITE_TIMEOUT"
USE_CRYPTO_RPC = "USE_CRYPTO_RPC"
DEFAULT_SECRET_NAME = "ceph-csi-kmip-credentials"  # noqa: S105 - Ceph-CSI's default Secret name
DEFAULT_TIMEOUT = 10.0

CA_CERT = "CA_CERT"
CLIENT_CERT = "CLIENT_CERT"
CLIENT_KEY = "CLIENT_KEY"
UNIQUE_IDENTIFIER = "UNIQUE_IDENTIFIER"
SECRET_KEYS = (CA_CERT, CLIENT_CERT, CLIENT_KEY, UNIQUE_IDENTIFIER)

RPC_NONCE_BYTES = 16  # Ceph-CSI's IV for the server's AES-CBC
LOCAL_NONCE_BYTES = 12  # AES-GCM's nonce, as Ceph-CSI seals a DEK locally
# TLS alerts by which a server refuses the client's certificate (and so the identity it stands for).
_CERT_REFUSALS = frozenset({
    "TLSV13_ALERT_CERTIFICATE_REQUIRED", "SSLV3_ALERT_BAD_CERTIFICATE", "TLSV1_ALERT_UNKNOWN_CA",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN", "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE", "TLSV1_ALERT_ACCESS_DENIED",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED", "SSLV3_ALERT_CERTIFICATE_REVOKED", "TLSV1_ALERT_DECRYPT_ERROR",
})  # fmt: skip


def _endpoint(kms_id: str, value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c.isspace() for c in host):
        raise KMSConfigError(
            f"KMS {kms_id!r}, key {ENDPOINT!r}: must be host:port (e.g. kmip.example.com:5696)"
        )
    return host, int(port)


@dataclass(frozen=True)
class KMIPSettings:
    kms_id: str
    host: str
    port: int
    server_name: str  # the name the server's certificate must carry
    timeout: float  # each socket operation: connect and handshake, every write, every read
    use_crypto_rpc: bool
    secret_namespace: str
    secret_name: str

    @classmethod
    def parse(cls, kms_id: str, entry: Mapping[str, str]) -> KMIPSettings:
        if not entry.get(ENDPOINT):
            raise KMSConfigError(f"KMS {kms_id!r}: key {ENDPOINT!r} (the KMIP server's host:port) is missing")
        host, port = _endpoint(kms_id, entry[ENDPOINT])
        return cls(
            kms_id=kms_id,
            host=host,
            port=port,
            server_name=entry.get(TLS_SERVER_NAME) or host,
            timeout=max(
                seconds(kms_id, entry, READ_TIMEOUT, DEFAULT_TIMEOUT),
                seconds(kms_id, entry, WRITE_TIMEOUT, DEFAULT_TIMEOUT),
            ),
            use_crypto_rpc=flag(kms_id, entry, USE_CRYPTO_RPC, True),
            secret_namespace=entry.get(SECRET_NAMESPACE) or plugin_namespace(kms_id, SECRET_NAMESPACE),
            secret_name=entry.get(SECRET_NAME) or DEFAULT_SECRET_NAME,
        )

    @property
    def where(self) -> str:
        return f"KMIP server {self.host}:{self.port} (KMS {self.kms_id!r})"

    @property
    def secret(self) -> str:
        return f"Secret {self.secret_namespace}/{self.secret_name}"


@dataclass(frozen=True)
class _Credentials:
    context: ssl.SSLContext = field(repr=False)
    key_id: str


def _memfd(name: str, data: str) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.write(fd, data.encode())
    return fd


def _credentials(settings: KMIPSettings) -> _Credentials:
    """The Secret's TLS identity as an SSL context, and the key's id. Messages name keys, never values."""
    from csi_luks.kube import read_secret

    data = read_secret(settings.secret_name, settings.secret_namespace, f"KMS {settings.kms_id!r}")
    missing = [key for key in SECRET_KEYS if not data.get(key, "").strip()]
    if missing:
        raise MissingSecret(f"KMS {settings.kms_id!r}: {settings.secret} has no {', '.join(missing)}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the server's certificate and name
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(cadata=data[CA_CERT])
    except (ssl.SSLError, ValueError):
        raise KMSConfigError(
            f"KMS {settings.kms_id!r}: {settings.secret} key {CA_CERT!r} holds no PEM certificate"
        ) from None
    cert_fd = _memfd("kmip-client-cert", data[CLIENT_CERT])
    key_fd = _memfd("kmip-client-key", data[CLIENT_KEY])
    try:
        context.load_cert_chain(f"/proc/self/fd/{cert_fd}", f"/proc/self/fd/{key_fd}")
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            # The server cannot accept an identity whose key is not the certificate's.
            raise KMSPermissionDenied(
                f"KMS {settings.kms_id!r}: {settings.secret}: {CLIENT_KEY!r} is not the key of "
                f"{CLIENT_CERT!r}, so the KMIP server would refuse this client identity"
            ) from None
        raise KMSConfigError(
            f"KMS {settings.kms_id!r}: {settings.secret}: {CLIENT_CERT!r} or {CLIENT_KEY!r} is not a PEM "
            f"certificate and unencrypted private key ({exc.reason})"
        ) from None
    finally:
        os.close(cert_fd)
        os.close(key_fd)
    return _Credentials(context, data[UNIQUE_IDENTIFIER].strip())


@functools.cache
def _pykmip() -> Any:
    """PyKMIP's enums, imported on first use; and our subclass of its connection."""
    global enums
    from kmip.core import enums as imported
    from kmip.services.kmip_client import KMIPProxy

    enums = imported

    class Proxy(KMIPProxy):  # type: ignore[misc]  # PyKMIP has no type hints
        """PyKMIP's connection, with our TLS context: the server's name checked, the key from memory."""

        def __init__(self, settings: KMIPSettings, context: ssl.SSLContext) -> None:
            super().__init__(
                host=settings.host,
                port=settings.port,
                timeout=settings.timeout,
                config_file=os.devnull,  # no pykmip.conf of the machine mixes in
                kmip_version=enums.KMIPVersion.KMIP_1_4,
            )
            self._context = context
            self._server_name = settings.server_name

        def _create_socket(self, sock: socket.socket) -> None:
            self.socket = self._context.wrap_socket(sock, server_hostname=self._server_name)
            self.socket.settimeout(self.timeout)

    return Proxy


def _cbc_parameters() -> dict[str, Any]:
    """Ceph-CSI's: AES-CBC with PKCS#5 padding."""
    return {
        "cryptographic_algorithm": enums.CryptographicAlgorithm.AES,
        "block_cipher_mode": enums.BlockCipherMode.CBC,
        "padding_method": enums.PaddingMethod.PKCS5,
    }


class KMIPKMS(EncryptionKMS):
    """Wraps DEKs with a KMIP server's key; the wrapped DEK lives in the volume's metadata."""

    def __init__(self, settings: KMIPSettings) -> None:
        super().__init__(settings.kms_id)
        self.settings = settings
        self._cached: _Credentials | None = None

    def __repr__(self) -> str:
        return f"KMIPKMS({self.kms_id!r}, {self.settings.host}:{self.settings.port})"

    @property
    def _credentials(self) -> _Credentials:
        # Read on first use: removing a DEK (it lives in the volume's metadata) needs no Secret.
        if self._cached is None:
            self._cached = _credentials(self.settings)
        return self._cached

    @contextlib.contextmanager
    def _client(self, operation: str, volume_id: str) -> Iterator[Any]:
        """A connected client that negotiated KMIP 1.4; every failure a KMS error naming the server."""
        credentials = self._credentials
        proxy = _pykmip()
        from kmip.core.messages.contents import ProtocolVersion
        from kmip.pie.client import ProxyKmipClient

        client = ProxyKmipClient(config_file=os.devnull, kmip_version=enums.KMIPVersion.KMIP_1_4)
        client.proxy = proxy(self.settings, credentials.context)
        where = f"{operation} for volume {volume_id}: {self.settings.where}"
        with _translated(where, self.settings):
            client.open()
            try:
                answer = client.proxy.discover_versions(protocol_versions=[ProtocolVersion(1, 4)])
                _check_result(answer, "DiscoverVersions")
                offered = [(v.major, v.minor) for v in answer.protocol_versions or []]
                if (1, 4) not in offered:
                    raise KMSRequestRefused(f"{where}: does not speak KMIP 1.4 (it offers {offered})")
                yield client
            finally:
                client.close()

    def _call(self, operation: str, volume_id: str, fn: Callable[[Any, str], T]) -> T:
        with self._client(operation, volume_id) as client:
            return fn(client, self._credentials.key_id)

    def _key(self, volume_id: str, operation: str) -> bytes:
        key = self._call(operation, volume_id, lambda c, uid: c.get(uid))
        value = getattr(key, "value", None)
        if not isinstance(value, bytes) or len(value) not in (16, 24, 32):
            raise KMSRequestRefused(
                f"{operation} for volume {volume_id}: {self.settings.where}: object "
                f"{self._credentials.key_id!r} is not an AES key"
            )
        return value

    def encrypt_dek(self, volume_id: str, plain_dek: str) -> str:
        if self.settings.use_crypto_rpc:
            nonce = os.urandom(RPC_NONCE_BYTES)
            sealed, _ = self._call(
                "wrap DEK (KMIP Encrypt)",
                volume_id,
                lambda c, uid: c.encrypt(
                    plain_dek.encode(),
                    uid=uid,
                    cryptographic_parameters=_cbc_parameters(),
                    iv_counter_nonce=nonce,
                ),
            )
        else:
            nonce = os.urandom(LOCAL_NONCE_BYTES)
            sealed = AESGCM(self._key(volume_id, "wrap DEK (KMIP Get)")).encrypt(
                nonce, plain_dek.encode(), None
            )
        return json.dumps(
            {"dek": base64.b64encode(sealed).decode(), "nonce": base64.b64encode(nonce).decode()}
        )

    def decrypt_dek(self, volume_id: str, encrypted_dek: str) -> str:
        refused = DEKDecryptError(
            f"volume {volume_id}: its DEK does not unwrap with key {self._key_name} on "
            f"{self.settings.where} (another key, or the volume's metadata was altered)"
        )
        try:
            wrapped = json.loads(encrypted_dek)
            sealed = base64.b64decode(wrapped["dek"], validate=True)
            nonce = base64.b64decode(wrapped["nonce"], validate=True)
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise refused from None
        if len(nonce) == LOCAL_NONCE_BYTES:
            try:
                plain = AESGCM(self._key(volume_id, "unwrap DEK (KMIP Get)")).decrypt(nonce, sealed, None)
            except InvalidTag:
                raise refused from None
        elif len(nonce) == RPC_NONCE_BYTES:
            try:
                plain = self._call(
                    "unwrap DEK (KMIP Decrypt)",
                    volume_id,
                    lambda c, uid: c.decrypt(
                        sealed, uid=uid, cryptographic_parameters=_cbc_parameters(), iv_counter_nonce=nonce
                    ),
                )
            except _CryptographicFailure as exc:
                raise DEKDecryptError(f"{refused}: {exc}") from None
        else:
            raise refused
        # CBC has no integrity: another key unwraps to noise (and passes the padding check one time in
        # 256). A DEK of either plugin is printable ASCII; noise all but never is.
        try:
            dek = plain.decode("ascii")
        except UnicodeDecodeError:
            raise refused from None
        if not dek or not dek.isprintable():
            raise refused
        return dek

    @property
    def _key_name(self) -> str:
        """For messages: the key's id once the Secret was read (a message never reads it)."""
        return (
            repr(self._cached.key_id)
            if self._cached is not None
            else f"{UNIQUE_IDENTIFIER} of {self.settings.secret}"
        )


class _CryptographicFailure(KMSRequestRefused):
    """The server could not decrypt (bad padding: the wrong key, or altered data)."""


def _check_result(result: Any, operation: str) -> None:
    status = getattr(result, "result_status", None)
    status = getattr(status, "value", status)
    if status != enums.ResultStatus.SUCCESS:
        from kmip.pie import exceptions as kmip_exceptions

        reason = getattr(result, "result_reason", None)
        message = getattr(result, "result_message", None)
        raise kmip_exceptions.KmipOperationFailure(
            status, getattr(reason, "value", reason), getattr(message, "value", message)
        )


@contextlib.contextmanager
def _translated(where: str, settings: KMIPSettings) -> Iterator[None]:
    _pykmip()
    from kmip.core.exceptions import ConnectionClosed
    from kmip.pie import exceptions as kmip_exceptions
    from kmip.services.kmip_protocol import RequestLengthMismatch

    try:
        yield
    except kmip_exceptions.KmipOperationFailure as exc:
        reason = exc.reason
        said = f"{getattr(reason, 'name', reason)}: {exc.message}"
        if reason == enums.ResultReason.PERMISSION_DENIED:
            raise KMSPermissionDenied(
                f"{where}: refused the client identity of {settings.secret} ({said})"
            ) from None
        if reason in (enums.ResultReason.CRYPTOGRAPHIC_FAILURE, enums.ResultReason.GENERAL_FAILURE):
            # What a server answers a Decrypt whose padding is wrong (PyKMIP: GENERAL_FAILURE).
            raise _CryptographicFailure(f"{where}: answered {said}") from None
        if reason == enums.ResultReason.ITEM_NOT_FOUND:
            raise KMSObjectNotFound(
                f"{where}: has no key {UNIQUE_IDENTIFIER} of {settings.secret} ({said})"
            ) from None
        if reason == enums.ResultReason.WRONG_KEY_LIFECYCLE_STATE:
            raise KMSRequestRefused(
                f"{where}: the key is not active: activate it on the server ({said})"
            ) from None
        raise KMSRequestRefused(f"{where}: answered {said}") from None
    except ssl.SSLCertVerificationError as exc:
        raise KMSTLSError(
            f"{where}: its certificate does not verify as {settings.server_name!r}: {exc.verify_message} "
            f"(check {CA_CERT} in {settings.secret} and {TLS_SERVER_NAME})"
        ) from None
    except ssl.SSLError as exc:
        if exc.reason in _CERT_REFUSALS:
            raise KMSPermissionDenied(
                f"{where}: refused the client certificate of {settings.secret} ({exc.reason}): the server "
                f"does not trust {CLIENT_CERT}/{CLIENT_KEY}"
            ) from None
        raise KMSUnavailable(f"{where}: unavailable: TLS failed: {exc.reason or exc}") from None
    except TimeoutError:
        raise KMSUnavailable(f"{where}: unavailable: no answer within {settings.timeout:g}s") from None
    except (OSError, EOFError, RequestLengthMismatch, ConnectionClosed) as exc:
        raise KMSUnavailable(f"{where}: unavailable: {exc}") from None


@register("kmip")
def _build(kms_id: str, entry: Mapping[str, str], context: KMSContext) -> EncryptionKMS:
    return KMIPKMS(KMIPSettings.parse(kms_id, entry))

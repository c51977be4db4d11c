"""KMS types `vault` (DEKs kept in a KV engine) and `vault-transit` (DEKs wrapped by a Transit key).

Both speak to Vault or OpenBao through hvac. One connection per KMS entry (its client, HTTP session,
token and detected KV versions) is kept and reused until the entry changes; a call that
fails for a transient reason (server down, sealed, 5xx, timeout) is retried with backoff until a
deadline, then reported as KMSUnavailable. A token that expired is renewed by logging in again. A server
certificate that does not verify is reported at once (KMSTLSError): waiting does not fix a wrong CA.
"""

from __future__ import annotations

import base64
import functools
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict, TypeVar
from urllib.parse import urlsplit

import hvac
import hvac.exceptions
import requests
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from csi_luks.kms.base import (
    DEKDecryptError,
    DEKNotFound,
    DEKStore,
    EncryptionKMS,
    KMSConfigError,
    KMSContext,
    KMSPermissionDenied,
    KMSRequestRefused,
    KMSTLSError,
    KMSUnavailable,
    register,
)
from csi_luks.kms.entry_values import flag, seconds
from csi_luks.kms.vault_auth import KubernetesAuth, TokenFileAuth, TokenSecretAuth, VaultAuth
from csi_luks.kms.vault_tls import (
    CABundleFile,
    CASecret,
    ServerNameAdapter,
    certificate_problem,
    plugin_namespace,
)
from csi_luks.volumes.ceph_csi import is_handle

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_SA_TOKEN_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/token"  # noqa: S105 - a path
_PASSPHRASE_FIELD = "passphrase"  # noqa: S105 - the field name in the KV secret
# Ceph-CSI (through libopenstorage/secrets) nests the field: its secrets read {"data": {"passphrase": ..}}
# in KV v1 and v2 alike. Both layouts are read; a Ceph-CSI volume's DEK is written in Ceph-CSI's, so that
# Ceph-CSI can take the volume back.
_CEPH_CSI_ENVELOPE = "data"
PENDING_SUFFIX = "-pending"  # a rotation's next DEK: <prefix><volume id>-pending
# Longer than any sane wait, and short enough for a socket timeout and tenacity's clock arithmetic
# (which fail on NaN, infinity and 1e300 with ValueError or OverflowError: INTERNAL, not a bad entry).
MAX_SECONDS = 86400.0
# What an HTTP header value (X-Vault-Namespace) may hold: printable ASCII, no surrounding blanks.
_HEADER_SAFE = re.compile(r"[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?")


def _address(kms_id: str, address: str) -> str:
    """vaultAddress checked the way requests will use it: an http(s) URL with a host and a valid port."""
    problem = None
    if not address.startswith(("http://", "https://")):
        problem = "must be an http(s):// URL"
    elif any(c.isspace() or not c.isprintable() or not c.isascii() for c in address):
        problem = "must not hold blanks, control or non-ASCII characters (use the IDNA form of a name)"
    else:
        try:
            parts = urlsplit(address)
            parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
        except ValueError:
            problem = "is not a valid URL (check the port)"
        else:
            if not parts.hostname:
                problem = "names no host"
            elif parts.query or parts.fragment or parts.username or parts.password:
                problem = "must be scheme://host[:port][/path], without query, fragment or credentials"
    if problem is not None:
        raise KMSConfigError(f"KMS {kms_id!r}, key 'vaultAddress': {problem}")
    return address.rstrip("/")


def _header_value(kms_id: str, entry: Mapping[str, str], key: str) -> str | None:
    value = entry.get(key) or None
    if value is not None and not _HEADER_SAFE.fullmatch(value):
        raise KMSConfigError(
            f"KMS {kms_id!r}, key {key!r}: must be printable ASCII without surrounding blanks (it is sent "
            "as an HTTP header)"
        )
    return value


def _auth(kms_id: str, entry: Mapping[str, str]) -> VaultAuth:
    """The login an entry of type vault or vault-transit asks for: exactly one of three."""
    role = entry.get("vaultRole") or None
    token_file = entry.get("vaultTokenFile") or None
    token_secret = entry.get("vaultTokenSecretName") or None
    chosen = [key for key, value in
              (("vaultRole", role), ("vaultTokenFile", token_file), ("vaultTokenSecretName", token_secret))
              if value]  # fmt: skip
    if len(chosen) != 1:
        raise KMSConfigError(
            f"KMS {kms_id!r}: set exactly one of 'vaultRole' (Kubernetes auth), 'vaultTokenFile' (a token "
            f"mounted from a Secret) or 'vaultTokenSecretName' (a Secret read through the API); found "
            f"{chosen or 'none'}"
        )
    if role is not None:
        return KubernetesAuth(
            role=role,
            mount=entry.get("vaultAuthPath", "kubernetes").strip("/"),
            token_file=entry.get("vaultServiceAccountTokenFile") or DEFAULT_SA_TOKEN_FILE,
        )
    if token_file is not None:
        return TokenFileAuth(token_file)
    assert token_secret is not None  # noqa: S101 - one of the three, checked above
    namespace = entry.get("vaultTokenSecretNamespace")
    if not namespace:
        raise KMSConfigError(
            f"KMS {kms_id!r}: key 'vaultTokenSecretNamespace' is required with 'vaultTokenSecretName'"
        )
    return TokenSecretAuth(namespace, token_secret, entry.get("vaultTokenSecretKey") or "token")


@dataclass(frozen=True)
class VaultSettings:
    """One KMS entry's connection settings, validated; the cache key of its client."""

    kms_id: str
    address: str
    namespace: str | None
    verify: bool | str  # False, True (system CAs), or a CA bundle file
    auth: VaultAuth
    timeout: float
    retry_deadline: float
    ca_secret: CASecret | None = None  # read at each login; only while verify is True
    tls_server_name: str | None = None  # the name the certificate must carry, if not the address's host

    @classmethod
    def parse(cls, kms_id: str, entry: Mapping[str, str], auth: VaultAuth | None = None) -> VaultSettings:
        """The entry's settings; auth replaces the entry's own login keys (the tenant types choose it)."""
        address = _address(kms_id, entry.get("vaultAddress", ""))
        verify: bool | str = flag(kms_id, entry, "vaultCAVerify", True)
        ca_file = entry.get("vaultCAFile")
        ca_secret_name = entry.get("vaultCAFromSecret")
        if ca_file and ca_secret_name:
            raise KMSConfigError(f"KMS {kms_id!r}: set 'vaultCAFile' or 'vaultCAFromSecret', not both")
        if ca_file:
            if not Path(ca_file).is_file():
                raise KMSConfigError(f"KMS {kms_id!r}, key 'vaultCAFile': {ca_file} does not exist")
            verify = ca_file if verify else False
        ca_secret = None
        if ca_secret_name and verify:
            namespace = entry.get("vaultCAFromSecretNamespace") or plugin_namespace(kms_id)
            ca_secret = CASecret(namespace, ca_secret_name)
        server_name = entry.get("vaultTLSServerName") or None
        if server_name and not address.startswith("https://"):
            raise KMSConfigError(
                f"KMS {kms_id!r}, key 'vaultTLSServerName': needs an https:// vaultAddress, not {address}"
            )
        return cls(
            kms_id=kms_id,
            address=address,
            namespace=_header_value(kms_id, entry, "vaultNamespace"),
            verify=verify,
            auth=auth if auth is not None else _auth(kms_id, entry),
            timeout=seconds(kms_id, entry, "vaultTimeout", 10.0, MAX_SECONDS),
            retry_deadline=seconds(kms_id, entry, "vaultRetryDeadline", 20.0, MAX_SECONDS),
            ca_secret=ca_secret,
            tls_server_name=server_name,
        )


class _Transient(Exception):
    """A failure worth retrying; carries the original for the final message."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


class VaultConnection:
    """An authenticated hvac client for one KMS id, shared by every call of that id."""

    def __init__(self, settings: VaultSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._client: hvac.Client | None = None
        self._ca_file = CABundleFile() if settings.ca_secret is not None else None
        # The KV engine version of each mount used, asked once: it changes only if the engine is remounted,
        # which a configuration change (a new connection) or a restart picks up.
        self._kv_versions: dict[str, int] = {}

    def _login(self) -> hvac.Client:
        s = self.settings
        verify = s.verify
        if s.ca_secret is not None and self._ca_file is not None:
            verify = self._ca_file.write(s.ca_secret.read(s.kms_id))
        session = requests.Session()
        # hvac takes a session's verify over its own argument, and a new session's is True (system CAs).
        session.verify = verify
        if s.tls_server_name:
            session.mount("https://", ServerNameAdapter(s.tls_server_name))
        client = hvac.Client(
            url=s.address, namespace=s.namespace, verify=verify, timeout=s.timeout, session=session
        )
        s.auth.login(client, s.kms_id)
        return client

    def kv_version(self, mount: str, volume_id: str) -> int:
        """The version (1 or 2) of the KV engine at mount, asked of Vault once (any token may read it)."""
        with self._lock:
            known = self._kv_versions.get(mount)
        if known is not None:
            return known
        answer = self.call(
            "detect KV version", volume_id, lambda c: c.adapter.get(f"/v1/sys/internal/ui/mounts/{mount}")
        )
        options = (answer.get("data") or {}).get("options") or {}
        version = 2 if str(options.get("version", "1")) == "2" else 1
        with self._lock:
            self._kv_versions[mount] = version
        return version

    def current_token(self) -> str | None:
        """The token in use, if logged in (for tests and diagnostics; never logged)."""
        with self._lock:
            return None if self._client is None else str(self._client.token)

    def call(self, operation: str, volume_id: str, fn: Callable[[hvac.Client], T]) -> T:
        """Run fn with a logged-in client; retry transient failures; map errors to KMS errors."""

        def attempt() -> T:
            relogged = False
            while True:
                with self._lock:
                    if self._client is None:
                        login = f"{operation}: Vault login with {self.settings.auth.describe()}"
                        self._client = _translate(self._login, login, self.settings, volume_id)
                    client = self._client
                try:
                    return _translate(functools.partial(fn, client), operation, self.settings, volume_id)
                except KMSTLSError:
                    # The next call starts afresh, re-reading a vaultCAFromSecret CA that may be fixed.
                    with self._lock:
                        self._client = None
                    raise
                except KMSPermissionDenied:
                    if relogged:
                        raise
                    # The token may have expired (or the Secret been rotated): log in afresh, once.
                    with self._lock:
                        self._client = None
                    relogged = True

        retrying = Retrying(
            retry=retry_if_exception_type(_Transient),
            stop=stop_after_delay(self.settings.retry_deadline),
            wait=wait_exponential(multiplier=0.25, max=4),
            reraise=True,
        )
        started = time.monotonic()
        try:
            return retrying(attempt)
        except _Transient as exc:
            raise KMSUnavailable(
                f"{operation} for volume {volume_id}: Vault at {self.settings.address} (KMS "
                f"{self.settings.kms_id!r}) is unavailable after {time.monotonic() - started:.0f}s: "
                f"{exc.cause}"
            ) from None


class VaultRequestError(KMSRequestRefused):
    """Vault answered a request with an error of its own (bad request, bad ciphertext...)."""


def _translate(fn: Callable[[], T], operation: str, settings: VaultSettings, volume_id: str) -> T:
    where = f"{operation} for volume {volume_id} (KMS {settings.kms_id!r})"
    try:
        return fn()
    except requests.exceptions.SSLError as exc:
        reason = certificate_problem(exc)
        if reason is None:
            raise _Transient(exc) from None
        name = f" as {settings.tls_server_name!r}" if settings.tls_server_name else ""
        raise KMSTLSError(
            f"{where}: TLS to Vault at {settings.address}{name} failed: {reason} (check vaultCAFile, "
            "vaultCAFromSecret, vaultTLSServerName)"
        ) from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        raise _Transient(exc) from None
    except (
        hvac.exceptions.VaultDown,
        hvac.exceptions.InternalServerError,
        hvac.exceptions.BadGateway,
        hvac.exceptions.RateLimitExceeded,
    ) as exc:
        raise _Transient(exc) from None
    except (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized) as exc:
        raise KMSPermissionDenied(f"{where}: Vault refused: {_errors(exc)}") from None
    except hvac.exceptions.InvalidPath:
        raise DEKNotFound(f"{where}: no DEK stored in Vault") from None
    except hvac.exceptions.VaultError as exc:
        raise VaultRequestError(f"{where}: Vault answered: {_errors(exc)}") from None
    except requests.exceptions.InvalidHeader:
        # Its message quotes the header value, which may be the token: never shown.
        raise KMSConfigError(
            f"{where}: a value sent to Vault as an HTTP header is not valid in one (is the Vault token "
            "file or Secret a single line of printable text?)"
        ) from None
    except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema) as exc:
        raise KMSConfigError(f"{where}: Vault at {settings.address} is not a usable URL: {exc}") from None


def _errors(exc: hvac.exceptions.VaultError) -> str:
    errors = getattr(exc, "errors", None)
    return "; ".join(map(str, errors)) if errors else str(exc) or type(exc).__name__


# One connection per KMS entry and identity (a tenant's login differs from the next tenant's): calls
# share its client, HTTP session, token and detected KV versions. An entry whose settings changed gets a
# new connection, and the old one is dropped once its calls are done.
_CONNECTIONS: dict[tuple[str, VaultAuth], VaultConnection] = {}
_CONNECTIONS_LOCK = threading.Lock()


def connection_for(settings: VaultSettings) -> VaultConnection:
    """The shared connection of these settings (a changed configuration replaces it)."""
    slot = (settings.kms_id, settings.auth)
    with _CONNECTIONS_LOCK:
        connection = _CONNECTIONS.get(slot)
        if connection is None or connection.settings != settings:
            connection = _CONNECTIONS[slot] = VaultConnection(settings)
        return connection


class VaultKVKMS(EncryptionKMS, DEKStore):
    """Keeps each DEK in a KV secret `<backend>/<prefix><volume id>`; the KMS is its own DEK store."""

    def __init__(
        self,
        kms_id: str,
        connection: VaultConnection,
        mount: str,
        prefix: str,
        kv_version: int | None,
        destroy: bool,
        suffix: str = "",
    ) -> None:
        super().__init__(kms_id)
        self.connection = connection
        self.mount = mount
        self.prefix = prefix
        self._kv_version = kv_version
        self.destroy = destroy
        self.suffix = suffix  # "-pending" for the store of a rotation's next DEK

    def pending_store(self) -> DEKStore:
        return VaultKVKMS(
            self.kms_id, self.connection, self.mount, self.prefix, self._kv_version, self.destroy,
            suffix=PENDING_SUFFIX,
        )  # fmt: skip

    def forget_previous_versions(self, volume_id: str) -> None:
        """KV v2 with vaultDestroyKeys: destroy every version but the current one (KV v1 keeps none)."""
        if not self.destroy or self.kv_version(volume_id) != 2:
            return
        path = self.path(volume_id)
        meta = self.connection.call(
            "read DEK versions",
            volume_id,
            lambda c: c.secrets.kv.v2.read_secret_metadata(path=path, mount_point=self.mount),
        )["data"]
        current = int(meta["current_version"])
        old = [int(v) for v, about in (meta.get("versions") or {}).items()
               if int(v) != current and not about.get("destroyed")]  # fmt: skip
        if old:
            self.connection.call(
                "destroy old DEK versions",
                volume_id,
                lambda c: c.secrets.kv.v2.destroy_secret_versions(
                    path=path, versions=old, mount_point=self.mount
                ),
            )

    @property
    def integrated_dek_store(self) -> DEKStore:
        return self

    def encrypt_dek(self, volume_id: str, plain_dek: str) -> str:
        return plain_dek

    def decrypt_dek(self, volume_id: str, encrypted_dek: str) -> str:
        return encrypted_dek

    def check_access(self, volume_id: str) -> None:
        # Logs in, and asks the engine's version as store_dek will.
        self.connection.kv_version(self.mount, volume_id)

    def path(self, volume_id: str) -> str:
        return f"{self.prefix}{volume_id}{self.suffix}"

    def kv_version(self, volume_id: str) -> int:
        """The engine's version: as configured, else detected once per connection."""
        if self._kv_version is not None:
            return self._kv_version
        return self.connection.kv_version(self.mount, volume_id)

    def store_dek(self, volume_id: str, dek: str) -> None:
        secret: dict[str, object] = {_PASSPHRASE_FIELD: dek}
        if is_handle(volume_id):
            secret = {_CEPH_CSI_ENVELOPE: secret}
        if self.kv_version(volume_id) == 2:
            self.connection.call(
                "store DEK",
                volume_id,
                lambda c: c.secrets.kv.v2.create_or_update_secret(
                    path=self.path(volume_id), secret=secret, mount_point=self.mount
                ),
            )
        else:
            self.connection.call(
                "store DEK",
                volume_id,
                # KV v1 takes PUT and POST alike; without a method hvac reads the secret first to choose.
                lambda c: c.secrets.kv.v1.create_or_update_secret(
                    path=self.path(volume_id), secret=secret, mount_point=self.mount, method="PUT"
                ),
            )

    def fetch_dek(self, volume_id: str) -> str:
        if self.kv_version(volume_id) == 2:
            answer = self.connection.call(
                "fetch DEK",
                volume_id,
                lambda c: c.secrets.kv.v2.read_secret_version(
                    path=self.path(volume_id), mount_point=self.mount, raise_on_deleted_version=True
                ),
            )
            data = answer["data"]["data"]
        else:
            answer = self.connection.call(
                "fetch DEK",
                volume_id,
                lambda c: c.secrets.kv.v1.read_secret(path=self.path(volume_id), mount_point=self.mount),
            )
            data = answer["data"]
        data = data or {}
        nested = data.get(_CEPH_CSI_ENVELOPE)
        value = (nested if isinstance(nested, dict) else data).get(_PASSPHRASE_FIELD)
        if not isinstance(value, str) or not value:
            raise DEKNotFound(
                f"volume {volume_id}: the Vault secret {self.mount}/{self.path(volume_id)} has no DEK"
            )
        return value

    def remove_dek(self, volume_id: str) -> None:
        path = self.path(volume_id)
        try:
            if self.kv_version(volume_id) == 1:
                self.connection.call(
                    "remove DEK",
                    volume_id,
                    lambda c: c.secrets.kv.v1.delete_secret(path=path, mount_point=self.mount),
                )
            elif self.destroy:
                # Every version and the metadata: nothing is left to undelete.
                self.connection.call(
                    "destroy DEK",
                    volume_id,
                    lambda c: c.secrets.kv.v2.delete_metadata_and_all_versions(
                        path=path, mount_point=self.mount
                    ),
                )
            else:
                self.connection.call(
                    "remove DEK",
                    volume_id,
                    lambda c: c.secrets.kv.v2.delete_latest_version_of_secret(
                        path=path, mount_point=self.mount
                    ),
                )
        except DEKNotFound:
            pass  # already gone


class VaultTransitKMS(EncryptionKMS):
    """Wraps each DEK with a Transit key that never leaves Vault; the wrapped DEK lives in volume metadata."""

    def __init__(
        self, kms_id: str, connection: VaultConnection, mount: str, key: str, derived: bool = False
    ) -> None:
        super().__init__(kms_id)
        self.connection = connection
        self.mount = mount
        self.key = key
        # With a derived Transit key each volume's DEK is wrapped under a key derived from its id, so a
        # wrapped DEK copied into another volume's metadata does not unwrap there. (Transit's
        # associated_data would do it too, but rewrap does not take it.)
        self.derived = derived

    def check_access(self, volume_id: str) -> None:
        # A token login is local to the client: ask Vault something any token with a right on the mount may.
        self.connection.call(
            "check access", volume_id, lambda c: c.adapter.get(f"/v1/sys/internal/ui/mounts/{self.mount}")
        )

    def _context(self, volume_id: str) -> str | None:
        return base64.b64encode(volume_id.encode()).decode() if self.derived else None

    def encrypt_dek(self, volume_id: str, plain_dek: str) -> str:
        plaintext = base64.b64encode(plain_dek.encode()).decode()
        answer = self.connection.call(
            "wrap DEK",
            volume_id,
            lambda c: c.secrets.transit.encrypt_data(
                name=self.key, plaintext=plaintext, context=self._context(volume_id), mount_point=self.mount
            ),
        )
        return str(answer["data"]["ciphertext"])

    def decrypt_dek(self, volume_id: str, encrypted_dek: str) -> str:
        try:
            answer = self.connection.call(
                "unwrap DEK",
                volume_id,
                lambda c: c.secrets.transit.decrypt_data(
                    name=self.key,
                    ciphertext=encrypted_dek,
                    context=self._context(volume_id),
                    mount_point=self.mount,
                ),
            )
        except VaultRequestError as exc:
            # Only Vault's own refusal means the ciphertext is wrong; TLS, login or reach errors stay.
            raise DEKDecryptError(
                f"volume {volume_id}: its DEK does not unwrap with Transit key {self.mount}/{self.key} "
                f"(KMS {self.kms_id!r}): {exc}"
            ) from None
        return base64.b64decode(answer["data"]["plaintext"]).decode()

    def rewrap_dek(self, volume_id: str, encrypted_dek: str) -> str:
        """Re-wrap under the Transit key's newest version (after a key rotation), without exposing the DEK."""
        answer = self.connection.call(
            "rewrap DEK",
            volume_id,
            lambda c: c.secrets.transit.rewrap_data(
                name=self.key,
                ciphertext=encrypted_dek,
                context=self._context(volume_id),
                mount_point=self.mount,
            ),
        )
        return str(answer["data"]["ciphertext"])


def _kv_version(kms_id: str, entry: Mapping[str, str]) -> int | None:
    backend = entry.get("vaultBackend", "")
    versions = {"": None, "kv": 1, "kv-v1": 1, "kv-v2": 2}
    if backend not in versions:
        raise KMSConfigError(f'KMS {kms_id!r}, key \'vaultBackend\': must be "kv-v1" or "kv-v2" (or unset)')
    return versions[backend]


class KVSettings(TypedDict):
    mount: str
    prefix: str
    kv_version: int | None
    destroy: bool


def kv_settings(kms_id: str, entry: Mapping[str, str]) -> KVSettings:
    """Where an entry keeps DEKs in KV, and how it removes them."""
    return KVSettings(
        mount=(entry.get("vaultBackendPath") or "secret").strip("/"),
        prefix=entry.get("vaultPassphrasePath", ""),
        kv_version=_kv_version(kms_id, entry),
        destroy=flag(kms_id, entry, "vaultDestroyKeys", True),
    )


@register("vault")
def _build_kv(kms_id: str, entry: Mapping[str, str], context: KMSContext) -> EncryptionKMS:
    return VaultKVKMS(
        kms_id, connection_for(VaultSettings.parse(kms_id, entry)), **kv_settings(kms_id, entry)
    )


@register("vault-transit")
def _build_transit(kms_id: str, entry: Mapping[str, str], context: KMSContext) -> EncryptionKMS:
    key = entry.get("vaultTransitKey")
    if not key:
        raise KMSConfigError(f"KMS {kms_id!r}: key 'vaultTransitKey' (the Transit key's name) is missing")
    return VaultTransitKMS(
        kms_id,
        connection_for(VaultSettings.parse(kms_id, entry)),
        mount=entry.get("vaultTransitPath", "transit").strip("/"),
        key=key,
        derived=flag(kms_id, entry, "vaultTransitDerivedKey", False),
    )

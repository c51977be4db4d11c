"""TLS to Vault: a CA bundle from a Kubernetes Secret, a server name other than the address's host, and
telling a certificate that does not verify (a configuration to fix) from a network failure (to retry).
"""

from __future__ import annotations

import atexit
import os
import shutil
import ssl
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from requests.adapters import DEFAULT_POOLBLOCK, HTTPAdapter
from urllib3.util.ssl_match_hostname import CertificateError

from csi_luks.kms.base import KMSConfigError, KMSObjectNotFound

CA_SECRET_KEY = "cert"  # noqa: S105 - the Secret key ceph-csi keeps a vaultCAFromSecret CA bundle in
# The plugin's own namespace, where a pod's ServiceAccount token volume puts it.
SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


@dataclass(frozen=True)
class CASecret:
    """A Secret whose key `cert` holds the PEM CA bundle that Vault's certificate must chain to."""

    namespace: str
    name: str

    def read(self, kms_id: str) -> str:
        """The bundle, read afresh through the API (so a rotated CA is picked up at the next login)."""
        from csi_luks.kube import read_secret

        data = read_secret(self.name, self.namespace, f"KMS {kms_id!r}, Vault CA (vaultCAFromSecret)")
        pem = data.get(CA_SECRET_KEY, "").strip()
        if not pem:
            raise KMSObjectNotFound(
                f"KMS {kms_id!r}: Secret {self.namespace}/{self.name} has no CA bundle under key "
                f"{CA_SECRET_KEY!r}"
            )
        try:
            ssl.create_default_context(cadata=pem)
        except (ssl.SSLError, ValueError):
            raise KMSConfigError(
                f"KMS {kms_id!r}: Secret {self.namespace}/{self.name} key {CA_SECRET_KEY!r} holds no "
                "PEM certificate"
            ) from None
        return pem + "\n"


def plugin_namespace(kms_id: str, key: str = "vaultCAFromSecretNamespace") -> str:
    """The namespace the plugin runs in: the default home of a Secret the entry names (key: the entry
    key that names another namespace, for the message when the plugin's own is unknown)."""
    try:
        namespace = Path(SA_NAMESPACE_FILE).read_text().strip()
    except OSError:
        namespace = ""
    if not namespace:
        raise KMSConfigError(
            f"KMS {kms_id!r}: set {key!r}: the plugin's own namespace is unknown "
            f"({SA_NAMESPACE_FILE} is missing, so it does not run in a pod)"
        )
    return namespace


_ca_dir: Path | None = None
_ca_dir_lock = threading.Lock()


def _private_dir() -> Path:
    """One directory per process, mode 0700 (mkdtemp), removed at exit."""
    global _ca_dir
    with _ca_dir_lock:
        if _ca_dir is None:
            _ca_dir = Path(tempfile.mkdtemp(prefix="csi-luks-vault-ca-"))
            atexit.register(shutil.rmtree, _ca_dir, True)
        return _ca_dir


class CABundleFile:
    """A file for one connection's CA bundle: requests verifies against a path, not a PEM string.

    Rewritten atomically at each login, mode 0600 in a 0700 directory: a CA is not secret, but what the
    plugin trusts is nobody else's to read or swap.
    """

    def __init__(self) -> None:
        self.path = _private_dir() / f"{uuid.uuid4().hex}.pem"

    def write(self, pem: str) -> str:
        partial = self.path.with_suffix(".partial")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(pem)
        os.replace(partial, self.path)
        return str(self.path)


class ServerNameAdapter(HTTPAdapter):
    """Sends `server_name` as SNI and checks the certificate against it, whatever host the URL names.

    Verification stays as configured (CA, on or off): only the name it is checked against changes.
    """

    def __init__(self, server_name: str) -> None:
        self.server_name = server_name
        super().__init__()

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = DEFAULT_POOLBLOCK, **pool_kwargs: Any
    ) -> None:
        pool_kwargs["server_hostname"] = self.server_name
        pool_kwargs["assert_hostname"] = self.server_name
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)


def certificate_problem(exc: BaseException) -> str | None:
    """Why the server's certificate was refused, if that is what exc (a requests SSLError) is about.

    requests and urllib3 wrap the ssl error a few levels deep (args, reason, cause); other TLS errors
    (a handshake cut short while Vault restarts) are not about the certificate and stay retryable.
    """
    pending: list[object] = [exc]
    seen: set[int] = set()
    while pending:
        item = pending.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, ssl.SSLCertVerificationError):
            return f"certificate verify failed: {item.verify_message or item.reason}"
        if isinstance(item, CertificateError):
            return f"certificate verify failed: {item}"
        pending.extend(item.args)
        pending.extend((getattr(item, "reason", None), item.__cause__, item.__context__))
    return None

"""How a Vault connection logs in: a token (file or Kubernetes Secret) or Kubernetes auth (a JWT).

Each method is a frozen dataclass, so it is part of the connection's cache key: two tenants with
different Secrets or ServiceAccounts get different connections, one per (KMS id, tenant).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import hvac

from csi_luks.kms.base import KMSConfigError, KMSObjectNotFound, MissingSecret


class VaultAuth(ABC):
    @abstractmethod
    def login(self, client: hvac.Client, kms_id: str) -> None:
        """Authenticate client (set its token); called again whenever Vault refuses the current token."""

    @abstractmethod
    def describe(self) -> str:
        """What the method is, for messages: never the credential itself."""


def _read(path: str, what: str, kms_id: str) -> str:
    try:
        value = Path(path).read_text().strip()
    except OSError as exc:
        raise KMSConfigError(f"KMS {kms_id!r}: cannot read {what} {path}: {exc.strerror}") from None
    except ValueError:  # a NUL byte in the path, or a file that is not UTF-8 text
        raise KMSConfigError(f"KMS {kms_id!r}: {what} {path!r} is not a readable text file") from None
    if not value:
        raise KMSConfigError(f"KMS {kms_id!r}: {what} {path} is empty")
    return value


@dataclass(frozen=True)
class TokenFileAuth(VaultAuth):
    """A token in a file (e.g. a mounted Secret); re-read at every login, so a rotated file is picked up."""

    path: str

    def login(self, client: hvac.Client, kms_id: str) -> None:
        client.token = _read(self.path, "the Vault token file", kms_id)

    def describe(self) -> str:
        return f"token file {self.path}"


@dataclass(frozen=True)
class TokenSecretAuth(VaultAuth):
    """A token in a Kubernetes Secret, read through the API at every login."""

    namespace: str
    name: str
    key: str
    # Read when the Secret `name` does not exist: Ceph-CSI's default name, for an entry that names none
    # (a tenant set up for Ceph-CSI keeps its token there).
    fallback: str | None = None

    def login(self, client: hvac.Client, kms_id: str) -> None:
        from csi_luks.kms.kube_api import read_secret

        purpose = f"KMS {kms_id!r}, Vault token"
        name = self.name
        try:
            data = read_secret(name, self.namespace, purpose)
        except KMSObjectNotFound:
            if self.fallback is None:
                raise
            name = self.fallback
            data = read_secret(name, self.namespace, purpose)
        token = data.get(self.key, "").strip()
        if not token:
            raise MissingSecret(
                f"KMS {kms_id!r}: Secret {self.namespace}/{name} has no Vault token under key {self.key!r}"
            )
        client.token = token

    def describe(self) -> str:
        return f"token from Secret {self.namespace}/{self.name}"


@dataclass(frozen=True)
class KubernetesAuth(VaultAuth):
    """Vault's Kubernetes auth: a ServiceAccount JWT, which Vault checks with a TokenReview.

    The JWT comes from a file (the plugin's own projected token) or, with service_account set, from the
    TokenRequest API for that ServiceAccount in `namespace` (a tenant's own identity).
    """

    role: str
    mount: str
    token_file: str | None = None
    namespace: str | None = None
    service_account: str | None = None
    audience: str | None = None

    def _jwt(self, kms_id: str) -> str:
        if self.service_account is not None:
            assert self.namespace is not None  # noqa: S101 - set together by the factories
            from csi_luks.kms.kube_api import request_service_account_token

            audiences = [self.audience] if self.audience else []
            return request_service_account_token(
                self.service_account, self.namespace, audiences, f"KMS {kms_id!r}, Vault login"
            )
        assert self.token_file is not None  # noqa: S101 - one of the two is always set
        return _read(self.token_file, "the service-account token", kms_id)

    def login(self, client: hvac.Client, kms_id: str) -> None:
        client.auth.kubernetes.login(role=self.role, jwt=self._jwt(kms_id), mount_point=self.mount)

    def describe(self) -> str:
        who = (
            f"ServiceAccount {self.namespace}/{self.service_account}"
            if self.service_account
            else f"token file {self.token_file}"
        )
        return f"Kubernetes auth role {self.role!r} at auth/{self.mount} with {who}"

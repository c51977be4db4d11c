"""EncryptionKMS, DEKStore, the provider registry, and the errors every backend raises.

A DEK (data encryption key) is the volume's LUKS passphrase: random, per volume. An EncryptionKMS
either wraps DEKs (the wrapped DEK then lives in a DEKStore such as the volume's own metadata) or keeps
them itself (then it is its own DEKStore). Each backend module registers itself under its
`encryptionKMSType`; BUILT_IN names the module of each built-in type, imported when that type is first
looked up, so a plugin loads only the backends (and their client libraries) its configuration uses.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field


class KMSError(Exception):
    """A KMS operation failed."""


class KMSConfigError(KMSError):
    """The KMS configuration is wrong (unknown id or type, missing or bad key). Names key and id."""


class KMSBackendMissing(KMSConfigError):
    """A KMS type's client library does not import in this plugin (its image): no request can fix it."""


class KMSObjectNotFound(KMSConfigError):
    """An object the configuration names (a Kubernetes Secret, a ServiceAccount, the local KMS's key file)
    does not exist."""


class KMSUnavailable(KMSError):
    """The KMS cannot be reached now; retrying later may work."""


class KMSPermissionDenied(KMSError):
    """The KMS refused us."""


class KMSTLSError(KMSError):
    """The KMS's TLS certificate does not verify (unknown CA, another name): fix the configuration."""


class KMSRequestRefused(KMSError):
    """The KMS answered with an error of its own (an unknown role, a bad request): its setup or the KMS
    configuration must change; a retry of the same call will not pass."""


class DEKNotFound(KMSError):
    """No DEK is stored for the volume."""


class DEKDecryptError(KMSError):
    """A stored DEK does not decrypt with this KMS's key (wrong or rotated key, tampered metadata)."""


class MissingSecret(KMSError):
    """A secret the KMS needs is not in the request (e.g. encryptionPassphrase)."""


class KeyRotationUnsupported(KMSError):
    """The KMS keeps no per-volume DEK that could be rotated (the `secrets` type)."""


class DEKStore(ABC):
    """Stores a (usually wrapped) DEK for a volume id."""

    def pending_store(self) -> DEKStore:
        """Where a key rotation keeps a volume's next DEK until it is current (operations/rotation.py)."""
        raise KeyRotationUnsupported(
            f"{type(self).__name__} keeps no pending DEK: key rotation is not possible"
        )

    def forget_previous_versions(self, volume_id: str) -> None:  # noqa: B027 - optional hook
        """After the volume's DEK was replaced: destroy older DEKs the store keeps (Vault KV v2 versions)."""

    @abstractmethod
    def store_dek(self, volume_id: str, dek: str) -> None: ...

    @abstractmethod
    def fetch_dek(self, volume_id: str) -> str:
        """The stored DEK, or DEKNotFound."""

    @abstractmethod
    def remove_dek(self, volume_id: str) -> None:
        """Remove the DEK; a missing one is already removed."""


class EncryptionKMS(ABC):
    """One configured KMS (one entry of the KMS configuration)."""

    def __init__(self, kms_id: str) -> None:
        self.kms_id = kms_id

    @property
    def integrated_dek_store(self) -> DEKStore | None:
        """The KMS itself when it stores DEKs; None when DEKs go to an external store (metadata)."""
        return None

    @abstractmethod
    def encrypt_dek(self, volume_id: str, plain_dek: str) -> str:
        """Wrap a DEK for storage (identity for KMSs that store DEKs themselves)."""

    @abstractmethod
    def decrypt_dek(self, volume_id: str, encrypted_dek: str) -> str:
        """Unwrap a stored DEK."""

    def check_access(self, volume_id: str) -> None:  # noqa: B027 - optional hook, most need no login
        """Log in (or connect) and fail as the first real call would, before CreateVolume makes anything:
        a KMS that refuses or is down then costs no image created and deleted on every retry."""

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release clients and connections."""


@dataclass(frozen=True)
class KMSContext:
    """What a call brings that a backend may need: the request's secrets, the PVC's namespace."""

    secrets: Mapping[str, str] = field(repr=False)  # never in a log line or a traceback
    pvc_namespace: str | None = None


KMSFactory = Callable[[str, Mapping[str, str], KMSContext], EncryptionKMS]
# Told of every KMS and DEK store call: (KMS type, operation, seconds, the exception or None). Metrics use it.
KMSCallObserver = Callable[[str, str, float, BaseException | None], None]
# Each built-in type and the module whose @register defines it. Imported on first use: hvac, requests,
# boto3 and PyKMIP cost megabytes a plugin whose entries are all `local` never needs.
BUILT_IN: Mapping[str, str] = {
    "aws-metadata": "csi_luks.kms.aws",
    "aws-sts-metadata": "csi_luks.kms.aws",
    "default": "csi_luks.kms.secrets",
    "kmip": "csi_luks.kms.kmip",
    "local": "csi_luks.kms.local",
    "metadata": "csi_luks.kms.metadata",
    "secrets": "csi_luks.kms.secrets",
    "vault": "csi_luks.kms.vault",
    "vault-transit": "csi_luks.kms.vault",
    "vaulttenantsa": "csi_luks.kms.vault_tenant",
    "vaulttokens": "csi_luks.kms.vault_tenant",
}
_REGISTRY: dict[str, KMSFactory] = {}
_TENANT_KEYS: dict[str, frozenset[str]] = {}
_SHARED_PASSPHRASE_TYPES: set[str] = set()


def register(
    kms_type: str, *aliases: str, tenant_keys: frozenset[str] = frozenset(), shared_passphrase: bool = False
) -> Callable[[KMSFactory], KMSFactory]:
    """Class/function decorator: `@register("local")` makes type "local" build with that factory.

    tenant_keys: the entry keys a tenant may override from a ConfigMap in the PVC's namespace (none by
    default: only types built for tenants, whose credentials are the tenant's own, allow any).
    shared_passphrase: every volume opens with one passphrase from the request, and no per-volume DEK
    is stored (so a copy of a volume with a DEK of its own cannot be kept).
    """

    def decorate(factory: KMSFactory) -> KMSFactory:
        for name in (kms_type, *aliases):
            if name in _REGISTRY:
                raise ValueError(f"KMS type {name!r} registered twice")
            _REGISTRY[name] = factory
            _TENANT_KEYS[name] = tenant_keys
            if shared_passphrase:
                _SHARED_PASSPHRASE_TYPES.add(name)
        return factory

    return decorate


def _load(kms_type: str) -> None:
    """Import the module of a built-in type not registered yet; unknown types are left to the caller."""
    module = BUILT_IN.get(kms_type)
    if module is None or kms_type in _REGISTRY:
        return
    try:
        importlib.import_module(module)  # thread safe: a concurrent first use waits for this import
    except ImportError as exc:
        # An image without a backend's client library: say which type needs what, not only a traceback.
        raise KMSBackendMissing(f"encryptionKMSType {kms_type!r} cannot be loaded: {exc}") from exc
    if kms_type not in _REGISTRY:
        raise AssertionError(f"{module} does not register KMS type {kms_type!r}")


def shares_one_passphrase(kms_type: str) -> bool:
    _load(kms_type)
    return kms_type in _SHARED_PASSPHRASE_TYPES


def tenant_keys_for(kms_type: str) -> frozenset[str]:
    _load(kms_type)
    return _TENANT_KEYS.get(kms_type, frozenset())


def factory_for(kms_type: str) -> KMSFactory:
    _load(kms_type)
    try:
        return _REGISTRY[kms_type]
    except KeyError:
        known = ", ".join(known_types())
        raise KMSConfigError(f"unknown encryptionKMSType {kms_type!r}; known types: {known}") from None


def known_types() -> list[str]:
    return sorted(_REGISTRY.keys() | BUILT_IN.keys())

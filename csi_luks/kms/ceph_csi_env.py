"""Ceph-CSI's env-style KMS entries: `KMS_PROVIDER`, `VAULT_ADDR`, ... as ODF/OCS writes them into the
`csi-kms-connection-details` ConfigMap, read as the entry they stand for (Ceph-CSI's
internal/kms/vault_tokens.go, transformConfig).

Ceph-CSI names the type with `KMS_PROVIDER` when `encryptionKMSType` is absent, and translates the other
keys for its two tenant Vault types; csi-luks translates them for every type (a key the type does not
use is ignored by it either way) and keeps the entry's other keys.
"""

from __future__ import annotations

from collections.abc import Mapping

PROVIDER_KEY = "KMS_PROVIDER"
_KEYS = {
    PROVIDER_KEY: "encryptionKMSType",
    "VAULT_ADDR": "vaultAddress",
    "VAULT_BACKEND": "vaultBackend",
    "VAULT_BACKEND_PATH": "vaultBackendPath",
    "VAULT_DESTROY_KEYS": "vaultDestroyKeys",
    "VAULT_CACERT": "vaultCAFromSecret",
    "VAULT_TLS_SERVER_NAME": "vaultTLSServerName",
    "VAULT_CLIENT_CERT": "vaultClientCertFromSecret",
    "VAULT_CLIENT_KEY": "vaultClientCertKeyFromSecret",
    "VAULT_AUTH_NAMESPACE": "vaultAuthNamespace",
    "VAULT_NAMESPACE": "vaultNamespace",
}
_SKIP_VERIFY = "VAULT_SKIP_VERIFY"  # the inverse of vaultCAVerify
_TRUE, _FALSE = ("1", "t", "T", "TRUE", "true", "True"), ("0", "f", "F", "FALSE", "false", "False")  # Go's


def is_env_style(entry: Mapping[str, object]) -> bool:
    return PROVIDER_KEY in entry and "encryptionKMSType" not in entry


def translate(entry: Mapping[str, str]) -> dict[str, str]:
    """The entry in the configuration file's keys; an explicit file-style key wins over its env twin."""
    translated = {k: v for k, v in entry.items() if k not in _KEYS and k != _SKIP_VERIFY}
    for env_key, key in _KEYS.items():
        if env_key in entry:
            translated.setdefault(key, entry[env_key])
    skip = entry.get(_SKIP_VERIFY)
    if skip in _TRUE or skip in _FALSE:  # as Ceph-CSI: an unparsable value leaves the default (verify)
        translated.setdefault("vaultCAVerify", "false" if skip in _TRUE else "true")
    return translated

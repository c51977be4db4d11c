"""KMS types `vaulttokens` and `vaulttenantsa`: Vault KV, with each tenant's own Vault identity.

A tenant is a Kubernetes namespace (the PVC's). With `vaulttokens` the plugin logs in with a token the
tenant keeps in a Secret of its namespace; with `vaulttenantsa` it asks the TokenRequest API for a token
of a ServiceAccount in that namespace and logs in with Vault's Kubernetes auth. Either way the DEKs are
stored with the tenant's credentials, under the tenant's policies. Tenants may also override some
connection settings (TENANT_KEYS) from a ConfigMap in their namespace (see KMSConfig).
"""

from __future__ import annotations

from collections.abc import Mapping

from csi_luks.kms.base import EncryptionKMS, KMSConfigError, KMSContext, register
from csi_luks.kms.vault import VaultKVKMS, VaultSettings, connection_for, kv_settings
from csi_luks.kms.vault_auth import KubernetesAuth, TokenSecretAuth

DEFAULT_TOKEN_SECRET = "csi-luks-vault-token"  # noqa: S105 - a Secret's name
CEPH_CSI_TOKEN_SECRET = "ceph-csi-kms-token"  # noqa: S105 - Ceph-CSI's default, read when ours is missing
DEFAULT_TENANT_SA = "csi-luks-vault-sa"
DEFAULT_ROLE = "csi-luks"

# Where to find Vault and the DEKs: what a tenant running its own Vault (or its own mount) needs to change.
_CONNECTION_KEYS = frozenset(
    {
        "vaultAddress",
        "vaultBackend",
        "vaultBackendPath",
        "vaultPassphrasePath",
        "vaultNamespace",
        "vaultCAVerify",
        "vaultTLSServerName",
        "vaultDestroyKeys",
    }
)


def _tenant(kms_id: str, context: KMSContext) -> str:
    if not context.pvc_namespace:
        raise KMSConfigError(
            f"KMS {kms_id!r}: this KMS type needs the PVC's namespace, and the request does not name one "
            "(run the external-provisioner with --extra-create-metadata)"
        )
    return context.pvc_namespace


@register("vaulttokens", tenant_keys=_CONNECTION_KEYS)
def _build_tokens(kms_id: str, entry: Mapping[str, str], context: KMSContext) -> EncryptionKMS:
    tenant = _tenant(kms_id, context)
    named = entry.get("tenantTokenName")
    fallback = None if named else CEPH_CSI_TOKEN_SECRET
    auth = TokenSecretAuth(tenant, named or DEFAULT_TOKEN_SECRET, "token", fallback)
    return VaultKVKMS(
        kms_id, connection_for(VaultSettings.parse(kms_id, entry, auth)), **kv_settings(kms_id, entry)
    )


@register("vaulttenantsa", tenant_keys=_CONNECTION_KEYS | {"vaultRole", "vaultAuthPath"})
def _build_tenant_sa(kms_id: str, entry: Mapping[str, str], context: KMSContext) -> EncryptionKMS:
    tenant = _tenant(kms_id, context)
    auth = KubernetesAuth(
        role=entry.get("vaultRole") or DEFAULT_ROLE,
        mount=(entry.get("vaultAuthPath") or "kubernetes").strip("/"),
        namespace=tenant,
        service_account=entry.get("tenantSAName") or DEFAULT_TENANT_SA,
        audience=entry.get("vaultKubernetesAudience") or None,
    )
    return VaultKVKMS(
        kms_id, connection_for(VaultSettings.parse(kms_id, entry, auth)), **kv_settings(kms_id, entry)
    )

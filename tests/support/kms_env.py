"""One OpenBao and one Kubernetes API server per session, wired together the way a real cluster is.

OpenBao's Kubernetes auth reviews tokens through the API server (TokenReview, with a reviewer
ServiceAccount bound to system:auth-delegator). The plugin's identity is the ServiceAccount
`kube-system/csi-luks` with the RBAC of deploy/kustomize/base/rbac.yaml; tenants are namespaces with their
own token Secret or ServiceAccount. Everything here is real: no call is mocked.
"""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass
from pathlib import Path

import hvac
import kubernetes.client as k8s
import kubernetes.utils

from tests.support.deployed_plugin import DEPLOY_BASE
from tests.support.kube import KubeCluster
from tests.support.openbao import OpenBao

SYSTEM_NAMESPACE = "kube-system"
NODE_SA = "csi-luks"  # the plugin's own ServiceAccount, from deploy/kustomize/base/rbac.yaml
RBAC_MANIFEST = DEPLOY_BASE / "rbac.yaml"
STRANGER_SA = "someone-else"  # a ServiceAccount Vault's roles do not bind
TENANT_SA = "csi-luks-vault-sa"  # the default of the vaulttenantsa type
TOKEN_SECRET = "csi-luks-vault-token"  # the default Secret name of the vaulttokens type
DEK_POLICY = """
path "secret/data/*" { capabilities = ["create", "read", "update", "delete"] }
path "secret/metadata/*" { capabilities = ["read", "delete", "list"] }
path "sys/internal/ui/mounts/*" { capabilities = ["read"] }
"""
NOTHING_POLICY = 'path "sys/internal/ui/mounts/*" { capabilities = ["read"] }'


@dataclass(frozen=True)
class Tenant:
    namespace: str
    vault_token: str  # kept in the namespace's Secret TOKEN_SECRET


@dataclass(frozen=True)
class KmsEnv:
    bao: OpenBao
    kube: KubeCluster
    node_token_file: Path  # a JWT of kube-system/csi-luks (deploy/kustomize/base/rbac.yaml), bound
    stranger_token_file: Path  # a JWT of kube-system/someone-else, which no role binds
    tenant: Tenant  # its ServiceAccount is bound to role `tenant`, its token Secret grants DEK_POLICY
    outsider: Tenant  # its ServiceAccount is bound to no role, its token Secret grants nothing
    unprivileged_kube_token: str  # authenticates to the API server, may read nothing (RBAC)

    def create_namespace(self, prefix: str = "t") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        with self.kube.api_client() as api:
            k8s.CoreV1Api(api).create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name)))
        return name

    def put_secret(self, namespace: str, name: str, data: dict[str, str]) -> None:
        encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
        self._put("secret", namespace, name, k8s.V1Secret(metadata=k8s.V1ObjectMeta(name=name), data=encoded))

    def put_config_map(self, namespace: str, name: str, data: dict[str, str]) -> None:
        self._put(
            "config_map", namespace, name, k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name=name), data=data)
        )

    def _put(self, kind: str, namespace: str, name: str, body: object) -> None:
        """Create or replace, as `kubectl apply` would."""
        with self.kube.api_client() as api:
            core = k8s.CoreV1Api(api)
            try:
                getattr(core, f"replace_namespaced_{kind}")(name, namespace, body)
            except k8s.ApiException as exc:
                if exc.status != 404:
                    raise
                getattr(core, f"create_namespaced_{kind}")(namespace, body)


def _service_account(api: k8s.ApiClient, namespace: str, name: str) -> None:
    k8s.CoreV1Api(api).create_namespaced_service_account(
        namespace, k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name=name))
    )


def service_account_token(api: k8s.ApiClient, namespace: str, name: str, seconds: int = 3600) -> str:
    request = k8s.AuthenticationV1TokenRequest(spec=k8s.V1TokenRequestSpec(expiration_seconds=seconds))
    response = k8s.CoreV1Api(api).create_namespaced_service_account_token(name, namespace, request)
    token: str = response.status.token
    return token


def _bind(api: k8s.ApiClient, cluster_role: str, service_account: str) -> None:
    k8s.RbacAuthorizationV1Api(api).create_cluster_role_binding(
        k8s.V1ClusterRoleBinding(
            metadata=k8s.V1ObjectMeta(name=f"{cluster_role.replace(':', '-')}-{service_account}"),
            role_ref=k8s.V1RoleRef(
                api_group="rbac.authorization.k8s.io", kind="ClusterRole", name=cluster_role
            ),
            subjects=[
                k8s.RbacV1Subject(kind="ServiceAccount", name=service_account, namespace=SYSTEM_NAMESPACE)
            ],
        )
    )


def _tenant(env_api: k8s.ApiClient, root: hvac.Client, namespace: str, policy: str) -> Tenant:
    k8s.CoreV1Api(env_api).create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=namespace)))
    _service_account(env_api, namespace, TENANT_SA)
    token = root.auth.token.create(policies=[policy], ttl="2h")["auth"]["client_token"]
    k8s.CoreV1Api(env_api).create_namespaced_secret(
        namespace,
        k8s.V1Secret(metadata=k8s.V1ObjectMeta(name=TOKEN_SECRET), string_data={"token": token}),
    )
    return Tenant(namespace, token)


def enable_kubernetes_auth(vault: hvac.Client, kube: KubeCluster, reviewer_jwt: str) -> None:
    """Kubernetes auth at auth/kubernetes of vault's namespace, reviewing tokens with reviewer_jwt."""
    vault.sys.enable_auth_method("kubernetes", path="kubernetes")
    vault.auth.kubernetes.configure(
        kubernetes_host=kube.url,
        kubernetes_ca_cert=kube.ca_pem,
        token_reviewer_jwt=reviewer_jwt,
        disable_local_ca_jwt=True,
    )


def create_kubernetes_role(vault: hvac.Client, role: str, namespace: str, name: str, policy: str) -> None:
    """Role `role` of auth/kubernetes: ServiceAccount namespace/name logs in with `policy`."""
    vault.auth.kubernetes.create_role(
        name=role,
        bound_service_account_names=[name],
        bound_service_account_namespaces=[namespace],
        policies=[policy],
        ttl="1h",
    )


def build_kms_env(bao: OpenBao, kube: KubeCluster, workdir: Path) -> KmsEnv:
    workdir.mkdir(parents=True, exist_ok=True)
    root = bao.client()
    root.sys.create_or_update_policy(name="dek", policy=DEK_POLICY)
    root.sys.create_or_update_policy(name="nothing", policy=NOTHING_POLICY)
    tenant_ns, outsider_ns = f"tenant-{uuid.uuid4().hex[:8]}", f"outsider-{uuid.uuid4().hex[:8]}"
    with kube.api_client() as api:
        kubernetes.utils.create_from_yaml(api, str(RBAC_MANIFEST))  # the plugin's ServiceAccount and RBAC
        for name in (STRANGER_SA, "vault-reviewer", "nobody"):
            _service_account(api, SYSTEM_NAMESPACE, name)
        _bind(api, "system:auth-delegator", "vault-reviewer")
        reviewer = service_account_token(api, SYSTEM_NAMESPACE, "vault-reviewer")
        node_token = service_account_token(api, SYSTEM_NAMESPACE, NODE_SA)
        stranger_token = service_account_token(api, SYSTEM_NAMESPACE, STRANGER_SA)
        nobody_token = service_account_token(api, SYSTEM_NAMESPACE, "nobody")
        tenant = _tenant(api, root, tenant_ns, "dek")
        outsider = _tenant(api, root, outsider_ns, "nothing")

    enable_kubernetes_auth(root, kube, reviewer)
    create_kubernetes_role(root, "csi-luks", SYSTEM_NAMESPACE, NODE_SA, "dek")
    create_kubernetes_role(root, "tenant", tenant_ns, TENANT_SA, "dek")
    node_file, stranger_file = workdir / "node-token", workdir / "stranger-token"
    node_file.write_text(node_token)
    stranger_file.write_text(stranger_token)
    return KmsEnv(
        bao=bao,
        kube=kube,
        node_token_file=node_file,
        stranger_token_file=stranger_file,
        tenant=tenant,
        outsider=outsider,
        unprivileged_kube_token=nobody_token,
    )

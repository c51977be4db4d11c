"""vaultNamespace against a real OpenBao with namespaces: DEKs live in the namespace's own mount."""

from __future__ import annotations

from pathlib import Path

import hvac
import hvac.exceptions
import pytest

from csi_luks.encryption import volume_encryption
from csi_luks.kms.base import DEKNotFound, KMSContext, KMSPermissionDenied, KMSRequestRefused
from csi_luks.kms.config import KMSConfig
from csi_luks.volumes.standalone import StandaloneBackend
from tests.support.kms_env import (
    NODE_SA,
    SYSTEM_NAMESPACE,
    KmsEnv,
    create_kubernetes_role,
    enable_kubernetes_auth,
    service_account_token,
)
from tests.support.openbao import ROOT_TOKEN, OpenBao

MiB = 1024 * 1024
CONTEXT = KMSContext(secrets={})
NAMESPACE = "team-a"
DEK_POLICY = """
path "secret/*" { capabilities = ["create", "read", "update", "delete", "list"] }
path "sys/internal/ui/mounts/*" { capabilities = ["read"] }
"""


@pytest.fixture(scope="module")
def team_a(session_bao: OpenBao, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Namespace team-a with its own KV v2 at secret/ (the root namespace has one at the same path), and
    token files: the root token, and a token created inside team-a (valid there only)."""
    session_bao.client().sys.create_namespace(path=NAMESPACE)
    inside = hvac.Client(url=session_bao.address, token=ROOT_TOKEN, namespace=NAMESPACE)
    inside.sys.enable_secrets_engine("kv", path="secret", options={"version": "2"})
    inside.sys.create_or_update_policy(name="dek-writer", policy=DEK_POLICY)
    local = inside.auth.token.create(policies=["dek-writer"], ttl="1h")["auth"]["client_token"]
    directory = tmp_path_factory.mktemp("namespace-tokens")
    files = {"root": directory / "root", "team-a": directory / "team-a"}
    files["root"].write_text(ROOT_TOKEN)
    files["team-a"].write_text(local)
    return files


@pytest.fixture
def backend(tmp_path: Path) -> StandaloneBackend:
    return StandaloneBackend(tmp_path / "state")


def entry(bao: OpenBao, token_file: Path, **keys: str) -> dict[str, str]:
    # No vaultBackend: the KV version is detected, which must be asked inside the namespace too.
    return {"encryptionKMSType": "vault", "vaultAddress": bao.address, "vaultTokenFile": str(token_file),
            "vaultPassphrasePath": "ns-test/", "vaultRetryDeadline": "5", **keys}  # fmt: skip


def new_volume(backend: StandaloneBackend, name: str) -> str:
    volume_id = backend.volume_id_for(name, {})
    backend.create(volume_id, name, MiB, {})
    return volume_id


def test_the_dek_goes_into_the_namespace_mount_and_is_invisible_from_the_root(
    session_bao: OpenBao, team_a: dict[str, Path], backend: StandaloneBackend
) -> None:
    config = KMSConfig(
        None,
        {"in-ns": entry(session_bao, team_a["root"], vaultNamespace=NAMESPACE),
         "at-root": entry(session_bao, team_a["root"])},
    )  # fmt: skip
    volume_id = new_volume(backend, "pvc-ns")
    encryption = volume_encryption(config, "in-ns", CONTEXT, backend)
    encryption.new_passphrase(volume_id)
    passphrase = encryption.get_passphrase(volume_id)

    inside = hvac.Client(url=session_bao.address, token=ROOT_TOKEN, namespace=NAMESPACE)
    stored = inside.secrets.kv.v2.read_secret_version(
        path=f"ns-test/{volume_id}", mount_point="secret", raise_on_deleted_version=True
    )
    assert stored["data"]["data"]["passphrase"] == passphrase
    with pytest.raises(hvac.exceptions.InvalidPath):  # the root namespace's secret/ has no such secret
        session_bao.client().secrets.kv.v2.read_secret_version(
            path=f"ns-test/{volume_id}", mount_point="secret", raise_on_deleted_version=True
        )
    with pytest.raises(DEKNotFound):  # nor does the same KMS entry without vaultNamespace find it
        volume_encryption(config, "at-root", CONTEXT, backend).get_passphrase(volume_id)

    encryption.remove(volume_id)
    with pytest.raises(hvac.exceptions.InvalidPath):  # destroyed inside the namespace
        inside.secrets.kv.v2.read_secret_metadata(path=f"ns-test/{volume_id}", mount_point="secret")


def test_a_token_of_the_namespace_works_there_only(
    session_bao: OpenBao, team_a: dict[str, Path], backend: StandaloneBackend
) -> None:
    config = KMSConfig(
        None,
        {"ns-token": entry(session_bao, team_a["team-a"], vaultNamespace=NAMESPACE),
         "ns-token-at-root": entry(session_bao, team_a["team-a"], vaultBackend="kv-v2")},
    )  # fmt: skip
    volume_id = new_volume(backend, "pvc-ns-token")
    encryption = volume_encryption(config, "ns-token", CONTEXT, backend)
    encryption.new_passphrase(volume_id)
    assert len(encryption.get_passphrase(volume_id)) >= 43
    with pytest.raises(KMSPermissionDenied, match="ns-token-at-root"):
        volume_encryption(config, "ns-token-at-root", CONTEXT, backend).new_passphrase(
            new_volume(backend, "pvc-ns-token-root")
        )


def test_kubernetes_auth_inside_the_namespace(
    session_bao: OpenBao, team_a: dict[str, Path], kms_env: KmsEnv, backend: StandaloneBackend
) -> None:
    """The login goes to team-a's own auth/kubernetes: role `team-a-only` exists nowhere else."""
    inside = hvac.Client(url=session_bao.address, token=ROOT_TOKEN, namespace=NAMESPACE)
    with kms_env.kube.api_client() as api:
        reviewer = service_account_token(api, SYSTEM_NAMESPACE, "vault-reviewer")
    enable_kubernetes_auth(inside, kms_env.kube, reviewer)
    create_kubernetes_role(inside, "team-a-only", SYSTEM_NAMESPACE, NODE_SA, "dek-writer")
    login = {"encryptionKMSType": "vault", "vaultAddress": session_bao.address, "vaultRole": "team-a-only",
             "vaultServiceAccountTokenFile": str(kms_env.node_token_file), "vaultPassphrasePath": "k8s/",
             "vaultRetryDeadline": "5"}  # fmt: skip
    config = KMSConfig(None, {"ns-k8s": {**login, "vaultNamespace": NAMESPACE}, "root-k8s": login})
    volume_id = new_volume(backend, "pvc-ns-k8s")
    encryption = volume_encryption(config, "ns-k8s", CONTEXT, backend)
    encryption.new_passphrase(volume_id)
    stored = inside.secrets.kv.v2.read_secret_version(
        path=f"k8s/{volume_id}", mount_point="secret", raise_on_deleted_version=True
    )
    assert stored["data"]["data"]["passphrase"] == encryption.get_passphrase(volume_id)
    at_root = volume_encryption(config, "root-k8s", CONTEXT, backend)
    with pytest.raises(KMSRequestRefused, match='invalid role name "team-a-only"'):  # no role at the root
        at_root.new_passphrase(new_volume(backend, "pvc-root"))

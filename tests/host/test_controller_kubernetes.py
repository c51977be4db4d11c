"""CreateVolume/DeleteVolume through gRPC with KMS types that use the Kubernetes API, on real servers.

A real kube-apiserver (Secrets, ConfigMaps, TokenRequest, TokenReview) and a real OpenBao whose
Kubernetes auth reviews tokens through it. The plugin runs in-process as the `kube-system/csi-luks`
ServiceAccount of deploy/kustomize/base/rbac.yaml, on the standalone backend.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import hvac.exceptions
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from csi_luks.csi import csi_pb2
from csi_luks.kms.metadata import derive_kek
from csi_luks.settings import Mode
from tests.support.kms_env import NODE_SA, SYSTEM_NAMESPACE, KmsEnv
from tests.support.kube import forged_token
from tests.support.plugin import MiB, RunningPlugin, running_plugin

PVC_NAMESPACE = "csi.storage.k8s.io/pvc/namespace"
DEK_KEY = "csi-luks/dek"


def _vault_dek(env: KmsEnv, path: str) -> str:
    answer = env.bao.client().secrets.kv.v2.read_secret_version(
        path=path, mount_point="secret", raise_on_deleted_version=True
    )
    dek: str = answer["data"]["data"]["passphrase"]
    return dek


def _no_vault_secret(env: KmsEnv, path: str) -> bool:
    try:
        env.bao.client().secrets.kv.v2.read_secret_metadata(path=path, mount_point="secret")
    except hvac.exceptions.InvalidPath:
        return True
    return False


@pytest.fixture
def config_map_name(kms_env: KmsEnv) -> str:
    return f"kms-config-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def plugin(
    tmp_path: Path, kms_env: KmsEnv, config_map_name: str, plugin_kube_client: None
) -> Iterator[RunningPlugin]:
    """A controller with no KMS configuration file: it reads the ConfigMap kube-system/<config_map_name>."""
    with running_plugin(
        tmp_path / "plugin", mode=Mode.CONTROLLER, kms_config_map=f"{SYSTEM_NAMESPACE}/{config_map_name}"
    ) as running:
        yield running


def _create(plugin: RunningPlugin, name: str, kms_id: str, namespace: str | None = None) -> csi_pb2.Volume:
    parameters = {"encrypted": "true", "encryptionKMSID": kms_id}
    if namespace is not None:
        parameters[PVC_NAMESPACE] = namespace
    return plugin.create(name, 64 * MiB, parameters)


def _code(info: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    code: grpc.StatusCode = info.value.code()
    return code


def test_metadata_kms_wraps_the_dek_with_a_passphrase_from_a_real_secret(
    plugin: RunningPlugin, kms_env: KmsEnv, config_map_name: str
) -> None:
    namespace = kms_env.create_namespace("app")
    passphrase = "class-passphrase-" + uuid.uuid4().hex
    kms_env.put_secret(namespace, "luks-kek", {"encryptionPassphrase": passphrase})
    entry = {"encryptionKMSType": "metadata", "secretName": "luks-kek"}  # in the PVC's namespace
    kms_env.put_config_map(SYSTEM_NAMESPACE, config_map_name, {"meta": json.dumps(entry)})

    volume = _create(plugin, "pvc-meta", "meta", namespace)
    metadata = plugin.backend.get(volume.volume_id).metadata
    wrapped = json.loads(metadata[DEK_KEY])
    assert set(wrapped) == {"dek", "nonce"}
    assert metadata["csi-luks/pvc-namespace"] == namespace
    # The Secret's passphrase, and only it, unwraps the DEK: scrypt KEK salted with the volume id.
    dek = AESGCM(derive_kek(passphrase, volume.volume_id)).decrypt(
        base64.b64decode(wrapped["nonce"]), base64.b64decode(wrapped["dek"]), None
    )
    assert len(dek) == 43

    plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))
    assert plugin.backend.list() == []


def test_metadata_kms_with_a_missing_secret_fails_and_leaves_nothing(
    plugin: RunningPlugin, kms_env: KmsEnv, config_map_name: str
) -> None:
    namespace = kms_env.create_namespace("app")
    entry = {"encryptionKMSType": "metadata", "secretName": "not-there"}
    kms_env.put_config_map(SYSTEM_NAMESPACE, config_map_name, {"meta": json.dumps(entry)})
    with pytest.raises(grpc.RpcError) as info:
        _create(plugin, "pvc-meta-missing", "meta", namespace)
    assert _code(info) == grpc.StatusCode.FAILED_PRECONDITION
    assert f"Secret {namespace}/not-there does not exist" in info.value.details()
    assert plugin.backend.list() == []


def test_a_config_map_edit_applies_without_a_restart(
    plugin: RunningPlugin, kms_env: KmsEnv, config_map_name: str
) -> None:
    vault = {
        "encryptionKMSType": "vault",
        "vaultAddress": kms_env.bao.address,
        "vaultRole": "csi-luks",
        "vaultServiceAccountTokenFile": str(kms_env.node_token_file),
    }
    # The whole document under config.json, as when the ConfigMap also backs a mounted file.
    first = {"kv": {**vault, "vaultPassphrasePath": "first/"}}
    kms_env.put_config_map(SYSTEM_NAMESPACE, config_map_name, {"config.json": json.dumps(first)})
    one = _create(plugin, "pvc-first", "kv")
    assert len(_vault_dek(kms_env, f"first/{one.volume_id}")) == 43
    with pytest.raises(grpc.RpcError) as info:
        _create(plugin, "pvc-later", "later")
    assert _code(info) == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        "unknown encryptionKMSID 'later'" in info.value.details() and config_map_name in info.value.details()
    )

    # Edited in place, now one key per KMS id: the very next call sees it.
    kms_env.put_config_map(
        SYSTEM_NAMESPACE,
        config_map_name,
        {
            "kv": json.dumps({**vault, "vaultPassphrasePath": "second/"}),
            "later": json.dumps({**vault, "vaultPassphrasePath": "later/"}),
        },
    )
    two = _create(plugin, "pvc-second", "kv")
    assert len(_vault_dek(kms_env, f"second/{two.volume_id}")) == 43
    later = _create(plugin, "pvc-later", "later")
    assert len(_vault_dek(kms_env, f"later/{later.volume_id}")) == 43


def test_kubernetes_auth_goes_through_a_real_token_review(
    plugin: RunningPlugin, kms_env: KmsEnv, config_map_name: str, tmp_path: Path
) -> None:
    forged = tmp_path / "forged-token"
    # The right ServiceAccount's name and namespace, signed by a key the API server does not trust:
    # only the TokenReview can tell, so a refusal shows Vault asked the API server.
    forged.write_text(forged_token(kms_env.kube, SYSTEM_NAMESPACE, NODE_SA))
    base = {
        "encryptionKMSType": "vault",
        "vaultAddress": kms_env.bao.address,
        "vaultRole": "csi-luks",
        "vaultPassphrasePath": "k8s-auth/",
    }
    entries = {
        "node": {**base, "vaultServiceAccountTokenFile": str(kms_env.node_token_file)},
        "stranger": {**base, "vaultServiceAccountTokenFile": str(kms_env.stranger_token_file)},
        "forged": {**base, "vaultServiceAccountTokenFile": str(forged)},
    }
    kms_env.put_config_map(SYSTEM_NAMESPACE, config_map_name, {k: json.dumps(v) for k, v in entries.items()})

    volume = _create(plugin, "pvc-node", "node")
    assert len(_vault_dek(kms_env, f"k8s-auth/{volume.volume_id}")) == 43
    for kms_id in ("stranger", "forged"):
        with pytest.raises(grpc.RpcError) as info:
            _create(plugin, f"pvc-{kms_id}", kms_id)
        assert _code(info) == grpc.StatusCode.PERMISSION_DENIED, (kms_id, info.value.details())
        assert f"KMS {kms_id!r}" in info.value.details()
    assert [v.volume_id for v in plugin.backend.list()] == [volume.volume_id]  # nothing half-created

    plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))
    assert _no_vault_secret(kms_env, f"k8s-auth/{volume.volume_id}")


def test_tenant_service_account_and_tenant_overrides(
    plugin: RunningPlugin, kms_env: KmsEnv, config_map_name: str
) -> None:
    tenant = kms_env.tenant.namespace
    entry = {
        "encryptionKMSType": "vaulttenantsa",
        "vaultAddress": kms_env.bao.address,
        "vaultRole": "tenant",
        "vaultPassphrasePath": "tenants/default/",
        "tenantConfigName": "my-kms-overrides",
    }
    kms_env.put_config_map(SYSTEM_NAMESPACE, config_map_name, {"tenant-sa": json.dumps(entry)})
    # The tenant moves its DEKs under its own path; it may not point the plugin at a token file.
    kms_env.put_config_map(
        tenant,
        "my-kms-overrides",
        {"vaultPassphrasePath": f"tenants/{tenant}/", "vaultTokenFile": "/etc/shadow"},
    )

    volume = _create(plugin, "pvc-tenant", "tenant-sa", tenant)
    assert len(_vault_dek(kms_env, f"tenants/{tenant}/{volume.volume_id}")) == 43
    assert _no_vault_secret(kms_env, f"tenants/default/{volume.volume_id}")

    # Another namespace's ServiceAccount is not bound to the role: refused, nothing left behind.
    with pytest.raises(grpc.RpcError) as info:
        _create(plugin, "pvc-outsider", "tenant-sa", kms_env.outsider.namespace)
    assert _code(info) == grpc.StatusCode.PERMISSION_DENIED
    assert [v.volume_id for v in plugin.backend.list()] == [volume.volume_id]

    # DeleteVolume carries no namespace: the one kept in the volume's metadata finds the tenant again.
    plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))
    assert _no_vault_secret(kms_env, f"tenants/{tenant}/{volume.volume_id}")
    assert plugin.backend.list() == []


def test_tenant_token_secret(plugin: RunningPlugin, kms_env: KmsEnv, config_map_name: str) -> None:
    entry = {
        "encryptionKMSType": "vaulttokens",
        "vaultAddress": kms_env.bao.address,
        "vaultPassphrasePath": "tok/",
    }
    kms_env.put_config_map(SYSTEM_NAMESPACE, config_map_name, {"tokens": json.dumps(entry)})
    volume = _create(plugin, "pvc-tokens", "tokens", kms_env.tenant.namespace)
    assert len(_vault_dek(kms_env, f"tok/{volume.volume_id}")) == 43
    with pytest.raises(grpc.RpcError) as info:
        _create(plugin, "pvc-tokens-no-namespace", "tokens")
    assert _code(info) == grpc.StatusCode.INVALID_ARGUMENT
    assert "--extra-create-metadata" in info.value.details()
    plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))
    assert _no_vault_secret(kms_env, f"tok/{volume.volume_id}")

"""CreateVolume/DeleteVolume through gRPC with Vault-backed KMS ids, on a real OpenBao server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import hvac.exceptions
import pytest

from csi_luks.csi import csi_pb2
from csi_luks.settings import Mode
from tests.support.openbao import OpenBao, openbao_server
from tests.support.plugin import MiB, RunningPlugin, running_plugin


@pytest.fixture
def bao(tmp_path: Path) -> Iterator[OpenBao]:
    with openbao_server(tmp_path / "openbao") as server:
        server.client().sys.enable_secrets_engine("transit", path="transit")
        server.client().secrets.transit.create_key(name="csi-kek")
        yield server


@pytest.fixture
def plugin(tmp_path: Path, bao: OpenBao) -> Iterator[RunningPlugin]:
    root = tmp_path / "plugin"
    root.mkdir()
    (root / "token").write_text("root")
    vault = {"vaultAddress": bao.address, "vaultTokenFile": str(root / "token"), "vaultRetryDeadline": "2"}
    (root / "kms-config.json").write_text(
        json.dumps(
            {
                "vault-kv": {"encryptionKMSType": "vault", "vaultPassphrasePath": "csi-luks/", **vault},
                "vault-transit": {
                    "encryptionKMSType": "vault-transit",
                    "vaultTransitKey": "csi-kek",
                    **vault,
                },
            }
        )
    )
    with running_plugin(root, mode=Mode.CONTROLLER) as running:
        yield running


def test_create_puts_the_dek_in_vault_and_delete_destroys_it(plugin: RunningPlugin, bao: OpenBao) -> None:
    volume = plugin.create("pvc-vault", 64 * MiB, {"encrypted": "true", "encryptionKMSID": "vault-kv"})
    kv = bao.client().secrets.kv.v2
    stored = kv.read_secret_version(
        path=f"csi-luks/{volume.volume_id}", mount_point="secret", raise_on_deleted_version=True
    )
    assert len(stored["data"]["data"]["passphrase"]) >= 43
    assert "csi-luks/dek" not in plugin.backend.get(volume.volume_id).metadata
    plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))
    with pytest.raises(hvac.exceptions.InvalidPath):
        kv.read_secret_metadata(path=f"csi-luks/{volume.volume_id}", mount_point="secret")
    assert plugin.backend.list() == []


def test_transit_leaves_only_ciphertext_in_the_volume(plugin: RunningPlugin) -> None:
    volume = plugin.create("pvc-transit", 64 * MiB, {"encrypted": "true", "encryptionKMSID": "vault-transit"})
    wrapped = plugin.backend.get(volume.volume_id).metadata["csi-luks/dek"]
    assert wrapped.startswith("vault:v1:")


def test_a_stopped_vault_fails_create_with_unavailable_and_leaves_nothing(
    plugin: RunningPlugin, bao: OpenBao
) -> None:
    bao.process.terminate()
    bao.process.wait(10)
    with pytest.raises(grpc.RpcError) as info:
        plugin.create("pvc-down", 64 * MiB, {"encrypted": "true", "encryptionKMSID": "vault-kv"})
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "unavailable" in info.value.details() and "vault-kv" in info.value.details()
    assert plugin.backend.list() == []

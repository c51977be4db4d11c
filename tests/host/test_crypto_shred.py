"""DeleteVolume and DeleteSnapshot crypto-shred: every DEK and the header backup go before the data, and
a KMS that cannot destroy them fails the call (UNAVAILABLE: the CO retries) with the volume kept."""

from __future__ import annotations

from pathlib import Path

import grpc
import hvac
import pytest

from csi_luks.csi import csi_pb2
from csi_luks.errors import status_for
from csi_luks.kms.base import KMSUnavailable
from csi_luks.volume_metadata import DELETING
from csi_luks.volumes.base import VolumeNotFound
from csi_luks.volumes.standalone import StandaloneBackend
from tests.support.openbao import OpenBao, free_port
from tests.support.operations import Volumes, vault_login


class _WatchedBackend(StandaloneBackend):
    """Records, when an object's data is deleted, what of its keys and header backup was left."""

    def __init__(self, state_dir: Path, volumes: Volumes) -> None:
        super().__init__(state_dir)
        self.volumes = volumes
        self.left_at_delete: dict[str, list[str]] = {}

    def delete(self, volume_id: str) -> None:
        try:
            metadata = self.get(volume_id).metadata
        except VolumeNotFound:
            metadata = {}
        left: list[str] = [key for key in ("csi-luks/dek", "csi-luks/dek-pending") if key in metadata]
        if self.fetch_header_backup(volume_id) is not None:
            left.append("header backup")
        self.left_at_delete[volume_id] = left
        super().delete(volume_id)


def _vault_entries(root: Path, address: str) -> dict[str, dict[str, str]]:
    vault = vault_login(root, address)
    return {
        "local-1": {"encryptionKMSType": "local", "keyFile": str(root / "kek")},
        "vault-kv": {"encryptionKMSType": "vault", "vaultPassphrasePath": "shred/", **vault},
        "vault-kv-keep": {
            "encryptionKMSType": "vault", "vaultPassphrasePath": "keep/", "vaultDestroyKeys": "false",
            **vault,
        },
        "vault-transit": {"encryptionKMSType": "vault-transit", "vaultTransitKey": "csi-kek", **vault},
    }  # fmt: skip


@pytest.fixture
def volumes(tmp_path: Path, session_bao: OpenBao) -> Volumes:
    made = Volumes(tmp_path, _vault_entries(tmp_path, session_bao.address))
    made.backend = made.controller.backend = made.tool.backend = _WatchedBackend(made.state_dir, made)
    return made


def _delete(volumes: Volumes, volume_id: str) -> None:
    volumes.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id), None)


@pytest.mark.parametrize("kms_id", ["local-1", "vault-kv", "vault-transit"])
def test_delete_destroys_the_deks_and_the_header_backup_before_the_data(
    volumes: Volumes, kms_id: str
) -> None:
    volume_id = volumes.create_formatted(f"pvc-shred-{kms_id}", kms_id)
    volumes.tool.encryption(volume_id).new_pending_passphrase(volume_id)  # as a rotation cut short leaves
    assert volumes.backend.fetch_header_backup(volume_id) is not None
    _delete(volumes, volume_id)
    assert volumes.backend.left_at_delete[volume_id] == []  # type: ignore[attr-defined]
    assert volumes.backend.list() == []


def test_delete_removes_the_vault_entries_of_the_dek_and_the_pending_dek(
    volumes: Volumes, session_bao: OpenBao
) -> None:
    volume_id = volumes.create_formatted("pvc-shred-kv", "vault-kv")
    volumes.tool.encryption(volume_id).new_pending_passphrase(volume_id)
    _delete(volumes, volume_id)
    kv = session_bao.client().secrets.kv.v2
    for path in (f"shred/{volume_id}", f"shred/{volume_id}-pending"):
        with pytest.raises(hvac.exceptions.InvalidPath):
            kv.read_secret_metadata(path=path, mount_point="secret")


def test_vault_kv_v2_without_destroy_keeps_the_deleted_dek_recoverable(
    volumes: Volumes, session_bao: OpenBao
) -> None:
    """What the README says: with vaultDestroyKeys=false, Vault keeps the version (an undelete brings
    it back); the volume's data is gone all the same."""
    volume_id = volumes.create_formatted("pvc-keep-kv", "vault-kv-keep")
    dek = volumes.dek(volume_id)
    _delete(volumes, volume_id)
    kv = session_bao.client().secrets.kv.v2
    meta = kv.read_secret_metadata(path=f"keep/{volume_id}", mount_point="secret")["data"]
    version = meta["current_version"]
    assert meta["versions"][str(version)]["deletion_time"]
    kv.undelete_secret_versions(path=f"keep/{volume_id}", versions=[version], mount_point="secret")
    read = kv.read_secret_version(
        path=f"keep/{volume_id}", mount_point="secret", raise_on_deleted_version=True
    )
    assert read["data"]["data"]["passphrase"] == dek


@pytest.mark.parametrize("kind", ["volume", "snapshot"])
def test_a_vault_that_is_down_fails_the_delete_with_unavailable_and_keeps_everything(
    volumes: Volumes, tmp_path: Path, kind: str
) -> None:
    volume_id = volumes.create_formatted("pvc-down", "vault-kv")
    object_id = volume_id
    if kind == "snapshot":
        request = csi_pb2.CreateSnapshotRequest(name="snap-down", source_volume_id=volume_id)
        object_id = volumes.controller.CreateSnapshot(request, None).snapshot.snapshot_id
    before = volumes.backend.get(object_id).metadata
    volumes.configure(_vault_entries(tmp_path, f"http://127.0.0.1:{free_port()}"))  # nothing listens there
    with pytest.raises(KMSUnavailable) as info:
        if kind == "snapshot":
            volumes.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=object_id), None)
        else:
            _delete(volumes, object_id)
    assert status_for(info.value)[0] == grpc.StatusCode.UNAVAILABLE
    after = dict(volumes.backend.get(object_id).metadata)
    # A volume keeps the delete's intent (its stages are refused) until the CO's retry gets through.
    assert (after.pop(DELETING, None) is not None) == (kind == "volume")
    assert after == before
    assert volumes.backend.fetch_header_backup(object_id) is not None
    assert object_id not in volumes.backend.left_at_delete  # type: ignore[attr-defined]

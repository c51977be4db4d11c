"""csi-luks's controller serving volumes the real Ceph-CSI (cephcsi v3.8.1) made, and handing them back.

Each volume is created by cephcsi (the `metadata` KMS: its DEK wrapped in image-meta with the handle as
salt), then csi-luks expands, copies or deletes it through its own gRPC API, under the same KMS id, and
cephcsi works on it again afterwards (the way back). The node's part (cephcsi's luksFormat, csi-luks
opening it, and back) needs dm-crypt: tests/vm.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import hvac.exceptions
import pytest

from csi_luks.csi import csi_pb2
from csi_luks.kms.base import KMSContext
from csi_luks.kms.config import KMSConfig
from csi_luks.kms.metadata import MetadataKMS
from csi_luks.operations.migration import migrate
from csi_luks.operations.tool import EXIT_OK, Tool
from csi_luks.settings import Mode
from csi_luks.volume_metadata import LUKS_HEADER_BYTES
from csi_luks.volumes.ceph_clusters import CephClusters
from csi_luks.volumes.rbd import RbdBackend, decode_volume_id
from tests.support import cephcsi as oracle
from tests.support import csi_tools
from tests.support.ceph import CephCluster
from tests.support.ceph_fixtures import CLUSTER_ID
from tests.support.cephcsi import CephCsi, CephCsiPool, running_cephcsi
from tests.support.kms_env import KmsEnv
from tests.support.kube import KubeCluster
from tests.support.plugin import MiB, RunningPlugin, mount_capability, running_plugin

ENCRYPTED, DEK = "rbd.csi.ceph.com/encrypted", "rbd.csi.ceph.com/dek"


@pytest.fixture
def plugin(tmp_path: Path, ceph_config: Path) -> Iterator[RunningPlugin]:
    """csi-luks's controller with Ceph-CSI's KMS entry under Ceph-CSI's id (the same configuration)."""
    (tmp_path / "kms-config.json").write_text(
        json.dumps({oracle.METADATA_KMS_ID: {"encryptionKMSType": "metadata"}})
    )
    with running_plugin(tmp_path, mode=Mode.CONTROLLER, ceph_config=ceph_config) as running:
        yield running


def unwrap(passphrase: str, volume_id: str, wrapped: str) -> str:
    kms = MetadataKMS("check", {}, KMSContext({oracle.PASSPHRASE_KEY: passphrase}))
    return kms.decrypt_dek(volume_id, wrapped)


@dataclass(frozen=True)
class MadeByCephCsi:
    """An encrypted volume cephcsi created with the `metadata` KMS, and what a test needs of it."""

    handle: str
    image: str
    passphrase: str
    creds: dict[str, str]  # the pool's cephx user and the KMS's passphrase
    dek: str  # the DEK cephcsi wrapped, unwrapped


def made_by_ceph_csi(cephcsi: CephCsi, ceph: CephCluster, pool: CephCsiPool, name: str) -> MadeByCephCsi:
    passphrase = secrets.token_urlsafe(24)
    creds = pool.with_passphrase(passphrase)
    handle = cephcsi.create_volume(name, 64 * MiB, pool.name, creds).volume_id
    image = f"csi-vol-{oracle.decode_handle(handle).uuid}"
    dek = unwrap(passphrase, handle, oracle.image_meta(ceph, pool.name, image)[DEK])
    return MadeByCephCsi(handle, image, passphrase, creds, dek)


def journal(ceph: CephCluster, pool: str, handle: str) -> tuple[dict[str, str] | None, dict[str, str]]:
    """(the volume's uuid object, the request directory) of Ceph-CSI's journal."""
    uid = oracle.decode_handle(handle).uuid
    return oracle.omap(ceph, pool, f"csi.volume.{uid}"), oracle.omap(
        ceph, pool, oracle.VOLUMES_DIRECTORY
    ) or {}


def expand(plugin: RunningPlugin, volume_id: str, size: int, creds: dict[str, str]) -> int:
    return int(
        plugin.controller.ControllerExpandVolume(
            csi_pb2.ControllerExpandVolumeRequest(
                volume_id=volume_id,
                capacity_range=csi_pb2.CapacityRange(required_bytes=size),
                volume_capability=mount_capability(),
                secrets=creds,
            ),
            timeout=60,
        ).capacity_bytes
    )


def restore(
    plugin: RunningPlugin, name: str, pool: str, creds: dict[str, str], snapshot_id: str
) -> csi_pb2.Volume:
    """CreateVolume from a snapshot, encrypted with Ceph-CSI's KMS entry, in the pool."""
    parameters = {"clusterID": "test-cluster", "pool": pool, "encrypted": "true",
                  "encryptionKMSID": oracle.METADATA_KMS_ID}  # fmt: skip
    request = csi_pb2.CreateVolumeRequest(
        name=name,
        capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB),
        volume_capabilities=[mount_capability()],
        parameters=parameters,
        secrets=creds,
        volume_content_source=csi_pb2.VolumeContentSource(
            snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snapshot_id)
        ),
    )
    volume: csi_pb2.Volume = plugin.controller.CreateVolume(request, timeout=60).volume
    return volume


def test_csi_luks_expands_and_deletes_a_ceph_csi_volume_as_ceph_csi_would_and_hands_it_back(
    plugin: RunningPlugin, cephcsi: CephCsi, ceph: CephCluster, cephcsi_pool: CephCsiPool
) -> None:
    pool = cephcsi_pool.name
    made = made_by_ceph_csi(cephcsi, ceph, cephcsi_pool, "pvc-takeover-1")
    handle, image, passphrase, creds, dek = made.handle, made.image, made.passphrase, made.creds, made.dek
    twin = cephcsi.create_volume("pvc-takeover-twin", 64 * MiB, pool, creds).volume_id

    # csi-luks grows it: the LUKS header is inside Ceph-CSI's image, so the image grows by the asked
    # capacity plus the header; Ceph-CSI's keys are untouched (never staged: still prepared).
    assert expand(plugin, handle, 96 * MiB, creds) == 96 * MiB
    assert oracle.image_size(ceph, pool, image) == 96 * MiB + LUKS_HEADER_BYTES
    after = oracle.image_meta(ceph, pool, image)
    assert after[ENCRYPTED] == "encryptionPrepared"
    assert unwrap(passphrase, handle, after[DEK]) == dek
    assert expand(plugin, handle, 96 * MiB, creds) == 96 * MiB  # idempotent

    # The way back: Ceph-CSI expands it again, finding its journal and keys as it left them.
    cephcsi.expand_volume(handle, 160 * MiB, creds)
    assert oracle.image_size(ceph, pool, image) == 160 * MiB

    # csi-luks deletes it; Ceph-CSI deletes the twin: the same is left (no image, no journal entry).
    plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=handle, secrets=creds), timeout=60)
    cephcsi.delete_volume(twin, creds)
    for gone in (handle, twin):
        uuid_object, directory = journal(ceph, pool, gone)
        assert uuid_object is None
        assert oracle.decode_handle(gone).uuid not in directory.values()
        assert f"csi-vol-{oracle.decode_handle(gone).uuid}" not in oracle.images(ceph, pool)
    assert image not in oracle.trash(ceph, pool).values()  # csi-luks purges what nothing depends on
    # Deleted is deleted, for both drivers.
    plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=handle, secrets=creds), timeout=60)
    cephcsi.delete_volume(handle, creds)


def test_a_snapshot_and_a_restore_of_a_ceph_csi_volume_are_csi_luks_volumes_with_its_dek(
    plugin: RunningPlugin, cephcsi: CephCsi, ceph: CephCluster, cephcsi_pool: CephCsiPool
) -> None:
    pool = cephcsi_pool.name
    made = made_by_ceph_csi(cephcsi, ceph, cephcsi_pool, "pvc-takeover-2")
    handle, passphrase, creds, dek = made.handle, made.passphrase, made.creds, made.dek

    snapshot = plugin.controller.CreateSnapshot(
        csi_pb2.CreateSnapshotRequest(name="snap-takeover-2", source_volume_id=handle, secrets=creds),
        timeout=60,
    ).snapshot
    assert snapshot.source_volume_id == handle and snapshot.ready_to_use
    restored = restore(plugin, "pvc-takeover-2-restored", pool, creds, snapshot.snapshot_id)
    # csi-luks's own ids and images, in the source's pool; none of Ceph-CSI's keys came along with the clone.
    for copy_id in (snapshot.snapshot_id, restored.volume_id):
        assert not oracle.HANDLE.match(copy_id)
    for copy_id in (snapshot.snapshot_id, restored.volume_id):
        ref = decode_volume_id(copy_id)
        assert ref.pool == pool
        meta = oracle.image_meta(ceph, pool, ref.image)
        assert ENCRYPTED not in meta and DEK not in meta
        assert meta["csi-luks/encryption-state"] == "prepared"
        # The copy's DEK is the source's (its header will be the source's), wrapped with the copy's id.
        assert unwrap(passphrase, copy_id, meta["csi-luks/dek"]) == dek

    # The way back has one limit: while csi-luks's copy-on-write copies need the source's data, Ceph-CSI
    # cannot delete it (its trash removal meets the clones: ENOTEMPTY). Once they are gone, it can.
    with pytest.raises(grpc.RpcError) as caught:
        cephcsi.delete_volume(handle, creds)
    assert "Directory not empty" in (caught.value.details() or "")
    plugin.controller.DeleteVolume(
        csi_pb2.DeleteVolumeRequest(volume_id=restored.volume_id, secrets=creds), timeout=60
    )
    plugin.controller.DeleteSnapshot(
        csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot.snapshot_id, secrets=creds), timeout=60
    )
    cephcsi.delete_volume(handle, creds)
    assert journal(ceph, pool, handle)[0] is None


def test_a_handle_of_an_unknown_cluster_or_a_vanished_journal_is_refused_with_the_right_code(
    plugin: RunningPlugin, ceph: CephCluster, cephcsi_pool: CephCsiPool
) -> None:
    pool_id = oracle.pool_id(ceph, cephcsi_pool.name)
    creds = dict(cephcsi_pool.secrets)
    unknown = f"0001-0005-other-{pool_id:016x}-0b6f6f8e-8f55-4a0e-bd4a-7c0e4c6a9d21"
    nothing = f"0001-000c-test-cluster-{pool_id:016x}-0b6f6f8e-8f55-4a0e-bd4a-7c0e4c6a9d21"
    for volume_id, code in (
        (unknown, grpc.StatusCode.INVALID_ARGUMENT),
        (nothing, grpc.StatusCode.NOT_FOUND),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            expand(plugin, volume_id, 96 * MiB, creds)
        assert caught.value.code() == code, (volume_id, caught.value.details())
    # DeleteVolume of a handle whose journal entry is gone: deleted already.
    plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=nothing, secrets=creds), timeout=60)


def test_migrate_moves_a_ceph_csi_volume_to_another_kms_id_that_ceph_csi_then_follows(
    tmp_path: Path, cephcsi: CephCsi, ceph: CephCluster, ceph_config: Path, cephcsi_pool: CephCsiPool
) -> None:
    """`csi-luks migrate` on a Ceph-CSI volume rewrites the journal's KMS id with the DEK: Ceph-CSI, whose
    configuration then knows only the new id, copies the volume's DEK into a snapshot of its own."""
    pool = cephcsi_pool.name
    made = made_by_ceph_csi(cephcsi, ceph, cephcsi_pool, "pvc-takeover-migrate")
    handle, passphrase, creds, dek = made.handle, made.passphrase, made.creds, made.dek
    entries = {
        oracle.METADATA_KMS_ID: {"encryptionKMSType": "metadata"},
        "cephcsi-metadata-new": {"encryptionKMSType": "metadata"},
    }
    config = KMSConfig(None, entries)
    backend = RbdBackend(CephClusters(ceph_config), tmp_path / "state").for_request(creds, one_request=False)
    tool = Tool(backend, config, secrets=creds)
    assert migrate(tool, oracle.METADATA_KMS_ID, "cephcsi-metadata-new", False, [handle]) == EXIT_OK
    assert tool.encryption(handle).get_passphrase(handle) == dek
    uuid_object, _ = journal(ceph, pool, handle)
    assert uuid_object is not None and uuid_object["csi.volume.encryptKMS"] == "cephcsi-metadata-new"

    # Ceph-CSI no longer knows the old id: only the journal's new one lets it read the DEK.
    cephcsi.set_kms_config({"cephcsi-metadata-new": {"encryptionKMSType": "metadata"}})
    try:
        snapshot = cephcsi.create_snapshot("snap-takeover-migrate", handle, creds)
        snapshot_image = f"csi-snap-{oracle.decode_handle(snapshot.snapshot_id).uuid}"
        wrapped = oracle.image_meta(ceph, pool, snapshot_image)[DEK]
        assert unwrap(passphrase, snapshot.snapshot_id, wrapped) == dek
        cephcsi.delete_snapshot(snapshot.snapshot_id, creds)
    finally:
        cephcsi.set_kms_config({oracle.METADATA_KMS_ID: {"encryptionKMSType": "metadata"}})
    plugin_delete = RbdBackend(CephClusters(ceph_config), tmp_path / "state2").for_request(creds)
    plugin_delete.delete(handle)
    assert journal(ceph, pool, handle)[0] is None


@pytest.fixture(scope="module")
def cephcsi_with_kube(
    ceph: CephCluster, kube: KubeCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CephCsi]:
    """A second cephcsi controller, which reaches the test API server (its tenant Vault types need it)."""
    binary = csi_tools.tool("cephcsi")
    with running_cephcsi(
        binary, ceph, CLUSTER_ID, tmp_path_factory.mktemp("cephcsi-kube"), kube=kube
    ) as running:
        yield running


def test_a_ceph_csi_vaulttokens_volume_keeps_its_dek_in_openbao_where_csi_luks_finds_and_removes_it(
    tmp_path: Path,
    cephcsi_with_kube: CephCsi,
    kms_env: KmsEnv,
    plugin_kube_client: None,
    ceph: CephCluster,
    ceph_config: Path,
    cephcsi_pool: CephCsiPool,
) -> None:
    """Ceph-CSI's `vaulttokens` on the session's OpenBao: the tenant's token in Ceph-CSI's default Secret
    (ceph-csi-kms-token), the DEK at secret/<handle> in Ceph-CSI's layout. csi-luks, with the same entry,
    finds the tenant in Ceph-CSI's journal (csi.volume.owner), the token in that Secret, and the DEK."""
    tenant = kms_env.create_namespace("cephcsi")
    client = kms_env.bao.client()
    token = oracle.vault_tenant_token(client)
    kms_env.put_secret(tenant, "ceph-csi-kms-token", {"token": token})
    entry = {
        "encryptionKMSType": "vaulttokens",
        "vaultAddress": kms_env.bao.address,
        "vaultBackendPath": "secret/",
    }
    cephcsi_with_kube.set_kms_config({"cephcsi-vault-tokens": entry})
    creds = dict(cephcsi_pool.secrets)
    volume = cephcsi_with_kube.create_volume(
        "pvc-takeover-vault", 64 * MiB, cephcsi_pool.name, creds, kms_id="cephcsi-vault-tokens",
        more_parameters={"csi.storage.k8s.io/pvc/namespace": tenant},
    )  # fmt: skip
    handle = volume.volume_id
    stored = client.secrets.kv.v2.read_secret_version(
        path=handle, mount_point="secret", raise_on_deleted_version=True
    )
    ceph_csi_dek = stored["data"]["data"]["data"][
        "passphrase"
    ]  # Ceph-CSI's nesting, checked on the real thing
    assert len(ceph_csi_dek) == 28

    backend = RbdBackend(CephClusters(ceph_config), tmp_path / "state").for_request(creds, one_request=False)
    tool = Tool(backend, KMSConfig(None, {"cephcsi-vault-tokens": entry}), secrets=creds)
    assert backend.get(handle).metadata["csi-luks/pvc-namespace"] == tenant
    encryption = tool.encryption(handle)
    assert encryption.get_passphrase(handle) == ceph_csi_dek
    encryption.remove(handle)  # what DeleteVolume does first
    backend.delete(handle)
    with pytest.raises(hvac.exceptions.InvalidPath):
        client.secrets.kv.v2.read_secret_version(
            path=handle, mount_point="secret", raise_on_deleted_version=True
        )
    assert journal(ceph, cephcsi_pool.name, handle)[0] is None


def test_csi_luks_restores_from_a_ceph_csi_snapshot_and_deletes_it_as_ceph_csi_would(
    plugin: RunningPlugin, cephcsi: CephCsi, ceph: CephCluster, cephcsi_pool: CephCsiPool
) -> None:
    """A VolumeSnapshot Ceph-CSI took (its handle has a volume's form; its journal is csi.snap.<uuid>) is
    restored by csi-luks with the snapshot's DEK, and deleted: its image and both journal entries."""
    pool = cephcsi_pool.name
    made = made_by_ceph_csi(cephcsi, ceph, cephcsi_pool, "pvc-takeover-snapsource")
    handle, passphrase, creds = made.handle, made.passphrase, made.creds
    snapshot = cephcsi.create_snapshot("snap-by-ceph-csi", handle, creds)
    snap_uuid = oracle.decode_handle(snapshot.snapshot_id).uuid
    dek = unwrap(
        passphrase, snapshot.snapshot_id, oracle.image_meta(ceph, pool, f"csi-snap-{snap_uuid}")[DEK]
    )

    restored = restore(plugin, "pvc-from-ceph-csi-snapshot", pool, creds, snapshot.snapshot_id)
    meta = oracle.image_meta(ceph, pool, decode_volume_id(restored.volume_id).image)
    assert unwrap(passphrase, restored.volume_id, meta["csi-luks/dek"]) == dek
    assert ENCRYPTED not in meta

    # A DeleteVolume of the snapshot's handle is refused (a snapshot is not a volume); DeleteSnapshot works.
    with pytest.raises(grpc.RpcError):
        plugin.controller.DeleteVolume(
            csi_pb2.DeleteVolumeRequest(volume_id=snapshot.snapshot_id, secrets=creds), timeout=60
        )
    plugin.controller.DeleteSnapshot(
        csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot.snapshot_id, secrets=creds), timeout=60
    )
    assert oracle.omap(ceph, pool, f"csi.snap.{snap_uuid}") is None
    assert snap_uuid not in (oracle.omap(ceph, pool, oracle.SNAPSHOTS_DIRECTORY) or {}).values()
    assert f"csi-snap-{snap_uuid}" not in oracle.images(ceph, pool)
    for volume_id in (restored.volume_id, handle):
        plugin.controller.DeleteVolume(
            csi_pb2.DeleteVolumeRequest(volume_id=volume_id, secrets=creds), timeout=60
        )

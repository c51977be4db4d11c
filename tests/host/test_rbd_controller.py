"""Controller on a real Ceph cluster through gRPC: RBD images, their metadata, snapshots, clones, restores."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import rados
import rbd

from bench.rbd import NEW_VOLUME_KEYS
from csi_luks.csi import csi_pb2
from csi_luks.csiaddons import reclaimspace_pb2 as reclaim_pb
from csi_luks.csiaddons import reclaimspace_pb2_grpc as reclaim_grpc
from csi_luks.kms.local import LocalKMS
from csi_luks.settings import Mode
from csi_luks.volume_metadata import LUKS_HEADER_BYTES, STATE
from csi_luks.volumes.base import BackendRequestError, BackendUnavailable, VolumeInUse
from csi_luks.volumes.ceph_clusters import CephClusters
from csi_luks.volumes.rbd import RbdBackend, decode_volume_id
from csi_luks.volumes.rbd_images import CALLS
from tests.support.audit import AUDIT
from tests.support.ceph import CephCluster
from tests.support.plugin import MiB, RunningPlugin, code_of, details_of, mount_capability, running_plugin

DEK = "csi-luks/dek"


@pytest.fixture
def plugin(tmp_path: Path, ceph_config: Path) -> Iterator[RunningPlugin]:
    with running_plugin(tmp_path, mode=Mode.CONTROLLER, ceph_config=ceph_config) as running:
        yield running


@pytest.fixture
def secrets(ceph_secrets: dict[str, str]) -> dict[str, str]:
    return ceph_secrets


def params(ceph: CephCluster, **extra: str) -> dict[str, str]:
    return {"clusterID": "test-cluster", "pool": ceph.pool, **extra}


def encrypted(ceph: CephCluster, kms_id: str = "local-1") -> dict[str, str]:
    return params(ceph, encrypted="true", encryptionKMSID=kms_id)


def spec(volume_id: str) -> str:
    return decode_volume_id(volume_id).spec


def image_meta(ceph: CephCluster, volume_id: str) -> dict[str, str]:
    return dict(
        json.loads(ceph.run("rbd", "image-meta", "list", "--format", "json", spec(volume_id)) or "{}")
    )


def image_size(ceph: CephCluster, volume_id: str) -> int:
    return int(json.loads(ceph.run("rbd", "info", "--format", "json", spec(volume_id)))["size"])


def exists(ceph: CephCluster, volume_id: str) -> bool:
    images = json.loads(ceph.run("rbd", "ls", "--format", "json", ceph.pool) or "[]")
    return decode_volume_id(volume_id).image in images


def trash(ceph: CephCluster, *object_ids: str) -> list[str]:
    """The images of these volumes or snapshots in the pool's RBD trash, sorted (other tests' images may
    wait there for their own dependants)."""
    listed = json.loads(ceph.run("rbd", "trash", "ls", "--format", "json", ceph.pool) or "[]")
    mine = {decode_volume_id(object_id).image for object_id in object_ids}
    return sorted(entry["name"] for entry in listed if entry["name"] in mine)


def fill(ceph: CephCluster, volume_id: str) -> None:
    """Write a pattern past the LUKS header area, as a workload's (encrypted) data would be."""
    ceph.run("rbd", "bench", "--io-type", "write", "--io-size", "64K", "--io-total", "1M",
             "--io-pattern", "seq", spec(volume_id))  # fmt: skip


def digest(ceph: CephCluster, volume_id: str, length: int) -> str:
    data = subprocess.run(
        ["rbd", "export", "--no-progress", spec(volume_id), "-"],
        env=ceph.env(), capture_output=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    return hashlib.sha256(data[:length]).hexdigest()


def dek(plugin: RunningPlugin, ceph: CephCluster, volume_id: str, key_file: str) -> str:
    wrapped = image_meta(ceph, volume_id)[DEK]
    return LocalKMS("check", plugin.kms_config.parent / key_file).decrypt_dek(volume_id, wrapped)


def test_create_keeps_state_in_image_metadata_and_delete_removes_the_image(
    plugin: RunningPlugin, ceph: CephCluster, secrets: dict[str, str]
) -> None:
    volume = plugin.create("pvc-rbd-1", 32 * MiB, encrypted(ceph), secrets=secrets)
    assert volume.volume_id.startswith("rbd-") and volume.capacity_bytes == 32 * MiB
    assert volume == plugin.create("pvc-rbd-1", 32 * MiB, encrypted(ceph), secrets=secrets)  # idempotent
    meta = image_meta(ceph, volume.volume_id)
    assert meta["csi-luks/encrypted"] == "true" and meta["csi-luks/kms-id"] == "local-1"
    assert meta[STATE] == "prepared" and meta["csi-luks/volume-id"] == volume.volume_id
    assert dek(plugin, ceph, volume.volume_id, "kek-1") not in meta[DEK]  # only wrapped
    assert image_size(ceph, volume.volume_id) >= 32 * MiB + LUKS_HEADER_BYTES

    plain = plugin.create("pvc-rbd-plain", 8 * MiB, params(ceph, encrypted="false"), secrets=secrets)
    assert image_meta(ceph, plain.volume_id)["csi-luks/encrypted"] == "false"
    assert DEK not in image_meta(ceph, plain.volume_id)

    for volume_id in (volume.volume_id, plain.volume_id):
        for _ in range(2):  # a repeated delete is a no-op
            plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id, secrets=secrets))
        assert not exists(ceph, volume_id)


def calls_since(before: Counter[str]) -> Counter[str]:
    """The plugin's librbd/librados calls (rbd_images.CALLS) since `before` was copied."""
    return CALLS - before


def test_create_and_delete_ask_the_cluster_nothing_twice(
    plugin: RunningPlugin, ceph: CephCluster, secrets: dict[str, str]
) -> None:
    # One open connection: each call is a round trip, no process, no handshake; still, none is repeated.
    before = Counter(CALLS)
    volume = plugin.create("pvc-rbd-calls", 16 * MiB, encrypted(ceph), secrets=secrets)
    created = calls_since(before)
    assert created["stat"] == 1, created  # the lookup; create() knows it found none
    assert created["create"] == 1 and created["metadata-list"] == 0, created
    # The bench's bare reference writes the same keys, as many times.
    assert sorted(image_meta(ceph, volume.volume_id)) == sorted(NEW_VOLUME_KEYS)
    assert created["metadata-set"] == len(NEW_VOLUME_KEYS), created

    before = Counter(CALLS)
    plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id, secrets=secrets))
    deleted = calls_since(before)
    assert deleted["stat"] == 1, deleted  # get(): the rest trusts what it read
    # The DEK is shredded; the pending DEK of a rotation, which this volume never had, costs no call.
    assert deleted["metadata-remove"] == 1, deleted
    assert deleted["remove"] == 1 and deleted["trash-move"] == 0, deleted  # no snapshot: removed at once
    assert deleted["trash-list"] == 1, deleted  # the purge of what nothing needs any more
    # The intent to delete (an open to set it), then "watched on any node?", asked once.
    assert deleted["metadata-set"] == 1 and deleted["watchers-list"] == 1, deleted
    assert sum(deleted.values()) <= 10, deleted
    assert not exists(ceph, volume.volume_id)


def test_no_controller_call_starts_a_process(
    plugin: RunningPlugin, ceph: CephCluster, secrets: dict[str, str]
) -> None:
    before = len(AUDIT.programs)
    source = plugin.create("pvc-rbd-noproc", 16 * MiB, encrypted(ceph), secrets=secrets).volume_id
    snapshot = plugin.snapshot("snap-rbd-noproc", source, secrets=secrets).snapshot_id
    restored = plugin.copy("pvc-rbd-noproc-restored", 32 * MiB, encrypted(ceph), snapshot_id=snapshot,
                           secrets=secrets).volume_id  # fmt: skip
    clone = plugin.copy("pvc-rbd-noproc-clone", None, encrypted(ceph), volume_id=source, secrets=secrets)
    plugin.controller.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(
            volume_id=source, capacity_range=csi_pb2.CapacityRange(required_bytes=32 * MiB), secrets=secrets
        )
    )
    for volume_id in (source, restored, clone.volume_id):
        plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id, secrets=secrets))
    plugin.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot, secrets=secrets))
    assert AUDIT.programs[before:] == []
    for object_id in (source, snapshot, restored, clone.volume_id):
        assert not exists(ceph, object_id)
    assert trash(ceph, source, snapshot, restored, clone.volume_id) == []  # nothing is left billed


def test_a_request_reads_a_volume_once_and_keeps_its_own_changes(
    plugin: RunningPlugin, ceph: CephCluster, secrets: dict[str, str]
) -> None:
    volume_id = plugin.create("pvc-rbd-read-once", 16 * MiB, encrypted(ceph), secrets=secrets).volume_id
    request = plugin.server.backend.for_request(secrets)  # what one RPC uses
    before = Counter(CALLS)
    first = request.get(volume_id)
    assert request.get(volume_id) == first  # the node's stage, then its DEK fetch
    request.set_metadata(volume_id, "csi-luks/test-key", "1")
    assert request.get(volume_id).metadata["csi-luks/test-key"] == "1"
    request.remove_metadata(volume_id, "csi-luks/test-key")
    assert "csi-luks/test-key" not in request.get(volume_id).metadata
    assert calls_since(before)["stat"] == 1
    assert "csi-luks/test-key" not in image_meta(ceph, volume_id)  # the cluster agrees

    request.resize(volume_id, 32 * MiB + LUKS_HEADER_BYTES)
    assert request.get(volume_id).size_bytes == image_size(ceph, volume_id) >= 32 * MiB  # read again
    assert calls_since(before)["stat"] == 2
    assert plugin.server.backend.for_request(secrets).get(volume_id) == request.get(volume_id)  # a new one


def test_node_publish_answers_from_the_stage_record_without_the_cluster(
    tmp_path: Path, ceph_config: Path, ceph: CephCluster, secrets: dict[str, str]
) -> None:
    with running_plugin(tmp_path / "plugin", ceph_config=ceph_config) as plugin:  # controller and node
        volume_id = plugin.create("pvc-rbd-publish", 16 * MiB, encrypted(ceph), secrets=secrets).volume_id
        publish = csi_pb2.NodePublishVolumeRequest(
            volume_id=volume_id, staging_target_path=str(tmp_path / "staging"),
            target_path=str(tmp_path / "target"), volume_capability=mount_capability(), secrets=secrets,
        )  # fmt: skip

        before = Counter(CALLS)
        # No record: the volume is read with the request's credentials (nothing is mounted at the staging
        # path on this host, so it is not staged either way).
        assert "is not staged" in details_of(plugin.node.NodePublishVolume, publish)
        assert calls_since(before)["stat"] == 1

        # What NodeStageVolume records before it maps the image (the host has no krbd to map it).
        request = plugin.server.backend.for_request(secrets)
        assert isinstance(request, RbdBackend)
        request._write_record(request.get(volume_id))
        before, spawned = Counter(CALLS), len(AUDIT.programs)
        assert code_of(plugin.node.NodePublishVolume, publish) == grpc.StatusCode.FAILED_PRECONDITION
        assert "is not staged" in details_of(plugin.node.NodePublishVolume, publish)
        assert calls_since(before) == Counter() and AUDIT.programs[spawned:] == []


def test_delete_purges_the_snapshots_an_interrupted_copy_left(
    plugin: RunningPlugin, ceph: CephCluster, secrets: dict[str, str]
) -> None:
    volume = plugin.create("pvc-rbd-snapped", 16 * MiB, encrypted(ceph), secrets=secrets)
    ceph.run("rbd", "snap", "create", f"{spec(volume.volume_id)}@csi-copy-csi-vol-left-behind")
    before = Counter(CALLS)
    plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id, secrets=secrets))
    deleted = calls_since(before)
    assert deleted["remove"] == 2 and deleted["snap-remove"] == 1, deleted  # refused, cleared, removed
    assert deleted["trash-move"] == 0, deleted  # no clone needed the snapshot
    assert not exists(ceph, volume.volume_id) and trash(ceph, volume.volume_id) == []


def test_expand_grows_the_image(plugin: RunningPlugin, ceph: CephCluster, secrets: dict[str, str]) -> None:
    volume = plugin.create("pvc-rbd-grow", 16 * MiB, encrypted(ceph), secrets=secrets)
    response = plugin.controller.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(
            volume_id=volume.volume_id,
            capacity_range=csi_pb2.CapacityRange(required_bytes=48 * MiB),
            secrets=secrets,
        )
    )
    assert response.capacity_bytes == 48 * MiB and response.node_expansion_required
    assert image_size(ceph, volume.volume_id) >= 48 * MiB + LUKS_HEADER_BYTES
    assert image_meta(ceph, volume.volume_id)["csi-luks/capacity"] == str(48 * MiB)


def test_snapshot_restore_and_clone_copy_content_and_rewrap_the_dek_across_kms_ids(
    plugin: RunningPlugin, ceph: CephCluster, secrets: dict[str, str]
) -> None:
    source = plugin.create("pvc-rbd-src", 24 * MiB, encrypted(ceph), secrets=secrets).volume_id
    ceph.run("rbd", "image-meta", "set", spec(source), STATE, "encrypted")  # as after its first NodeStage
    fill(ceph, source)
    length = image_size(ceph, source)
    source_digest = digest(ceph, source, length)

    snapshot = plugin.snapshot("snap-rbd-1", source, secrets=secrets)
    assert snapshot.ready_to_use and snapshot.source_volume_id == source
    assert decode_volume_id(snapshot.snapshot_id).pool == ceph.pool
    restored = plugin.copy("pvc-rbd-restored", 64 * MiB, encrypted(ceph, "local-2"),
                           snapshot_id=snapshot.snapshot_id, secrets=secrets).volume_id  # fmt: skip
    clone = plugin.copy("pvc-rbd-clone", None, encrypted(ceph), volume_id=source, secrets=secrets).volume_id

    # Content: a point-in-time copy; the restore grew to its own size.
    for copy in (snapshot.snapshot_id, restored, clone):
        assert digest(ceph, copy, length) == source_digest
    assert image_size(ceph, restored) >= 64 * MiB + LUKS_HEADER_BYTES
    # Keys: the same DEK, wrapped for each object's own KMS id (local-2 for the restore).
    source_dek = dek(plugin, ceph, source, "kek-1")
    assert dek(plugin, ceph, snapshot.snapshot_id, "kek-1") == source_dek
    assert dek(plugin, ceph, clone, "kek-1") == source_dek
    assert dek(plugin, ceph, restored, "kek-2") == source_dek
    meta = image_meta(ceph, restored)
    assert meta["csi-luks/kms-id"] == "local-2" and meta[STATE] == "encrypted"
    assert meta["csi-luks/source"] == snapshot.snapshot_id
    # The copies hold no snapshot, and the source kept none of the temporary ones.
    for image in (source, snapshot.snapshot_id, restored, clone):
        assert json.loads(ceph.run("rbd", "snap", "ls", "--format", "json", spec(image)) or "[]") == []

    # Each outlives the others: delete the source and the snapshot, the restore is still whole.
    for volume_id in (source, clone):
        plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id, secrets=secrets))
    plugin.controller.DeleteSnapshot(
        csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot.snapshot_id, secrets=secrets)
    )
    assert not exists(ceph, snapshot.snapshot_id) and exists(ceph, restored)
    assert dek(plugin, ceph, restored, "kek-2") == source_dek


def test_copy_rules_and_credential_errors(
    plugin: RunningPlugin, ceph: CephCluster, secrets: dict[str, str]
) -> None:
    source = plugin.create("pvc-rbd-rules", 8 * MiB, encrypted(ceph), secrets=secrets).volume_id
    create = plugin.copy
    assert code_of(
        create, "pvc-x", None, params(ceph, encrypted="false"), volume_id=source, secrets=secrets
    ) == (grpc.StatusCode.INVALID_ARGUMENT)
    assert code_of(create, "pvc-y", 4 * MiB, encrypted(ceph), volume_id=source, secrets=secrets) == (
        grpc.StatusCode.OUT_OF_RANGE
    )
    # No credentials, a wrong key, an unknown cluster: each says what to fix.
    assert "userID, userKey" in details_of(plugin.create, "pvc-z", 8 * MiB, encrypted(ceph))
    other_key = subprocess.run(
        ["ceph-authtool", "--gen-print-key"], capture_output=True, text=True, check=True
    )
    wrong = {"userID": ceph.csi.id, "userKey": other_key.stdout.strip()}
    AUDIT.register_ceph_key(wrong["userKey"])
    assert (
        code_of(plugin.create, "pvc-z", 8 * MiB, encrypted(ceph), secrets=wrong)
        == grpc.StatusCode.PERMISSION_DENIED
    )
    garbled = {"userID": ceph.csi.id, "userKey": "not a cephx key"}
    assert "not a valid cephx key" in details_of(
        plugin.create, "pvc-z", 8 * MiB, encrypted(ceph), secrets=garbled
    )
    details = details_of(
        plugin.create, "pvc-z", 8 * MiB, params(ceph, clusterID="elsewhere"), secrets=secrets
    )
    assert "clusterID 'elsewhere'" in details and "test-cluster" in details
    mounter = details_of(plugin.create, "pvc-z", 8 * MiB, params(ceph, mounter="fuse"), secrets=secrets)
    assert "mounter 'fuse'" in mounter and "rbd-nbd" in mounter
    unknown = details_of(plugin.create, "pvc-z", 8 * MiB, params(ceph, colour="red"), secrets=secrets)
    assert "colour" in unknown and "pool" in unknown


def test_an_interrupted_create_is_replaced_and_invisible_until_complete(
    plugin: RunningPlugin, ceph: CephCluster, secrets: dict[str, str]
) -> None:
    volume_id = plugin.server.backend.volume_id_for("pvc-rbd-crash", params(ceph))
    # What a create that stopped after `rbd create` and one metadata key leaves behind.
    ceph.run("rbd", "create", "--size", "4M", spec(volume_id))
    ceph.run("rbd", "image-meta", "set", spec(volume_id), "csi-luks/name", "pvc-rbd-crash")
    assert (
        code_of(
            plugin.controller.ControllerExpandVolume,
            csi_pb2.ControllerExpandVolumeRequest(
                volume_id=volume_id,
                capacity_range=csi_pb2.CapacityRange(required_bytes=8 * MiB),
                secrets=secrets,
            ),
        )
        == grpc.StatusCode.NOT_FOUND
    )
    volume = plugin.create("pvc-rbd-crash", 16 * MiB, encrypted(ceph), secrets=secrets)
    assert volume.volume_id == volume_id and image_meta(ceph, volume_id)["csi-luks/volume-id"] == volume_id
    assert image_size(ceph, volume_id) >= 16 * MiB + LUKS_HEADER_BYTES


def test_listing_is_not_advertised(plugin: RunningPlugin) -> None:
    capabilities = plugin.controller_capabilities()
    rpc = csi_pb2.ControllerServiceCapability.RPC
    assert rpc.CREATE_DELETE_SNAPSHOT in capabilities and rpc.CLONE_VOLUME in capabilities
    assert rpc.LIST_VOLUMES not in capabilities and rpc.GET_CAPACITY not in capabilities
    assert (
        code_of(plugin.controller.ListVolumes, csi_pb2.ListVolumesRequest()) == grpc.StatusCode.UNIMPLEMENTED
    )


def test_rados_namespace_and_data_pool_place_the_image(ceph: CephCluster, tmp_path: Path) -> None:
    ceph.create_pool("csi-data")
    ceph.run("rbd", "namespace", "create", f"{ceph.pool}/tenant-a")
    user = ceph.create_user(
        "client.csi-ns",
        {"mon": "profile rbd", "osd": f"profile rbd pool={ceph.pool}, profile rbd pool=csi-data"},
    )
    AUDIT.register_ceph_key(user.key)
    config = tmp_path / "config.json"
    monitors = [f"v1:{ceph.monitors}"]
    config.write_text(
        json.dumps([{"clusterID": "ns", "monitors": monitors, "rbd": {"radosNamespace": "tenant-a"}}])
    )
    backend = RbdBackend(CephClusters(config), tmp_path).for_request({"userID": user.id, "userKey": user.key})
    parameters = {"clusterID": "ns", "pool": ceph.pool, "dataPool": "csi-data"}
    volume_id = backend.volume_id_for("pvc-ns", parameters)
    backend.create(volume_id, "pvc-ns", 8 * MiB, {"csi-luks/name": "pvc-ns"}, parameters=parameters)
    ref = decode_volume_id(volume_id)
    assert ref.namespace == "tenant-a" and ref.spec == f"{ceph.pool}/tenant-a/{ref.image}"
    listed = json.loads(ceph.run("rbd", "ls", "--format", "json", "--namespace", "tenant-a", ceph.pool))
    assert ref.image in listed and ref.image not in json.loads(
        ceph.run("rbd", "ls", "--format", "json", ceph.pool)
    )
    assert json.loads(ceph.run("rbd", "info", "--format", "json", ref.spec))["data_pool"] == "csi-data"
    backend.delete(volume_id)
    assert ref.image not in json.loads(
        ceph.run("rbd", "ls", "--format", "json", "--namespace", "tenant-a", ceph.pool)
    )


def test_an_unreachable_cluster_is_unavailable_within_the_connect_timeout(
    ceph: CephCluster, tmp_path: Path
) -> None:
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    config = tmp_path / "config.json"
    config.write_text(json.dumps([{"clusterID": "down", "monitors": [f"v1:127.0.0.1:{port}"]}]))
    backend = RbdBackend(CephClusters(config), tmp_path, connect_timeout=2).for_request(
        {"userID": ceph.csi.id, "userKey": ceph.csi.key}
    )
    volume_id = backend.volume_id_for("pvc-down", {"clusterID": "down", "pool": "rbd"})
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match="did not answer"):
        backend.get(volume_id)
    assert time.monotonic() - started < 20


def test_an_image_owned_by_another_volume_id_is_never_replaced_or_deleted(
    ceph: CephCluster, tmp_path: Path
) -> None:
    # Two clusterIDs naming one Ceph cluster: the same PV name maps to the same image under both.
    config = tmp_path / "config.json"
    monitors = [f"v1:{ceph.monitors}"]
    config.write_text(
        json.dumps([{"clusterID": "a", "monitors": monitors}, {"clusterID": "b", "monitors": monitors}])
    )
    backend = RbdBackend(CephClusters(config), tmp_path).for_request(
        {"userID": ceph.csi.id, "userKey": ceph.csi.key}
    )
    via_a = backend.volume_id_for("pvc-alias", {"clusterID": "a", "pool": ceph.pool})
    via_b = backend.volume_id_for("pvc-alias", {"clusterID": "b", "pool": ceph.pool})
    assert via_a != via_b and decode_volume_id(via_a).spec == decode_volume_id(via_b).spec
    backend.create(via_a, "pvc-alias", 4 * MiB, {"csi-luks/name": "pvc-alias"})
    with pytest.raises(VolumeInUse, match=f"belongs to volume {via_a}"):
        backend.create(via_b, "pvc-alias", 4 * MiB, {"csi-luks/name": "pvc-alias"})
    backend.delete(via_b)  # this id names no volume of its own: nothing to delete
    assert backend.get(via_a).metadata["csi-luks/name"] == "pvc-alias"
    backend.delete(via_a)
    assert not exists(ceph, via_a)


def test_placement_errors_are_the_requests_fault(ceph: CephCluster, tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps([{"clusterID": "c", "monitors": [f"v1:{ceph.monitors}"]}]))
    backend = RbdBackend(CephClusters(config), tmp_path).for_request(
        {"userID": ceph.csi.id, "userKey": ceph.csi.key}
    )
    missing_pool = {"clusterID": "c", "pool": "no-such-pool"}
    volume_id = backend.volume_id_for("pvc-nowhere", missing_pool)
    with pytest.raises(BackendRequestError, match="pool, RADOS namespace or data pool does not exist"):
        backend.create(volume_id, "pvc-nowhere", 4 * MiB, {}, parameters=missing_pool)
    features = {"clusterID": "c", "pool": ceph.pool, "imageFeatures": "layering,teleport"}
    with pytest.raises(BackendRequestError, match="unknown \\['teleport'\\]"):
        backend.create(backend.volume_id_for("pvc-f", features), "pvc-f", 4 * MiB, {}, parameters=features)


def rbd_used(ceph: CephCluster, volume_id: str) -> int:
    du = json.loads(ceph.run("rbd", "du", "--format", "json", spec(volume_id)))
    return sum(int(i["used_size"]) for i in du["images"] if not i.get("snapshot"))


def write_zeros(ceph: CephCluster, volume_id: str, offset: int, length: int) -> None:
    """Write zero bytes into the image as client.admin (what a dm-crypt discard leaves is zeros; ciphertext
    never is): its objects exist, and count in `rbd du`, until something frees them."""
    ref = decode_volume_id(volume_id)
    with (
        rados.Rados(conffile=str(ceph.conf)) as cluster,
        cluster.open_ioctx(ref.pool) as ioctx,
        rbd.Image(ioctx, ref.image) as image,
    ):
        image.write(bytes(length), offset)


def test_controller_reclaim_space_sparsifies_the_image_and_reports_rbd_du(
    plugin: RunningPlugin, ceph: CephCluster, secrets: dict[str, str]
) -> None:
    volume = plugin.create("pvc-sparsify", 64 * MiB, encrypted(ceph), secrets=secrets)
    fill(ceph, volume.volume_id)  # the first MiB: the LUKS header area, ciphertext-like
    write_zeros(ceph, volume.volume_id, 16 * MiB, 8 * MiB)  # two whole 4 MiB objects of zeros
    before = rbd_used(ceph, volume.volume_id)
    assert before >= 9 * MiB
    stub = reclaim_grpc.ReclaimSpaceControllerStub(plugin.channel)
    request = reclaim_pb.ControllerReclaimSpaceRequest(volume_id=volume.volume_id, secrets=secrets)
    calls, spawned = Counter(CALLS), len(AUDIT.programs)
    response = stub.ControllerReclaimSpace(request)
    # librbd on the cached connection (issue 20): no `rbd sparsify`/`rbd du` process.
    assert AUDIT.programs[spawned:] == []
    assert calls_since(calls)["sparsify"] == 1 and calls_since(calls)["du"] == 2, calls_since(calls)
    assert response.pre_usage.usage_bytes == before
    # The objects of zeros are gone; the written range is not zeros (as ciphertext never is): kept.
    after = rbd_used(ceph, volume.volume_id)
    assert response.post_usage.usage_bytes == after == before - 8 * MiB
    no_credentials = reclaim_pb.ControllerReclaimSpaceRequest(volume_id=volume.volume_id)
    assert code_of(stub.ControllerReclaimSpace, no_credentials) == grpc.StatusCode.INVALID_ARGUMENT
    assert "userID" in details_of(stub.ControllerReclaimSpace, no_credentials)

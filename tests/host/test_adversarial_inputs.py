"""Hostile and malformed requests over gRPC (issue 11): each is refused with a precise code before it
touches a file or a command, or handled without harm; none answers INTERNAL."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import Message

from csi_luks.csi import csi_pb2
from csi_luks.kms.local import LocalKMS
from csi_luks.settings import Mode
from csi_luks.volume_metadata import CAPACITY, KIND, KIND_SNAPSHOT, LUKS_HEADER_BYTES, STATE
from tests.support.audit import AUDIT
from tests.support.ceph import CephCluster
from tests.support.plugin import (
    MiB,
    RunningPlugin,
    code_of,
    details_of,
    mount_capability,
    running_plugin,
)

LOCAL_1 = {"encrypted": "true", "encryptionKMSID": "local-1"}
SECRETS_CLASS = {"encrypted": "true", "encryptionKMSID": ""}
PASSPHRASE = {"encryptionPassphrase": "the-shared-class-passphrase"}
PiB = 1024**5
INT64_MAX = 2**63 - 1
CAP = mount_capability()
# Ids no backend makes: paths out of the state directory, absolute paths, NUL, newlines, huge ones.
HOSTILE_IDS = ["../../precious", "/some/dir/config", "sa-\x00x", "a\nb", "..", "x" * 10_000]


@pytest.fixture
def plugin(tmp_path: Path) -> Iterator[RunningPlugin]:
    with running_plugin(tmp_path / "plugin", mode=Mode.ALL) as running:
        yield running


def cryptsetup_calls() -> int:
    return len(AUDIT.spawns)


def unknown_standalone_id(plugin: RunningPlugin) -> str:
    return plugin.backend.volume_id_for("never-created", {})


def node_requests(volume_id: str, path: str) -> list[tuple[str, Message]]:
    return [
        ("NodeStageVolume", csi_pb2.NodeStageVolumeRequest(
            volume_id=volume_id, staging_target_path=path, volume_capability=CAP)),
        ("NodeUnstageVolume", csi_pb2.NodeUnstageVolumeRequest(
            volume_id=volume_id, staging_target_path=path)),
        ("NodePublishVolume", csi_pb2.NodePublishVolumeRequest(
            volume_id=volume_id, staging_target_path=path, target_path=path + "/t", volume_capability=CAP)),
        ("NodeUnpublishVolume", csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=path)),
        ("NodeGetVolumeStats", csi_pb2.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=path)),
        ("NodeExpandVolume", csi_pb2.NodeExpandVolumeRequest(volume_id=volume_id, volume_path=path)),
    ]  # fmt: skip


def controller_requests(object_id: str) -> list[tuple[str, Message]]:
    return [
        ("ControllerExpandVolume", csi_pb2.ControllerExpandVolumeRequest(
            volume_id=object_id, capacity_range=csi_pb2.CapacityRange(required_bytes=MiB))),
        ("ValidateVolumeCapabilities", csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id=object_id, volume_capabilities=[CAP])),
        ("CreateSnapshot", csi_pb2.CreateSnapshotRequest(name="snap-hostile", source_volume_id=object_id)),
        ("CreateVolume", csi_pb2.CreateVolumeRequest(
            name="restore-hostile", volume_capabilities=[CAP], parameters=LOCAL_1,
            volume_content_source=csi_pb2.VolumeContentSource(
                snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=object_id)))),
        ("CreateVolume", csi_pb2.CreateVolumeRequest(
            name="clone-hostile", volume_capabilities=[CAP], parameters=LOCAL_1,
            volume_content_source=csi_pb2.VolumeContentSource(
                volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=object_id)))),
    ]  # fmt: skip


def call(plugin: RunningPlugin, method: str, request: Message) -> grpc.StatusCode:
    service = plugin.node if method.startswith("Node") else plugin.controller
    try:
        getattr(service, method)(request)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@pytest.fixture
def rbd_node(tmp_path: Path) -> Iterator[RunningPlugin]:
    """An RBD node plugin; no cluster is needed for calls that carry no credentials."""
    clusters = tmp_path / "ceph-config.json"
    clusters.write_text(json.dumps([{"clusterID": "c1", "monitors": ["127.0.0.1:6789"]}]))
    with running_plugin(tmp_path / "plugin", mode=Mode.NODE, ceph_config=clusters) as running:
        yield running


@pytest.fixture
def rbd_plugin(tmp_path: Path, ceph_config: Path) -> Iterator[RunningPlugin]:
    with running_plugin(tmp_path / "rbd", mode=Mode.ALL, ceph_config=ceph_config) as running:
        yield running


def rbd_images(ceph: CephCluster) -> list[str]:
    return sorted(json.loads(ceph.run("rbd", "ls", "--format", "json", ceph.pool) or "[]"))


def rbd_parameters(ceph: CephCluster) -> dict[str, str]:
    return {"clusterID": "test-cluster", "pool": ceph.pool, **LOCAL_1}


def expand(plugin: RunningPlugin, volume_id: str, size: int, secrets: dict[str, str] | None = None) -> int:
    request = csi_pb2.ControllerExpandVolumeRequest(
        volume_id=volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=size), secrets=secrets
    )
    capacity: int = plugin.controller.ControllerExpandVolume(request).capacity_bytes
    return capacity


# --- item 7: a broken KMS configuration edit keeps the last good one ----------------------------------


@pytest.mark.parametrize("broken", ["[" * 100_000 + "]" * 100_000, '{"a": ' + "9" * 5000 + "}"])
def test_a_hostile_kms_configuration_edit_keeps_the_last_good_one(
    plugin: RunningPlugin, broken: str, caplog: pytest.LogCaptureFixture
) -> None:
    good = plugin.kms_config.read_text()
    plugin.kms_config.write_text(broken)
    os.utime(plugin.kms_config, ns=(10**18, 10**18))  # a change the plugin notices, whatever the clock
    with caplog.at_level(logging.ERROR):
        volume = plugin.create("pvc-after-edit", 16 * MiB)
        plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))
    assert "KMS configuration" in caplog.text and "last good" in caplog.text
    plugin.kms_config.write_text(good)


# --- item 6: NodeUnpublish removes only what a publish made -------------------------------------------


def test_unpublish_of_a_target_never_published_keeps_the_users_files(
    plugin: RunningPlugin, tmp_path: Path
) -> None:
    volume_id = unknown_standalone_id(plugin)

    def unpublish(target: Path) -> None:
        plugin.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(target))
        )

    data_file = tmp_path / "data-file"
    data_file.write_text("user data")
    full_dir = tmp_path / "full-dir"
    full_dir.mkdir()
    (full_dir / "inside").write_text("user data")
    empty_dir = tmp_path / "empty-dir"
    empty_dir.mkdir()
    empty_file = tmp_path / "block-target"
    empty_file.touch()
    for target in (data_file, full_dir, empty_dir, empty_file, tmp_path / "missing"):
        unpublish(target)
    assert data_file.read_text() == "user data"
    assert (full_dir / "inside").read_text() == "user data"
    assert not empty_dir.exists() and not empty_file.exists()  # what a publish leaves: removed


# --- items 3 and 4: capacities beyond what the backend can hold ---------------------------------------


@pytest.mark.parametrize("size", [PiB, INT64_MAX])
def test_a_capacity_the_backend_cannot_hold_is_refused_and_leaves_nothing(
    plugin: RunningPlugin, size: int
) -> None:
    code = code_of(plugin.create, "pvc-too-big", size)
    assert code in (grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED)
    volumes = plugin.state_dir / "volumes"
    assert not volumes.exists() or not os.listdir(volumes)


def test_a_refused_expand_leaves_the_volume_as_it_was(plugin: RunningPlugin) -> None:
    volume = plugin.create("pvc-expand", 64 * MiB)
    image = plugin.backend.image_path(volume.volume_id)
    size_before, meta_before = image.stat().st_size, plugin.backend.get(volume.volume_id).metadata
    for size in (PiB, INT64_MAX):
        code = code_of(expand, plugin, volume.volume_id, size)
        assert code in (grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert image.stat().st_size == size_before
    assert plugin.backend.get(volume.volume_id).metadata == meta_before
    assert json.loads((image.parent / "meta.json").read_text())["size"] == size_before
    assert expand(plugin, volume.volume_id, 128 * MiB) == 128 * MiB
    assert image.stat().st_size == 128 * MiB + LUKS_HEADER_BYTES


def test_rbd_capacities_beyond_an_image_are_refused_and_leave_nothing(
    rbd_plugin: RunningPlugin, ceph: CephCluster, ceph_secrets: dict[str, str]
) -> None:
    parameters = rbd_parameters(ceph)
    before = rbd_images(ceph)
    for size in (2 * PiB, INT64_MAX):
        code = code_of(rbd_plugin.create, "pvc-rbd-huge", size, parameters, secrets=ceph_secrets)
        assert code in (grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert rbd_images(ceph) == before
    volume = rbd_plugin.create("pvc-rbd-adv", 16 * MiB, parameters, secrets=ceph_secrets)
    code = code_of(expand, rbd_plugin, volume.volume_id, 2 * PiB, ceph_secrets)
    assert code in (grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert expand(rbd_plugin, volume.volume_id, 32 * MiB, ceph_secrets) == 32 * MiB
    rbd_plugin.controller.DeleteVolume(
        csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id, secrets=ceph_secrets)
    )
    assert rbd_images(ceph) == before


# --- item 2: a copy must open with its class's key ----------------------------------------------------


def test_an_encrypted_snapshot_cannot_be_restored_into_a_secrets_class(plugin: RunningPlugin) -> None:
    source = plugin.create("pvc-kms", 16 * MiB, LOCAL_1)
    plugin.backend.set_metadata(source.volume_id, STATE, "encrypted")
    snapshot = plugin.snapshot("snap-kms", source.volume_id)
    before = {v.volume_id for v in plugin.backend.list()}
    for source_kind in ({"snapshot_id": snapshot.snapshot_id}, {"volume_id": source.volume_id}):
        code = code_of(plugin.copy, "restored", None, SECRETS_CLASS, secrets=PASSPHRASE, **source_kind)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "secrets" in details_of(
        plugin.copy, "restored", None, SECRETS_CLASS, secrets=PASSPHRASE, snapshot_id=snapshot.snapshot_id
    )
    assert {v.volume_id for v in plugin.backend.list()} == before


def test_a_secrets_class_snapshot_restored_into_a_kms_class_keeps_the_shared_passphrase(
    plugin: RunningPlugin,
) -> None:
    source = plugin.create("pvc-shared", 16 * MiB, SECRETS_CLASS, secrets=PASSPHRASE)
    plugin.backend.set_metadata(source.volume_id, STATE, "encrypted")
    snapshot = plugin.snapshot("snap-shared", source.volume_id, secrets=PASSPHRASE)
    before = {v.volume_id for v in plugin.backend.list()}
    # Without the passphrase the DEK cannot be known: refused, nothing left.
    code = code_of(plugin.copy, "restored-kms", None, LOCAL_1, snapshot_id=snapshot.snapshot_id)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert {v.volume_id for v in plugin.backend.list()} == before
    restored = plugin.copy(
        "restored-kms", None, LOCAL_1, snapshot_id=snapshot.snapshot_id, secrets=PASSPHRASE
    )
    wrapped = plugin.backend.get(restored.volume_id).metadata["csi-luks/dek"]
    dek = LocalKMS("check", plugin.kms_config.parent / "kek-1").decrypt_dek(restored.volume_id, wrapped)
    assert dek == PASSPHRASE["encryptionPassphrase"]  # the copied header opens with it


# --- item 5: volume and snapshot ids live in disjoint namespaces --------------------------------------


def test_volume_and_snapshot_names_never_share_an_id(plugin: RunningPlugin) -> None:
    source = plugin.create("pvc-src", 16 * MiB)
    snapshot = plugin.snapshot("y", source.volume_id)
    volume = plugin.create("snapshot:y", 16 * MiB)
    assert volume.volume_id != snapshot.snapshot_id
    volume_x = plugin.create("snapshot:x", 16 * MiB)
    snapshot_x = plugin.snapshot("x", source.volume_id)
    assert snapshot_x.snapshot_id != volume_x.volume_id
    assert snapshot_x.source_volume_id == source.volume_id

    # Deleting an object with the other kind's call refuses, and says why.
    request = csi_pb2.DeleteVolumeRequest(volume_id=snapshot.snapshot_id)
    assert code_of(plugin.controller.DeleteVolume, request) == grpc.StatusCode.INVALID_ARGUMENT
    assert "snapshot" in details_of(plugin.controller.DeleteVolume, request)
    request_s = csi_pb2.DeleteSnapshotRequest(snapshot_id=volume.volume_id)
    assert code_of(plugin.controller.DeleteSnapshot, request_s) == grpc.StatusCode.INVALID_ARGUMENT
    assert "volume" in details_of(plugin.controller.DeleteSnapshot, request_s)
    plugin.backend.get(snapshot.snapshot_id)
    plugin.backend.get(volume.volume_id)


def test_a_snapshot_with_an_id_of_the_old_scheme_is_not_handed_out_as_a_volume(plugin: RunningPlugin) -> None:
    # Snapshots made before the namespaces were split have ids derived from "snapshot:" + name.
    legacy_id = plugin.backend.volume_id_for("snapshot:old", {})
    plugin.backend.create(legacy_id, "old", 16 * MiB, {KIND: KIND_SNAPSHOT, CAPACITY: str(16 * MiB)})
    assert (
        code_of(plugin.create, "snapshot:old", 16 * MiB, {"encrypted": "false"})
        == grpc.StatusCode.ALREADY_EXISTS
    )
    listed = plugin.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(snapshot_id=legacy_id))
    assert [e.snapshot.snapshot_id for e in listed.entries] == [legacy_id]  # and it still resolves


def test_rbd_volume_and_snapshot_names_never_share_an_id(
    rbd_plugin: RunningPlugin, ceph: CephCluster, ceph_secrets: dict[str, str]
) -> None:
    parameters = rbd_parameters(ceph)
    before = rbd_images(ceph)
    volume = rbd_plugin.create("pvc-rbd-kinds", 16 * MiB, parameters, secrets=ceph_secrets)
    snapshot = rbd_plugin.snapshot("adv", volume.volume_id, secrets=ceph_secrets)
    named_like_it = rbd_plugin.create("snapshot:adv", 16 * MiB, parameters, secrets=ceph_secrets)
    assert named_like_it.volume_id != snapshot.snapshot_id
    delete = csi_pb2.DeleteVolumeRequest(volume_id=snapshot.snapshot_id, secrets=ceph_secrets)
    assert code_of(rbd_plugin.controller.DeleteVolume, delete) == grpc.StatusCode.INVALID_ARGUMENT
    for object_id in (named_like_it.volume_id, volume.volume_id):
        rbd_plugin.controller.DeleteVolume(
            csi_pb2.DeleteVolumeRequest(volume_id=object_id, secrets=ceph_secrets)
        )
    rbd_plugin.controller.DeleteSnapshot(
        csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot.snapshot_id, secrets=ceph_secrets)
    )
    assert rbd_images(ceph) == before


# --- items 1 and 8: ids are checked against the backend's grammar before any path or command ----------


@pytest.mark.parametrize("hostile", HOSTILE_IDS)
def test_hostile_ids_are_refused_before_any_file_or_command(
    plugin: RunningPlugin, tmp_path: Path, hostile: str
) -> None:
    before = cryptsetup_calls()
    requests = node_requests(hostile, str(tmp_path / "staging")) + controller_requests(hostile)
    for method, request in requests:
        code = call(plugin, method, request)
        assert code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT), (method, code)
    assert cryptsetup_calls() == before
    # Deleting what cannot exist succeeds without touching anything (csi-sanity: DeleteVolume and
    # DeleteSnapshot of a non-existent id are OK).
    plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=hostile))
    plugin.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=hostile))
    listed = plugin.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(snapshot_id=hostile))
    assert not listed.entries
    listed = plugin.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(source_volume_id=hostile))
    assert not listed.entries


def test_a_well_formed_unknown_id_keeps_its_answers(plugin: RunningPlugin, tmp_path: Path) -> None:
    unknown = unknown_standalone_id(plugin)
    staging = str(tmp_path / "staging")
    # (NodeUnstage of it closes a mapping by name: device-mapper's answer, covered in the VM tier.)
    plugin.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id=unknown, target_path=staging)
    )
    stats = csi_pb2.NodeGetVolumeStatsRequest(volume_id=unknown, volume_path=staging)
    assert code_of(plugin.node.NodeGetVolumeStats, stats) == grpc.StatusCode.NOT_FOUND
    plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=unknown))
    plugin.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=unknown))


def test_rbd_node_unstage_never_deletes_files_outside_the_state_dir(
    rbd_node: RunningPlugin, tmp_path: Path
) -> None:
    state = rbd_node.state_dir
    (state / "rbd-attachments").mkdir(parents=True)
    precious = state / ".." / "precious.json"
    precious.write_text("keep me")
    elsewhere = tmp_path / "some" / "dir"
    elsewhere.mkdir(parents=True)
    (elsewhere / "config.json").write_text("keep me too")
    before = cryptsetup_calls()
    for volume_id in ("../../precious", str(elsewhere / "config")):
        request = csi_pb2.NodeUnstageVolumeRequest(
            volume_id=volume_id, staging_target_path=str(tmp_path / "s")
        )
        code = code_of(rbd_node.node.NodeUnstageVolume, request)
        assert code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
    assert precious.read_text() == "keep me"
    assert (elsewhere / "config.json").read_text() == "keep me too"
    assert cryptsetup_calls() == before


def test_rbd_hostile_ids(rbd_plugin: RunningPlugin, tmp_path: Path, ceph_secrets: dict[str, str]) -> None:
    for hostile in HOSTILE_IDS:
        for method, request in node_requests(hostile, str(tmp_path / "staging")) + controller_requests(
            hostile
        ):
            code = call(rbd_plugin, method, request)
            assert code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT), (method, code)
        rbd_plugin.controller.DeleteVolume(
            csi_pb2.DeleteVolumeRequest(volume_id=hostile, secrets=ceph_secrets)
        )


# --- item 8: malformed fields -------------------------------------------------------------------------


def test_nul_bytes_in_paths_are_invalid_arguments(plugin: RunningPlugin, tmp_path: Path) -> None:
    volume = plugin.create("pvc-nul", 16 * MiB)
    for method, request in node_requests(volume.volume_id, str(tmp_path) + "/bad\x00path"):
        assert call(plugin, method, request) == grpc.StatusCode.INVALID_ARGUMENT, method


def test_an_access_mode_csi_does_not_define_is_an_invalid_argument(
    plugin: RunningPlugin, tmp_path: Path
) -> None:
    undefined = csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(),
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=99),  # type: ignore[arg-type]
    )
    request = csi_pb2.CreateVolumeRequest(
        name="pvc-mode", volume_capabilities=[undefined], parameters=LOCAL_1
    )
    assert code_of(plugin.controller.CreateVolume, request) == grpc.StatusCode.INVALID_ARGUMENT
    volume = plugin.create("pvc-mode-2", 16 * MiB)
    stage = csi_pb2.NodeStageVolumeRequest(
        volume_id=volume.volume_id, staging_target_path=str(tmp_path / "s"), volume_capability=undefined
    )
    assert code_of(plugin.node.NodeStageVolume, stage) == grpc.StatusCode.INVALID_ARGUMENT
    validate = plugin.controller.ValidateVolumeCapabilities(
        csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id=volume.volume_id, volume_capabilities=[undefined])
    )
    assert not validate.HasField("confirmed") and "99" in validate.message


def test_huge_request_fields_do_not_hide_the_answer(plugin: RunningPlugin) -> None:
    huge = "x" * 10_000
    request = csi_pb2.NodeGetVolumeStatsRequest(volume_id=huge, volume_path="/tmp")
    assert code_of(plugin.node.NodeGetVolumeStats, request) == grpc.StatusCode.NOT_FOUND
    assert len(details_of(plugin.node.NodeGetVolumeStats, request)) < 1000
    create = csi_pb2.CreateVolumeRequest(name="pvc-huge", volume_capabilities=[CAP], parameters={huge: "1"})
    assert code_of(plugin.controller.CreateVolume, create) == grpc.StatusCode.INVALID_ARGUMENT
    assert len(details_of(plugin.controller.CreateVolume, create)) < 1000
    create = csi_pb2.CreateVolumeRequest(
        name="pvc-huge", volume_capabilities=[CAP], parameters={"encrypted": huge}
    )
    assert code_of(plugin.controller.CreateVolume, create) == grpc.StatusCode.INVALID_ARGUMENT
    token = csi_pb2.ListSnapshotsRequest(starting_token=huge)
    assert code_of(plugin.controller.ListSnapshots, token) == grpc.StatusCode.ABORTED
    # A name that is long is a name: the volume is made, and a conflicting repeat is reported in full.
    plugin.create(huge, 16 * MiB)
    assert code_of(plugin.create, huge, 32 * MiB) == grpc.StatusCode.ALREADY_EXISTS

"""Snapshots, restores and clones through gRPC on the standalone backend: content copied, DEK re-wrapped."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_luks.csi import csi_pb2
from csi_luks.kms.local import LocalKMS
from csi_luks.settings import Mode
from csi_luks.volume_metadata import LUKS_HEADER_BYTES, STATE
from tests.support.plugin import MiB, RunningPlugin, code_of, details_of, running_plugin

DEK = "csi-luks/dek"
LOCAL_1 = {"encrypted": "true", "encryptionKMSID": "local-1"}
LOCAL_2 = {"encrypted": "true", "encryptionKMSID": "local-2"}
PLAIN = {"encrypted": "false"}


@pytest.fixture
def plugin(tmp_path: Path) -> Iterator[RunningPlugin]:
    with running_plugin(tmp_path, mode=Mode.CONTROLLER) as running:
        yield running


def dek_of(plugin: RunningPlugin, object_id: str, key_file: str) -> str:
    """Unwrap an object's DEK with a local KMS key file, as the node would."""
    wrapped = plugin.backend.get(object_id).metadata[DEK]
    return LocalKMS("check", plugin.kms_config.parent / key_file).decrypt_dek(object_id, wrapped)


def fill(plugin: RunningPlugin, volume_id: str, marker: bytes) -> str:
    """Write a marker after the LUKS header area (as a workload's data would be) and hash the image."""
    image = plugin.backend.image_path(volume_id)
    with image.open("r+b") as f:
        f.seek(LUKS_HEADER_BYTES + MiB)
        f.write(marker * 1000)
    return hashlib.sha256(image.read_bytes()).hexdigest()


def digest(plugin: RunningPlugin, volume_id: str, length: int | None = None) -> str:
    data = plugin.backend.image_path(volume_id).read_bytes()
    return hashlib.sha256(data[:length] if length is not None else data).hexdigest()


def test_snapshot_restore_and_clone_carry_content_and_dek(plugin: RunningPlugin) -> None:
    source = plugin.create("pvc-source", 32 * MiB, LOCAL_1)
    plugin.backend.set_metadata(source.volume_id, STATE, "encrypted")  # as after its first NodeStage
    source_digest = fill(plugin, source.volume_id, b"source-data!")
    source_dek = dek_of(plugin, source.volume_id, "kek-1")

    snapshot = plugin.snapshot("snap-1", source.volume_id)
    assert snapshot.ready_to_use and snapshot.source_volume_id == source.volume_id
    assert snapshot.size_bytes == 32 * MiB and snapshot.creation_time.seconds > 0
    assert digest(plugin, snapshot.snapshot_id) == source_digest
    # The snapshot has its own wrapped copy of the DEK (its id is the GCM associated data).
    snapshot_meta = plugin.backend.get(snapshot.snapshot_id).metadata
    assert snapshot_meta[DEK] != plugin.backend.get(source.volume_id).metadata[DEK]
    assert dek_of(plugin, snapshot.snapshot_id, "kek-1") == source_dek
    assert snapshot_meta[STATE] == "encrypted"

    # Writes to the source after the snapshot do not reach it.
    fill(plugin, source.volume_id, b"later-write!")
    assert digest(plugin, snapshot.snapshot_id) == source_digest

    # Restore into a larger volume of another StorageClass (another KMS): same DEK, re-wrapped.
    restored = plugin.copy("pvc-restored", 64 * MiB, LOCAL_2, snapshot_id=snapshot.snapshot_id)
    assert restored.capacity_bytes == 64 * MiB
    info = plugin.backend.get(restored.volume_id)
    assert info.size_bytes == 64 * MiB + LUKS_HEADER_BYTES
    assert info.metadata[STATE] == "encrypted" and info.metadata["csi-luks/kms-id"] == "local-2"
    assert dek_of(plugin, restored.volume_id, "kek-2") == source_dek
    with pytest.raises(Exception, match="does not decrypt"):
        dek_of(plugin, restored.volume_id, "kek-1")
    snapshot_bytes = 32 * MiB + LUKS_HEADER_BYTES
    assert digest(plugin, restored.volume_id, snapshot_bytes) == source_digest

    # Clone the source volume directly, without giving a size: the source's capacity.
    clone = plugin.copy("pvc-clone", None, LOCAL_1, volume_id=source.volume_id)
    assert clone.capacity_bytes == 32 * MiB
    assert dek_of(plugin, clone.volume_id, "kek-1") == source_dek
    assert digest(plugin, clone.volume_id) == digest(plugin, source.volume_id)

    # The snapshot outlives its source, keys included.
    plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=source.volume_id))
    again = plugin.copy("pvc-after-delete", None, LOCAL_1, snapshot_id=snapshot.snapshot_id)
    assert dek_of(plugin, again.volume_id, "kek-1") == source_dek


def test_every_answer_to_a_copy_carries_its_content_source(plugin: RunningPlugin) -> None:
    # external-provisioner deletes a volume made for a PVC dataSource whose answer lacks content_source.
    source = plugin.create("pvc-src", 16 * MiB, LOCAL_1)
    assert not source.HasField("content_source")
    snapshot = plugin.snapshot("snap-src", source.volume_id)
    for _ in range(2):  # the first call, then the CO's retry (answered from the finished volume)
        restored = plugin.copy("pvc-restored", None, LOCAL_1, snapshot_id=snapshot.snapshot_id)
        assert restored.content_source.WhichOneof("type") == "snapshot"
        assert restored.content_source.snapshot.snapshot_id == snapshot.snapshot_id
        clone = plugin.copy("pvc-clone", None, LOCAL_2, volume_id=source.volume_id)
        assert clone.content_source.WhichOneof("type") == "volume"
        assert clone.content_source.volume.volume_id == source.volume_id


def test_a_copy_of_a_never_staged_volume_stays_prepared(plugin: RunningPlugin) -> None:
    source = plugin.create("pvc-fresh", 16 * MiB, LOCAL_1)
    clone = plugin.copy("pvc-fresh-clone", None, LOCAL_2, volume_id=source.volume_id)
    # Empty, no LUKS header yet: the first NodeStage formats it, with the copied DEK.
    assert plugin.backend.get(clone.volume_id).metadata[STATE] == "prepared"
    assert dek_of(plugin, clone.volume_id, "kek-2") == dek_of(plugin, source.volume_id, "kek-1")


def test_unencrypted_snapshot_and_restore(plugin: RunningPlugin) -> None:
    source = plugin.create("pvc-plain", 16 * MiB, PLAIN)
    source_digest = fill(plugin, source.volume_id, b"plain")
    snapshot = plugin.snapshot("snap-plain", source.volume_id)
    restored = plugin.copy("pvc-plain-restored", None, PLAIN, snapshot_id=snapshot.snapshot_id)
    assert digest(plugin, restored.volume_id) == source_digest
    assert DEK not in plugin.backend.get(restored.volume_id).metadata


def test_copy_rules(plugin: RunningPlugin) -> None:
    encrypted = plugin.create("pvc-enc", 16 * MiB, LOCAL_1)
    plain = plugin.create("pvc-plain", 16 * MiB, PLAIN)
    snapshot = plugin.snapshot("snap-enc", encrypted.volume_id)
    before = {v.volume_id for v in plugin.backend.list()}

    def create(name: str, size: int | None, parameters: dict[str, str], **source: str) -> None:
        plugin.copy(
            name, size, parameters, snapshot_id=source.get("snapshot_id"), volume_id=source.get("volume_id")
        )

    # Encrypted <-> unencrypted: INVALID_ARGUMENT, both ways.
    assert (
        code_of(create, "x1", None, PLAIN, snapshot_id=snapshot.snapshot_id)
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert "cannot become an unencrypted volume" in details_of(
        create, "x1", None, PLAIN, snapshot_id=snapshot.snapshot_id
    )
    assert code_of(create, "x2", None, LOCAL_1, volume_id=plain.volume_id) == grpc.StatusCode.INVALID_ARGUMENT
    # Smaller than the source: OUT_OF_RANGE.
    assert (
        code_of(create, "x3", 8 * MiB, LOCAL_1, snapshot_id=snapshot.snapshot_id)
        == grpc.StatusCode.OUT_OF_RANGE
    )
    # Missing sources, and ids of the wrong kind: NOT_FOUND.
    missing = plugin.backend.volume_id_for("nothing", {})
    assert code_of(create, "x4", None, LOCAL_1, snapshot_id=missing) == grpc.StatusCode.NOT_FOUND
    assert code_of(create, "x5", None, LOCAL_1, volume_id=snapshot.snapshot_id) == grpc.StatusCode.NOT_FOUND
    assert code_of(create, "x6", None, LOCAL_1, snapshot_id=encrypted.volume_id) == grpc.StatusCode.NOT_FOUND
    assert {v.volume_id for v in plugin.backend.list()} == before  # nothing half-created


def test_snapshot_rules_and_idempotency(plugin: RunningPlugin) -> None:
    one = plugin.create("pvc-one", 16 * MiB, LOCAL_1)
    two = plugin.create("pvc-two", 16 * MiB, LOCAL_1)
    first = plugin.snapshot("snap", one.volume_id)
    assert plugin.snapshot("snap", one.volume_id).snapshot_id == first.snapshot_id  # a retry
    assert code_of(plugin.snapshot, "snap", two.volume_id) == grpc.StatusCode.ALREADY_EXISTS
    assert (
        code_of(plugin.snapshot, "snap-x", "sa-00000000-0000-0000-0000-000000000000")
        == grpc.StatusCode.NOT_FOUND
    )
    assert code_of(plugin.snapshot, "", one.volume_id) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(plugin.snapshot, "snap-y", "") == grpc.StatusCode.INVALID_ARGUMENT

    # A snapshot is not a volume: not listed, not expandable, not deletable as one.
    assert first.snapshot_id not in [
        e.volume.volume_id for e in plugin.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries
    ]
    expand = csi_pb2.ControllerExpandVolumeRequest(
        volume_id=first.snapshot_id, capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB)
    )
    assert code_of(plugin.controller.ControllerExpandVolume, expand) == grpc.StatusCode.NOT_FOUND
    delete_volume = csi_pb2.DeleteVolumeRequest(volume_id=first.snapshot_id)
    assert code_of(plugin.controller.DeleteVolume, delete_volume) == grpc.StatusCode.INVALID_ARGUMENT
    assert plugin.backend.get(first.snapshot_id)  # still there
    delete_snapshot = csi_pb2.DeleteSnapshotRequest(snapshot_id=one.volume_id)
    assert code_of(plugin.controller.DeleteSnapshot, delete_snapshot) == grpc.StatusCode.INVALID_ARGUMENT
    assert plugin.backend.get(one.volume_id)  # a volume is not deleted as a snapshot


def test_snapshot_accepts_the_snapshotters_extra_metadata_and_refuses_other_parameters(
    plugin: RunningPlugin,
) -> None:
    """csi-snapshotter --extra-create-metadata (as the deployed controller runs it) adds its own keys."""
    source = plugin.create("pvc-meta", 16 * MiB, LOCAL_1)
    metadata = {
        "csi.storage.k8s.io/volumesnapshot/name": "snap-meta",
        "csi.storage.k8s.io/volumesnapshot/namespace": "default",
        "csi.storage.k8s.io/volumesnapshotcontent/name": "snapcontent-1",
    }
    request = csi_pb2.CreateSnapshotRequest(name="snap-meta", source_volume_id=source.volume_id)
    request.parameters.update(metadata)
    snapshot = plugin.controller.CreateSnapshot(request).snapshot
    assert snapshot.ready_to_use and snapshot.source_volume_id == source.volume_id
    request.parameters["pool"] = "elsewhere"
    request.name = "snap-meta-2"
    details = details_of(plugin.controller.CreateSnapshot, request)
    assert "takes no parameters" in details and "pool" in details and "volumesnapshot" not in details


def test_list_snapshots_filters_and_pages(plugin: RunningPlugin) -> None:
    one = plugin.create("pvc-one", 16 * MiB, LOCAL_1)
    two = plugin.create("pvc-two", 16 * MiB, PLAIN)
    ids = {plugin.snapshot(f"snap-{i}", one.volume_id).snapshot_id for i in range(3)}
    other = plugin.snapshot("snap-two", two.volume_id).snapshot_id

    def listing(**kwargs: object) -> csi_pb2.ListSnapshotsResponse:
        response: csi_pb2.ListSnapshotsResponse = plugin.controller.ListSnapshots(
            csi_pb2.ListSnapshotsRequest(**kwargs)  # type: ignore[arg-type]
        )
        return response

    assert {e.snapshot.snapshot_id for e in listing().entries} == ids | {other}
    assert {e.snapshot.snapshot_id for e in listing(source_volume_id=one.volume_id).entries} == ids
    assert [e.snapshot.snapshot_id for e in listing(snapshot_id=other).entries] == [other]
    assert listing(snapshot_id="sa-00000000-0000-0000-0000-000000000000").entries == []
    seen: list[str] = []
    token = ""
    while True:
        page = listing(max_entries=3, starting_token=token)
        seen += [e.snapshot.snapshot_id for e in page.entries]
        token = page.next_token
        if not token:
            break
    assert sorted(seen) == sorted(ids | {other})
    assert code_of(plugin.controller.ListSnapshots, csi_pb2.ListSnapshotsRequest(starting_token="bogus")) == (
        grpc.StatusCode.ABORTED
    )


def test_delete_snapshot_removes_its_dek_and_is_idempotent(plugin: RunningPlugin) -> None:
    source = plugin.create("pvc-src", 16 * MiB, LOCAL_1)
    snapshot = plugin.snapshot("snap-del", source.volume_id)
    request = csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot.snapshot_id)
    plugin.controller.DeleteSnapshot(request)
    plugin.controller.DeleteSnapshot(request)
    assert [v.volume_id for v in plugin.backend.list()] == [source.volume_id]
    assert code_of(plugin.controller.DeleteSnapshot, csi_pb2.DeleteSnapshotRequest()) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )


def test_a_crash_between_copy_and_key_is_finished_with_the_source_key(plugin: RunningPlugin) -> None:
    """The copy exists but its DEK was never copied (a crash): the retry copies the DEK, never a new one."""
    source = plugin.create("pvc-src", 16 * MiB, LOCAL_1)
    plugin.backend.set_metadata(source.volume_id, STATE, "encrypted")
    volume_id = plugin.backend.volume_id_for("pvc-crash", {})
    plugin.backend.create(
        volume_id,
        "pvc-crash",
        16 * MiB + LUKS_HEADER_BYTES,
        {
            "csi-luks/name": "pvc-crash", "csi-luks/capacity": str(16 * MiB),
            "csi-luks/encrypted": "true", "csi-luks/kms-id": "local-2",
            "csi-luks/source": source.volume_id, "csi-luks/source-state": "encrypted",
        },
        source_id=source.volume_id,
    )  # fmt: skip
    retried = plugin.copy("pvc-crash", None, LOCAL_2, volume_id=source.volume_id)
    assert retried.volume_id == volume_id
    assert dek_of(plugin, volume_id, "kek-2") == dek_of(plugin, source.volume_id, "kek-1")
    assert plugin.backend.get(volume_id).metadata[STATE] == "encrypted"


def test_an_unfinished_copy_whose_source_is_gone_is_removed(plugin: RunningPlugin) -> None:
    source = plugin.create("pvc-src", 16 * MiB, LOCAL_1)
    volume_id = plugin.backend.volume_id_for("pvc-orphan", {})
    plugin.backend.create(
        volume_id, "pvc-orphan", 16 * MiB + LUKS_HEADER_BYTES,
        {"csi-luks/name": "pvc-orphan", "csi-luks/capacity": str(16 * MiB), "csi-luks/encrypted": "true",
         "csi-luks/kms-id": "local-1", "csi-luks/source": source.volume_id},
        source_id=source.volume_id,
    )  # fmt: skip
    plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=source.volume_id))
    assert code_of(plugin.copy, "pvc-orphan", None, LOCAL_1, volume_id=source.volume_id) == (
        grpc.StatusCode.NOT_FOUND
    )
    assert plugin.backend.list() == []  # nothing leaked


def test_a_finished_copy_is_returned_on_retry_after_its_source_is_gone(plugin: RunningPlugin) -> None:
    source = plugin.create("pvc-src", 16 * MiB, LOCAL_1)
    clone = plugin.copy("pvc-clone", None, LOCAL_1, volume_id=source.volume_id)
    plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=source.volume_id))
    # The CO lost the first answer and asks again: the same volume, not NOT_FOUND.
    assert plugin.copy("pvc-clone", None, LOCAL_1, volume_id=source.volume_id) == clone


def test_a_source_being_copied_is_locked(plugin: RunningPlugin) -> None:
    source = plugin.create("pvc-src", 16 * MiB, LOCAL_1)
    with plugin.server.locks.hold(source.volume_id, "a copy of it in flight"):
        assert code_of(plugin.copy, "pvc-clone", None, LOCAL_1, volume_id=source.volume_id) == (
            grpc.StatusCode.ABORTED
        )
    assert plugin.copy("pvc-clone", None, LOCAL_1, volume_id=source.volume_id).volume_id


def test_copies_beyond_the_limit_are_refused_until_a_slot_frees(plugin: RunningPlugin) -> None:
    source = plugin.create("pvc-src", 16 * MiB, LOCAL_1)
    slots = plugin.server.controller.copy_slots
    for _ in range(plugin.server.controller.max_copies):  # as many copies as allowed, all in flight
        assert slots.acquire(blocking=False)
    try:
        assert code_of(plugin.copy, "pvc-clone", None, LOCAL_1, volume_id=source.volume_id) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        assert code_of(plugin.snapshot, "snap-busy", source.volume_id) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert plugin.create("pvc-plain-new", 16 * MiB, LOCAL_1).volume_id  # no copy: not limited
    finally:
        for _ in range(plugin.server.controller.max_copies):
            slots.release()
    clone = plugin.copy("pvc-clone", None, LOCAL_1, volume_id=source.volume_id)
    assert plugin.backend.get(clone.volume_id).metadata["csi-luks/source"] == source.volume_id


def test_capabilities_advertise_snapshots_and_clones(plugin: RunningPlugin) -> None:
    kinds = plugin.controller_capabilities()
    rpc = csi_pb2.ControllerServiceCapability.RPC
    assert {rpc.CREATE_DELETE_SNAPSHOT, rpc.LIST_SNAPSHOTS, rpc.CLONE_VOLUME} <= kinds

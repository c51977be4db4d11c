"""Controller service over gRPC on the host: CSI argument rules, error codes, idempotent repeats."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_luks.csi import csi_pb2
from csi_luks.settings import Mode
from csi_luks.volume_metadata import CAPACITY, KMS_ID, LUKS_HEADER_BYTES, STATE
from tests.support.plugin import (
    MiB,
    Mode_,
    RunningPlugin,
    block_capability,
    code_of,
    details_of,
    mount_capability,
    running_plugin,
)

GiB = 1024 * MiB


@pytest.fixture
def plugin(tmp_path: Path) -> Iterator[RunningPlugin]:
    with running_plugin(tmp_path, mode=Mode.CONTROLLER) as running:
        yield running


def test_create_encrypted_volume_stores_a_wrapped_dek_and_marks_it_prepared(plugin: RunningPlugin) -> None:
    volume = plugin.create("pvc-a", size=100 * MiB)
    assert volume.capacity_bytes == 100 * MiB
    assert dict(volume.volume_context) == {"encrypted": "true", "encryptionKMSID": "local-1"}
    info = plugin.backend.get(volume.volume_id)
    assert info.metadata[STATE] == "prepared" and info.metadata[KMS_ID] == "local-1"
    assert info.metadata[CAPACITY] == str(100 * MiB)
    wrapped = json.loads(info.metadata["csi-luks/dek"])
    assert set(wrapped) == {"dek", "nonce"}
    # The backing store holds the capacity asked for plus the LUKS2 header.
    assert info.size_bytes == 100 * MiB + LUKS_HEADER_BYTES


def test_create_is_idempotent_by_name(plugin: RunningPlugin) -> None:
    first = plugin.create("pvc-b")
    dek = plugin.backend.get(first.volume_id).metadata["csi-luks/dek"]
    second = plugin.create("pvc-b")
    assert first == second
    assert plugin.backend.get(first.volume_id).metadata["csi-luks/dek"] == dek  # no new key on a repeat


def test_same_name_with_other_size_or_kms_already_exists(plugin: RunningPlugin) -> None:
    plugin.create("pvc-c", size=64 * MiB)
    assert code_of(plugin.create, "pvc-c", 128 * MiB) == grpc.StatusCode.ALREADY_EXISTS
    other_kms = {"encrypted": "true", "encryptionKMSID": "local-2"}
    assert code_of(plugin.create, "pvc-c", 64 * MiB, other_kms) == grpc.StatusCode.ALREADY_EXISTS
    assert code_of(plugin.create, "pvc-c", 64 * MiB, {"encrypted": "false"}) == grpc.StatusCode.ALREADY_EXISTS


def test_unencrypted_volume_has_no_dek(plugin: RunningPlugin) -> None:
    volume = plugin.create("pvc-plain", parameters={"encrypted": "false"})
    metadata = plugin.backend.get(volume.volume_id).metadata
    assert "csi-luks/dek" not in metadata and STATE not in metadata
    assert plugin.backend.get(volume.volume_id).size_bytes == 64 * MiB


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"encrypted": "yes"}, 'must be "true" or "false"'),
        ({"encrypted": "true", "encryptionKMSID": "vault-x"}, "local-1"),  # names the known ids
        ({"encrypted": "true", "encrypt": "true"}, "unknown StorageClass parameters ['encrypt']"),
        ({"encryptionKMSID": "local-1"}, "encrypted"),
    ],
)
def test_bad_parameters_are_invalid_arguments(
    plugin: RunningPlugin, parameters: dict[str, str], message: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        plugin.create("pvc-bad", parameters=parameters)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()
    assert plugin.backend.list() == []


def test_kubernetes_parameters_are_accepted(plugin: RunningPlugin) -> None:
    parameters = {"encrypted": "true", "encryptionKMSID": "local-1", "csi.storage.k8s.io/pvc/name": "data"}
    assert plugin.create("pvc-k8s", parameters=parameters).volume_id


@pytest.mark.parametrize(
    "request_",
    [
        csi_pb2.CreateVolumeRequest(volume_capabilities=[mount_capability()]),  # no name
        csi_pb2.CreateVolumeRequest(name="v"),  # no capabilities
        csi_pb2.CreateVolumeRequest(name="v", volume_capabilities=[csi_pb2.VolumeCapability()]),
        csi_pb2.CreateVolumeRequest(
            name="v", volume_capabilities=[mount_capability(mode=Mode_.MULTI_NODE_MULTI_WRITER)]
        ),
        csi_pb2.CreateVolumeRequest(name="v", volume_capabilities=[mount_capability(fs_type="btrfs")]),
        csi_pb2.CreateVolumeRequest(
            name="v",
            volume_capabilities=[mount_capability()],
            volume_content_source=csi_pb2.VolumeContentSource(),  # names neither a snapshot nor a volume
        ),
    ],
)
def test_malformed_create_requests(plugin: RunningPlugin, request_: csi_pb2.CreateVolumeRequest) -> None:
    assert code_of(plugin.controller.CreateVolume, request_) == grpc.StatusCode.INVALID_ARGUMENT


def test_capacity_range_rules(plugin: RunningPlugin) -> None:
    default = plugin.controller.CreateVolume(
        csi_pb2.CreateVolumeRequest(name="pvc-default", volume_capabilities=[mount_capability()])
    ).volume
    assert default.capacity_bytes == 1 * GiB
    rounded = plugin.create("pvc-round", size=10 * MiB + 1, parameters={"encrypted": "false"})
    assert rounded.capacity_bytes == 11 * MiB
    too_big = csi_pb2.CreateVolumeRequest(
        name="pvc-range",
        capacity_range=csi_pb2.CapacityRange(required_bytes=20 * MiB, limit_bytes=10 * MiB),
        volume_capabilities=[mount_capability()],
    )
    assert code_of(plugin.controller.CreateVolume, too_big) == grpc.StatusCode.OUT_OF_RANGE


def test_an_xfs_volume_smaller_than_mkfs_xfs_accepts_is_out_of_range_and_not_made(
    plugin: RunningPlugin,
) -> None:
    def request(name: str, size: int, *fs_types: str) -> csi_pb2.CreateVolumeRequest:
        return csi_pb2.CreateVolumeRequest(
            name=name,
            capacity_range=csi_pb2.CapacityRange(required_bytes=size),
            volume_capabilities=[mount_capability(fs_type) for fs_type in fs_types],
            parameters={"encrypted": "true", "encryptionKMSID": "local-1"},
        )

    for fs_types in (("xfs",), ("ext4", "xfs")):
        small = request("pvc-xfs-small", 299 * MiB, *fs_types)
        with pytest.raises(grpc.RpcError) as info:
            plugin.controller.CreateVolume(small)
        assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE
        assert "at least 314572800 bytes (300 MiB" in info.value.details(), info.value.details()
    assert plugin.backend.list() == []  # nothing made, no DEK stored
    plugin.controller.CreateVolume(request("pvc-xfs-300", 300 * MiB, "xfs"))  # the minimum itself
    plugin.controller.CreateVolume(request("pvc-ext4-small", 64 * MiB, "ext4"))
    plugin.create("pvc-block-small", 64 * MiB, capability=block_capability())


def test_delete_removes_volume_and_dek_and_is_idempotent(plugin: RunningPlugin) -> None:
    volume = plugin.create("pvc-d")
    request = csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id)
    plugin.controller.DeleteVolume(request)
    plugin.controller.DeleteVolume(request)
    assert plugin.backend.list() == []
    plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="sa-unknown"))
    assert (
        code_of(plugin.controller.DeleteVolume, csi_pb2.DeleteVolumeRequest())
        == grpc.StatusCode.INVALID_ARGUMENT
    )


def test_expand_grows_and_asks_for_node_expansion(plugin: RunningPlugin) -> None:
    volume = plugin.create("pvc-e", size=64 * MiB)
    request = csi_pb2.ControllerExpandVolumeRequest(
        volume_id=volume.volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=128 * MiB)
    )
    for _ in range(2):  # a repeat is a no-op with the same answer
        response = plugin.controller.ControllerExpandVolume(request)
        assert response.capacity_bytes == 128 * MiB and response.node_expansion_required
    assert plugin.backend.get(volume.volume_id).size_bytes == 128 * MiB + LUKS_HEADER_BYTES
    unknown = csi_pb2.ControllerExpandVolumeRequest(
        volume_id="sa-nope", capacity_range=csi_pb2.CapacityRange(required_bytes=MiB)
    )
    assert code_of(plugin.controller.ControllerExpandVolume, unknown) == grpc.StatusCode.NOT_FOUND
    no_range = csi_pb2.ControllerExpandVolumeRequest(volume_id=volume.volume_id)
    assert code_of(plugin.controller.ControllerExpandVolume, no_range) == grpc.StatusCode.INVALID_ARGUMENT


def test_validate_volume_capabilities(plugin: RunningPlugin) -> None:
    volume = plugin.create("pvc-v")
    ok = plugin.controller.ValidateVolumeCapabilities(
        csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id=volume.volume_id, volume_capabilities=[mount_capability()]
        )
    )
    assert ok.HasField("confirmed")
    refused = plugin.controller.ValidateVolumeCapabilities(
        csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id=volume.volume_id,
            volume_capabilities=[mount_capability(mode=Mode_.MULTI_NODE_MULTI_WRITER)],
        )
    )
    assert not refused.HasField("confirmed") and "one node" in refused.message
    missing = csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id="sa-x", volume_capabilities=[mount_capability()]
    )
    assert code_of(plugin.controller.ValidateVolumeCapabilities, missing) == grpc.StatusCode.NOT_FOUND
    no_caps = csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id=volume.volume_id)
    assert code_of(plugin.controller.ValidateVolumeCapabilities, no_caps) == grpc.StatusCode.INVALID_ARGUMENT


def test_list_volumes_pages(plugin: RunningPlugin) -> None:
    ids = {plugin.create(f"pvc-l{i}", parameters={"encrypted": "false"}).volume_id for i in range(3)}
    first = plugin.controller.ListVolumes(csi_pb2.ListVolumesRequest(max_entries=2))
    assert len(first.entries) == 2 and first.next_token
    rest = plugin.controller.ListVolumes(
        csi_pb2.ListVolumesRequest(max_entries=2, starting_token=first.next_token)
    )
    assert len(rest.entries) == 1 and not rest.next_token
    assert {e.volume.volume_id for e in [*first.entries, *rest.entries]} == ids
    # Deleting the last volume of a page does not disturb the next page.
    plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=first.entries[-1].volume.volume_id))
    again = plugin.controller.ListVolumes(
        csi_pb2.ListVolumesRequest(max_entries=2, starting_token=first.next_token)
    )
    assert [e.volume.volume_id for e in again.entries] == [e.volume.volume_id for e in rest.entries]
    bad = csi_pb2.ListVolumesRequest(starting_token="nonsense")
    assert code_of(plugin.controller.ListVolumes, bad) == grpc.StatusCode.ABORTED


def test_capacity_and_capabilities(plugin: RunningPlugin) -> None:
    assert plugin.controller.GetCapacity(csi_pb2.GetCapacityRequest()).available_capacity > 0
    kinds = plugin.controller_capabilities()
    RPC = csi_pb2.ControllerServiceCapability.RPC.Type
    assert {RPC.CREATE_DELETE_VOLUME, RPC.EXPAND_VOLUME} <= kinds
    plugin_caps = plugin.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    services = {c.service.type for c in plugin_caps.capabilities if c.HasField("service")}
    assert csi_pb2.PluginCapability.Service.CONTROLLER_SERVICE in services


def test_an_operation_in_flight_makes_a_second_one_abort(plugin: RunningPlugin) -> None:
    volume = plugin.create("pvc-busy")
    with plugin.server.locks.hold(volume.volume_id, "NodeStageVolume"):
        message = details_of(
            plugin.controller.DeleteVolume, csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id)
        )
        assert (
            code_of(plugin.controller.DeleteVolume, csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))
            == grpc.StatusCode.ABORTED
        )
    assert "NodeStageVolume is already in progress" in message
    plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))


def test_a_failing_kms_leaves_no_half_created_volume(tmp_path: Path) -> None:
    root = tmp_path / "p"
    root.mkdir()
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    (root / "kms-config.json").write_text(
        json.dumps({"broken": {"encryptionKMSType": "local", "keyFile": str(blocker / "kek")}})
    )
    with running_plugin(root, mode=Mode.CONTROLLER) as plugin:
        with pytest.raises(grpc.RpcError) as info:
            plugin.create("pvc-x", parameters={"encrypted": "true", "encryptionKMSID": "broken"})
        assert info.value.code() != grpc.StatusCode.OK
        assert plugin.backend.list() == []


def test_delete_sweeps_a_volume_torn_by_a_crash_in_create(plugin: RunningPlugin) -> None:
    volume = plugin.create("pvc-torn", parameters={"encrypted": "false"})
    image = plugin.backend.image_path(volume.volume_id)
    image.unlink()  # what a crash between the metadata and the image leaves
    plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))
    assert not image.parent.exists()

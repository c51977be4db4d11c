"""Node service argument and error-code rules over gRPC (no device is touched: runs on the host)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import Message

from csi_luks.csi import csi_pb2
from csi_luks.settings import Mode
from tests.support.plugin import RunningPlugin, mount_capability, running_plugin


@pytest.fixture
def plugin(tmp_path: Path) -> Iterator[RunningPlugin]:
    with running_plugin(tmp_path, mode=Mode.ALL) as running:
        yield running


def _code(plugin: RunningPlugin, method: str, request: Message) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        getattr(plugin.node, method)(request)
    return info.value.code()


CAP = mount_capability()
INVALID = [
    ("NodeStageVolume", csi_pb2.NodeStageVolumeRequest(staging_target_path="/s", volume_capability=CAP)),
    ("NodeStageVolume", csi_pb2.NodeStageVolumeRequest(volume_id="v", volume_capability=CAP)),
    ("NodeStageVolume", csi_pb2.NodeStageVolumeRequest(volume_id="v", staging_target_path="/s")),
    ("NodeUnstageVolume", csi_pb2.NodeUnstageVolumeRequest(staging_target_path="/s")),
    ("NodeUnstageVolume", csi_pb2.NodeUnstageVolumeRequest(volume_id="v")),
    ("NodePublishVolume", csi_pb2.NodePublishVolumeRequest(
        volume_id="v", staging_target_path="/s", volume_capability=CAP)),
    ("NodePublishVolume", csi_pb2.NodePublishVolumeRequest(
        target_path="/t", staging_target_path="/s", volume_capability=CAP)),
    ("NodePublishVolume", csi_pb2.NodePublishVolumeRequest(
        volume_id="v", target_path="/t", staging_target_path="/s")),
    ("NodeUnpublishVolume", csi_pb2.NodeUnpublishVolumeRequest(target_path="/t")),
    ("NodeUnpublishVolume", csi_pb2.NodeUnpublishVolumeRequest(volume_id="v")),
    ("NodeGetVolumeStats", csi_pb2.NodeGetVolumeStatsRequest(volume_path="/t")),
    ("NodeGetVolumeStats", csi_pb2.NodeGetVolumeStatsRequest(volume_id="v")),
    ("NodeExpandVolume", csi_pb2.NodeExpandVolumeRequest(volume_path="/t")),
    ("NodeExpandVolume", csi_pb2.NodeExpandVolumeRequest(volume_id="v")),
]  # fmt: skip


@pytest.mark.parametrize(("method", "request_"), INVALID)
def test_missing_fields_are_invalid_arguments(plugin: RunningPlugin, method: str, request_: Message) -> None:
    assert _code(plugin, method, request_) == grpc.StatusCode.INVALID_ARGUMENT


def test_unknown_volumes_are_not_found(plugin: RunningPlugin, tmp_path: Path) -> None:
    stage = csi_pb2.NodeStageVolumeRequest(
        volume_id="sa-none", staging_target_path="/s", volume_capability=CAP
    )
    assert _code(plugin, "NodeStageVolume", stage) == grpc.StatusCode.NOT_FOUND
    stats = csi_pb2.NodeGetVolumeStatsRequest(volume_id="sa-none", volume_path=str(tmp_path))
    assert _code(plugin, "NodeGetVolumeStats", stats) == grpc.StatusCode.NOT_FOUND
    expand = csi_pb2.NodeExpandVolumeRequest(volume_id="sa-none", volume_path=str(tmp_path))
    assert _code(plugin, "NodeExpandVolume", expand) == grpc.StatusCode.NOT_FOUND


def test_stats_of_a_missing_path_is_not_found(plugin: RunningPlugin, tmp_path: Path) -> None:
    volume = plugin.create("pvc-stats")
    request = csi_pb2.NodeGetVolumeStatsRequest(
        volume_id=volume.volume_id, volume_path=str(tmp_path / "gone")
    )
    assert _code(plugin, "NodeGetVolumeStats", request) == grpc.StatusCode.NOT_FOUND


def test_unpublish_of_a_path_never_published_succeeds(plugin: RunningPlugin, tmp_path: Path) -> None:
    volume_id = plugin.backend.volume_id_for("never-published", {})
    request = csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(tmp_path / "never"))
    plugin.node.NodeUnpublishVolume(request)
    plugin.node.NodeUnpublishVolume(request)


def test_node_info_and_capabilities(plugin: RunningPlugin) -> None:
    assert plugin.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest()).node_id == "test-node"
    caps = plugin.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest())
    RPC = csi_pb2.NodeServiceCapability.RPC.Type
    assert {RPC.STAGE_UNSTAGE_VOLUME, RPC.EXPAND_VOLUME, RPC.GET_VOLUME_STATS, RPC.VOLUME_CONDITION} <= {
        c.rpc.type for c in caps.capabilities
    }

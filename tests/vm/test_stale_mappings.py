"""A stale mapping (in the VM): the krbd device under a staged volume's dm-crypt mapping is force-unmapped.

NodeGetVolumeStats reports the volume abnormal with what happened, the metrics count the mapping, a stage
or publish over it is refused, a node start names it in its log, and NodeUnstageVolume tears it down (no
mount or mapping left); a restage maps the image again and finds the data written before the device went
away.
"""

from __future__ import annotations

import logging
import os
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from csi_luks.csi import csi_pb2
from csi_luks.luks import Cryptsetup, mapper_name
from csi_luks.system.filesystem import Filesystems
from tests.support.ceph import CephCluster
from tests.support.openbao import free_port
from tests.support.plugin import MiB, RunningPlugin, mount_capability, running_plugin
from tests.vm.test_rbd_node import parameters, stage, unstage

MARKER = b"CSI-LUKS-STALE-MAPPING-MARKER " * 100


def _stats(plugin: RunningPlugin, volume_id: str, staging: Path) -> csi_pb2.VolumeCondition:
    response = plugin.node.NodeGetVolumeStats(
        csi_pb2.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=str(staging))
    )
    condition: csi_pb2.VolumeCondition = response.volume_condition
    return condition


def _stale_gauge(address: str) -> float:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=30) as response:
        text = response.read().decode()
    values = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "csi_luks_stale_mappings"
    ]
    assert len(values) == 1, text
    return values[0]


def _dm_names() -> set[str]:
    names = set()
    for entry in Path("/sys/block").glob("dm-*"):
        try:
            names.add((entry / "dm" / "name").read_text().strip())
        except OSError:
            continue
    return names


def _sysfs_view(mapper: str) -> dict[str, str]:
    """The mapping's dm device, its slave links and where they lead (in the guest log, for the record)."""
    for entry in Path("/sys/block").glob("dm-*"):
        if (entry / "dm" / "name").read_text().strip() == mapper:
            return {
                str(link): f"{os.readlink(link)} (exists: {link.exists()})"
                for link in (entry / "slaves").iterdir()
            } or {str(entry / "slaves"): "empty"}
    return {}


@pytest.mark.timeout(900)
def test_a_force_unmapped_rbd_device_is_reported_counted_and_unstaged(
    ceph: CephCluster,
    ceph_config: Path,
    ceph_secrets: dict[str, str],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    staging = tmp_path / "staging"
    address = f"127.0.0.1:{free_port()}"
    with running_plugin(tmp_path / "plugin", ceph_config=ceph_config, metrics_address=address) as plugin:
        volume_id = plugin.create("pvc-stale", 32 * MiB, parameters(ceph), secrets=ceph_secrets).volume_id
        mapper = mapper_name(volume_id)
        stage(plugin, volume_id, staging, ceph_secrets)
        assert not _stats(plugin, volume_id, staging).abnormal
        assert _stale_gauge(address) == 0
        (staging / "data.bin").write_bytes(MARKER)
        os.sync()

        device = plugin.server.backend.find_attachment(volume_id)
        assert device is not None and device.startswith("/dev/rbd")
        # What an operator's `rbd unmap -o force` (or a lost cluster's cleanup) does under a live mapping.
        ceph.run("rbd", "device", "unmap", "-o", "force", device)
        print("after the unmap:", _sysfs_view(mapper))
        assert plugin.server.backend.for_request({}).find_attachment(volume_id) is None
        assert Cryptsetup().status(mapper).active  # dm-crypt still holds the mapping

        condition = _stats(plugin, volume_id, staging)
        assert condition.abnormal
        assert condition.message == (
            f"dm-crypt mapping {mapper} has lost its backing device {device} (unmapped?); "
            "unstage and restage the volume"
        )
        assert _stale_gauge(address) == 1
        # A stage or publish over it is refused: the dead mapping must not pass for the volume's open one.
        with pytest.raises(grpc.RpcError) as refused:
            stage(plugin, volume_id, staging, ceph_secrets)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert condition.message in refused.value.details()
        with pytest.raises(grpc.RpcError) as refused:
            plugin.node.NodePublishVolume(
                csi_pb2.NodePublishVolumeRequest(
                    volume_id=volume_id, target_path=str(tmp_path / "pod"), staging_target_path=str(staging),
                    volume_capability=mount_capability(),
                )
            )  # fmt: skip
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert condition.message in refused.value.details()
        with caplog.at_level(logging.WARNING, logger="csi_luks.server"):
            plugin.server.warn_of_stale_mappings()  # what a node start logs
        assert any(condition.message in record.getMessage() for record in caplog.records)

        unstage(plugin, volume_id, staging)
        assert not Filesystems().is_mounted(str(staging))
        assert not Cryptsetup().status(mapper).active and mapper not in _dm_names()
        assert _stale_gauge(address) == 0

        # The device back: a restage maps the image anew and reads what was written before it went away.
        stage(plugin, volume_id, staging, ceph_secrets)
        assert (staging / "data.bin").read_bytes() == MARKER
        assert not _stats(plugin, volume_id, staging).abnormal
        unstage(plugin, volume_id, staging)
        plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id, secrets=ceph_secrets))

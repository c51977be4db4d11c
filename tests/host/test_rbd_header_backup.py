"""RBD: a LUKS header backup is a RADOS object beside the image, copied with snapshots and clones and
removed by the delete before the image (real Ceph cluster, the plugin's cephx user)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_luks.csi import csi_pb2
from csi_luks.settings import Mode
from csi_luks.volumes.ceph_clusters import CephClusters
from csi_luks.volumes.rbd import RbdBackend, decode_volume_id
from tests.support.ceph import CephCluster
from tests.support.plugin import MiB, RunningPlugin, running_plugin


@pytest.fixture
def plugin(tmp_path: Path, ceph_config: Path) -> Iterator[RunningPlugin]:
    with running_plugin(tmp_path, mode=Mode.CONTROLLER, ceph_config=ceph_config) as running:
        yield running


def _objects(ceph: CephCluster) -> set[str]:
    return set(ceph.run("rados", "--pool", ceph.pool, "ls").split())


def test_header_backups_live_beside_the_image_and_go_before_it(
    plugin: RunningPlugin, ceph: CephCluster, ceph_config: Path, ceph_secrets: dict[str, str], tmp_path: Path
) -> None:
    parameters = {
        "clusterID": "test-cluster",
        "pool": ceph.pool,
        "encrypted": "true",
        "encryptionKMSID": "local-1",
    }
    volume_id = plugin.create("pvc-rbd-header", 32 * MiB, parameters, secrets=ceph_secrets).volume_id
    backend = RbdBackend(CephClusters(str(ceph_config)), tmp_path / "node").for_request(ceph_secrets)
    assert backend.keeps_header_backups and backend.fetch_header_backup(volume_id) is None
    header = os.urandom(MiB) + bytes(15 * MiB)  # a LUKS2 header area: key slots, then zeros
    backend.store_header_backup(volume_id, header)
    name = f"csi-luks-header.{decode_volume_id(volume_id).image}"
    assert name in _objects(ceph)
    assert backend.fetch_header_backup(volume_id) == header

    snapshot = plugin.snapshot("snap-rbd-header", volume_id, secrets=ceph_secrets)
    assert backend.fetch_header_backup(snapshot.snapshot_id) == header
    plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id, secrets=ceph_secrets))
    assert name not in _objects(ceph)
    assert backend.fetch_header_backup(snapshot.snapshot_id) == header
    plugin.controller.DeleteSnapshot(
        csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot.snapshot_id, secrets=ceph_secrets)
    )
    assert not any(o.startswith("csi-luks-header.") for o in _objects(ceph))

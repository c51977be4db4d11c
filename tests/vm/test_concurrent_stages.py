"""Sixteen encrypted volumes staged at once by one node plugin (runs in the VM): every stage succeeds with its
own loop device, mapping and mount, and the unstages, also at once, leave nothing behind."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from csi_luks.csi import csi_pb2
from csi_luks.luks import Cryptsetup, mapper_name
from csi_luks.system.filesystem import Filesystems
from csi_luks.volume_metadata import STATE
from tests.support.plugin import MiB, mount_capability, running_plugin

pytestmark = pytest.mark.timeout(600)
VOLUMES = 16


def _loop_backing_files() -> set[str]:
    listing = subprocess.run(
        ["losetup", "--list", "--noheadings", "--output", "BACK-FILE"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {line.strip() for line in listing.splitlines()}


def test_sixteen_volumes_staged_at_once_all_succeed_and_unstage_cleanly(tmp_path: Path) -> None:
    with running_plugin(tmp_path / "plugin") as plugin:
        ids = [plugin.create(f"pvc-concurrent-{n}", size=16 * MiB).volume_id for n in range(VOLUMES)]
        staging = {volume_id: tmp_path / "staging" / volume_id for volume_id in ids}

        def stage(volume_id: str) -> None:
            plugin.node.NodeStageVolume(
                csi_pb2.NodeStageVolumeRequest(
                    volume_id=volume_id,
                    staging_target_path=str(staging[volume_id]),
                    volume_capability=mount_capability(),
                )
            )
            (staging[volume_id] / "id").write_text(volume_id)

        def unstage(volume_id: str) -> None:
            plugin.node.NodeUnstageVolume(
                csi_pb2.NodeUnstageVolumeRequest(
                    volume_id=volume_id, staging_target_path=str(staging[volume_id])
                )
            )

        with ThreadPoolExecutor(max_workers=VOLUMES) as pool:
            list(pool.map(stage, ids))  # re-raises the first failure
        images = {str(plugin.backend.image_path(volume_id)) for volume_id in ids}
        assert images <= _loop_backing_files()  # one loop device each
        for volume_id in ids:
            assert plugin.backend.get(volume_id).metadata[STATE] == "encrypted"
            assert Cryptsetup().status(mapper_name(volume_id)).active
            assert Filesystems().is_mounted(str(staging[volume_id]))
            assert (staging[volume_id] / "id").read_text() == volume_id  # its own filesystem

        with ThreadPoolExecutor(max_workers=VOLUMES) as pool:
            list(pool.map(unstage, ids))
        assert not images & _loop_backing_files()
        for volume_id in ids:
            assert not Cryptsetup().status(mapper_name(volume_id)).active
            assert not Filesystems().is_mounted(str(staging[volume_id]))
            plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id))
        assert plugin.backend.list() == []

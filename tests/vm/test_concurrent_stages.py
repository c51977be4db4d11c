"""Sixteen encrypted volumes staged at once by one node plugin (runs in the VM): every stage succeeds with its
own loop device, mapping and mount, and the unstages, also at once, leave nothing behind."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from csi_luks.csi import csi_pb2
from csi_luks.luks import mapper_name
from csi_luks.volume_metadata import STATE
from tests.support.plugin import MiB, mount_capability, running_plugin

pytestmark = pytest.mark.timeout(600)
VOLUMES = 16


def _crypt_mappings() -> set[str]:
    listing = subprocess.run(
        ["dmsetup", "ls", "--target", "crypt"], capture_output=True, text=True, check=True
    )
    return {line.split()[0] for line in listing.stdout.splitlines() if "\t" in line}


def _mount_points() -> set[str]:
    with open("/proc/self/mountinfo") as mountinfo:
        return {line.split()[4] for line in mountinfo}


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
        with ThreadPoolExecutor(max_workers=VOLUMES) as pool:
            ids = list(
                pool.map(
                    lambda n: plugin.create(f"pvc-concurrent-{n}", size=16 * MiB).volume_id, range(VOLUMES)
                )
            )
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
        mappings, mounts = {mapper_name(v) for v in ids}, {str(path) for path in staging.values()}
        assert mappings <= _crypt_mappings() and mounts <= _mount_points()
        for volume_id in ids:
            assert plugin.backend.get(volume_id).metadata[STATE] == "encrypted"
            assert (staging[volume_id] / "id").read_text() == volume_id  # its own filesystem

        with ThreadPoolExecutor(max_workers=VOLUMES) as pool:
            list(pool.map(unstage, ids))
        assert not images & _loop_backing_files()
        assert not mappings & _crypt_mappings() and not mounts & _mount_points()
        with ThreadPoolExecutor(max_workers=VOLUMES) as pool:
            list(
                pool.map(
                    lambda v: plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=v)), ids
                )
            )
        assert plugin.backend.list() == []

"""The node's crash points on real dm-crypt (runs in the VM): a `csi-luks serve --mode node` process with
CSI_LUKS_CRASH_POINT set is SIGKILLed inside NodeStage, NodeUnstage or NodeExpand; a plugin without it
retries the call, which must converge with the data intact, no device formatted twice (the LUKS and
filesystem UUIDs and a file written at the crash survive) and no mapping, loop device or mount leaked.

A plugin start costs about a minute under TCG, so the node has few points (one after each step, see
services/node.py) and each case starts one killed process; the retries share one plugin.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_luks.csi import csi_pb2, csi_pb2_grpc
from csi_luks.luks import Cryptsetup, mapper_name, mapper_path
from csi_luks.system.filesystem import Filesystems
from csi_luks.volume_metadata import STATE
from tests.support.crash_harness import NODE_SCENARIOS, killed_at, serve_argv
from tests.support.plugin import MiB, RunningPlugin, mount_capability, running_plugin

pytestmark = pytest.mark.timeout(900)  # one plugin start (about a minute under TCG) and a few calls each
SIZE = 64 * MiB
MARKER = "written before the crash\n"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("crash-node")


@pytest.fixture(scope="module")
def plugin(root: Path) -> Iterator[RunningPlugin]:
    """The plugin that retries (no crash point): one for every case."""
    with running_plugin(root) as running:
        yield running


def _stage_request(volume_id: str, staging: Path) -> csi_pb2.NodeStageVolumeRequest:
    return csi_pb2.NodeStageVolumeRequest(
        volume_id=volume_id, staging_target_path=str(staging), volume_capability=mount_capability()
    )


def _unstage_request(volume_id: str, staging: Path) -> csi_pb2.NodeUnstageVolumeRequest:
    return csi_pb2.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=str(staging))


def _crash(root: Path, point: str, call: str, request: object) -> None:
    argv = serve_argv(root / "crash.sock", root / "state", root / "kms-config.json", "--mode", "node")
    killed_at(
        point,
        argv,
        root / "crash.sock",
        {**os.environ},
        lambda channel: getattr(csi_pb2_grpc.NodeStub(channel), call)(request),
        ready_timeout=300,
    )


def _loops(plugin: RunningPlugin, volume_id: str) -> list[str]:
    image = str(plugin.backend.image_path(volume_id))
    out = subprocess.run(["losetup", "-j", image], capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def _mapped(volume_id: str) -> bool:
    return Cryptsetup().status(mapper_name(volume_id)).active


def _luks_uuid(plugin: RunningPlugin, volume_id: str) -> str | None:
    image = str(plugin.backend.image_path(volume_id))
    result = subprocess.run(["cryptsetup", "luksUUID", image], capture_output=True, text=True, check=False)
    return result.stdout.strip() if result.returncode == 0 else None


def _fs_uuid(volume_id: str) -> str | None:
    if not _mapped(volume_id):
        return None
    result = subprocess.run(
        ["blkid", "-o", "value", "-s", "UUID", mapper_path(mapper_name(volume_id))],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return result.stdout.strip() or None


def _write_marker_on_the_filesystem(volume_id: str) -> None:
    """The crash left a filesystem on an open mapping, not mounted: put a file on it, as if used."""
    with tempfile.TemporaryDirectory() as mountpoint:
        subprocess.run(["mount", mapper_path(mapper_name(volume_id)), mountpoint], check=True)
        try:
            Path(mountpoint, "marker").write_text(MARKER)
        finally:
            subprocess.run(["umount", mountpoint], check=True)


def _assert_staged_once(plugin: RunningPlugin, volume_id: str, staging: Path) -> None:
    assert plugin.backend.get(volume_id).metadata[STATE] == "encrypted"
    assert len(_loops(plugin, volume_id)) == 1, _loops(plugin, volume_id)
    assert _mapped(volume_id)
    assert Filesystems().is_mounted(str(staging))
    assert plugin.backend.fetch_header_backup(volume_id) is not None


def _assert_nothing_left(plugin: RunningPlugin, volume_id: str, staging: Path) -> None:
    assert not Filesystems().is_mounted(str(staging))
    assert not _mapped(volume_id)
    assert _loops(plugin, volume_id) == []


def _finish(plugin: RunningPlugin, volume_id: str, staging: Path) -> None:
    """Unstage, stage again (the marker is still there), unstage, delete: nothing left."""
    plugin.node.NodeUnstageVolume(_unstage_request(volume_id, staging))
    _assert_nothing_left(plugin, volume_id, staging)
    plugin.node.NodeStageVolume(_stage_request(volume_id, staging))
    assert (staging / "marker").read_text() == MARKER
    plugin.node.NodeUnstageVolume(_unstage_request(volume_id, staging))
    _assert_nothing_left(plugin, volume_id, staging)
    plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id))


@pytest.mark.parametrize("point", NODE_SCENARIOS["stage"])
def test_a_stage_killed_at_a_crash_point_converges_without_formatting_twice(
    root: Path, plugin: RunningPlugin, point: str
) -> None:
    volume_id = plugin.create(f"crash-{point}", SIZE).volume_id
    staging = root / f"staging-{point}"
    _crash(root, point, "NodeStageVolume", _stage_request(volume_id, staging))
    luks, fs = _luks_uuid(plugin, volume_id), _fs_uuid(volume_id)
    if fs is not None:
        _write_marker_on_the_filesystem(volume_id)
    plugin.node.NodeStageVolume(_stage_request(volume_id, staging))
    _assert_staged_once(plugin, volume_id, staging)
    if luks is not None:  # formatted before the kill: the retry used that header
        assert _luks_uuid(plugin, volume_id) == luks
    if fs is not None:  # and that filesystem, with what was written on it
        assert _fs_uuid(volume_id) == fs
        assert (staging / "marker").read_text() == MARKER
    else:
        (staging / "marker").write_text(MARKER)
    assert plugin.backend.fetch_header_backup(volume_id) == _header_of(plugin, volume_id, root)
    _finish(plugin, volume_id, staging)


def _header_of(plugin: RunningPlugin, volume_id: str, root: Path) -> bytes:
    """The volume's LUKS header as luksHeaderBackup takes it now (the backup must be this one)."""
    backup = root / f"header-{volume_id}"
    backup.unlink(missing_ok=True)
    image = str(plugin.backend.image_path(volume_id))
    subprocess.run(["cryptsetup", "luksHeaderBackup", image, "--header-backup-file", str(backup)], check=True)
    return backup.read_bytes()


def _staged_with_a_marker(root: Path, plugin: RunningPlugin, point: str) -> tuple[str, Path]:
    volume_id = plugin.create(f"crash-{point}", SIZE).volume_id
    staging = root / f"staging-{point}"
    plugin.node.NodeStageVolume(_stage_request(volume_id, staging))
    (staging / "marker").write_text(MARKER)
    os.sync()
    return volume_id, staging


@pytest.mark.parametrize("point", NODE_SCENARIOS["unstage"])
def test_an_unstage_killed_at_a_crash_point_converges_and_leaks_nothing(
    root: Path, plugin: RunningPlugin, point: str
) -> None:
    volume_id, staging = _staged_with_a_marker(root, plugin, point)
    _crash(root, point, "NodeUnstageVolume", _unstage_request(volume_id, staging))
    assert plugin.node.NodeUnstageVolume(_unstage_request(volume_id, staging)) == (
        csi_pb2.NodeUnstageVolumeResponse()
    )
    _assert_nothing_left(plugin, volume_id, staging)
    plugin.node.NodeStageVolume(_stage_request(volume_id, staging))
    _finish(plugin, volume_id, staging)


@pytest.mark.parametrize("point", NODE_SCENARIOS["expand"])
def test_an_expand_killed_at_a_crash_point_converges_on_retry(
    root: Path, plugin: RunningPlugin, point: str
) -> None:
    volume_id, staging = _staged_with_a_marker(root, plugin, point)
    before = os.statvfs(staging)
    plugin.controller.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(
            volume_id=volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=2 * SIZE)
        )
    )
    request = csi_pb2.NodeExpandVolumeRequest(volume_id=volume_id, volume_path=str(staging))
    _crash(root, point, "NodeExpandVolume", request)
    response = plugin.node.NodeExpandVolume(request)
    assert response.capacity_bytes >= 2 * SIZE
    after = os.statvfs(staging)
    assert after.f_blocks * after.f_frsize > before.f_blocks * before.f_frsize + SIZE // 2
    _assert_staged_once(plugin, volume_id, staging)
    assert (staging / "marker").read_text() == MARKER
    _finish(plugin, volume_id, staging)

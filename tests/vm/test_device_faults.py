"""Device faults under a volume (runs in the VM): it fails I/O during luksFormat, open, mkfs or resize.

A device-mapper device is put between the volume's image and the loop device NodeStage attaches: the
image is renamed beside itself and attached to a loop device of our own, a dm device (`linear`) maps that
loop, and the image path becomes a symlink to /dev/mapper/<dm device>, so the plugin's losetup builds the
volume's loop over the dm device. Loading an `error` table (all I/O fails) or a `flakey` one with
error_writes (reads work, writes fail) makes the device fail; `linear` again clears the fault. The
product has no test hook for any of it.

Each call must fail with UNAVAILABLE (the storage failed, nothing in the request is wrong) and a message
naming the step, leave the volume's state record where it was and the node as it found it, lose nothing
written before, and succeed once the fault is cleared.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from csi_luks.csi import csi_pb2
from csi_luks.luks import Cryptsetup, mapper_name
from csi_luks.system.filesystem import Filesystems
from csi_luks.volume_metadata import LUKS_HEADER_BYTES, STATE
from tests.support.fault_layer import SECTOR, FaultLayer
from tests.support.plugin import MiB, RunningPlugin, mount_capability, running_plugin

pytestmark = pytest.mark.timeout(600)
SIZE = 16 * MiB
DATA = os.urandom(256 * 1024)  # written before a fault, read back after it


@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningPlugin]:
    subprocess.run(["modprobe", "dm_flakey"], check=True)
    with running_plugin(tmp_path_factory.mktemp("device-faults")) as running:
        yield running


@dataclass
class Volume:
    plugin: RunningPlugin
    volume_id: str
    staging: Path
    layer: FaultLayer

    def stage(self) -> None:
        self.plugin.node.NodeStageVolume(
            csi_pb2.NodeStageVolumeRequest(
                volume_id=self.volume_id,
                staging_target_path=str(self.staging),
                volume_capability=mount_capability(),
            )
        )

    def unstage(self) -> None:
        self.plugin.node.NodeUnstageVolume(
            csi_pb2.NodeUnstageVolumeRequest(volume_id=self.volume_id, staging_target_path=str(self.staging))
        )

    def expand_node(self) -> int:
        response = self.plugin.node.NodeExpandVolume(
            csi_pb2.NodeExpandVolumeRequest(volume_id=self.volume_id, volume_path=str(self.staging))
        )
        return int(response.capacity_bytes)

    @property
    def state(self) -> str:
        return self.plugin.backend.get(self.volume_id).metadata[STATE]

    def write_data(self) -> None:
        (self.staging / "data").write_bytes(DATA)
        os.sync()

    def assert_untouched_node(self) -> None:
        """What a failed stage leaves: no mount, no mapping, no loop device."""
        assert not Filesystems().is_mounted(str(self.staging))
        assert not Cryptsetup().status(mapper_name(self.volume_id)).active
        assert self.plugin.backend.find_attachment(self.volume_id) is None


@pytest.fixture
def volume(plugin: RunningPlugin, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Volume]:
    volume_id = plugin.create(request.node.name[5:40], size=SIZE).volume_id
    layer = FaultLayer(plugin.backend.image_path(volume_id), f"fault-{volume_id[-12:]}")
    layer.install()
    made = Volume(plugin, volume_id, tmp_path / "staging", layer)
    try:
        yield made
    finally:
        layer.clear()
        with suppress(grpc.RpcError):
            made.unstage()
        layer.remove()
        plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id))


def _fails_unavailable(call: object, *words: str) -> None:
    """call fails with UNAVAILABLE, and its message says each of words."""
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    print(f"{info.value.code()}: {info.value.details()}")  # the report shows what an operator reads
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert all(word in info.value.details() for word in words), info.value.details()


def test_a_write_fault_fails_luks_format_and_the_volume_stays_prepared(volume: Volume) -> None:
    empty = volume.layer.digest()
    volume.layer.fail_writes()
    _fails_unavailable(volume.stage, "luksFormat", "I/O error", "/dev/loop")
    assert volume.state == "prepared"
    assert volume.plugin.backend.fetch_header_backup(volume.volume_id) is None
    volume.assert_untouched_node()
    volume.layer.clear()
    assert volume.layer.digest() == empty  # no half-written header
    volume.stage()
    assert volume.state == "encrypted"
    volume.write_data()
    assert (volume.staging / "data").read_bytes() == DATA


def test_a_read_fault_fails_the_restage_and_keeps_the_data(volume: Volume) -> None:
    volume.stage()
    volume.write_data()
    volume.unstage()
    before = volume.layer.digest()
    volume.layer.fail_all()
    _fails_unavailable(volume.stage, "I/O error", "/dev/loop")
    assert volume.state == "encrypted"
    volume.assert_untouched_node()
    volume.layer.clear()
    assert volume.layer.digest() == before
    volume.stage()
    assert (volume.staging / "data").read_bytes() == DATA


def test_a_write_fault_on_the_data_area_fails_mkfs_and_the_retry_makes_the_filesystem(volume: Volume) -> None:
    volume.layer.fail_writes(from_sector=LUKS_HEADER_BYTES // SECTOR)  # luksFormat works, mkfs does not
    _fails_unavailable(volume.stage, "mkfs", "I/O error")
    # The header was written and its backup taken; the volume stays prepared until its filesystem is made.
    assert volume.state == "prepared"
    assert volume.plugin.backend.fetch_header_backup(volume.volume_id) is not None
    volume.assert_untouched_node()
    volume.layer.clear()
    volume.stage()
    assert Filesystems().probe(f"/dev/mapper/{mapper_name(volume.volume_id)}").type == "ext4"
    volume.write_data()
    volume.unstage()
    volume.stage()
    assert (volume.staging / "data").read_bytes() == DATA


def test_a_read_fault_fails_node_expand_and_the_retry_grows_the_volume(volume: Volume) -> None:
    volume.stage()
    volume.write_data()
    before = os.statvfs(volume.staging)
    with volume.layer.image_in_place():
        volume.plugin.controller.ControllerExpandVolume(
            csi_pb2.ControllerExpandVolumeRequest(
                volume_id=volume.volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=2 * SIZE)
            )
        )
    volume.layer.fail_all()
    _fails_unavailable(volume.expand_node, "resize", "I/O error")
    volume.layer.clear()
    assert volume.expand_node() >= 2 * SIZE
    after = os.statvfs(volume.staging)
    assert after.f_blocks * after.f_frsize > before.f_blocks * before.f_frsize + SIZE // 2
    assert (volume.staging / "data").read_bytes() == DATA
    volume.unstage()
    volume.stage()
    assert (volume.staging / "data").read_bytes() == DATA

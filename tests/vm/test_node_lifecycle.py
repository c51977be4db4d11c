"""Node service on real dm-crypt, loop devices and filesystems, driven over gRPC (runs in the VM)."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from csi_luks.csi import csi_pb2
from csi_luks.encryption import volume_encryption
from csi_luks.kms.base import KMSContext
from csi_luks.luks import Cryptsetup, mapper_name
from csi_luks.system.filesystem import Filesystems
from csi_luks.volume_metadata import STATE
from tests.support.audit import AUDIT
from tests.support.plugin import MiB, RunningPlugin, block_capability, mount_capability, running_plugin

MARKER = b"CSI-LUKS-NODE-PLAINTEXT-MARKER " * 1000


def stage(plugin: RunningPlugin, volume_id: str, staging: Path, capability: csi_pb2.VolumeCapability,
          secrets: dict[str, str] | None = None) -> None:  # fmt: skip
    plugin.node.NodeStageVolume(
        csi_pb2.NodeStageVolumeRequest(
            volume_id=volume_id,
            staging_target_path=str(staging),
            volume_capability=capability,
            secrets=secrets or {},
        )
    )


def unstage(plugin: RunningPlugin, volume_id: str, staging: Path) -> None:
    plugin.node.NodeUnstageVolume(
        csi_pb2.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=str(staging))
    )


def publish(plugin: RunningPlugin, volume_id: str, staging: Path, target: Path,
            capability: csi_pb2.VolumeCapability, readonly: bool = False) -> None:  # fmt: skip
    plugin.node.NodePublishVolume(
        csi_pb2.NodePublishVolumeRequest(
            volume_id=volume_id,
            staging_target_path=str(staging),
            target_path=str(target),
            volume_capability=capability,
            readonly=readonly,
        )
    )


def unpublish(plugin: RunningPlugin, volume_id: str, target: Path) -> None:
    plugin.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(target))
    )


def expand(plugin: RunningPlugin, volume_id: str, path: Path, size: int) -> int:
    plugin.controller.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(
            volume_id=volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=size)
        )
    )
    response = plugin.node.NodeExpandVolume(
        csi_pb2.NodeExpandVolumeRequest(volume_id=volume_id, volume_path=str(path))
    )
    return int(response.capacity_bytes)


def stats(plugin: RunningPlugin, volume_id: str, path: Path) -> csi_pb2.NodeGetVolumeStatsResponse:
    response: csi_pb2.NodeGetVolumeStatsResponse = plugin.node.NodeGetVolumeStats(
        csi_pb2.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=str(path))
    )
    return response


def no_plaintext(plugin: RunningPlugin, volume_id: str) -> None:
    data = plugin.backend.image_path(volume_id).read_bytes()
    assert data[:6] == b"LUKS\xba\xbe"
    assert MARKER[:31] not in data


def not_mapped(volume_id: str) -> bool:
    return not Cryptsetup().status(mapper_name(volume_id)).active


@pytest.mark.parametrize("fs_type", ["ext4", "xfs"])
def test_filesystem_lifecycle(tmp_path: Path, fs_type: str) -> None:
    staging, target = tmp_path / "staging", tmp_path / "target"
    capability = mount_capability(fs_type)
    with running_plugin(tmp_path / "plugin") as plugin:
        volume_id = plugin.create(f"pvc-{fs_type}", size=320 * MiB, capability=capability).volume_id
        for _ in range(2):  # every call twice: repeats are no-ops
            stage(plugin, volume_id, staging, capability)
        assert plugin.backend.get(volume_id).metadata[STATE] == "encrypted"
        assert Filesystems().probe(f"/dev/mapper/{mapper_name(volume_id)}").type == fs_type
        for _ in range(2):
            publish(plugin, volume_id, staging, target, capability)
        (target / "data.bin").write_bytes(MARKER)
        os.sync()
        for _ in range(2):
            unpublish(plugin, volume_id, target)
        assert not target.exists()
        for _ in range(2):
            unstage(plugin, volume_id, staging)
        assert not_mapped(volume_id) and plugin.backend.find_attachment(volume_id) is None
        no_plaintext(plugin, volume_id)

        stage(plugin, volume_id, staging, capability)
        publish(plugin, volume_id, staging, target, capability)
        assert (target / "data.bin").read_bytes() == MARKER
        before = stats(plugin, volume_id, target)
        assert not before.volume_condition.abnormal
        units = {u.unit: u for u in before.usage}
        assert units[csi_pb2.VolumeUsage.BYTES].used > len(MARKER) // 2
        assert units[csi_pb2.VolumeUsage.INODES].total > 0

        assert expand(plugin, volume_id, target, 640 * MiB) >= 640 * MiB
        after = {u.unit: u for u in stats(plugin, volume_id, target).usage}[csi_pb2.VolumeUsage.BYTES]
        assert after.total > units[csi_pb2.VolumeUsage.BYTES].total + 250 * MiB
        assert (target / "data.bin").read_bytes() == MARKER

        subprocess.run(["umount", str(target)], check=True)  # the mount vanishes under the CO
        gone = stats(plugin, volume_id, target)
        assert gone.volume_condition.abnormal and "not mounted" in gone.volume_condition.message

        unpublish(plugin, volume_id, target)
        unstage(plugin, volume_id, staging)
        plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id))
        assert plugin.backend.list() == []


def test_raw_block_lifecycle(tmp_path: Path) -> None:
    staging, target = tmp_path / "staging", tmp_path / "dev" / "block"
    capability = block_capability()
    with running_plugin(tmp_path / "plugin") as plugin:
        volume_id = plugin.create("pvc-block", size=64 * MiB, capability=capability).volume_id
        stage(plugin, volume_id, staging, capability)
        for _ in range(2):
            publish(plugin, volume_id, staging, target, capability)
        with target.open("r+b") as device:
            device.seek(8 * MiB)
            device.write(MARKER)
            device.flush()
            os.fsync(device.fileno())
        assert stats(plugin, volume_id, target).usage[0].total == 64 * MiB
        assert expand(plugin, volume_id, target, 96 * MiB) == 96 * MiB
        unpublish(plugin, volume_id, target)
        unstage(plugin, volume_id, staging)
        no_plaintext(plugin, volume_id)
        stage(plugin, volume_id, staging, capability)
        publish(plugin, volume_id, staging, target, capability)
        with target.open("rb") as device:
            device.seek(8 * MiB)
            assert device.read(len(MARKER)) == MARKER
        unpublish(plugin, volume_id, target)
        unstage(plugin, volume_id, staging)


def test_unstage_after_a_plugin_restart(tmp_path: Path) -> None:
    staging, capability = tmp_path / "staging", mount_capability()
    root = tmp_path / "plugin"
    with running_plugin(root) as first:
        volume_id = first.create("pvc-restart").volume_id
        stage(first, volume_id, staging, capability)
        (staging / "kept.txt").write_text("survives the restart")
    with running_plugin(root) as second:  # a new process: nothing in memory
        unstage(second, volume_id, staging)
        assert not_mapped(volume_id) and second.backend.find_attachment(volume_id) is None
        assert not Filesystems().is_mounted(str(staging))
        stage(second, volume_id, staging, capability)
        assert (staging / "kept.txt").read_text() == "survives the restart"
        unstage(second, volume_id, staging)


def test_a_device_holding_a_filesystem_is_never_formatted(tmp_path: Path) -> None:
    with running_plugin(tmp_path / "plugin") as plugin:
        volume_id = plugin.create("pvc-has-data").volume_id
        image = plugin.backend.image_path(volume_id)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)  # somebody's data is there
        digest = hashlib.sha256(image.read_bytes()).hexdigest()
        with pytest.raises(grpc.RpcError) as info:
            stage(plugin, volume_id, tmp_path / "staging", mount_capability())
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "refusing to format" in info.value.details()
        assert hashlib.sha256(image.read_bytes()).hexdigest() == digest
        assert plugin.backend.get(volume_id).metadata[STATE] == "prepared"
        assert plugin.backend.find_attachment(volume_id) is None  # left as it was found


def test_encrypted_state_without_a_header_is_refused(tmp_path: Path) -> None:
    with running_plugin(tmp_path / "plugin") as plugin:
        volume_id = plugin.create("pvc-lost-header").volume_id
        plugin.backend.set_metadata(volume_id, STATE, "encrypted")
        with pytest.raises(grpc.RpcError) as info:
            stage(plugin, volume_id, tmp_path / "staging", mount_capability())
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "no LUKS header" in info.value.details()
        assert Filesystems().probe(str(plugin.backend.image_path(volume_id))).empty


def test_crash_between_format_and_state_write_is_repaired(tmp_path: Path) -> None:
    with running_plugin(tmp_path / "plugin") as plugin:
        volume_id = plugin.create("pvc-crash").volume_id
        encryption = volume_encryption(
            plugin.server.kms_config, "local-1", KMSContext(secrets={}), plugin.backend
        )
        passphrase = encryption.get_passphrase(volume_id)
        AUDIT.register(passphrase)
        Cryptsetup().format(str(plugin.backend.image_path(volume_id)), passphrase)  # the crashed stage
        stage(plugin, volume_id, tmp_path / "staging", mount_capability())
        assert plugin.backend.get(volume_id).metadata[STATE] == "encrypted"
        unstage(plugin, volume_id, tmp_path / "staging")


def test_a_wrong_key_fails_stage_and_leaves_the_device_untouched(tmp_path: Path) -> None:
    staging, capability = tmp_path / "staging", mount_capability()
    with running_plugin(tmp_path / "plugin") as plugin:
        volume_id = plugin.create("pvc-wrong").volume_id
        stage(plugin, volume_id, staging, capability)
        unstage(plugin, volume_id, staging)
        image = plugin.backend.image_path(volume_id)
        digest = hashlib.sha256(image.read_bytes()).hexdigest()
        # The stored DEK is replaced by another one: it unwraps fine but opens no key slot.
        volume_encryption(
            plugin.server.kms_config, "local-1", KMSContext(secrets={}), plugin.backend
        ).new_passphrase(volume_id)
        with pytest.raises(grpc.RpcError) as info:
            stage(plugin, volume_id, staging, capability)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "does not open volume" in info.value.details()
        assert hashlib.sha256(image.read_bytes()).hexdigest() == digest
        assert not_mapped(volume_id) and plugin.backend.find_attachment(volume_id) is None


def test_secrets_kms_uses_the_stage_secret(tmp_path: Path, new_passphrase: Callable[[], bytes]) -> None:
    staging, capability = tmp_path / "staging", mount_capability()
    secret = new_passphrase().decode()
    with running_plugin(tmp_path / "plugin") as plugin:
        volume_id = plugin.create("pvc-secret", parameters={"encrypted": "true"}).volume_id
        with pytest.raises(grpc.RpcError) as info:
            stage(plugin, volume_id, staging, capability)  # no secret given
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "encryptionPassphrase" in info.value.details()
        stage(plugin, volume_id, staging, capability, secrets={"encryptionPassphrase": secret})
        unstage(plugin, volume_id, staging)
        assert Cryptsetup().verify_passphrase(str(plugin.backend.image_path(volume_id)), secret) == 0

"""Node on real RBD images (runs in the VM): krbd map, LUKS format once, mount, restart, restore, clone."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_luks.csi import csi_pb2
from csi_luks.csiaddons import encryptionkeyrotation_pb2 as pb
from csi_luks.csiaddons import encryptionkeyrotation_pb2_grpc as pb_grpc
from csi_luks.kms.config import KMSConfig
from csi_luks.luks import Cryptsetup, WrongPassphrase, mapper_name
from csi_luks.operations.header_backup import header_backup_matches
from csi_luks.operations.tool import Tool
from csi_luks.system.filesystem import Filesystems
from csi_luks.volume_metadata import FILESYSTEM, LUKS_HEADER_BYTES, STATE
from csi_luks.volumes.rbd import decode_volume_id
from tests.support.ceph import CephCluster
from tests.support.plugin import MiB, RunningPlugin, mount_capability, running_plugin

DEK = "csi-luks/dek"
MARKER = b"CSI-LUKS-RBD-PLAINTEXT-MARKER " * 1000


@pytest.fixture
def secrets(ceph_secrets: dict[str, str]) -> dict[str, str]:
    return ceph_secrets


@pytest.fixture
def plugin_root(tmp_path: Path) -> Path:
    return tmp_path / "plugin"


@pytest.fixture
def plugin(plugin_root: Path, ceph_config: Path) -> Iterator[RunningPlugin]:
    with running_plugin(plugin_root, ceph_config=ceph_config) as running:
        yield running


def parameters(ceph: CephCluster, kms_id: str = "local-1") -> dict[str, str]:
    return {"clusterID": "test-cluster", "pool": ceph.pool, "encrypted": "true", "encryptionKMSID": kms_id}


def stage(plugin: RunningPlugin, volume_id: str, staging: Path, secrets: dict[str, str]) -> None:
    plugin.node.NodeStageVolume(
        csi_pb2.NodeStageVolumeRequest(
            volume_id=volume_id, staging_target_path=str(staging), volume_capability=mount_capability(),
            secrets=secrets,
        )
    )  # fmt: skip


def unstage(plugin: RunningPlugin, volume_id: str, staging: Path) -> None:
    plugin.node.NodeUnstageVolume(
        csi_pb2.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=str(staging))
    )


def image_meta(ceph: CephCluster, volume_id: str) -> dict[str, str]:
    spec = decode_volume_id(volume_id).spec
    return dict(json.loads(ceph.run("rbd", "image-meta", "list", "--format", "json", spec) or "{}"))


def mapped(volume_id: str) -> bool:
    return Cryptsetup().status(mapper_name(volume_id)).active


def test_stage_formats_once_mounts_and_survives_unstage_restage_and_a_plugin_restart(
    plugin_root: Path, ceph_config: Path, ceph: CephCluster, secrets: dict[str, str], tmp_path: Path
) -> None:
    staging = tmp_path / "staging"
    with running_plugin(plugin_root, ceph_config=ceph_config) as plugin:
        volume_id = plugin.create("pvc-rbd-node", 64 * MiB, parameters(ceph), secrets=secrets).volume_id
        for _ in range(2):  # a repeat is a no-op
            stage(plugin, volume_id, staging, secrets)
        device = plugin.server.backend.find_attachment(volume_id)
        assert device is not None and device.startswith("/dev/rbd")
        assert image_meta(ceph, volume_id)[STATE] == "encrypted"
        assert Filesystems().probe(device).is_luks and mapped(volume_id)
        (staging / "data.bin").write_bytes(MARKER)
        os.sync()
        # Mapped here: the controller refuses to delete it.
        with pytest.raises(grpc.RpcError) as info:
            plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id, secrets=secrets))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        unstage(plugin, volume_id, staging)
        assert plugin.server.backend.find_attachment(volume_id) is None and not mapped(volume_id)
        stage(plugin, volume_id, staging, secrets)  # not formatted again: the data is there
        assert (staging / "data.bin").read_bytes() == MARKER

    with running_plugin(plugin_root, ceph_config=ceph_config) as restarted:  # nothing in memory
        # Stats and unstage carry no credentials: the node's record of the attachment serves them.
        stats = restarted.node.NodeGetVolumeStats(
            csi_pb2.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=str(staging))
        )
        assert not stats.volume_condition.abnormal
        unstage(restarted, volume_id, staging)
        assert restarted.server.backend.find_attachment(volume_id) is None and not mapped(volume_id)
        # The image holds only ciphertext.
        spec = decode_volume_id(volume_id).spec
        exported = tmp_path / "image.raw"
        ceph.run("rbd", "export", "--no-progress", spec, str(exported))
        data = exported.read_bytes()
        assert data[:6] == b"LUKS\xba\xbe" and MARKER[:30] not in data
        # The filesystem made at the first stage is recorded in the image's metadata: once its superblock
        # is wiped (in ciphertext), NodeStage refuses and writes nothing instead of making a new one.
        recorded = image_meta(ceph, volume_id)[FILESYSTEM]
        assert recorded.startswith("ext4 ")
        backend = restarted.server.backend.for_request(secrets)
        with open(backend.attach(volume_id), "r+b") as raw:
            raw.seek(LUKS_HEADER_BYTES)
            raw.write(bytes(4096))
            os.fsync(raw.fileno())
        backend.detach(volume_id)
        with pytest.raises(grpc.RpcError) as info:
            stage(restarted, volume_id, staging, secrets)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value.details()
        assert recorded.split()[1] in info.value.details() and "nothing was formatted" in info.value.details()
        assert restarted.server.backend.find_attachment(volume_id) is None and not mapped(volume_id)
        restarted.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id, secrets=secrets))


def test_restore_into_a_larger_volume_and_clone_are_readable_with_their_own_deks(
    plugin: RunningPlugin, ceph: CephCluster, secrets: dict[str, str], tmp_path: Path
) -> None:
    source = plugin.create("pvc-rbd-origin", 64 * MiB, parameters(ceph), secrets=secrets).volume_id
    stage(plugin, source, tmp_path / "source", secrets)
    (tmp_path / "source" / "data.txt").write_text("before the snapshot")
    unstage(plugin, source, tmp_path / "source")

    snapshot = plugin.snapshot("snap-rbd-node", source, secrets=secrets).snapshot_id
    restored = plugin.copy("pvc-rbd-restore", 160 * MiB, parameters(ceph, "local-2"),
                           snapshot_id=snapshot, secrets=secrets).volume_id  # fmt: skip
    clone = plugin.copy("pvc-rbd-clone", None, parameters(ceph), volume_id=source, secrets=secrets).volume_id
    wrapped = {i: image_meta(ceph, i)[DEK] for i in (source, snapshot, restored, clone)}
    assert len(set(wrapped.values())) == 4, "each image holds its own wrapped DEK"

    stage(plugin, restored, tmp_path / "restored", secrets)
    assert (tmp_path / "restored" / "data.txt").read_text() == "before the snapshot"
    fs = os.statvfs(tmp_path / "restored")
    assert fs.f_blocks * fs.f_frsize > 120 * MiB  # ext4 grown to the larger image at stage
    unstage(plugin, restored, tmp_path / "restored")

    stage(plugin, clone, tmp_path / "clone", secrets)
    assert (tmp_path / "clone" / "data.txt").read_text() == "before the snapshot"
    unstage(plugin, clone, tmp_path / "clone")

    for volume_id in (source, restored, clone):
        plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id, secrets=secrets))
    plugin.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot, secrets=secrets))


def test_node_expansion_grows_mapping_and_filesystem(
    plugin: RunningPlugin, ceph: CephCluster, secrets: dict[str, str], tmp_path: Path
) -> None:
    staging = tmp_path / "staging"
    volume_id = plugin.create("pvc-rbd-expand", 64 * MiB, parameters(ceph), secrets=secrets).volume_id
    stage(plugin, volume_id, staging, secrets)
    plugin.controller.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(
            volume_id=volume_id,
            capacity_range=csi_pb2.CapacityRange(required_bytes=192 * MiB),
            secrets=secrets,
        )
    )
    response = plugin.node.NodeExpandVolume(
        csi_pb2.NodeExpandVolumeRequest(volume_id=volume_id, volume_path=str(staging), secrets=secrets)
    )
    assert response.capacity_bytes >= 192 * MiB
    fs = os.statvfs(staging)
    assert fs.f_blocks * fs.f_frsize > 150 * MiB
    unstage(plugin, volume_id, staging)
    plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id, secrets=secrets))


def test_rbd_nbd_mounter_maps_through_a_userspace_daemon(
    plugin: RunningPlugin, ceph: CephCluster, secrets: dict[str, str], tmp_path: Path
) -> None:
    staging = tmp_path / "staging"
    nbd = {**parameters(ceph), "mounter": "rbd-nbd"}
    volume_id = plugin.create("pvc-rbd-nbd", 64 * MiB, nbd, secrets=secrets).volume_id
    stage(plugin, volume_id, staging, secrets)
    device = plugin.server.backend.find_attachment(volume_id)
    assert device is not None and device.startswith("/dev/nbd")
    (staging / "data.bin").write_bytes(MARKER)
    unstage(plugin, volume_id, staging)
    assert plugin.server.backend.find_attachment(volume_id) is None and not mapped(volume_id)
    stage(plugin, volume_id, staging, secrets)
    assert (staging / "data.bin").read_bytes() == MARKER
    unstage(plugin, volume_id, staging)
    plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id, secrets=secrets))


@pytest.mark.timeout(1800)  # a dozen rbd maps and CLI calls, each seconds under TCG, and a CLI start
def test_rotation_on_krbd_staged_then_unstaged_keeps_the_data(
    plugin: RunningPlugin, ceph: CephCluster, ceph_config: Path, secrets: dict[str, str], tmp_path: Path
) -> None:
    """Key rotation on the RBD backend: EncryptionKeyRotate under a mounted filesystem (through the
    node's krbd mapping), then `csi-luks rotate` of the unstaged volume (mapped for the duration);
    each leaves one key slot, the old DEK opens nothing, and a restage reads the data."""
    staging = tmp_path / "staging"
    volume_id = plugin.create("pvc-rbd-rotate", 64 * MiB, parameters(ceph), secrets=secrets).volume_id
    stage(plugin, volume_id, staging, secrets)
    (staging / "data.bin").write_bytes(MARKER)
    os.sync()
    # Not one request's view (which keeps what it read): the test reads each DEK anew.
    backend = plugin.server.backend.for_request(secrets, one_request=False)
    tool = Tool(backend, KMSConfig.from_file(str(plugin.kms_config)))
    deks = [tool.encryption(volume_id).get_passphrase(volume_id)]
    stub = pb_grpc.EncryptionKeyRotationControllerStub(plugin.channel)
    stub.EncryptionKeyRotate(
        pb.EncryptionKeyRotateRequest(volume_id=volume_id, volume_path=str(staging), secrets=secrets)
    )
    assert (staging / "data.bin").read_bytes() == MARKER  # the mapping never noticed
    deks.append(tool.encryption(volume_id).get_passphrase(volume_id))
    unstage(plugin, volume_id, staging)

    secrets_file = tmp_path / "secrets.json"
    secrets_file.write_text(json.dumps(secrets))
    rotated = subprocess.run(
        [sys.executable, "-m", "csi_luks.cli", "rotate", volume_id, "--backend", "rbd",
         "--ceph-config", str(ceph_config), "--state-dir", str(plugin.state_dir),
         "--kms-config", str(plugin.kms_config), "--secrets-file", str(secrets_file)],
        capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip
    assert rotated.returncode == 0, rotated.stderr
    assert "DEK rotated" in rotated.stdout
    assert plugin.server.backend.find_attachment(volume_id) is None, "mapped only for the rotation"
    deks.append(tool.encryption(volume_id).get_passphrase(volume_id))
    # Compared by digest: a failure message must not print a DEK.
    assert len({hashlib.sha256(dek.encode()).hexdigest() for dek in deks}) == 3, "a rotation kept its DEK"
    meta = image_meta(ceph, volume_id)
    assert meta[STATE] == "encrypted" and "csi-luks/dek-pending" not in meta
    stage(plugin, volume_id, staging, secrets)
    assert (staging / "data.bin").read_bytes() == MARKER
    device = plugin.server.backend.find_attachment(volume_id)
    assert device is not None
    cryptsetup = Cryptsetup()  # the header is read from the mapped image; the open mapping is left alone
    for old in deks[:2]:
        with pytest.raises(WrongPassphrase):
            cryptsetup.verify_passphrase(device, old)
    assert cryptsetup.active_slots(device) == [cryptsetup.verify_passphrase(device, deks[2])]
    assert header_backup_matches(cryptsetup, tool.backend, volume_id, device) is True
    unstage(plugin, volume_id, staging)
    plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id, secrets=secrets))

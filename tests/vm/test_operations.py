"""Operator lifecycle on real dm-crypt (runs in the VM): a wiped header restored from its backup, a DEK
rotated under a mounted filesystem, and a NodeStage that finishes a rotation killed halfway."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from csi_luks.csiaddons import encryptionkeyrotation_pb2 as pb
from csi_luks.csiaddons import encryptionkeyrotation_pb2_grpc as pb_grpc
from csi_luks.kms.config import KMSConfig
from csi_luks.luks import Cryptsetup, WrongPassphrase
from csi_luks.operations import commands
from csi_luks.operations.rotation import CRASH_POINT_ENV
from csi_luks.operations.tool import EXIT_OK, Tool
from csi_luks.volume_metadata import STATE
from tests.support.plugin import MiB, RunningPlugin, mount_capability, running_plugin
from tests.vm.test_node_lifecycle import MARKER, stage, unstage


def _tool(plugin: RunningPlugin) -> Tool:
    return Tool(plugin.backend, KMSConfig.from_file(str(plugin.kms_config)))


def _dek(plugin: RunningPlugin, volume_id: str) -> str:
    return _tool(plugin).encryption(volume_id).get_passphrase(volume_id)


def _staged_with_data(plugin: RunningPlugin, name: str, staging: Path) -> str:
    volume_id = plugin.create(name, size=64 * MiB).volume_id
    stage(plugin, volume_id, staging, mount_capability())
    (staging / "data.bin").write_bytes(MARKER)
    os.sync()
    return volume_id


def test_a_wiped_header_is_restored_from_its_backup(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    with running_plugin(tmp_path / "plugin") as plugin:
        volume_id = _staged_with_data(plugin, "pvc-header", staging)
        unstage(plugin, volume_id, staging)
        with plugin.backend.image_path(volume_id).open("r+b") as image:
            image.write(bytes(4 * MiB))
        with pytest.raises(grpc.RpcError) as refused:
            stage(plugin, volume_id, staging, mount_capability())
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "no LUKS header" in refused.value.details()
        assert commands.header_restore(_tool(plugin), volume_id, force=False) == EXIT_OK
        stage(plugin, volume_id, staging, mount_capability())
        assert (staging / "data.bin").read_bytes() == MARKER
        unstage(plugin, volume_id, staging)


def test_rotate_a_staged_mounted_volume_then_restage_with_the_new_key(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    with running_plugin(tmp_path / "plugin") as plugin:
        volume_id = _staged_with_data(plugin, "pvc-rotate-staged", staging)
        old = _dek(plugin, volume_id)
        stub = pb_grpc.EncryptionKeyRotationControllerStub(plugin.channel)
        stub.EncryptionKeyRotate(pb.EncryptionKeyRotateRequest(volume_id=volume_id, volume_path=str(staging)))
        assert (staging / "data.bin").read_bytes() == MARKER  # the mapping never noticed
        new = _dek(plugin, volume_id)
        assert new != old
        unstage(plugin, volume_id, staging)
        image = str(plugin.backend.image_path(volume_id))
        with pytest.raises(WrongPassphrase):
            Cryptsetup().verify_passphrase(image, old)
        assert Cryptsetup().active_slots(image) == [Cryptsetup().verify_passphrase(image, new)]
        stage(plugin, volume_id, staging, mount_capability())
        assert (staging / "data.bin").read_bytes() == MARKER
        unstage(plugin, volume_id, staging)


def test_node_stage_finishes_a_rotation_killed_after_its_key_was_added(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    with running_plugin(tmp_path / "plugin") as plugin:
        volume_id = _staged_with_data(plugin, "pvc-rotate-killed", staging)
        unstage(plugin, volume_id, staging)
        old = _dek(plugin, volume_id)
        crashed = subprocess.run(
            [sys.executable, "-m", "csi_luks.cli", "rotate", volume_id, "--state-dir", str(plugin.state_dir),
             "--kms-config", str(plugin.kms_config)],
            env={**os.environ, CRASH_POINT_ENV: "rotation.after-add-key"}, capture_output=True, check=False,
        )  # fmt: skip
        assert crashed.returncode == -signal.SIGKILL
        assert plugin.backend.get(volume_id).metadata[STATE] == "rotating"
        stage(plugin, volume_id, staging, mount_capability())
        assert plugin.backend.get(volume_id).metadata[STATE] == "encrypted"
        assert (staging / "data.bin").read_bytes() == MARKER
        new = _dek(plugin, volume_id)
        assert new != old
        unstage(plugin, volume_id, staging)
        image = str(plugin.backend.image_path(volume_id))
        assert Cryptsetup().active_slots(image) == [Cryptsetup().verify_passphrase(image, new)]

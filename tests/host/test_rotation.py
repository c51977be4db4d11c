"""DEK rotation on the host (image files are LUKS devices to cryptsetup): the crash-point matrix for the
local, metadata and vault KMS types, a rotation with each of kmip (both modes), aws-metadata and
aws-sts-metadata, the secrets type's refusal, rewrap, and the csi-addons service."""

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
from csi_luks.operations import commands
from csi_luks.operations.header_backup import header_backup_matches
from csi_luks.operations.rotation import CRASH_POINT_ENV, CRASH_POINTS
from csi_luks.operations.tool import EXIT_FAILED, EXIT_OK
from csi_luks.volume_metadata import EncryptionState
from tests.support.openbao import OpenBao
from tests.support.operations import Volumes, vault_login
from tests.support.plugin import code_of, details_of, running_plugin

KMS_IDS = ("local-1", "metadata-1", "vault-kv")
# Types whose credentials are Kubernetes Secrets (the test API server) and whose keys live on the session's
# KMIP server or AWS emulator. They keep the wrapped DEK in the volume's metadata, as local and metadata do,
# through the same DEK store: the crash-point matrix (16 kills, a CLI start each) stays with local and
# metadata for that store, and these rotate once each.
BREADTH_IDS = ("kmip-rpc", "kmip-local", "aws-metadata", "aws-sts-metadata")


def _entries(root: Path, bao: OpenBao) -> dict[str, dict[str, str]]:
    vault = vault_login(root, bao.address, "2")
    return {
        "local-1": {"encryptionKMSType": "local", "keyFile": str(root / "kek")},
        "metadata-1": {"encryptionKMSType": "metadata"},  # the KEK passphrase: the request's secrets
        "vault-kv": {"encryptionKMSType": "vault", "vaultPassphrasePath": "rotation/", **vault},
        "vault-transit": {"encryptionKMSType": "vault-transit", "vaultTransitKey": "rewrap-kek", **vault},
        "secrets": {"encryptionKMSType": "secrets"},
    }


@pytest.fixture
def volumes(tmp_path: Path, session_bao: OpenBao) -> Volumes:
    secrets = {"encryptionPassphrase": "kek passphrase of the metadata type, 0123456789"}
    return Volumes(tmp_path, _entries(tmp_path, session_bao), secrets)


@pytest.fixture
def kms_volumes(request: pytest.FixtureRequest, kms_id: str) -> Volumes:
    """The volumes fixture that has kms_id."""
    found: Volumes = request.getfixturevalue("breadth_volumes" if kms_id in BREADTH_IDS else "volumes")
    return found


# Between promote and the wipe the old key slot is one the KMS has no key for any more (the protocol's
# one such window, which the next call closes): only a kill there may leave it.
_OLD_SLOT_LEFT = ("rotation.after-promote", "rotation.before-kill-old-slots")


def _assert_safe(volumes: Volumes, volume_id: str, old_dek: str, crash_point: str) -> None:
    """After a kill: the KMS's DEK opens the volume, and every key slot is one the KMS has a key for
    (current or pending), but for the old slot in the window above."""
    current_slot = volumes.opens(volume_id, volumes.dek(volume_id))
    assert current_slot is not None, "the KMS's DEK does not open the volume"
    known = {current_slot, volumes.opens(volume_id, volumes.pending_dek(volume_id))}
    old_slot = volumes.opens(volume_id, old_dek)
    if crash_point in _OLD_SLOT_LEFT:
        assert old_slot is not None and old_slot not in known
        known.add(old_slot)
    assert set(volumes.slots(volume_id)) == known - {None}


def _assert_rotated(volumes: Volumes, volume_id: str, old_dek: str) -> None:
    new_dek = volumes.dek(volume_id)
    assert new_dek != old_dek
    assert volumes.state(volume_id) == EncryptionState.ENCRYPTED.value
    assert volumes.pending_dek(volume_id) is None
    assert volumes.slots(volume_id) == [volumes.opens(volume_id, new_dek)]
    assert volumes.opens(volume_id, old_dek) is None
    image = volumes.image(volume_id)
    assert header_backup_matches(volumes.tool.cryptsetup, volumes.backend, volume_id, image) is True


@pytest.mark.parametrize("kms_id", KMS_IDS + BREADTH_IDS)
def test_rotate_gives_a_new_dek_and_wipes_the_old_slot(kms_volumes: Volumes, kms_id: str) -> None:
    volumes = kms_volumes
    volume_id = volumes.create_formatted(f"pvc-rotate-{kms_id}", kms_id)
    old = volumes.dek(volume_id)
    done = volumes.cli("rotate", volume_id)
    assert done.returncode == EXIT_OK, done.stderr
    assert "DEK rotated; key slot 1; key slots wiped: 0" in done.stdout
    _assert_rotated(volumes, volume_id, old)
    second = volumes.dek(volume_id)
    assert commands.rotate(volumes.tool, [volume_id]) == EXIT_OK  # and again: slot 0 is free now
    _assert_rotated(volumes, volume_id, second)
    assert volumes.slots(volume_id) == [0]


@pytest.mark.parametrize("crash_point", CRASH_POINTS)
@pytest.mark.parametrize("kms_id", KMS_IDS)
def test_a_rotation_killed_at_any_step_is_safe_and_converges(
    kms_volumes: Volumes, kms_id: str, crash_point: str
) -> None:
    volumes = kms_volumes
    volume_id = volumes.create_formatted(f"pvc-{kms_id}-{crash_point}", kms_id)
    old = volumes.dek(volume_id)
    crashed = volumes.cli("rotate", volume_id, env={**os.environ, CRASH_POINT_ENV: crash_point})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert f"crash point {crash_point}" in crashed.stderr
    _assert_safe(volumes, volume_id, old, crash_point)
    assert commands.rotate(volumes.tool, [volume_id]) == EXIT_OK
    _assert_rotated(volumes, volume_id, old)


def test_vault_kv_keeps_only_the_current_dek_version(volumes: Volumes, session_bao: OpenBao) -> None:
    volume_id = volumes.create_formatted("pvc-rotate-versions", "vault-kv")
    assert commands.rotate(volumes.tool, [volume_id]) == EXIT_OK
    kv = session_bao.client().secrets.kv.v2
    meta = kv.read_secret_metadata(path=f"rotation/{volume_id}", mount_point="secret")["data"]
    current = meta["current_version"]
    assert current == 2
    assert all(about["destroyed"] for version, about in meta["versions"].items() if int(version) != current)


def test_the_secrets_type_cannot_rotate(volumes: Volumes) -> None:
    volume_id = volumes.create_formatted("pvc-shared-passphrase", "secrets")
    refused = volumes.cli("rotate", volume_id)
    assert refused.returncode == EXIT_FAILED
    assert "type secrets" in refused.stderr and "no per-volume key to rotate" in refused.stderr
    assert volumes.slots(volume_id) == [0]
    assert volumes.state(volume_id) == EncryptionState.ENCRYPTED.value


def test_a_volume_never_staged_has_nothing_to_rotate(volumes: Volumes) -> None:
    volume_id = volumes.create("pvc-prepared", "local-1")
    refused = volumes.cli("rotate", volume_id)
    assert refused.returncode == EXIT_FAILED
    assert "has no LUKS header yet" in refused.stderr


def test_rewrap_moves_transit_deks_to_the_newest_key_version(volumes: Volumes, session_bao: OpenBao) -> None:
    root = session_bao.client()
    root.secrets.transit.create_key(name="rewrap-kek")
    volume_id = volumes.create_formatted("pvc-rewrap", "vault-transit")
    dek = volumes.dek(volume_id)
    before = volumes.backend.get(volume_id).metadata["csi-luks/dek"]
    root.secrets.transit.rotate_key(name="rewrap-kek")
    version = root.secrets.transit.read_key(name="rewrap-kek")["data"]["latest_version"]
    done = volumes.cli("rewrap")
    assert done.returncode == EXIT_OK, done.stderr
    assert f"{volume_id}: 1 wrapped DEK(s) re-wrapped" in done.stdout
    after = volumes.backend.get(volume_id).metadata["csi-luks/dek"]
    assert after != before and after.startswith(f"vault:v{version}:")
    assert volumes.dek(volume_id) == dek
    again = volumes.cli("rewrap", "--kms-id", "vault-transit")
    assert again.returncode == EXIT_OK and "already under the newest key version" in again.stdout


def test_encryption_key_rotate_over_grpc(volumes: Volumes, tmp_path: Path) -> None:
    volume_id = volumes.create_formatted("pvc-grpc-rotate", "local-1")
    old = volumes.dek(volume_id)
    with running_plugin(tmp_path, state_dir=volumes.state_dir) as plugin:
        stub = pb_grpc.EncryptionKeyRotationControllerStub(plugin.channel)
        stub.EncryptionKeyRotate(pb.EncryptionKeyRotateRequest(volume_id=volume_id, volume_path="/unused"))
        _assert_rotated(volumes, volume_id, old)
        given = pb.EncryptionKeyRotateRequest(volume_id=volume_id, encryption_key="chosen by the caller")
        assert code_of(stub.EncryptionKeyRotate, given) == grpc.StatusCode.INVALID_ARGUMENT
        missing = pb.EncryptionKeyRotateRequest(volume_id="sa-00000000-0000-0000-0000-000000000000")
        assert code_of(stub.EncryptionKeyRotate, missing) == grpc.StatusCode.NOT_FOUND
        shared = volumes.create_formatted("pvc-grpc-shared", "secrets")
        request = pb.EncryptionKeyRotateRequest(volume_id=shared, secrets=volumes.secrets)
        assert code_of(stub.EncryptionKeyRotate, request) == grpc.StatusCode.FAILED_PRECONDITION
        assert "no per-volume key to rotate" in details_of(stub.EncryptionKeyRotate, request)


def test_one_key_change_at_a_time_per_volume_across_processes(volumes: Volumes, tmp_path: Path) -> None:
    """An operator's rotation in flight (another process) holds the volume's key lock: the plugin's
    EncryptionKeyRotate is ABORTED, a second `csi-luks rotate` and `migrate` refuse, and nothing
    changes; once the holder is killed (its flock dies with it) the next rotation succeeds."""
    volume_id = volumes.create_formatted("pvc-rotate-locked", "local-1")
    old = volumes.dek(volume_id)
    holder_code = (
        "import sys, time\n"
        "from csi_luks.volumes.standalone import StandaloneBackend\n"
        "with StandaloneBackend(sys.argv[1]).key_operation(sys.argv[2], 'a key rotation'):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(600)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", holder_code, str(volumes.state_dir), volume_id],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        refused = volumes.cli("rotate", volume_id)
        assert refused.returncode == EXIT_FAILED
        assert (
            f"a key rotation (pid {holder.pid}) is changing the key of volume {volume_id}" in refused.stderr
        )
        moved = volumes.cli("migrate", "--from", "local-1", "--to", "metadata-1")
        assert moved.returncode == EXIT_FAILED and "is changing the key" in moved.stderr
        with running_plugin(tmp_path / "plugin", state_dir=volumes.state_dir) as plugin:
            stub = pb_grpc.EncryptionKeyRotationControllerStub(plugin.channel)
            request = pb.EncryptionKeyRotateRequest(volume_id=volume_id)
            assert code_of(stub.EncryptionKeyRotate, request) == grpc.StatusCode.ABORTED
            assert "will succeed once it is done" in details_of(stub.EncryptionKeyRotate, request)
        assert volumes.dek(volume_id) == old and volumes.state(volume_id) == EncryptionState.ENCRYPTED.value
        assert volumes.slots(volume_id) == [volumes.opens(volume_id, old)]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    done = volumes.cli("rotate", volume_id)
    assert done.returncode == EXIT_OK, done.stderr
    _assert_rotated(volumes, volume_id, old)

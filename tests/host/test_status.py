"""`csi-luks status`: its table, its JSON, and an exit code for each outcome."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from csi_luks.kms.dek_store import DEK_KEY
from csi_luks.operations.rotation import CRASH_POINT_ENV
from csi_luks.operations.tool import EXIT_INCONSISTENT, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE
from tests.support.openbao import OpenBao, free_port
from tests.support.operations import Volumes, vault_login
from tests.support.plugin import MiB


def _entries(root: Path, address: str) -> dict[str, dict[str, str]]:
    vault = vault_login(root, address)
    return {
        "local-1": {"encryptionKMSType": "local", "keyFile": str(root / "kek")},
        "vault-kv": {"encryptionKMSType": "vault", "vaultPassphrasePath": "status/", **vault},
    }


@pytest.fixture
def volumes(tmp_path: Path, session_bao: OpenBao) -> Volumes:
    return Volumes(tmp_path, _entries(tmp_path, session_bao.address))


def _status(volumes: Volumes, *volume_ids: str) -> tuple[int, list[dict[str, Any]]]:
    done = volumes.cli("status", *volume_ids, "--output", "json")
    return done.returncode, json.loads(done.stdout)


def test_consistent_volumes_exit_0(volumes: Volumes) -> None:
    local = volumes.create_formatted("pvc-status-local", "local-1")
    vault = volumes.create_formatted("pvc-status-vault", "vault-kv")
    prepared = volumes.create("pvc-status-prepared", "local-1")
    code, statuses = _status(volumes)
    assert code == EXIT_OK
    by_id = {s["volume_id"]: s for s in statuses}
    assert set(by_id) == {local, vault, prepared}
    assert by_id[local] | {"problems": []} == by_id[local]
    assert (by_id[local]["kms_type"], by_id[local]["state"], by_id[local]["key_slots"]) == (
        "local",
        "encrypted",
        [0],
    )
    assert by_id[local]["dek_retrievable"] and by_id[local]["dek_slot"] == 0
    assert by_id[local]["header_backup"] == "matches" and by_id[local]["consistent"]
    assert by_id[vault]["kms_type"] == "vault" and by_id[vault]["consistent"]
    assert by_id[prepared]["state"] == "prepared" and by_id[prepared]["consistent"]
    table = volumes.cli("status")
    assert table.returncode == EXIT_OK
    assert table.stdout.splitlines()[0].split() == [
        "VOLUME", "KIND", "KMS", "TYPE", "STATE", "SLOTS", "DEK", "OPENS", "PENDING", "BACKUP", "RESULT",
    ]  # fmt: skip
    assert "INCONSISTENT" not in table.stdout


def test_a_missing_dek_is_inconsistent(volumes: Volumes) -> None:
    volume_id = volumes.create_formatted("pvc-status-no-dek", "local-1")
    volumes.backend.remove_metadata(volume_id, DEK_KEY)
    code, [status] = _status(volumes, volume_id)
    assert code == EXIT_INCONSISTENT
    assert status["dek_retrievable"] is False and not status["consistent"]
    assert any("DEK not retrievable" in p for p in status["problems"])
    table = volumes.cli("status", volume_id)
    assert table.returncode == EXIT_INCONSISTENT and "INCONSISTENT" in table.stdout


def test_a_dek_that_does_not_open_the_header_is_inconsistent(volumes: Volumes) -> None:
    volume_id = volumes.create_formatted("pvc-status-wrong-dek", "local-1")
    volumes.tool.encryption(volume_id).new_passphrase(volume_id)  # a DEK no key slot knows
    code, [status] = _status(volumes, volume_id)
    assert code == EXIT_INCONSISTENT
    assert status["dek_retrievable"] is True and status["dek_slot"] is None
    assert "the DEK does not open the LUKS header" in status["problems"]


def test_a_pending_rotation_is_inconsistent_until_finished(volumes: Volumes) -> None:
    volume_id = volumes.create_formatted("pvc-status-pending", "local-1")
    crashed = volumes.cli("rotate", volume_id, env={**os.environ, CRASH_POINT_ENV: "rotation.after-add-key"})
    assert crashed.returncode == -signal.SIGKILL
    code, [status] = _status(volumes, volume_id)
    assert code == EXIT_INCONSISTENT
    assert status["rotation_pending"] and status["state"] == "rotating" and status["key_slots"] == [0, 1]
    assert status["header_backup"] == "matches"  # refreshed after the key was added
    assert volumes.cli("rotate", volume_id).returncode == EXIT_OK
    assert _status(volumes, volume_id)[0] == EXIT_OK


def test_a_header_backup_that_differs_is_inconsistent(volumes: Volumes) -> None:
    volume_id = volumes.create_formatted("pvc-status-backup", "local-1")
    with open(volumes.image(volume_id), "r+b") as f:
        f.seek(8 * MiB)  # key-slot area: the header still parses, its backup no longer matches
        f.write(b"\xff" * 4096)
    code, [status] = _status(volumes, volume_id)
    assert code == EXIT_INCONSISTENT and status["header_backup"] == "differs"


def test_a_kms_that_is_down_exits_3(volumes: Volumes, tmp_path: Path) -> None:
    fine = volumes.create_formatted("pvc-status-fine", "local-1")
    down = volumes.create_formatted("pvc-status-down", "vault-kv")
    volumes.configure(_entries(tmp_path, f"http://127.0.0.1:{free_port()}"))
    code, statuses = _status(volumes)
    assert code == EXIT_UNAVAILABLE
    by_id = {s["volume_id"]: s for s in statuses}
    assert by_id[fine]["consistent"]
    assert by_id[down]["unreachable"] and "unavailable" in by_id[down]["problems"][0]


def test_a_backend_that_cannot_list_is_a_usage_error(volumes: Volumes, tmp_path: Path) -> None:
    argv = ["status", "--backend", "rbd", "--ceph-config", str(tmp_path / "no-such-config.json")]
    refused = volumes.cli(*argv)
    assert refused.returncode == EXIT_USAGE
    assert "csi-luks status: the RBD backend cannot list volumes" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_the_kmip_and_aws_types_and_a_kmip_server_down(breadth_volumes: Volumes) -> None:
    volumes = breadth_volumes
    entries = json.loads(volumes.kms_config.read_text())
    ids = {volumes.create_formatted(f"pvc-status-{kms_id}", kms_id): kms_id for kms_id in entries}
    code, statuses = _status(volumes)
    assert code == EXIT_OK, statuses
    for status in statuses:
        kms_id = ids[status["volume_id"]]
        assert status["kms_type"] == entries[kms_id]["encryptionKMSType"]
        assert status["consistent"] and status["dek_slot"] == 0, status
    dead = {"KMIP_ENDPOINT": f"127.0.0.1:{free_port()}", "READ_TIMEOUT": "1", "WRITE_TIMEOUT": "1"}
    volumes.configure({**entries, "kmip-rpc": {**entries["kmip-rpc"], **dead}})
    code, statuses = _status(volumes)
    assert code == EXIT_UNAVAILABLE
    for status in statuses:
        if ids[status["volume_id"]] == "kmip-rpc":
            assert status["unreachable"] and "unavailable" in status["problems"][0], status
        else:
            assert status["consistent"], status

"""Header backups kept with each encrypted standalone volume, and `csi-luks header restore`."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from csi_luks.csi import csi_pb2
from csi_luks.luks.header import HeaderBackupStream
from csi_luks.operations.header_backup import header_backup_matches, refresh_header_backup
from csi_luks.operations.tool import EXIT_FAILED, EXIT_OK
from csi_luks.volumes.base import BackendUnavailable
from tests.support.operations import Volumes
from tests.support.plugin import MiB


@pytest.fixture
def volumes(tmp_path: Path) -> Volumes:
    return Volumes(tmp_path, {"local-1": {"encryptionKMSType": "local", "keyFile": str(tmp_path / "kek")}})


def _wipe_header(volumes: Volumes, volume_id: str) -> None:
    with open(volumes.image(volume_id), "r+b") as f:
        f.write(bytes(4 * MiB))


def test_the_first_format_leaves_a_backup_that_matches_the_header(volumes: Volumes) -> None:
    volume_id = volumes.create("pvc-backup", "local-1")
    assert volumes.backend.fetch_header_backup(volume_id) is None
    volumes.format(volume_id)
    backup = volumes.backend.fetch_header_backup(volume_id)
    assert backup is not None and len(backup) == 16 * MiB
    assert (volumes.state_dir / "volumes" / volume_id / "header.backup").stat().st_mode & 0o077 == 0
    image = volumes.image(volume_id)
    assert header_backup_matches(volumes.tool.cryptsetup, volumes.backend, volume_id, image) is True
    _wipe_header(volumes, volume_id)
    assert header_backup_matches(volumes.tool.cryptsetup, volumes.backend, volume_id, image) is False


def test_restore_brings_back_a_wiped_header(volumes: Volumes) -> None:
    volume_id = volumes.create_formatted("pvc-restore", "local-1")
    dek = volumes.dek(volume_id)
    _wipe_header(volumes, volume_id)
    assert volumes.opens(volume_id, dek) is None
    done = volumes.cli("header", "restore", volume_id)
    assert done.returncode == EXIT_OK, done.stderr
    assert "restored" in done.stdout
    assert volumes.opens(volume_id, dek) == 0


def test_restore_refuses_a_header_that_still_opens_unless_forced(volumes: Volumes) -> None:
    volume_id = volumes.create_formatted("pvc-intact", "local-1")
    refused = volumes.cli("header", "restore", volume_id)
    assert refused.returncode == EXIT_FAILED
    assert "opens with the KMS's DEK" in refused.stderr and "--force" in refused.stderr
    forced = volumes.cli("header", "restore", volume_id, "--force")
    assert forced.returncode == EXIT_OK, forced.stderr
    assert volumes.opens(volume_id, volumes.dek(volume_id)) == 0


def test_restore_without_a_backup_is_refused(volumes: Volumes) -> None:
    volume_id = volumes.create("pvc-no-backup", "local-1")
    refused = volumes.cli("header", "restore", volume_id)
    assert refused.returncode == EXIT_FAILED
    assert "has no LUKS header backup" in refused.stderr


def test_header_backup_command_makes_a_missing_backup(volumes: Volumes) -> None:
    volume_id = volumes.create_formatted("pvc-late-backup", "local-1")
    volumes.backend.remove_header_backup(volume_id)
    made = volumes.cli("header", "backup", volume_id)
    assert made.returncode == EXIT_OK, made.stderr
    assert volumes.backend.fetch_header_backup(volume_id) is not None


def test_a_snapshot_keeps_its_own_copy_of_the_backup(volumes: Volumes) -> None:
    volume_id = volumes.create_formatted("pvc-snap-source", "local-1")
    request = csi_pb2.CreateSnapshotRequest(name="snap-backup", source_volume_id=volume_id)
    snapshot_id = volumes.controller.CreateSnapshot(request, None).snapshot.snapshot_id
    assert volumes.backend.fetch_header_backup(snapshot_id) == volumes.backend.fetch_header_backup(volume_id)
    volumes.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id), None)
    assert volumes.backend.fetch_header_backup(snapshot_id) is not None


def test_a_read_that_fails_midway_through_the_stream_falls_back_to_luksHeaderBackup(
    volumes: Volumes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The device fails after the header copies were checked: cryptsetup's backup is taken instead (and
    says what is wrong where it fails too), not the backend's write blamed."""
    volume_id = volumes.create_formatted("pvc-read-fails", "local-1")
    image = volumes.image(volume_id)
    volumes.backend.remove_header_backup(volume_id)
    fill = HeaderBackupStream._fill

    def failing_fill(self: HeaderBackupStream, chunk: memoryview, offset: int) -> None:
        if offset >= 4 * MiB:
            raise OSError(errno.EIO, "Input/output error")
        fill(self, chunk, offset)

    monkeypatch.setattr(HeaderBackupStream, "_fill", failing_fill)
    assert refresh_header_backup(volumes.tool.cryptsetup, volumes.backend, volume_id, image) is True
    monkeypatch.undo()
    assert header_backup_matches(volumes.tool.cryptsetup, volumes.backend, volume_id, image) is True
    directory = volumes.state_dir / "volumes" / volume_id
    assert not [p.name for p in directory.iterdir() if p.name.startswith(".header.backup.")]  # no torn temp


def test_a_backend_that_cannot_write_the_streamed_backup_says_so(
    volumes: Volumes, monkeypatch: pytest.MonkeyPatch
) -> None:
    volume_id = volumes.create_formatted("pvc-write-fails", "local-1")

    def refuse(path: Path, chunks: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("csi_luks.volumes.standalone.write_streamed_atomically", refuse)
    with pytest.raises(BackendUnavailable, match=r"cannot write .*header\.backup: No space left"):
        refresh_header_backup(volumes.tool.cryptsetup, volumes.backend, volume_id, volumes.image(volume_id))

"""Device I/O errors told apart from an empty device or a tool's other failures (faults on real devices:
tests/vm/test_device_faults.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from csi_luks.system.device_io import DeviceIOError, read_error, reports_io_error
from csi_luks.system.filesystem import Filesystems
from csi_luks.system.runner import CommandError, CommandResult


class ScriptedRunner:
    def __init__(self, *answers: tuple[int, str, str]) -> None:
        self.answers = list(answers)

    def run(self, argv: list[str], *, check: bool = True, **_: object) -> CommandResult:
        rc, out, err = self.answers.pop(0)
        if check and rc:
            raise CommandError(argv, rc, out, err)
        return CommandResult(argv, rc, out, err, 0.0)


def test_io_error_wordings() -> None:
    assert reports_io_error("mkfs.ext4: Input/output error while writing out and closing file system")
    assert reports_io_error("Cannot wipe header on device /dev/loop1.")
    assert not reports_io_error("mkfs.ext4: Device size reported to be zero.")


def test_a_readable_file_has_no_read_error(tmp_path: Path) -> None:
    image = tmp_path / "image"
    image.write_bytes(b"\0" * 8192)
    assert read_error(str(image)) is None
    assert read_error(str(tmp_path / "missing")) is None  # the caller's own error says more


def test_nothing_found_on_an_unreadable_device_is_an_io_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("csi_luks.system.filesystem.read_error", lambda device: "Input/output error")
    with pytest.raises(DeviceIOError, match="probing /dev/loop1: I/O error"):
        Filesystems(ScriptedRunner((2, "", ""))).probe("/dev/loop1")  # type: ignore[arg-type]
    monkeypatch.setattr("csi_luks.system.filesystem.read_error", lambda device: None)
    assert Filesystems(ScriptedRunner((2, "", ""))).probe("/dev/loop1").empty  # type: ignore[arg-type]


def test_mkfs_failing_with_an_io_error_is_a_device_io_error() -> None:
    failing = ScriptedRunner(
        (1, "", "mkfs.ext4: Input/output error while writing out and closing file system")
    )
    with pytest.raises(DeviceIOError, match=r"mkfs\.ext4 /dev/mapper/v: I/O error"):
        Filesystems(failing).mkfs("/dev/mapper/v", "ext4")  # type: ignore[arg-type]
    other = ScriptedRunner((1, "", "mkfs.ext4: invalid blocks count"))
    with pytest.raises(CommandError):
        Filesystems(other).mkfs("/dev/mapper/v", "ext4")  # type: ignore[arg-type]

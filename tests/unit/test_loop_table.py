"""LoopDevices.find reads the kernel's loop table from sysfs, and from losetup where sysfs is not there."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from csi_luks.system.loop import LoopDevices
from tests.unit.test_luks_engine import FakeRunner


def sysfs(tmp_path: Path, attached: dict[str, str], detached: tuple[str, ...] = ()) -> Path:
    """A /sys/block look-alike: each attached loop device has loop/backing_file, a detached one has not."""
    block = tmp_path / "block"
    for name, back in attached.items():
        (block / name / "loop").mkdir(parents=True)
        (block / name / "loop" / "backing_file").write_text(back + "\n")
    for name in ("vda", *detached):
        (block / name).mkdir(parents=True)
    return block


def test_the_device_of_an_attached_image_is_found_through_symlinks_and_deletion(tmp_path: Path) -> None:
    image, gone = tmp_path / "a.img", tmp_path / "gone.img"
    image.touch()
    link = tmp_path / "link.img"
    link.symlink_to(image)
    runner = FakeRunner([])
    loops = LoopDevices(runner=runner, sys_block=sysfs(  # type: ignore[arg-type]
        tmp_path, {"loop3": str(image), "loop7": f"{gone} (deleted)"}, detached=("loop0", "loop1"),
    ))  # fmt: skip
    assert loops.find(str(link)) == "/dev/loop3"
    assert loops.find(str(gone)) == "/dev/loop7"  # unlinked while attached: still attached
    assert loops.find(str(tmp_path / "other.img")) is None
    assert runner.calls == []  # no losetup process


def test_without_sysfs_the_table_comes_from_losetup(tmp_path: Path) -> None:
    image = tmp_path / "a.img"
    listing = {"loopdevices": [{"name": "/dev/loop5", "back-file": f"{image} (deleted)"},
                               {"name": "/dev/loop6", "back-file": None}]}  # fmt: skip
    runner = FakeRunner([(0, json.dumps(listing), ""), (0, "", "")])
    loops = LoopDevices(runner=runner, sys_block=tmp_path / "no-sysfs")  # type: ignore[arg-type]
    assert loops.find(str(image)) == "/dev/loop5"
    assert loops.find(str(tmp_path / "b.img")) is None  # an empty listing: nothing attached
    assert [c.argv[:2] for c in runner.calls] == [["losetup", "--list"]] * 2


def test_attach_asks_for_direct_io_where_the_file_opens_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = tmp_path / "a.img"
    image.write_bytes(b"\0" * 4096)
    runner = FakeRunner([(0, "/dev/loop2\n", ""), (0, "/dev/loop3\n", "")])
    loops = LoopDevices(runner=runner, sys_block=sysfs(tmp_path, {}))  # type: ignore[arg-type]
    real_open = os.open
    opened: list[int] = []

    def direct_io(path: str, flags: int) -> int:
        opened.append(flags)
        return real_open(path, flags & ~os.O_DIRECT)  # whatever this host's tmp file system allows

    monkeypatch.setattr("csi_luks.system.loop.os.open", direct_io)
    assert loops.attach(str(image)) == "/dev/loop2"
    assert opened and opened[0] & os.O_DIRECT

    def no_direct_io(path: str, flags: int) -> int:  # tmpfs before Linux 6.6
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr("csi_luks.system.loop.os.open", no_direct_io)
    assert loops.attach(str(image)) == "/dev/loop3"
    assert [call.argv for call in runner.calls] == [
        ["losetup", "--find", "--show", "--direct-io=on", str(image)],
        ["losetup", "--find", "--show", str(image)],
    ]

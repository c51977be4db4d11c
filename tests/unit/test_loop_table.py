"""LoopDevices.find reads the kernel's loop table from sysfs, and from losetup where sysfs is not there;
attach packs <linux/loop.h>'s struct loop_config, or runs losetup where the kernel has no LOOP_CONFIGURE."""

from __future__ import annotations

import ctypes
import errno
import json
import os
from pathlib import Path

import pytest

from csi_luks.system.loop import LO_FLAGS_DIRECT_IO, LOOP_CONFIG, LoopDevices, loop_config
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
    """Both ways: by LOOP_CONFIGURE, and by losetup where the kernel has no LOOP_CONFIGURE."""
    image = tmp_path / "a.img"
    image.write_bytes(b"\0" * 4096)
    runner = FakeRunner([(0, "/dev/loop2\n", ""), (0, "/dev/loop3\n", "")])
    loops = LoopDevices(runner=runner, sys_block=sysfs(tmp_path, {}))  # type: ignore[arg-type]
    configured: list[bool] = []

    def before_linux_5_8(path: str, direct_io: bool) -> str:
        configured.append(direct_io)
        raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))

    monkeypatch.setattr("csi_luks.system.loop._configure_free_device", before_linux_5_8)
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
    assert configured == [True, False]
    assert [call.argv for call in runner.calls] == [
        ["losetup", "--find", "--show", "--direct-io=on", str(image)],
        ["losetup", "--find", "--show", str(image)],
    ]


class _LoopInfo64(ctypes.Structure):
    """struct loop_info64 as <linux/loop.h> declares it, laid out by the C rules ctypes follows."""

    _fields_ = [
        *((name, ctypes.c_uint64) for name in ("device", "inode", "rdevice", "offset", "sizelimit")),
        *((name, ctypes.c_uint32) for name in ("number", "encrypt_type", "encrypt_key_size", "flags")),
        ("file_name", ctypes.c_char * 64),
        ("crypt_name", ctypes.c_char * 64),
        ("encrypt_key", ctypes.c_uint8 * 32),
        ("init", ctypes.c_uint64 * 2),
    ]


class _LoopConfig(ctypes.Structure):
    _fields_ = [
        ("fd", ctypes.c_uint32),
        ("block_size", ctypes.c_uint32),
        ("info", _LoopInfo64),
        ("reserved", ctypes.c_uint64 * 8),
    ]


def test_loop_config_is_packed_as_the_kernel_lays_it_out() -> None:
    assert LOOP_CONFIG.size == ctypes.sizeof(_LoopConfig) == 304
    config = _LoopConfig.from_buffer_copy(loop_config(7, "/var/lib/csi-luks/vol-1/image", direct_io=True))
    assert (config.fd, config.block_size) == (7, 0)
    info = config.info
    assert info.flags == LO_FLAGS_DIRECT_IO
    assert (info.offset, info.sizelimit, info.encrypt_type, info.encrypt_key_size) == (0, 0, 0, 0)
    assert info.file_name == b"/var/lib/csi-luks/vol-1/image" and info.crypt_name == b""
    assert bytes(info.encrypt_key) == bytes(32) and list(config.reserved) == [0] * 8
    assert _LoopConfig.from_buffer_copy(loop_config(3, "/x", direct_io=False)).info.flags == 0


def test_a_long_file_name_is_cut_to_63_bytes_and_terminated() -> None:
    path = "/var/lib/csi-luks/" + "v" * 100
    raw = loop_config(3, path, direct_io=False)
    name_at = _LoopConfig.info.offset + _LoopInfo64.file_name.offset
    assert raw[name_at : name_at + 64] == path.encode()[:63] + b"\0"

"""Open mappings found in a /sys/block look-alike, without `cryptsetup status`; and where sysfs cannot
tell (no sysfs, a device cryptsetup did not make, a table over several devices), cryptsetup is asked."""

from __future__ import annotations

from pathlib import Path

import pytest

from csi_luks.luks import DeviceBusy, DeviceMapperUnavailable
from csi_luks.luks.sysfs import find_dm_device
from tests.unit.test_luks_engine import engine
from tests.unit.test_stale_mappings import FakeSysBlock

OPENED = (0, "", "")
ON_LOOP7 = (0, "/dev/mapper/v is active.\n  type:    n/a\n  device:  /dev/loop7\n", "")
INACTIVE = (4, "/dev/mapper/v is inactive.\n", "")


@pytest.fixture(autouse=True)
def _device_mapper(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel has device-mapper (the host running these may not)."""
    monkeypatch.setattr("csi_luks.luks.cryptsetup.device_mapper_registered", lambda: True)


def _sys(tmp_path: Path) -> FakeSysBlock:
    sys = FakeSysBlock(tmp_path)
    sys.disk("loop0", image=str(tmp_path / "image"))
    sys.disk("loop7")
    return sys


def test_a_name_no_device_has_is_opened_without_a_status_call(tmp_path: Path) -> None:
    sys = _sys(tmp_path)
    sys.mapping("dm-0", "other", "loop7")
    cs, runner = engine(OPENED, sys_block=sys.block)
    assert cs.open("/dev/loop0", "v", "pw") == "/dev/mapper/v"
    assert [c.argv[1] for c in runner.calls] == ["open"]
    assert not cs.is_open("v") and cs.is_open("other")


def test_a_mapping_on_the_same_device_or_its_image_file_is_already_open(tmp_path: Path) -> None:
    sys = _sys(tmp_path)
    sys.mapping("dm-3", "v", "loop0")
    cs, runner = engine(sys_block=sys.block)
    assert cs.open("/dev/loop0", "v", "pw") == "/dev/mapper/v"
    assert cs.open_mapping_of(str(tmp_path / "image"), "v") == "/dev/mapper/v"  # what `status` calls loop
    assert runner.calls == []


def test_a_mapping_on_another_device_is_busy(tmp_path: Path) -> None:
    sys = _sys(tmp_path)
    sys.mapping("dm-3", "v", "loop7")
    cs, runner = engine(sys_block=sys.block)
    with pytest.raises(DeviceBusy, match="mapping v already exists for /dev/loop7, not for /dev/loop0"):
        cs.open("/dev/loop0", "v", "pw")
    assert runner.calls == []


@pytest.mark.parametrize(
    ("uuid", "backing"),
    [
        ("LVM-abc", ("loop7",)),  # not a mapping cryptsetup made: it says what the device is
        ("", ("loop7",)),  # no UUID at all
        (None, ("loop0", "loop7")),  # a table over two devices: no single backing device to compare
        (None, ()),  # no device at all
    ],
)
def test_where_sysfs_cannot_tell_cryptsetup_status_is_asked(
    tmp_path: Path, uuid: str | None, backing: tuple[str, ...]
) -> None:
    sys = _sys(tmp_path)
    sys.mapping("dm-3", "v", *backing, uuid=uuid)
    cs, runner = engine(ON_LOOP7, sys_block=sys.block)
    with pytest.raises(DeviceBusy, match="/dev/loop7"):
        cs.open("/dev/loop0", "v", "pw")
    assert [c.argv[1:] for c in runner.calls] == [["status", "v"]]


def test_without_sysfs_cryptsetup_status_is_asked(tmp_path: Path) -> None:
    cs, runner = engine(INACTIVE, OPENED, INACTIVE, sys_block=tmp_path / "absent")
    cs.open("/dev/loop0", "v", "pw")
    cs.close("v")
    assert [c.argv[1] for c in runner.calls] == ["status", "open", "status"]


def test_close_closes_what_sysfs_shows_open_and_nothing_else(tmp_path: Path) -> None:
    sys = _sys(tmp_path)
    sys.mapping("dm-3", "v", "loop0")
    cs, runner = engine(OPENED, sys_block=sys.block)
    cs.close("v")
    cs.close("absent")  # no device-mapper device of that name: already closed
    assert [c.argv[1:] for c in runner.calls] == [["close", "v"]]


def test_find_dm_device_reads_name_uuid_and_slaves(tmp_path: Path) -> None:
    sys = _sys(tmp_path)
    sys.mapping("dm-3", "v", "loop0")
    found = find_dm_device("v", sys.block)
    assert found is not None and found.device == "dm-3" and found.slaves == ("loop0",) and found.is_crypt
    assert found.uuid == f"CRYPT-LUKS2-{'0' * 32}-v"
    assert find_dm_device("w", sys.block) is None
    with pytest.raises(OSError):
        find_dm_device("v", tmp_path / "absent")


NO_DM = (1, "", "Cannot initialize device-mapper. Is dm_mod kernel module loaded?\n")


def test_on_a_kernel_without_device_mapper_cryptsetup_says_so_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("csi_luks.luks.cryptsetup.device_mapper_registered", lambda: False)
    sys = _sys(tmp_path)
    cs, runner = engine(NO_DM, NO_DM, sys_block=sys.block)
    with pytest.raises(DeviceMapperUnavailable):  # NodeGetVolumeStats: FAILED_PRECONDITION, as before
        cs.is_open("v")
    cs.close("v")  # no mapping can exist: nothing to close
    assert [c.argv[1:] for c in runner.calls] == [["status", "v"], ["status", "v"]]

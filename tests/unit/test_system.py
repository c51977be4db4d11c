from __future__ import annotations

from pathlib import Path

import pytest

from csi_luks.system import vm
from csi_luks.system.kernel import device_mapper_missing_reason, device_mapper_registered


def test_device_mapper_present(tmp_path: Path) -> None:
    misc = tmp_path / "misc"
    misc.write_text("237 loop-control\n236 device-mapper\n")
    control = tmp_path / "control"
    control.touch()
    assert device_mapper_missing_reason(misc, control) is None


def test_device_mapper_missing_driver_despite_control_node(tmp_path: Path) -> None:
    misc = tmp_path / "misc"
    misc.write_text("237 loop-control\n229 fuse\n")
    control = tmp_path / "control"
    control.touch()
    reason = device_mapper_missing_reason(misc, control)
    assert reason is not None and "device-mapper" in reason


def test_device_mapper_registered_reads_the_misc_drivers(tmp_path: Path) -> None:
    misc = tmp_path / "misc"
    misc.write_text("237 loop-control\n236 device-mapper\n")
    assert device_mapper_registered(misc)
    misc.write_text("237 loop-control\n229 fuse\n")
    assert not device_mapper_registered(misc)
    with pytest.raises(OSError):
        device_mapper_registered(tmp_path / "absent")


def test_device_mapper_missing_control_node(tmp_path: Path) -> None:
    misc = tmp_path / "misc"
    misc.write_text("236 device-mapper\n")
    reason = device_mapper_missing_reason(misc, tmp_path / "absent")
    assert reason is not None and "missing" in reason


def test_find_kernel_picks_the_newest_with_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CSI_LUKS_VM_KERNEL", raising=False)
    boot, modules = tmp_path / "boot", tmp_path / "modules"
    boot.mkdir()
    for version in ("6.1.0-9-amd64", "6.1.0-56-amd64", "6.12.0-1-amd64"):
        (boot / f"vmlinuz-{version}").touch()
    for version in ("6.1.0-9-amd64", "6.1.0-56-amd64"):  # 6.12 has no modules: unusable
        (modules / version).mkdir(parents=True)
    assert vm.find_kernel(boot, modules) == str(boot / "vmlinuz-6.1.0-56-amd64")


def test_find_kernel_without_any(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CSI_LUKS_VM_KERNEL", raising=False)
    with pytest.raises(vm.GuestUnavailable, match="linux-image-amd64"):
        vm.find_kernel(tmp_path, tmp_path)

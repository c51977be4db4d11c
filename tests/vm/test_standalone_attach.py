"""StandaloneBackend on real loop devices (runs in the VM: this host's kernel has none)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_luks.system.loop import LoopDevices
from csi_luks.volumes.base import VolumeInUse
from csi_luks.volumes.standalone import IMAGE, StandaloneBackend

MiB = 1024 * 1024


def device_size(device: str) -> int:
    return int(subprocess.run(["blockdev", "--getsize64", device], capture_output=True, check=True).stdout)


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    state = tmp_path / "state"
    yield state
    # Leave no loop device behind, whatever the test did.
    loops = LoopDevices()
    for image in (state / "volumes").glob(f"*/{IMAGE}"):
        device = loops.find(str(image))
        if device:
            loops.detach(device)


def test_attach_resize_and_delete_on_a_real_loop_device(state: Path) -> None:
    backend = StandaloneBackend(state)
    volume_id = backend.volume_id_for("pvc-attach", {})
    backend.create(volume_id, "pvc-attach", 16 * MiB, {})
    assert backend.find_attachment(volume_id) is None

    device = backend.attach(volume_id)
    assert device.startswith("/dev/loop") and stat.S_ISBLK(os.stat(device).st_mode)
    assert backend.attach(volume_id) == device  # idempotent: the same device, not a second one
    assert device_size(device) == 16 * MiB

    # A new instance (a restarted plugin) finds the attachment from the kernel, not from memory.
    restarted = StandaloneBackend(state)
    assert restarted.find_attachment(volume_id) == device

    assert restarted.resize(volume_id, 48 * MiB) == 48 * MiB
    restarted.refresh_attachment_size(volume_id)
    assert device_size(device) == 48 * MiB

    with pytest.raises(VolumeInUse, match=device):
        restarted.delete(volume_id)
    assert backend.get(volume_id).size_bytes == 48 * MiB  # untouched

    restarted.detach(volume_id)
    assert backend.find_attachment(volume_id) is None
    backend.detach(volume_id)  # already detached: nothing to do
    backend.delete(volume_id)
    assert backend.list() == [] and not (state / "volumes" / volume_id).exists()


def test_an_attachment_made_by_another_process_is_found_and_guards_delete(state: Path) -> None:
    """Controller and node may be separate processes sharing the state directory."""
    backend = StandaloneBackend(state)
    volume_id = backend.volume_id_for("pvc-other", {})
    backend.create(volume_id, "pvc-other", 8 * MiB, {})
    attach = (
        "import sys; from csi_luks.volumes.standalone import StandaloneBackend; "
        "print(StandaloneBackend(sys.argv[1]).attach(sys.argv[2]))"
    )
    node = subprocess.run(
        [sys.executable, "-c", attach, str(state), volume_id], capture_output=True, text=True, check=True
    )
    device = node.stdout.strip()
    assert device.startswith("/dev/loop")
    assert backend.find_attachment(volume_id) == device
    with pytest.raises(VolumeInUse):
        backend.delete(volume_id)
    backend.detach(volume_id)
    backend.delete(volume_id)
    assert backend.list() == []

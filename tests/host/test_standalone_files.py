"""The standalone backend's files and metadata on the host (attachment needs loop devices: see tests/vm)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from csi_luks.volumes.base import VolumeInUse, VolumeNotFound
from csi_luks.volumes.standalone import META, StandaloneBackend

MiB = 1024 * 1024


@dataclass
class FakeLoops:
    attached: dict[str, str] = field(default_factory=dict)

    def find(self, backing_file: str) -> str | None:
        return self.attached.get(backing_file)

    def attach(self, backing_file: str) -> str:
        return self.attached.setdefault(backing_file, f"/dev/loop{len(self.attached)}")

    def detach(self, device: str) -> None:
        self.attached = {k: v for k, v in self.attached.items() if v != device}

    def refresh_size(self, device: str) -> None:
        pass


@pytest.fixture
def backend(tmp_path: Path) -> StandaloneBackend:
    return StandaloneBackend(tmp_path / "state", loops=FakeLoops())  # type: ignore[arg-type]


def test_ids_are_deterministic_per_name(backend: StandaloneBackend) -> None:
    assert backend.volume_id_for("pvc-1") == backend.volume_id_for("pvc-1")
    assert backend.volume_id_for("pvc-1") != backend.volume_id_for("pvc-2")


def test_create_is_sparse_idempotent_and_keeps_metadata(backend: StandaloneBackend, tmp_path: Path) -> None:
    vid = backend.volume_id_for("pvc-1")
    info = backend.create(vid, "pvc-1", 64 * MiB, {"k": "v"})
    assert (info.name, info.size_bytes, info.metadata) == ("pvc-1", 64 * MiB, {"k": "v"})
    assert backend.image_path(vid).stat().st_blocks == 0  # sparse
    assert backend.create(vid, "pvc-1", 64 * MiB, {"other": "x"}) == info  # existing: unchanged
    restarted = StandaloneBackend(tmp_path / "state")
    assert restarted.get(vid) == info and [v.volume_id for v in restarted.list()] == [vid]


def test_metadata_updates_are_atomic_files(backend: StandaloneBackend) -> None:
    vid = backend.volume_id_for("pvc-m")
    backend.create(vid, "pvc-m", MiB, {})
    backend.set_metadata(vid, "csi-luks/state", "prepared")
    backend.set_metadata(vid, "csi-luks/state", "encrypted")
    backend.remove_metadata(vid, "absent")
    assert backend.get(vid).metadata == {"csi-luks/state": "encrypted"}
    backend.remove_metadata(vid, "csi-luks/state")
    assert backend.get(vid).metadata == {}
    leftovers = [p.name for p in backend.image_path(vid).parent.iterdir() if p.name.startswith(".meta")]
    assert leftovers == []


def test_resize_grows_and_never_shrinks(backend: StandaloneBackend) -> None:
    vid = backend.volume_id_for("pvc-r")
    backend.create(vid, "pvc-r", 10 * MiB, {})
    assert backend.resize(vid, 20 * MiB) == 20 * MiB
    assert backend.resize(vid, 5 * MiB) == 20 * MiB
    assert backend.get(vid).size_bytes == 20 * MiB


def test_ids_that_are_not_ours_are_never_paths(backend: StandaloneBackend, tmp_path: Path) -> None:
    for bad in ("../../etc", "sa-../x", "/etc/passwd", ""):
        with pytest.raises(VolumeNotFound):
            backend.get(bad)
        backend.delete(bad)  # a no-op, not an error
    assert (tmp_path / "state").exists() is False


def test_crash_before_the_image_is_finished_by_a_retry(backend: StandaloneBackend) -> None:
    vid = backend.volume_id_for("pvc-crash")
    backend.create(vid, "pvc-crash", 8 * MiB, {})
    backend.image_path(vid).unlink()  # as if the process died right after writing meta.json
    with pytest.raises(VolumeNotFound):
        backend.get(vid)
    assert backend.list() == []
    assert backend.create(vid, "pvc-crash", 8 * MiB, {}).size_bytes == 8 * MiB


def test_torn_directory_without_metadata_is_not_a_volume(backend: StandaloneBackend) -> None:
    vid = backend.volume_id_for("pvc-torn")
    backend.create(vid, "pvc-torn", MiB, {})
    (backend.image_path(vid).parent / META).unlink()
    assert backend.list() == []
    with pytest.raises(VolumeNotFound):
        backend.get(vid)
    backend.delete(vid)
    assert not backend.image_path(vid).parent.exists()


def test_delete_refuses_an_attached_volume(backend: StandaloneBackend) -> None:
    vid = backend.volume_id_for("pvc-att")
    backend.create(vid, "pvc-att", MiB, {})
    device = backend.attach(vid)
    assert backend.attach(vid) == device == backend.find_attachment(vid)
    with pytest.raises(VolumeInUse):
        backend.delete(vid)
    backend.detach(vid)
    backend.detach(vid)
    backend.delete(vid)
    backend.delete(vid)
    assert backend.list() == []


def test_free_bytes(backend: StandaloneBackend) -> None:
    assert (backend.free_bytes() or 0) > 0

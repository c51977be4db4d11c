"""StandaloneBackend on real files; this host has no loop devices, so losetup is faked (real: tests/vm)."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from csi_luks.system.loop import LoopDevices
from csi_luks.volumes.base import (
    BackendUnavailable,
    CapacityOutOfRange,
    VolumeBackendError,
    VolumeInUse,
    VolumeNotFound,
)
from csi_luks.volumes.standalone import IMAGE, META, StandaloneBackend, write_streamed_atomically

MiB = 1024 * 1024


class FakeLoops(LoopDevices):
    """The kernel's loop table in memory; records every call the backend makes."""

    def __init__(self) -> None:
        super().__init__()
        self.attached: dict[str, str] = {}  # backing file -> device
        self.calls: list[tuple[str, str]] = []
        self.on_find: list[Callable[[], None]] = []  # run (once each) inside the next find()

    def find(self, backing_file: str) -> str | None:
        self.calls.append(("find", backing_file))
        while self.on_find:
            self.on_find.pop(0)()
        return self.attached.get(backing_file)

    def attach(self, backing_file: str) -> str:
        self.calls.append(("attach", backing_file))
        return self.attached.setdefault(backing_file, f"/dev/loop{len(self.attached)}")

    def detach(self, device: str) -> None:
        self.calls.append(("detach", device))
        self.attached = {k: v for k, v in self.attached.items() if v != device}

    def refresh_size(self, device: str) -> None:
        self.calls.append(("refresh_size", device))


@pytest.fixture
def loops() -> FakeLoops:
    return FakeLoops()


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def backend(state: Path, loops: FakeLoops) -> StandaloneBackend:
    return StandaloneBackend(state, loops=loops)


def new_volume(backend: StandaloneBackend, name: str, size: int = 8 * MiB, **metadata: str) -> str:
    volume_id = backend.volume_id_for(name, {})
    backend.create(volume_id, name, size, metadata)
    return volume_id


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --- ids ----------------------------------------------------------------------------------------------


def test_ids_are_deterministic_distinct_and_stable_across_instances(backend: StandaloneBackend) -> None:
    one, two = backend.volume_id_for("pvc-1", {}), backend.volume_id_for("pvc-2", {})
    elsewhere = StandaloneBackend("/elsewhere")
    assert one == backend.volume_id_for("pvc-1", {}) == elsewhere.volume_id_for("pvc-1", {})
    assert one != two
    assert one.startswith("sa-") and len(one) == len("sa-") + 36
    # Pinned: ids of existing volumes must never change (the namespace is fixed forever).
    assert one == "sa-4fd28303-60cc-5c45-9ec9-88aa2727201c"


BAD_IDS = [
    "../../etc",
    "sa-../../etc",
    "/etc/passwd",
    "",
    "volumes",
    "sa-6F1C1E52-4B0E-5C8E-9F5E-3F1D2A7C9B10",  # uppercase: not what volume_id_for makes
    "sa-6f1c1e52-4b0e-5c8e-9f5e-3f1d2a7c9b10\n",  # a trailing newline must not pass a "$" check
    "sa-6f1c1e52-4b0e-5c8e-9f5e-3f1d2a7c9b10/../../x",
]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_ids_that_are_not_ours_are_not_found_and_never_paths(
    backend: StandaloneBackend, loops: FakeLoops, state: Path, bad: str
) -> None:
    for call in (
        lambda: backend.get(bad),
        lambda: backend.create(bad, "x", MiB, {}),
        lambda: backend.resize(bad, 2 * MiB),
        lambda: backend.set_metadata(bad, "k", "v"),
        lambda: backend.remove_metadata(bad, "k"),
        lambda: backend.attach(bad),
    ):
        with pytest.raises(VolumeNotFound):
            call()
    backend.delete(bad)  # nothing to delete: not an error
    assert backend.find_attachment(bad) is None
    backend.detach(bad)
    backend.refresh_attachment_size(bad)
    assert loops.calls == []  # no path was ever built from the id, not even for losetup
    assert not state.exists()


# --- create, get, list --------------------------------------------------------------------------------


def test_create_lays_out_a_sparse_image_and_metadata(backend: StandaloneBackend, state: Path) -> None:
    volume_id = backend.volume_id_for("pvc-1", {})
    info = backend.create(volume_id, "pvc-1", 64 * MiB, {"k": "v"})
    assert (info.volume_id, info.name, info.size_bytes, info.metadata) == (
        volume_id,
        "pvc-1",
        64 * MiB,
        {"k": "v"},
    )
    directory = state / "volumes" / volume_id
    assert backend.image_path(volume_id) == directory / IMAGE
    image = os.stat(directory / IMAGE)
    assert image.st_size == 64 * MiB and image.st_blocks == 0  # sparse: no space used yet
    meta = json.loads((directory / META).read_text())
    assert (meta["name"], meta["metadata"]) == ("pvc-1", {"k": "v"})
    # The image and metadata are the plugin's only: DEKs (local KMS) and plaintext live there.
    assert stat.S_IMODE(os.stat(directory / META).st_mode) == 0o600
    assert stat.S_IMODE(image.st_mode) == 0o600
    assert backend.get(volume_id) == info


def test_create_is_idempotent_and_returns_an_existing_volume_unchanged(backend: StandaloneBackend) -> None:
    volume_id = backend.volume_id_for("pvc-1", {})
    info = backend.create(volume_id, "pvc-1", 16 * MiB, {"k": "v"})
    backend.set_metadata(volume_id, "state", "prepared")
    again = backend.create(volume_id, "pvc-1", 32 * MiB, {"other": "x"})
    assert again == backend.get(volume_id)
    assert (again.size_bytes, again.metadata) == (info.size_bytes, {"k": "v", "state": "prepared"})


def test_create_refuses_a_size_that_is_not_positive(backend: StandaloneBackend, state: Path) -> None:
    for size in (0, -1):
        with pytest.raises(ValueError, match="positive"):
            backend.create(backend.volume_id_for("pvc-0", {}), "pvc-0", size, {})
    assert not state.exists()


def test_list_is_sorted_by_id_and_survives_a_restart(backend: StandaloneBackend, state: Path) -> None:
    assert backend.list() == []  # no state directory yet: no volumes, not an error
    ids = [new_volume(backend, f"pvc-{i}", MiB * (i + 1), n=str(i)) for i in range(5)]
    listed = backend.list()
    assert [v.volume_id for v in listed] == sorted(ids)
    restarted = StandaloneBackend(state, loops=FakeLoops())
    assert restarted.list() == listed
    assert all(restarted.get(v.volume_id) == v for v in listed)


def test_get_of_a_missing_volume(backend: StandaloneBackend) -> None:
    with pytest.raises(VolumeNotFound):
        backend.get(backend.volume_id_for("never-created", {}))
    new_volume(backend, "pvc-1")
    with pytest.raises(VolumeNotFound):
        backend.get(backend.volume_id_for("never-created", {}))


# --- resize -------------------------------------------------------------------------------------------


def test_resize_grows_and_never_shrinks(backend: StandaloneBackend) -> None:
    volume_id = new_volume(backend, "pvc-r", 10 * MiB)
    assert backend.resize(volume_id, 20 * MiB) == 20 * MiB
    assert backend.get(volume_id).size_bytes == 20 * MiB
    assert backend.resize(volume_id, 5 * MiB) == 20 * MiB
    assert backend.resize(volume_id, 20 * MiB) == 20 * MiB
    assert backend.get(volume_id).size_bytes == 20 * MiB
    assert backend.image_path(volume_id).stat().st_blocks == 0  # still sparse
    with pytest.raises(VolumeNotFound):
        backend.resize(backend.volume_id_for("never-created", {}), 20 * MiB)


def test_a_refused_grow_leaves_the_recorded_size_as_it_was(
    backend: StandaloneBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    volume_id = new_volume(backend, "pvc-refused", 10 * MiB)
    meta = backend.image_path(volume_id).parent / META

    def too_large(image: Path, size: int) -> int:
        raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr(StandaloneBackend, "_grow_image", staticmethod(too_large))
    with pytest.raises(CapacityOutOfRange):
        backend.resize(volume_id, 20 * MiB)
    assert json.loads(meta.read_text())["size"] == 10 * MiB  # a later, smaller resize is not held to it
    monkeypatch.undo()
    assert backend.resize(volume_id, 12 * MiB) == 12 * MiB


def test_capacities_beyond_the_file_system_are_refused_without_a_trace(
    backend: StandaloneBackend, state: Path
) -> None:
    backend.check_capacity(64 * MiB)
    for size in (1024**5, 2**63 - 1, 2**63):
        with pytest.raises(CapacityOutOfRange):
            backend.check_capacity(size)
    assert not state.exists() or files_in(state) == []


# --- metadata -----------------------------------------------------------------------------------------


def test_metadata_set_and_remove_survive_a_restart(
    backend: StandaloneBackend, state: Path, loops: FakeLoops
) -> None:
    volume_id = new_volume(backend, "pvc-m", k="v")
    backend.set_metadata(volume_id, "csi-luks/state", "prepared")
    backend.set_metadata(volume_id, "csi-luks/state", "encrypted")
    backend.set_metadata(volume_id, "dek", "wrapped")
    backend.remove_metadata(volume_id, "absent")  # not an error
    backend.remove_metadata(volume_id, "k")
    restarted = StandaloneBackend(state, loops=loops)
    assert restarted.get(volume_id).metadata == {"csi-luks/state": "encrypted", "dek": "wrapped"}
    restarted.remove_metadata(volume_id, "dek")
    assert StandaloneBackend(state, loops=loops).get(volume_id).metadata == {"csi-luks/state": "encrypted"}
    missing = backend.volume_id_for("never-created", {})
    with pytest.raises(VolumeNotFound):
        backend.set_metadata(missing, "k", "v")
    with pytest.raises(VolumeNotFound):
        backend.remove_metadata(missing, "k")


def test_metadata_writes_leave_no_temporary_files(backend: StandaloneBackend, state: Path) -> None:
    volume_id = new_volume(backend, "pvc-m")
    for i in range(5):
        backend.set_metadata(volume_id, f"k{i}", "v")
        backend.remove_metadata(volume_id, f"k{i}")
    backend.resize(volume_id, 16 * MiB)
    assert files_in(state / "volumes" / volume_id) == [".lock", META, IMAGE]


def test_a_failed_metadata_write_keeps_the_old_file(
    backend: StandaloneBackend, state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    volume_id = new_volume(backend, "pvc-m", k="old")
    before = (state / "volumes" / volume_id / META).read_bytes()

    def crash(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(BackendUnavailable, match=META):
        backend.set_metadata(volume_id, "k", "new")
    monkeypatch.undo()
    assert (state / "volumes" / volume_id / META).read_bytes() == before
    assert backend.get(volume_id).metadata == {"k": "old"}
    assert files_in(state / "volumes" / volume_id) == [".lock", META, IMAGE]


def test_concurrent_metadata_updates_from_separate_instances_lose_nothing(state: Path) -> None:
    """Each thread stands for a process (controller, node) with its own instance: flock serialises them."""
    volume_id = new_volume(StandaloneBackend(state, loops=FakeLoops()), "pvc-c")
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        mine = StandaloneBackend(state, loops=FakeLoops())
        try:
            for i in range(15):
                mine.set_metadata(volume_id, f"w{n}-{i}", str(i))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    metadata = StandaloneBackend(state, loops=FakeLoops()).get(volume_id).metadata
    assert metadata == {f"w{n}-{i}": str(i) for n in range(6) for i in range(15)}


# --- delete -------------------------------------------------------------------------------------------


def test_delete_removes_everything_and_is_idempotent(backend: StandaloneBackend, state: Path) -> None:
    keep = new_volume(backend, "pvc-keep")
    volume_id = new_volume(backend, "pvc-d", k="v")
    backend.delete(volume_id)
    assert not (state / "volumes" / volume_id).exists()
    assert files_in(state / "volumes") == [keep]  # no trash left behind
    backend.delete(volume_id)
    StandaloneBackend(state, loops=FakeLoops()).delete(volume_id)
    with pytest.raises(VolumeNotFound):
        backend.get(volume_id)
    assert [v.volume_id for v in backend.list()] == [keep]
    # The name can be used again, for a new, empty volume.
    assert backend.create(volume_id, "pvc-d", MiB, {}).metadata == {}


def test_delete_refuses_an_attached_volume(backend: StandaloneBackend, loops: FakeLoops) -> None:
    volume_id = new_volume(backend, "pvc-att")
    device = backend.attach(volume_id)
    with pytest.raises(VolumeInUse, match=device):
        backend.delete(volume_id)
    assert backend.get(volume_id).name == "pvc-att"  # untouched
    backend.detach(volume_id)
    backend.delete(volume_id)
    assert backend.list() == []


def test_a_crash_during_delete_leaves_trash_that_the_next_delete_sweeps(
    backend: StandaloneBackend, state: Path
) -> None:
    volume_id = new_volume(backend, "pvc-d")
    trash = state / "volumes" / f".deleted-{volume_id}.deadbeef"
    (state / "volumes" / volume_id).rename(trash)  # as if the process died right after the rename
    assert backend.list() == []
    with pytest.raises(VolumeNotFound):
        backend.get(volume_id)
    backend.delete(volume_id)  # the retry
    assert files_in(state / "volumes") == []


def test_a_delete_does_not_scan_the_other_volumes(
    backend: StandaloneBackend, state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its cost must not grow with the number of volumes: only a retry looks for left-over trash."""
    others = [new_volume(backend, f"pvc-other-{i}") for i in range(3)]
    volume_id = new_volume(backend, "pvc-d")
    scanned: list[str] = []
    scandir = os.scandir

    def recording(path: str | int) -> Iterator[os.DirEntry[str]]:
        if not isinstance(path, int):  # rmtree scans the trash by file descriptor
            scanned.append(os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", recording)
    backend.delete(volume_id)
    assert scanned == []
    assert sorted(files_in(state / "volumes")) == sorted(others)  # its own trash is gone too
    backend.delete(volume_id)  # the retry sweeps
    assert scanned == [str(state / "volumes")]


def test_a_metadata_update_waiting_on_a_delete_does_not_resurrect_the_volume(
    backend: StandaloneBackend, loops: FakeLoops, state: Path
) -> None:
    volume_id = new_volume(backend, "pvc-race")
    outcome: list[BaseException | None] = []

    def other_process() -> None:
        try:
            StandaloneBackend(state, loops=FakeLoops()).set_metadata(volume_id, "k", "v")
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=other_process)

    def start_waiter_while_delete_holds_the_lock() -> None:
        waiter.start()
        time.sleep(0.3)  # let it block on the volume's lock

    loops.on_find.append(start_waiter_while_delete_holds_the_lock)  # delete calls find under the lock
    backend.delete(volume_id)
    waiter.join()
    assert len(outcome) == 1 and isinstance(outcome[0], VolumeNotFound)
    assert files_in(state / "volumes") == []


# --- crashes during create ----------------------------------------------------------------------------


def test_a_crash_after_the_metadata_before_the_image_is_completed_by_a_retry(
    backend: StandaloneBackend, state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    volume_id = backend.volume_id_for("pvc-crash", {})

    class Crash(BaseException):
        pass

    def die(self: object, *args: object) -> None:
        raise Crash

    monkeypatch.setattr(StandaloneBackend, "_make_image", die)
    with pytest.raises(Crash):
        backend.create(volume_id, "pvc-crash", 8 * MiB, {"k": "v"})
    monkeypatch.undo()
    directory = state / "volumes" / volume_id
    assert (directory / META).exists() and not (directory / IMAGE).exists()
    # Half a volume is no volume: not found, not listed, no metadata to change.
    with pytest.raises(VolumeNotFound):
        backend.get(volume_id)
    assert backend.list() == []
    with pytest.raises(VolumeNotFound):
        backend.set_metadata(volume_id, "k", "x")
    info = backend.create(volume_id, "pvc-crash", 8 * MiB, {"k": "v"})
    assert (info.size_bytes, info.metadata) == (8 * MiB, {"k": "v"})
    assert [v.volume_id for v in backend.list()] == [volume_id]


def test_a_half_written_image_and_its_leftovers_are_completed(
    backend: StandaloneBackend, state: Path
) -> None:
    """By hand, the states an older or interrupted create can leave: a short image, a stray temp image."""
    volume_id = backend.volume_id_for("pvc-short", {})
    directory = state / "volumes" / volume_id
    directory.mkdir(parents=True)
    (directory / META).write_text(json.dumps({"name": "pvc-short", "size": 8 * MiB, "metadata": {"k": "v"}}))
    (directory / IMAGE).write_bytes(b"")
    assert backend.create(volume_id, "pvc-short", 8 * MiB, {"k": "v"}).size_bytes == 8 * MiB

    volume_id = backend.volume_id_for("pvc-stray", {})
    directory = state / "volumes" / volume_id
    directory.mkdir(parents=True)
    (directory / META).write_text(json.dumps({"name": "pvc-stray", "metadata": {}}))  # no "size": older file
    (directory / f".{IMAGE}.abc123").write_bytes(b"partial")
    assert backend.create(volume_id, "pvc-stray", 4 * MiB, {}).size_bytes == 4 * MiB
    assert files_in(directory) == [".lock", META, IMAGE]


def test_a_torn_directory_without_metadata_is_not_a_volume(backend: StandaloneBackend, state: Path) -> None:
    volume_id = backend.volume_id_for("pvc-torn", {})
    directory = state / "volumes" / volume_id
    directory.mkdir(parents=True)
    (directory / IMAGE).write_bytes(b"old data from who knows where")
    assert backend.list() == []
    with pytest.raises(VolumeNotFound):
        backend.get(volume_id)
    # A create over it starts afresh: a leftover image is never handed out as a new volume.
    info = backend.create(volume_id, "pvc-torn", MiB, {})
    assert info.size_bytes == MiB
    assert (directory / IMAGE).read_bytes() == bytes(MiB)
    backend.delete(volume_id)
    directory.mkdir()  # torn again, empty this time: delete removes it too
    backend.delete(volume_id)
    assert not directory.exists()


def test_corrupt_metadata_is_an_error_for_get_and_skipped_by_list(
    backend: StandaloneBackend, state: Path
) -> None:
    good, bad = new_volume(backend, "pvc-good"), new_volume(backend, "pvc-bad")
    (state / "volumes" / bad / META).write_text("{not json")
    with pytest.raises(VolumeBackendError, match=META):
        backend.get(bad)
    assert [v.volume_id for v in backend.list()] == [good]


# --- attachment (delegated to losetup, faked here) ----------------------------------------------------


def test_attach_find_detach_and_refresh_delegate_to_the_loop_table(
    backend: StandaloneBackend, loops: FakeLoops, state: Path
) -> None:
    volume_id = new_volume(backend, "pvc-a")
    image = str(state / "volumes" / volume_id / IMAGE)
    assert backend.find_attachment(volume_id) is None
    backend.detach(volume_id)  # not attached: nothing to do
    backend.refresh_attachment_size(volume_id)
    assert [c for c in loops.calls if c[0] != "find"] == []

    device = backend.attach(volume_id)
    assert loops.calls[-1] == ("attach", image)
    assert backend.attach(volume_id) == device
    # A new instance (a restarted plugin) finds it from the loop table, not from memory.
    restarted = StandaloneBackend(state, loops=loops)
    assert restarted.find_attachment(volume_id) == device
    restarted.refresh_attachment_size(volume_id)
    assert loops.calls[-1] == ("refresh_size", device)
    restarted.detach(volume_id)
    assert loops.calls[-1] == ("detach", device)
    assert backend.find_attachment(volume_id) is None


def test_attach_of_a_missing_volume_does_not_touch_losetup(
    backend: StandaloneBackend, loops: FakeLoops
) -> None:
    with pytest.raises(VolumeNotFound):
        backend.attach(backend.volume_id_for("never-created", {}))
    assert loops.calls == []


def test_a_relative_state_dir_gives_losetup_absolute_paths(
    tmp_path: Path, loops: FakeLoops, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    backend = StandaloneBackend("state", loops=loops)
    volume_id = new_volume(backend, "pvc-rel")
    backend.attach(volume_id)
    assert loops.calls[-1] == ("attach", str(tmp_path / "state" / "volumes" / volume_id / IMAGE))


# --- the state directory ------------------------------------------------------------------------------


def test_free_bytes(backend: StandaloneBackend, state: Path, loops: FakeLoops) -> None:
    assert (backend.free_bytes() or 0) > 0  # before the state directory exists
    new_volume(backend, "pvc-1")
    assert (backend.free_bytes() or 0) > 0


def test_a_state_dir_that_cannot_exist_is_unavailable(tmp_path: Path, loops: FakeLoops) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    backend = StandaloneBackend(blocker / "state", loops=loops)
    volume_id = backend.volume_id_for("pvc-1", {})
    with pytest.raises(BackendUnavailable, match=str(blocker)):
        backend.create(volume_id, "pvc-1", MiB, {})
    with pytest.raises(BackendUnavailable, match=str(blocker)):
        backend.list()
    with pytest.raises(BackendUnavailable, match=str(blocker)):
        backend.get(volume_id)
    with pytest.raises(BackendUnavailable, match=str(blocker)):
        backend.set_metadata(volume_id, "k", "v")
    with pytest.raises(BackendUnavailable, match=str(blocker)):
        backend.free_bytes()
    with pytest.raises(BackendUnavailable):
        StandaloneBackend(tmp_path / "missing" / "deeper" / "state", loops=loops).free_bytes()


# --- a file written from chunks, past the page cache (header backups) -------------------------------


def _chunks_of(data: bytes, sizes: list[int]) -> Iterator[bytes]:
    offset = 0
    for size in sizes:
        yield data[offset : offset + size]
        offset += size


@pytest.mark.parametrize(
    "sizes",
    [
        [1 << 20] * 3,  # whole pages: direct writes
        [4096, 1 << 20, 100, (2 << 20) - 4196],  # a chunk of no whole page: buffered from there
        [(3 << 20) + 5000],  # one chunk bigger than the writer's buffer, not page-aligned at its end
    ],
)
def test_a_streamed_write_holds_exactly_its_chunks(tmp_path: Path, sizes: list[int]) -> None:
    data = os.urandom(sum(sizes))
    path = tmp_path / "header.backup"
    path.write_bytes(b"older")
    write_streamed_atomically(path, _chunks_of(data, sizes))
    assert path.read_bytes() == data
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["header.backup"]  # no temporary file left


def test_a_stream_that_fails_midway_leaves_the_older_file(tmp_path: Path) -> None:
    path = tmp_path / "header.backup"
    path.write_bytes(b"older")

    def failing() -> Iterator[bytes]:
        yield bytes(1 << 20)
        raise OSError(errno.EIO, "the device failed")

    with pytest.raises(OSError, match="the device failed"):
        write_streamed_atomically(path, failing())
    assert path.read_bytes() == b"older"
    assert [p.name for p in tmp_path.iterdir()] == ["header.backup"]


# --- never written: the proof that lets a first stage skip its probe -------------------------------


def test_never_written_is_proven_only_for_a_device_over_this_very_image(state: Path, tmp_path: Path) -> None:
    """Real loop devices: a sparse image is never written; one with a byte written is not; and a loop
    device left over a deleted image (whose name a new, empty image now has) proves nothing."""
    backend = StandaloneBackend(state)
    volume_id = new_volume(backend, "pvc-proof")
    device = backend.attach(volume_id)
    try:
        assert backend.never_written(volume_id, device) is True
        with open(device, "r+b") as f:  # through the device: the flush must bring it to the image
            f.write(b"x")
        assert backend.never_written(volume_id, device) is False
        image = backend.image_path(volume_id)
        os.unlink(image)  # the old image, still held by the loop device
        with image.open("wb") as f:
            f.truncate(8 * MiB)
        assert backend.never_written(volume_id, device) is False
        assert backend.attach(volume_id) == device  # what attach finds for the new image: the old one's
        other = subprocess.run(["losetup", "--find", "--show", str(image)],  # the new image's own device
                               capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
        try:
            assert backend.never_written(volume_id, other) is True
        finally:
            LoopDevices().detach(other)
    finally:
        LoopDevices().detach(device)

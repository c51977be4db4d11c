"""Node side, inside a guest with dm-crypt (run as root): NodeStage/NodeUnstage vs the raw commands.

Three flows over the same kind of volume (a sparse image on a loop device, LUKS2, ext4), timed here:
- the plugin: NodeStageVolume (first: attach, luksFormat, open, mkfs, mount; again: attach, open,
  mount) and NodeUnstageVolume, over gRPC;
- raw: the same commands by hand, with the plugin's own luksFormat flags;
- Ceph-CSI: the raw commands with Ceph-CSI's luksFormat flags (argon2id, 32 MiB, time-benchmarked).
Then 16 first stages at once against a node plugin process (`serve --mode node`, as a DaemonSet runs it)
in a cgroup of its own: memory.peak counts the plugin and every command it runs; against the same 16
stages by hand, side by side in one cgroup.

In the guest (--ram-disk) every image is on ext4 over a RAM block device (brd), not on the guest's
tmpfs: brd's pages are charged to no cgroup, as a disk's blocks would not be, and the loop devices do
direct I/O there (as the plugin's do on any filesystem that allows it), so the images' bytes are not in
the page cache either: memory.peak counts processes, not storage.

The three flows take their samples in turn (one round of each, then the next), so that load from
elsewhere on the machine falls on all three alike.

Beside the ratios, a breakdown (bench/breakdown.py): the median of each of the plugin's steps and the
processes inside them (timing.py, read in this process), against the median of each raw command.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import grpc

from bench.breakdown import GRPC, TOTAL, FlowTimes, call_parts, render_all
from bench.table import Row, Target
from csi_luks import timing
from csi_luks.csi import csi_pb2, csi_pb2_grpc
from csi_luks.luks.options import FormatOptions
from csi_luks.settings import Mode
from csi_luks.system.loop import _opens_for_direct_io
from tests.support.plugin import MiB, RunningPlugin, mount_capability, running_plugin

RAW = Target("ratio", "<=", 1.1)
CEPH_CSI = Target("ratio", "<=", 0.35)
MEMORY = Target("ratio", "<=", 1.5)
ENCRYPTED = {"encrypted": "true", "encryptionKMSID": "local-1"}
KEY = b"0123456789abcdef0123456789abcdef0123456789a"  # a DEK-shaped passphrase for the raw flows
CEPH_CSI_FLAGS = ("--type", "luks2", "--hash", "sha256", "--pbkdf", "argon2id", "--pbkdf-memory", "32768")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def plugin_format_flags() -> list[str]:
    """The luksFormat flags csi-luks passes by default (cryptsetup.py's format), for the raw flow."""
    options = FormatOptions()
    return ["--type", "luks2", "--cipher", options.cipher, "--key-size",
            str(options.key_size), "--hash", options.hash, *options.pbkdf_args(),
            "--key-slot", str(options.key_slot)]  # fmt: skip


def _run(
    argv: Sequence[str],
    stdin: bytes | None = None,
    times: dict[str, float] | None = None,
    name: str = "",
    cgroup: Path | None = None,
) -> str:
    """Run a command; with times, its wall time is added there under name (the command's own by default);
    with cgroup, the command runs in that cgroup (a shell joins it, then becomes the command)."""
    started = time.perf_counter()
    command = list(argv)
    if cgroup is not None:
        command = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(cgroup / "cgroup.procs"), *command]
    out = subprocess.run(command, input=stdin, capture_output=True, check=True).stdout.decode().strip()
    if times is not None:
        key = name or argv[0]
        times[key] = times.get(key, 0.0) + time.perf_counter() - started
    return out


@dataclass
class RawVolume:
    """One image staged by hand: the commands NodeStage/NodeUnstage run, without the plugin."""

    image: Path
    target: Path
    name: str
    format_flags: Sequence[str]
    device: str = ""
    # The last stage's or unstage's commands: wall seconds by command.
    times: dict[str, float] = field(default_factory=dict)
    cgroup: Path | None = None  # where the commands run, if not in this process's cgroup

    def stage(self, first: bool) -> None:
        self.times = times = dict[str, float]()
        run = partial(_run, times=times, cgroup=self.cgroup)
        # Direct I/O where the image's filesystem allows it, as the plugin's losetup (system/loop.py).
        direct_io = ["--direct-io=on"] if _opens_for_direct_io(str(self.image)) else []
        self.device = run(["losetup", "--find", "--show", *direct_io, str(self.image)], name="losetup --find")
        if first:
            flags = ["--batch-mode", *self.format_flags, "--key-file=-"]
            run(["cryptsetup", "luksFormat", *flags, self.device], KEY, name="cryptsetup luksFormat")
        run(["cryptsetup", "open", "--type", "luks2", "--disable-keyring", "--key-file=-", self.device,
             self.name], KEY, name="cryptsetup open")  # fmt: skip
        if first:
            run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                 f"/dev/mapper/{self.name}"])  # fmt: skip
        self.target.mkdir(parents=True, exist_ok=True)
        run(["mount", "-t", "ext4", f"/dev/mapper/{self.name}", str(self.target)])

    def unstage(self) -> None:
        self.times = times = dict[str, float]()
        _run(["umount", str(self.target)], times=times)
        _run(["cryptsetup", "close", self.name], times=times, name="cryptsetup close")
        _run(["losetup", "--detach", self.device], times=times, name="losetup --detach")


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def _timed(action: Callable[..., object], *args: object) -> float:
    started = time.perf_counter()
    action(*args)
    return time.perf_counter() - started


PHASES = ("first", "again", "unstage")
ROUND = ("first", "unstage", "again", "unstage")  # what each sample of a flow does to its volume


@dataclass
class Flow:
    """One flow's wall times by phase (first stage, stage again, unstage) and their parts by phase."""

    times: dict[str, list[float]] = field(default_factory=lambda: {phase: [] for phase in PHASES})
    parts: dict[str, FlowTimes] = field(default_factory=lambda: {phase: FlowTimes() for phase in PHASES})

    def add(self, phase: str, seconds: float, parts: dict[str, float]) -> None:
        self.times[phase].append(seconds)
        self.parts[phase].add({**parts, TOTAL: seconds})

    def medians_ms(self) -> dict[str, float]:
        return {phase: _median_ms(values) for phase, values in self.times.items()}


def raw_round(flow: Flow, scratch: Path, label: str, flags: Sequence[str], size: int, i: int) -> None:
    """One sample: first stage, unstage, stage again, unstage, by hand with these luksFormat flags; each
    command timed."""
    image = scratch / f"{label}-{i}.img"
    with image.open("wb") as f:
        f.truncate(size)
    volume = RawVolume(image, scratch / f"{label}-{i}-mnt", f"bench-{label}-{i}", flags)
    actions: dict[str, Callable[[], None]] = {
        "first": partial(volume.stage, True),
        "again": partial(volume.stage, False),
        "unstage": volume.unstage,
    }
    for phase in ROUND:
        seconds = _timed(actions[phase])
        flow.add(phase, seconds, volume.times)
    image.unlink()


def _stage(plugin: csi_pb2_grpc.NodeStub, volume_id: str, staging: Path) -> None:
    plugin.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
        volume_id=volume_id, staging_target_path=str(staging), volume_capability=mount_capability(),
    ))  # fmt: skip


def _unstage(plugin: csi_pb2_grpc.NodeStub, volume_id: str, staging: Path) -> None:
    plugin.NodeUnstageVolume(
        csi_pb2.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=str(staging))
    )


def plugin_round(flow: Flow, plugin: RunningPlugin, scratch: Path, size: int, i: int) -> None:
    """The same over gRPC; each call's steps as the plugin (in this process) timed them."""
    volume_id = plugin.create(f"bench-node-{i}", size, ENCRYPTED).volume_id
    staging = scratch / f"plugin-{i}-staging"
    for phase in ROUND:
        call = _unstage if phase == "unstage" else _stage
        with timing.collecting() as calls:
            seconds = _timed(call, plugin.node, volume_id, staging)
        (timed,) = calls
        flow.add(phase, seconds, {**call_parts(timed), GRPC: seconds - timed.seconds})
    plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id))


def interleaved_flows(
    plugin: RunningPlugin, scratch: Path, size: int, samples: int
) -> tuple[Flow, Flow, Flow]:
    """The plugin's, the raw and the Ceph-CSI-flags flows, one round of each in turn, `samples` times:
    a spell of load from elsewhere on the machine then slows the three alike, not one flow's samples."""
    ours, raw, ceph = Flow(), Flow(), Flow()
    for i in range(samples):
        plugin_round(ours, plugin, scratch, size, i)
        raw_round(raw, scratch, "raw", plugin_format_flags(), size, i)
        raw_round(ceph, scratch, "ceph", CEPH_CSI_FLAGS, size, i)
    return ours, raw, ceph


@contextlib.contextmanager
def memory_cgroup(name: str) -> Iterator[Path]:
    """A cgroup v2 group with the memory controller (cgroup2 is mounted first if the guest has not)."""
    if not (CGROUP_ROOT / "cgroup.controllers").exists():
        _run(["mount", "-t", "cgroup2", "cgroup2", str(CGROUP_ROOT)])
    (CGROUP_ROOT / "cgroup.subtree_control").write_text("+memory")
    group = CGROUP_ROOT / name
    group.mkdir(exist_ok=True)
    try:
        yield group
    finally:
        for _ in range(50):  # the last processes may take a moment to leave
            with contextlib.suppress(OSError):
                group.rmdir()
                break
            time.sleep(0.1)


def concurrent_first_stages(scratch: Path, count: int, size: int) -> tuple[float, float]:
    """memory.peak (MiB) of a node plugin process and its children while `count` first stages run at
    once, and the seconds they took together."""
    volume_ids = []
    with running_plugin(scratch / "concurrent", mode=Mode.CONTROLLER) as creator:
        for i in range(count):
            volume_ids.append(creator.create(f"bench-concurrent-{i}", size, ENCRYPTED).volume_id)
            _allocate(creator.backend.image_path(volume_ids[-1]), size)
    root = scratch / "concurrent"
    socket = root / "node.sock"
    with memory_cgroup("csi-luks-bench") as group:
        # The shell joins the cgroup, then becomes the plugin: every child it starts is counted too.
        command = (f'echo $$ > {group / "cgroup.procs"} && exec {sys.executable} -m csi_luks.cli '
                   f"--log-level warning serve --mode node --endpoint unix://{socket} --node-id bench "
                   f"--state-dir {root / 'state'} --kms-config {root / 'kms-config.json'}")  # fmt: skip
        process = subprocess.Popen(["sh", "-c", command], stdin=subprocess.DEVNULL)
        try:
            with grpc.insecure_channel(f"unix://{socket}") as channel:
                # A fresh interpreter under TCG beside a loaded host takes minutes to import the plugin.
                grpc.channel_ready_future(channel).result(timeout=900)
                ready = int((group / "memory.current").read_text()) / MiB
                print(
                    f"node: the plugin, ready, before any stage: memory.current {ready:.0f} MiB",
                    file=sys.stderr,
                )
                node = csi_pb2_grpc.NodeStub(channel)
                started = time.perf_counter()
                _all_at_once(
                    "concurrent stages",
                    [
                        partial(_stage, node, v, scratch / f"concurrent-{i}-staging")
                        for i, v in enumerate(volume_ids)
                    ],
                )
                seconds = time.perf_counter() - started
                peak = _peak(group, "the plugin")
                for i, volume_id in enumerate(volume_ids):
                    _unstage(node, volume_id, scratch / f"concurrent-{i}-staging")
        finally:
            process.terminate()
            process.wait(30)
    return peak, seconds


def concurrent_raw_first_stages(scratch: Path, count: int, size: int) -> tuple[float, float]:
    """memory.peak (MiB) of `count` first stages by hand (the raw flow's commands), side by side in one
    cgroup: the reference for the plugin's; and the seconds they took together."""
    volumes = []
    for i in range(count):
        image = scratch / f"raw-concurrent-{i}.img"
        with image.open("wb") as f:
            f.truncate(size)
        _allocate(image, size)
        volumes.append(RawVolume(image, scratch / f"raw-concurrent-{i}-mnt", f"bench-raw-c-{i}",
                                 plugin_format_flags()))  # fmt: skip
    with memory_cgroup("csi-luks-bench-raw") as group:
        for volume in volumes:
            volume.cgroup = group
        started = time.perf_counter()
        _all_at_once("raw concurrent stages", [partial(volume.stage, True) for volume in volumes])
        seconds = time.perf_counter() - started
        peak = _peak(group, "the raw commands")
        for volume in volumes:
            volume.cgroup = None
            volume.unstage()
            volume.image.unlink()
    return peak, seconds


def _all_at_once(what: str, actions: list[Callable[[], object]]) -> None:
    """Run every action in a thread of its own, all at once; RuntimeError if any failed."""
    errors: list[BaseException] = []

    def run(action: Callable[[], object]) -> None:
        try:
            action()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(action,)) for action in actions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(actions)} {what} failed: {errors[0]}")


def _allocate(image: Path, size: int) -> None:
    """Allocate the image's blocks here, outside any measured cgroup: on a tmpfs (a guest without
    --ram-disk) its pages are charged to the cgroup that first writes them, and the storage's own bytes
    would count as the stages' memory (on a node they are a disk's, not RAM). On a disk, no page."""
    with open(image, "r+b") as f:
        os.posix_fallocate(f.fileno(), 0, size)


def _peak(group: Path, what: str) -> float:
    """The group's memory.peak in MiB; what it holds now, by kind, printed beside it."""
    peak = int((group / "memory.peak").read_text()) / MiB
    # What the group holds now, all stages done: which kind of memory the peak was made of.
    stat = dict(line.split() for line in (group / "memory.stat").read_text().splitlines())
    kinds = [kind for kind in ("anon", "file", "shmem", "kernel") if kind in stat]
    held = ", ".join(f"{kind} {int(stat[kind]) / MiB:.0f}" for kind in kinds)
    print(f"node: {what}: memory.peak {peak:.0f} MiB; after the stages (MiB): {held}", file=sys.stderr)
    return peak


@contextlib.contextmanager
def ram_disk_scratch(size_mib: int) -> Iterator[Path]:
    """A scratch directory on ext4 over a RAM block device (brd, /dev/ram0; mounted with discard, so a
    deleted image's blocks go back): a block device, whose pages no cgroup is charged for."""
    _run(["modprobe", "brd", "rd_nr=1", f"rd_size={size_mib * 1024}"])
    try:
        _run(["mkfs.ext4", "-q", "-F", "/dev/ram0"])
        with tempfile.TemporaryDirectory(prefix="csi-luks-bench-disk-") as name:
            _run(["mount", "-o", "discard", "/dev/ram0", name])
            try:
                yield Path(name)
            finally:
                _cleanup(["umount", name])
    finally:
        _cleanup(["rmmod", "brd"])


def _cleanup(argv: list[str]) -> None:
    """A clean-up command whose failure (something still holds the disk) must not lose the figures."""
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(f"node: {' '.join(argv)} failed: {done.stderr.strip()}", file=sys.stderr)


TITLES = {"first": "NodeStage, first", "again": "NodeStage, again", "unstage": "NodeUnstage"}


def breakdown(ours: Flow, raw: Flow) -> str:
    """The plugin's steps beside the raw commands, phase by phase (medians)."""
    return render_all((TITLES[phase], ours.parts[phase], raw.parts[phase]) for phase in PHASES)


def measure(
    size_mib: int = 64,
    samples: int = 7,
    concurrent: int = 16,
    notes: list[str] | None = None,
    ram_disk: bool = False,
) -> list[Row]:
    """The rows of the table; with notes, the breakdown is appended there for printing beside it.
    ram_disk: the images on ext4 over a brd RAM disk made here (in the guest), not in /tmp."""
    size = size_mib * MiB
    # Room for the 16 concurrent images (their raw and plugin sides one after the other), and ext4's own.
    disk = ram_disk_scratch(concurrent * size_mib + 512) if ram_disk else contextlib.nullcontext(None)
    with disk as under, tempfile.TemporaryDirectory(prefix="csi-luks-bench-node-", dir=under) as name:
        scratch = Path(name)
        with running_plugin(scratch / "plugin", mode=Mode.ALL) as plugin:
            plugin_times, raw_times, ceph_times = interleaved_flows(plugin, scratch, size, samples)
        ceph = ceph_times.medians_ms()
        raw_peak, raw_seconds = concurrent_raw_first_stages(scratch, concurrent, size)
        peak, seconds = concurrent_first_stages(scratch, concurrent, size)
    if notes is not None:
        notes.append(breakdown(plugin_times, raw_times))
    ours, raw = plugin_times.medians_ms(), raw_times.medians_ms()
    rows = []
    for step in PHASES:
        title = TITLES[step]
        rows.append(Row(title, ours[step], "ms", raw[step], "raw commands", RAW))
        if step != "unstage":  # no KDF runs in an unstage: nothing for Ceph-CSI's flags to change
            rows.append(Row(title, ours[step], "ms", ceph[step], "Ceph-CSI luksFormat flags", CEPH_CSI))
    rows.append(Row(f"{concurrent} concurrent first NodeStage: memory.peak", peak, "MiB", raw_peak,
                    f"the {concurrent} raw flows, one cgroup", MEMORY))  # fmt: skip
    # No target: what the node's bound on concurrent PBKDFs (--max-concurrent-kdfs) costs such a burst.
    rows.append(Row(f"{concurrent} concurrent first NodeStage: wall time", seconds * 1000, "ms",
                    raw_seconds * 1000, f"the {concurrent} raw flows"))  # fmt: skip
    return rows

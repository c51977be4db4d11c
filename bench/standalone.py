"""The standalone backend: CreateVolume/DeleteVolume latency and start-to-ready, at few and many volumes.

Each figure at `many` existing volumes is compared with the same figure at `few`: the targets say they
must not grow with the number of volumes (a ratio of about 1; the bound leaves room for noise).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from bench.table import Row, Target
from csi_luks.csi import csi_pb2, csi_pb2_grpc
from csi_luks.settings import Mode
from tests.support.plugin import RunningPlugin, running_plugin

FLAT = Target("ratio", "<=", 1.5)  # "does not grow": noise on a shared machine easily makes 1.2x
ENCRYPTED = {"encrypted": "true", "encryptionKMSID": "local-1"}


def _pair_latency(plugin: RunningPlugin, name: str) -> tuple[float, float]:
    """CreateVolume and DeleteVolume latency (s) of one new encrypted volume."""
    started = time.perf_counter()
    volume = plugin.create(name, parameters=ENCRYPTED)
    created = time.perf_counter()
    plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))
    return created - started, time.perf_counter() - created


def _populate(plugin: RunningPlugin, upto: int) -> None:
    have = len(plugin.backend.list())
    for i in range(have, upto):
        plugin.create(f"existing-{i}", parameters=ENCRYPTED)


def start_to_ready(root: Path, attempt: int) -> float:
    """Seconds from starting `csi-luks serve` (a new process, controller mode) until Probe says ready."""
    socket = root / f"start-{attempt}.sock"
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "csi_luks.cli", "--log-level", "warning", "serve", "--mode", "controller",
         "--endpoint", f"unix://{socket}", "--state-dir", str(root / "state"),
         "--kms-config", str(root / "kms-config.json"), "--node-id", "bench"],
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        return _wait_ready(socket, started, process)
    finally:
        process.terminate()
        process.wait(30)


def _wait_ready(socket: Path, started: float, process: subprocess.Popen[bytes], timeout: float = 60) -> float:
    while time.perf_counter() - started < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"the plugin exited with {process.returncode} before it was ready")
        if socket.exists():
            with grpc.insecure_channel(f"unix://{socket}") as channel:
                try:
                    probe = csi_pb2_grpc.IdentityStub(channel).Probe(csi_pb2.ProbeRequest(), timeout=5)
                    if probe.ready.value:
                        return time.perf_counter() - started
                except grpc.RpcError:
                    pass
        time.sleep(0.005)
    raise RuntimeError(f"the plugin was not ready within {timeout:g}s")


def measure(few: int = 10, many: int = 1000, samples: int = 30, starts: int = 5) -> list[Row]:
    """Two state directories, with `few` and with `many` volumes, measured in alternation (a burst of load
    from elsewhere hits both alike); each figure is the median of its samples."""
    with tempfile.TemporaryDirectory(prefix="csi-luks-bench-standalone-") as scratch:
        root = Path(scratch)
        latency: dict[str, tuple[list[float], list[float]]] = {"few": ([], []), "many": ([], [])}
        with (
            running_plugin(root / "few", mode=Mode.CONTROLLER) as small,
            running_plugin(root / "many", mode=Mode.CONTROLLER) as large,
        ):
            _populate(small, few)
            _populate(large, many)
            for i in range(samples):
                for label, plugin in (("few", small), ("many", large)):
                    create, delete = _pair_latency(plugin, f"probe-{i}")
                    latency[label][0].append(create)
                    latency[label][1].append(delete)
        (root / "empty").mkdir()
        ready: dict[str, list[float]] = {"empty": [], "many": []}
        for attempt in range(starts):
            for label in ready:
                ready[label].append(start_to_ready(root / label, attempt))
    create_few, delete_few = (statistics.median(v) * 1000 for v in latency["few"])
    create_many, delete_many = (statistics.median(v) * 1000 for v in latency["many"])
    return [
        Row(f"standalone CreateVolume, {many} volumes", create_many, "ms",
            reference=create_few, reference_name=f"{few} volumes", target=FLAT),
        Row(f"standalone DeleteVolume, {many} volumes", delete_many, "ms",
            reference=delete_few, reference_name=f"{few} volumes", target=FLAT),
        Row(f"plugin start to ready, {many} volumes", statistics.median(ready["many"]), "s",
            reference=statistics.median(ready["empty"]), reference_name="0 volumes", target=FLAT),
    ]  # fmt: skip

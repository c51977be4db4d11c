"""The `metadata` KMS's key derivations under a burst: 32 concurrent CreateVolume calls, peak RSS.

Each CreateVolume with the `metadata` KMS derives its volume's wrapping key with scrypt (32 MiB a call);
Ceph-CSI's controller, which derives without a bound, is OOM-killed by bursts of creates
(ceph/ceph-csi#3472). Two `csi-luks serve --mode controller` processes on the standalone backend (no
device-mapper needed), one with the default `--max-concurrent-kdfs` and one with 32 slots (no bound
below the gRPC pool's 16 workers), each get one CreateVolume, then 32 at once. The figure is the
process's peak RSS (VmHWM in /proc/PID/status) after the burst, against its peak after the one call.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc

from bench.standalone import _wait_ready
from bench.table import Row, Target
from csi_luks.csi import csi_pb2, csi_pb2_grpc
from csi_luks.kms.kdf import DEFAULT_MAX_KDFS
from tests.support.plugin import MiB, mount_capability

KMS_ID = "meta"
PARAMETERS = {"encrypted": "true", "encryptionKMSID": KMS_ID}
SECRETS = {"encryptionPassphrase": "bench passphrase"}  # the request's secrets: no Kubernetes needed
UNBOUNDED = 32  # slots enough for every call of the burst: the gRPC pool's 16 workers are the bound
# The bound's promise: the burst holds at most (slots - 1) derivations more than one call does, 32 MiB
# each, plus room for the concurrent calls' own objects and noise.
BOUNDED = Target("value", "<=", (DEFAULT_MAX_KDFS - 1) * 32 + 48)


@dataclass(frozen=True)
class Burst:
    """One controller's figures: peak RSS (MiB) after start, after one call, after the burst; its time."""

    slots: int
    idle_mib: float
    one_mib: float
    burst_mib: float
    burst_seconds: float


def peak_rss_mib(pid: int) -> float:
    """VmHWM: the most resident memory the process has had (its own, not its children's)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


def _create(controller: csi_pb2_grpc.ControllerStub, name: str) -> None:
    controller.CreateVolume(csi_pb2.CreateVolumeRequest(
        name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB),
        volume_capabilities=[mount_capability()], parameters=PARAMETERS, secrets=SECRETS,
    ), timeout=600)  # fmt: skip


def burst(root: Path, slots: int, calls: int) -> Burst:
    """Start a controller with `slots` derivation slots; one CreateVolume, then `calls` at once."""
    root.mkdir(parents=True)
    (root / "kms-config.json").write_text(json.dumps({KMS_ID: {"encryptionKMSType": "metadata"}}))
    socket = root / "csi.sock"
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "csi_luks.cli", "--log-level", "warning", "serve", "--mode", "controller",
         "--endpoint", f"unix://{socket}", "--state-dir", str(root / "state"),
         "--kms-config", str(root / "kms-config.json"), "--node-id", "bench",
         "--max-concurrent-kdfs", str(slots)],
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_ready(socket, started, process, timeout=300)
        idle = peak_rss_mib(process.pid)
        with grpc.insecure_channel(f"unix://{socket}") as channel:
            controller = csi_pb2_grpc.ControllerStub(channel)
            _create(controller, "one")
            one = peak_rss_mib(process.pid)
            began = time.perf_counter()
            with ThreadPoolExecutor(max_workers=calls) as pool:
                list(pool.map(lambda i: _create(controller, f"burst-{i}"), range(calls)))
            seconds = time.perf_counter() - began
        return Burst(slots, idle, one, peak_rss_mib(process.pid), seconds)
    finally:
        process.terminate()
        process.wait(30)


def measure(calls: int = 32) -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="csi-luks-bench-kdf-") as scratch:
        bounded = burst(Path(scratch) / "bounded", DEFAULT_MAX_KDFS, calls)
        unbounded = burst(Path(scratch) / "unbounded", UNBOUNDED, calls)
    print(
        f"kdf: peak RSS after start {bounded.idle_mib:.0f} / {unbounded.idle_mib:.0f} MiB, after one "
        f"CreateVolume {bounded.one_mib:.0f} / {unbounded.one_mib:.0f} MiB ({bounded.slots} / "
        f"{unbounded.slots} slots)",
        file=sys.stderr,
    )
    title = f"{calls} concurrent CreateVolume (metadata KMS)"
    return [
        Row(f"{title}: peak RSS, {bounded.slots} KDF slots", bounded.burst_mib, "MiB",
            bounded.one_mib, "one call"),
        Row(f"{title}: peak RSS, {unbounded.slots} KDF slots", unbounded.burst_mib, "MiB",
            unbounded.one_mib, "one call"),
        Row(f"{title}: peak RSS above one call, {bounded.slots} KDF slots",
            bounded.burst_mib - bounded.one_mib, "MiB", unbounded.burst_mib - unbounded.one_mib,
            f"{unbounded.slots} slots", BOUNDED),
        Row(f"{title}: wall time, {bounded.slots} KDF slots", bounded.burst_seconds, "s",
            unbounded.burst_seconds, f"{unbounded.slots} slots"),
    ]  # fmt: skip

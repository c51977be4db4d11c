"""Prometheus metrics of one plugin server: its calls, cryptsetup and KMS calls, staged volumes, readiness.

Each server has a registry of its own rather than prometheus_client's global one, so several servers in
one process (the tests) do not count into each other. Label values are method names, status codes,
operation names, step names (literals in the code), program names (the fixed set the plugin runs), KMS
types and exception class names, never request fields: no secret and no volume id can reach a scrape.

prometheus_client (and the HTTP server under it) is imported when a PluginMetrics is made: a plugin
without --metrics-address uses only this module's mapping helpers and does not carry it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import grpc

from csi_luks.luks.naming import MAPPER_PREFIX
from csi_luks.readiness import ReadinessCheck
from csi_luks.timing import OTHER, CallTiming
from csi_luks.volumes.base import VolumeBackend, VolumeBackendError
from csi_luks.volumes.rbd_chain import FLATTENS

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

log = logging.getLogger(__name__)

# CSI calls range from a millisecond (Probe) to minutes (a copy, mkfs of a large volume).
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_STEP_BUCKETS = (0.0005, 0.001, 0.0025, *_BUCKETS)

STAGE = "/csi.v1.Node/NodeStageVolume"
UNSTAGE = "/csi.v1.Node/NodeUnstageVolume"
MAPPER_DIR = "/dev/mapper"


class PluginMetrics:
    """The metrics, the observers that feed them, and the HTTP endpoint that serves them."""

    def __init__(
        self,
        readiness: ReadinessCheck,
        staged: Iterable[str] = (),
        stale_mappings: Callable[[], int] | None = None,
    ) -> None:
        """staged: the volume ids already staged when the server starts (see staged_at_start);
        stale_mappings: counts the node's stale mappings (luks/stale.py), asked at each scrape."""
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self._staged = set(staged)
        self._staged_lock = threading.Lock()
        self._http: tuple[WSGIServer, threading.Thread] | None = None
        self._requests = Counter(
            "csi_luks_grpc_requests", "gRPC calls handled, by method and status code",
            ["method", "code"], registry=self.registry,
        )  # fmt: skip
        self._request_seconds = Histogram(
            "csi_luks_grpc_request_duration_seconds", "gRPC call latency, by method and status code",
            ["method", "code"], buckets=_BUCKETS, registry=self.registry,
        )  # fmt: skip
        # Steps and processes take from a fraction of a millisecond (a sysfs read) to minutes (mkfs).
        self._step_seconds = Histogram(
            "csi_luks_step_duration_seconds",
            "time of each step of a call (timing.py), by method and step; `other` is what no step covers",
            ["method", "step"], buckets=_STEP_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self._process_seconds = Histogram(
            "csi_luks_process_duration_seconds", "wall time of each process a call ran, by method, program",
            ["method", "program"], buckets=_STEP_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self._cryptsetup_seconds = Histogram(
            "csi_luks_cryptsetup_duration_seconds", "cryptsetup call duration, by operation",
            ["operation"], buckets=_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self._cryptsetup_failures = Counter(
            "csi_luks_cryptsetup_failures", "failed cryptsetup calls, by operation and error",
            ["operation", "error"], registry=self.registry,
        )  # fmt: skip
        self._kms_seconds = Histogram(
            "csi_luks_kms_duration_seconds",
            "KMS and DEK store call duration, by KMS type and operation (wrap, unwrap, store, fetch, remove)",
            ["kms_type", "operation"], buckets=_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self._kms_failures = Counter(
            "csi_luks_kms_failures", "failed KMS and DEK store calls, by KMS type, operation and error",
            ["kms_type", "operation", "error"], registry=self.registry,
        )  # fmt: skip
        Gauge("csi_luks_volumes_staged", "volumes staged on this node", registry=self.registry).set_function(
            self._staged_count
        )
        Gauge(
            "csi_luks_ready",
            "1 when the plugin can work on this machine (what Probe answers), else 0",
            registry=self.registry,
        ).set_function(lambda: 1.0 if (latest := readiness.latest) is not None and latest.ready else 0.0)
        Gauge(
            "csi_luks_rbd_flattens_running",
            "RBD clones this process flattens in the background (their chain grew past the soft depth)",
            registry=self.registry,
        ).set_function(lambda: float(len(FLATTENS.running())))
        if stale_mappings is not None:
            # Counted anew at each scrape from sysfs (no process): always the current count.
            Gauge(
                "csi_luks_stale_mappings",
                "dm-crypt mappings of this node's volumes whose backing device is gone (unstage them)",
                registry=self.registry,
            ).set_function(lambda: float(stale_mappings()))

    # --- observers ---------------------------------------------------------------------------------

    def call_finished(
        self, method: str, code: grpc.StatusCode, seconds: float, volume_id: str | None
    ) -> None:
        self._requests.labels(method, code.name).inc()
        self._request_seconds.labels(method, code.name).observe(seconds)
        if code is grpc.StatusCode.OK and volume_id:
            with self._staged_lock:
                if method == STAGE:
                    self._staged.add(volume_id)
                elif method == UNSTAGE:
                    self._staged.discard(volume_id)

    def call_timed(self, timing: CallTiming) -> None:
        """A call's breakdown: each top-level step (a step run twice is observed twice), the rest as
        `other`, and each process it ran wherever it ran."""
        for span in timing.steps:
            self._step_seconds.labels(timing.method, span.name).observe(span.seconds)
        self._step_seconds.labels(timing.method, OTHER).observe(timing.breakdown()[OTHER])
        for span in timing.steps:
            for process in [span] if span.process else span.processes():
                self._process_seconds.labels(timing.method, process.name).observe(process.seconds)

    def cryptsetup_call(self, operation: str, seconds: float, error: BaseException | None) -> None:
        self._cryptsetup_seconds.labels(operation).observe(seconds)
        if error is not None:
            self._cryptsetup_failures.labels(operation, type(error).__name__).inc()

    def kms_call(self, kms_type: str, operation: str, seconds: float, error: BaseException | None) -> None:
        self._kms_seconds.labels(kms_type, operation).observe(seconds)
        if error is not None:
            self._kms_failures.labels(kms_type, operation, type(error).__name__).inc()

    def _staged_count(self) -> float:
        with self._staged_lock:
            return float(len(self._staged))

    # --- endpoint ----------------------------------------------------------------------------------

    def serve(self, host: str, port: int) -> None:
        """Serve /metrics over HTTP on host:port, in a thread of its own."""
        from prometheus_client import start_http_server

        server, thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = (server, thread)
        log.info("metrics on http://%s:%d/metrics", host, server.server_port)

    def stop(self) -> None:
        if self._http is None:
            return
        server, thread = self._http
        server.shutdown()
        server.server_close()
        thread.join()
        self._http = None


def staged_at_start(backend: VolumeBackend, mapper_dir: str = MAPPER_DIR) -> list[str]:
    """The volumes of this backend with an open dm-crypt mapping: what a restarted node plugin had staged.

    Mappings are named after volume ids (luks/naming.py); names that are not ids of this backend (a host's
    own luks-UUID disk) are not ours. Unencrypted volumes have no mapping and count from their next stage.
    """
    try:
        names = os.listdir(mapper_dir)
    except OSError:
        return []
    return sorted(name[len(MAPPER_PREFIX) :] for name in names if is_volume_mapping(backend, name))


def is_volume_mapping(backend: VolumeBackend, name: str) -> bool:
    """Whether a mapping name is that of a volume of this backend (luks/naming.py), not a host's own disk."""
    if not name.startswith(MAPPER_PREFIX):
        return False
    try:
        backend.check_id(name[len(MAPPER_PREFIX) :])
    except VolumeBackendError:
        return False
    return True

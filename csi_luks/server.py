"""The gRPC server on a unix socket: service wiring, logging and error mapping, clean shutdown."""

from __future__ import annotations

import contextlib
import functools
import grp
import logging
import os
import signal
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from csi_luks import __version__
from csi_luks.csi import csi_pb2, csi_pb2_grpc
from csi_luks.csiaddons.encryptionkeyrotation_pb2_grpc import (
    add_EncryptionKeyRotationControllerServicer_to_server as add_key_rotation_servicer,
)
from csi_luks.csiaddons.identity_pb2_grpc import (
    add_IdentityServicer_to_server as add_addons_identity_servicer,
)
from csi_luks.csiaddons.reclaimspace_pb2_grpc import (
    add_ReclaimSpaceControllerServicer_to_server,
    add_ReclaimSpaceNodeServicer_to_server,
)
from csi_luks.errors import capped, status_for
from csi_luks.kms import kdf
from csi_luks.kms.config import KMSConfig
from csi_luks.locks import OperationLocks
from csi_luks.logs import CALL_FIELDS, new_request_id, request_scope
from csi_luks.luks import Cryptsetup
from csi_luks.luks.stale import StaleMappings
from csi_luks.metrics import PluginMetrics, is_volume_mapping, staged_at_start
from csi_luks.readiness import ReadinessCheck
from csi_luks.services.csiaddons_identity import CsiAddonsIdentityService
from csi_luks.services.identity import IdentityService
from csi_luks.services.node import NodeService
from csi_luks.services.reclaim_space import ReclaimSpaceControllerService, ReclaimSpaceNodeService
from csi_luks.services.rotation import EncryptionKeyRotationService
from csi_luks.services.sanitize import sanitized
from csi_luks.settings import Backend, Settings
from csi_luks.system.filesystem import Filesystems
from csi_luks.timing import CallTiming, timed_call
from csi_luks.volumes.base import VolumeBackend
from csi_luks.volumes.ceph_clusters import CephClusters, read_secrets, sweep_stale_key_dirs
from csi_luks.volumes.standalone import StandaloneBackend

log = logging.getLogger(__name__)


class ServerError(Exception):
    """The server cannot start (socket in use, bad permissions, ...)."""


class _CallInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Logs each unary call (secrets stripped), maps exceptions to gRPC codes, counts calls: in one place."""

    def __init__(self, metrics: PluginMetrics | None) -> None:
        self._metrics = metrics

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        method: str = details.method
        inner = handler.unary_unary

        def behavior(request: Any, context: grpc.ServicerContext) -> Any:
            request_id = new_request_id()
            with request_scope(request_id):
                return self._call(method, inner, request, context, request_id)

        return grpc.unary_unary_rpc_method_handler(
            behavior,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _call(
        self, method: str, inner: Callable[[Any, Any], Any], request: Any, context: Any, request_id: str
    ) -> Any:
        started = time.monotonic()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("[%s] %s request: %s", request_id, method, sanitized(request))
        timing = CallTiming(method, _volume_id(request, None))
        try:
            with timed_call(timing):
                response = inner(request, context)
        except Exception as exc:
            code, message = status_for(exc)
            message = capped(message)
            elapsed = time.monotonic() - started
            volume_id = _volume_id(request, None)
            self._timed(request_id, code, timing)
            self._finished(method, code, elapsed, volume_id)
            fields = _call_fields(method, code, elapsed, volume_id)
            if code == grpc.StatusCode.INTERNAL:
                log.exception(
                    "[%s] %s failed after %.3fs: %s", request_id, method, elapsed, message, extra=fields
                )
            else:
                log.warning(
                    "[%s] %s -> %s after %.3fs: %s", request_id, method, code.name, elapsed, message,
                    extra=fields,
                )  # fmt: skip
            context.abort(code, message)  # raises: the call ends here with that status
            raise
        elapsed = time.monotonic() - started
        volume_id = _volume_id(request, response)
        timing.subject = volume_id
        self._timed(request_id, grpc.StatusCode.OK, timing)
        self._finished(method, grpc.StatusCode.OK, elapsed, volume_id)
        log.info(
            "[%s] %s -> OK in %.3fs", request_id, method, elapsed,
            extra=_call_fields(method, grpc.StatusCode.OK, elapsed, volume_id),
        )  # fmt: skip
        return response

    def _timed(self, request_id: str, code: grpc.StatusCode, timing: CallTiming) -> None:
        """Where the call's time went (timing.py): one debug line, and the step histograms."""
        if not timing.steps:
            return
        if log.isEnabledFor(logging.DEBUG):
            log.debug("[%s] %s -> %s", request_id, timing.render(), code.name)
        if self._metrics is not None:
            self._metrics.call_timed(timing)

    def _finished(self, method: str, code: grpc.StatusCode, elapsed: float, volume_id: str | None) -> None:
        if self._metrics is not None:
            self._metrics.call_finished(method, code, elapsed, volume_id)


def _volume_id(request: Any, response: Any) -> str | None:
    """The volume a call is about: the request's volume id, a snapshot's source, a new volume's id."""
    fields = request.DESCRIPTOR.fields_by_name
    for name in ("volume_id", "source_volume_id"):
        if name in fields and getattr(request, name):
            return str(getattr(request, name))
    if response is not None and "volume" in response.DESCRIPTOR.fields_by_name:
        return str(response.volume.volume_id) or None
    return None


def _call_fields(
    method: str, code: grpc.StatusCode, elapsed: float, volume_id: str | None
) -> dict[str, object]:
    """What the JSON log line of a call carries besides its message (logs.py)."""
    return {
        CALL_FIELDS: {
            "method": method,
            "volume_id": volume_id,
            "code": code.name,
            "duration_ms": round(elapsed * 1000, 3),
        }
    }


def _remove_stale_socket(path: str) -> None:
    """Remove a socket left by a dead plugin; refuse if one is alive or the path is not a socket."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ServerError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        log.info("removed stale socket %s", path)
        return
    finally:
        probe.close()
    raise ServerError(f"another process is serving on {path}")


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _backend(settings: Settings) -> VolumeBackend:
    if settings.backend is Backend.RBD:
        # Imported only here: librbd, librados and pyudev are megabytes a standalone plugin never uses.
        from csi_luks.volumes.rbd import RbdBackend

        sweep_stale_key_dirs()  # a SIGKILLed predecessor may have left a cephx key file behind
        clusters = CephClusters(settings.ceph_config)
        return RbdBackend(clusters, settings.state_dir, ceph_csi_instance=settings.ceph_csi_instance_id)
    return StandaloneBackend(settings.state_dir)


class PluginServer:
    """The plugin's gRPC server; start(), then wait_for_termination() or stop()."""

    def __init__(
        self,
        settings: Settings,
        cryptsetup: Cryptsetup | None = None,
        backend: VolumeBackend | None = None,
    ) -> None:
        self.settings = settings
        self.cryptsetup = cryptsetup or Cryptsetup(kdf_slots=kdf.SLOTS)  # the KMS's derivations' slots
        self.backend = backend or _backend(settings)
        self.kms_config = KMSConfig.from_file(settings.kms_config, settings.kms_config_map_ref)
        self.locks = OperationLocks()
        kdf.SLOTS.set_limit(settings.max_kdfs)  # process-wide: every KMS instance derives through them
        self.readiness = ReadinessCheck(self.cryptsetup, needs_device_mapper=settings.mode.runs_node)
        self.health = health.HealthServicer()
        self.stale_mappings = StaleMappings(is_ours=functools.partial(is_volume_mapping, self.backend))
        self.metrics: PluginMetrics | None = None
        if settings.metrics_address is not None:
            runs_node = settings.mode.runs_node
            self.metrics = PluginMetrics(
                self.readiness,
                staged_at_start(self.backend) if runs_node else [],
                (lambda: len(self.stale_mappings.find())) if runs_node else None,
            )
            self.cryptsetup.observer = self.metrics.cryptsetup_call
            self.kms_config.observer = self.metrics.kms_call
        self._server: grpc.Server | None = None
        self._stopped = threading.Event()
        self.flatten_scan: threading.Thread | None = None  # resume_owed_flattens's, while it runs

    def _plugin_capabilities(self) -> list[csi_pb2.PluginCapability]:
        # Advertise only what this process actually serves.
        capabilities = [
            csi_pb2.PluginCapability(
                volume_expansion=csi_pb2.PluginCapability.VolumeExpansion(
                    type=csi_pb2.PluginCapability.VolumeExpansion.ONLINE
                )
            )
        ]
        if self.settings.mode.runs_controller:
            capabilities.append(
                csi_pb2.PluginCapability(
                    service=csi_pb2.PluginCapability.Service(
                        type=csi_pb2.PluginCapability.Service.CONTROLLER_SERVICE
                    )
                )
            )
        return capabilities

    def start(self) -> None:
        path = self.settings.socket_path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        _remove_stale_socket(path)
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.settings.workers, thread_name_prefix="csi"),
            interceptors=[_CallInterceptor(self.metrics)],
        )
        csi_pb2_grpc.add_IdentityServicer_to_server(
            IdentityService(
                self.settings.driver_name, __version__, self._plugin_capabilities(), self.readiness
            ),
            server,
        )
        services = ["", "csi.v1.Identity", "identity.Identity"]
        add_addons_identity_servicer(
            CsiAddonsIdentityService(
                self.settings.driver_name,
                __version__,
                controller=self.settings.mode.runs_controller,
                node=self.settings.mode.runs_node,
                readiness=self.readiness,
            ),
            server,
        )
        if self.settings.mode.runs_controller:
            # Imported here: a node plugin runs no controller and need not hold its code.
            from csi_luks.services.controller import ControllerService

            self.controller = ControllerService(
                self.backend, self.kms_config, self.locks, max_copies=self.settings.max_copies
            )
            csi_pb2_grpc.add_ControllerServicer_to_server(self.controller, server)
            services.append("csi.v1.Controller")
            add_ReclaimSpaceControllerServicer_to_server(
                ReclaimSpaceControllerService(self.backend, self.locks), server
            )
            services.append("reclaimspace.ReclaimSpaceController")
        if self.settings.mode.runs_node:
            csi_pb2_grpc.add_NodeServicer_to_server(
                NodeService(
                    self.settings.node_id,
                    self.backend,
                    self.kms_config,
                    self.locks,
                    self.cryptsetup,
                    Filesystems(self.cryptsetup.runner),
                    self.stale_mappings,
                ),
                server,
            )
            services.append("csi.v1.Node")
            rotation = EncryptionKeyRotationService(
                self.backend, self.kms_config, self.locks, self.cryptsetup
            )
            add_key_rotation_servicer(rotation, server)
            services.append("encryptionkeyrotation.EncryptionKeyRotationController")
            add_ReclaimSpaceNodeServicer_to_server(
                ReclaimSpaceNodeService(
                    self.backend, self.locks, self.cryptsetup, Filesystems(self.cryptsetup.runner)
                ),
                server,
            )
            services.append("reclaimspace.ReclaimSpaceNode")
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        # Created 0600 from the first instant: a umask, not a chmod after the fact, closes the window.
        with _umask(0o177):
            if server.add_insecure_port(f"unix://{os.path.abspath(path)}") == 0:
                raise ServerError(f"cannot bind {path}")
            server.start()
        self._secure_socket(path)
        self._server = server
        if self.metrics is not None:
            host, port = self.settings.metrics_endpoint
            try:
                self.metrics.serve(host, port)
            except OSError as exc:  # stop() removes the socket
                raise ServerError(f"cannot serve metrics on {self.settings.metrics_address}: {exc}") from None
        for service in services:
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "csi-luks %s serving %s as %s (node %s, mode %s)",
            __version__, path, self.settings.driver_name, self.settings.node_id, self.settings.mode.value,
        )  # fmt: skip
        self.readiness.check()
        if self.settings.mode.runs_node:
            self.warn_of_stale_mappings()
        if self.settings.mode.runs_controller:
            self.flatten_scan = self.resume_owed_flattens()

    def resume_owed_flattens(self) -> threading.Thread | None:
        """RBD: resume the background flattens a stopped plugin left owed (volumes/rbd_chain), in a thread
        of their own: a slow or unreachable cluster must not hold up the start. Needs --ceph-secrets."""
        if self.settings.backend is not Backend.RBD:
            return None  # without importing the RBD module (see _backend) only to find it unused
        from csi_luks.volumes.rbd import RbdBackend

        backend, secrets = self.backend, self.settings.ceph_secrets
        if not isinstance(backend, RbdBackend):
            return None
        if not secrets:
            log.info(
                "no --ceph-secrets: a flatten a stopped plugin left owed resumes when its image is next read"
            )
            return None

        def scan() -> None:
            started = time.monotonic()
            try:
                resumed = backend.for_request(read_secrets(secrets), one_request=False).resume_owed_flattens()
            except Exception as exc:  # the plugin serves on: each owed flatten resumes when its image is read
                log.warning(
                    "owed RBD flattens not looked for (%s): each resumes when its image is next read", exc
                )
                return
            log.info("owed RBD flattens looked for in %.1fs: %s", time.monotonic() - started,
                     f"resumed {', '.join(resumed)}" if resumed else "none")  # fmt: skip

        thread = threading.Thread(target=scan, name="resume owed flattens", daemon=True)
        thread.start()
        return thread

    def warn_of_stale_mappings(self) -> None:
        """Name each stale mapping in the log at start: a restarted node finds what it left behind."""
        for stale in self.stale_mappings.find():
            log.warning("%s (NodeGetVolumeStats reports it as abnormal)", stale.message)

    def _secure_socket(self, path: str) -> None:
        group = self.settings.socket_group
        if group is None:
            os.chmod(path, 0o600)
            return
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise ServerError(f"socket group {group!r} does not exist") from None
        os.chown(path, -1, gid)
        os.chmod(path, 0o660)

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls, let in-flight calls finish within the grace period, remove the socket."""
        if self._server is None or self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        grace = self.settings.grace_period if grace is None else grace
        log.info("shutting down; in-flight calls get up to %.0fs to finish", grace)
        self._server.stop(grace).wait()
        if self.metrics is not None:
            self.metrics.stop()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.settings.socket_path)
        log.info("stopped")

    def serve_until_signalled(self) -> None:
        """Start, then block until SIGTERM or SIGINT, then stop cleanly."""
        signalled = threading.Event()

        def on_signal(signum: int, _frame: object) -> None:
            log.info("received %s", signal.Signals(signum).name)
            signalled.set()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            # A timed wait: a signal that the kernel delivers to one of gRPC's threads does not wake a
            # main thread blocked for good in a lock, and Python runs handlers only in the main thread.
            while not signalled.wait(timeout=0.5):
                pass
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

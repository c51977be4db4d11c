"""`csi-luks serve` as a real process (its stderr captured), spoken to over its unix socket by gRPC stubs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

from csi_luks.csi import csi_pb2, csi_pb2_grpc


class Plugin:
    def __init__(self, proc: subprocess.Popen[str], sock: Path) -> None:
        self.proc = proc
        self.sock = sock
        self.channel = grpc.insecure_channel(f"unix://{sock}")
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.controller = csi_pb2_grpc.ControllerStub(self.channel)

    def terminate(self, timeout: float = 30) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        try:
            _, stderr = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            # PYTHONFAULTHANDLER (set by serve) makes SIGABRT print every thread's stack: say where it hung.
            self.proc.send_signal(signal.SIGABRT)
            _, stderr = self.proc.communicate()
            raise AssertionError(f"the plugin did not stop within {timeout}s of SIGTERM:\n{stderr}") from None
        self.channel.close()
        return self.proc.returncode, stderr


def _accepts(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


@contextmanager
def serve(sock: Path | str, *args: str, env: dict[str, str] | None = None) -> Iterator[Plugin]:
    endpoint = str(sock)
    path = Path(endpoint.removeprefix("unix://"))
    private = ["--state-dir", str(path.parent / "state"), "--kms-config", str(path.parent / "kms.json")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "csi_luks.cli", "serve", "--endpoint", endpoint, *private, *args],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONFAULTHANDLER": "1", **(env or {})},
    )
    try:
        # Wait for the socket to accept connections before making the channel: a channel made earlier
        # backs off exponentially between reconnects, which on a loaded machine outlasts any deadline.
        deadline = time.monotonic() + 60
        while not _accepts(path):
            if proc.poll() is not None:
                raise AssertionError(
                    f"the plugin exited {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"the plugin did not open {path} within 60s")
            time.sleep(0.05)
        plugin = Plugin(proc, path)
        plugin.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=30, wait_for_ready=True)
        yield plugin
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

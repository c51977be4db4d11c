"""`csi-luks serve` as separate controller and node processes, started the way deploy/ starts them.

The command line and the environment come from the csi-luks container of controller.yaml and node-plugin.yaml
in deploy/kustomize/base, so a flag or variable changed there changes what the real-client tests run.
Only what names a place on a real node is replaced: the endpoint, the state directory, the cluster list,
and (where the test has no Kubernetes API) the KMS ConfigMap, by a KMS configuration file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.support import serve_process
from tests.support.serve_process import ServeProcess

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
    running: ServeProcess

    @property
    def process(self) -> subprocess.Popen[str]:
        return self.running.proc

    def log_tail(self, limit: int = 4000) -> str:
        return f"--- {self.role} plugin log ({self.log}) ---\n{self.running.output(limit)}"

    def stop(self) -> None:
        self.running.stop()


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
    try:
        running = serve_process.start(argv, socket_path, child_env, log=log, ready_timeout=START_TIMEOUT)
    except AssertionError as exc:
        raise RuntimeError(f"csi-luks {role}: {exc}") from None
    return PluginProcess(role, socket_path, log, running)


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

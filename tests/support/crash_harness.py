"""The crash-point registry, derived from the code, and which harness case reaches which point.

Every `Step("<operation>", "<step>")` (points `<operation>.before-<step>` and `.after-<step>`) and every
`crash_point("<operation>.<when>-<step>")` under csi_luks/ is found with `ast`; the harnesses
(tests/host/test_crash_points_controller.py, tests/vm/test_crash_points_node.py, and the rotation and
migration matrices) run their cases from the tables here, and tests/unit/test_crash_points.py checks
that the tables and the code name the same set.
"""

from __future__ import annotations

import ast
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc

from csi_luks.crash import CRASH_POINT_ENV

PACKAGE = Path(__file__).resolve().parents[2] / "csi_luks"


def steps(operation: str, *names: str) -> tuple[str, ...]:
    return tuple(f"{operation}.{when}-{name}" for name in names for when in ("before", "after"))


@dataclass(frozen=True)
class CodePoints:
    points: dict[str, str]  # crash point -> the file (relative to the package) that has it
    problems: list[str]  # calls the registry cannot read (not literal strings)


def code_points(package: Path = PACKAGE) -> CodePoints:
    """Every crash point the plugin's code names, from its syntax tree."""
    points: dict[str, str] = {}
    problems: list[str] = []
    for path in sorted(package.rglob("*.py")):
        if path.name.endswith("_pb2.py") or path.name.endswith("_pb2_grpc.py"):
            continue
        relative = str(path.relative_to(package))
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            callee = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
            if callee not in ("Step", "crash_point") or relative == "crash.py":
                continue
            literals = [
                a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)
            ]
            where = f"{relative}:{node.lineno}"
            if callee == "Step" and len(literals) == 2 == len(node.args) and not node.keywords:
                for point in steps(*literals):
                    points[point] = relative
            elif callee == "crash_point" and len(literals) == 1 == len(node.args) and not node.keywords:
                points[literals[0]] = relative
            else:
                problems.append(f"{where}: {callee}(...) without literal string arguments")
    return CodePoints(points, problems)


# --- controller cases (host tier) ---------------------------------------------------------------------

_COPY_KEY = steps("prepare-key", "copy-dek", "mark-state")
_STANDALONE_COPY = steps("standalone-create", "meta", "header-backup", "image")
_RBD_COPY = steps("rbd-clone", "snapshot", "clone", "remove-snapshot") + steps(
    "rbd-create", "header-backup", "grow", "drop-source-metadata", "metadata", "owner"
)
# The points each controller call passes through, by backend.
CONTROLLER_SCENARIOS: dict[str, dict[str, tuple[str, ...]]] = {
    "standalone": {
        "create": steps("create-volume", "backing-store")
        + steps("standalone-create", "meta", "image")
        + steps("prepare-key", "new-dek", "mark-state"),
        "restore": steps("create-volume", "backing-store") + _STANDALONE_COPY + _COPY_KEY,
        "clone": steps("create-volume", "backing-store") + _STANDALONE_COPY + _COPY_KEY,
        "snapshot": steps("create-snapshot", "backing-store") + _STANDALONE_COPY + _COPY_KEY,
        "delete": steps("delete", "mark-deleting", "remove-dek", "remove-header-backup", "remove-data")
        + steps("standalone-delete", "rename", "sweep"),
        # The volume is attached (a loop device on this machine): the intent is recorded, then taken back.
        "delete-in-use": steps("delete", "mark-deleting", "unmark-deleting"),
        "expand": steps("controller-expand", "resize", "record-capacity")
        + steps("standalone-resize", "record-size", "grow"),
    },
    "rbd": {
        "create": steps("create-volume", "backing-store")
        + steps("rbd-create", "image", "metadata", "owner")
        + steps("prepare-key", "new-dek", "mark-state"),
        "restore": steps("create-volume", "backing-store") + _RBD_COPY + _COPY_KEY,
        "clone": steps("create-volume", "backing-store") + _RBD_COPY + _COPY_KEY,
        "snapshot": steps("create-snapshot", "backing-store") + _RBD_COPY + _COPY_KEY,
        "delete": steps("delete", "mark-deleting", "remove-dek", "remove-header-backup", "remove-data")
        + steps("rbd-delete", "remove-image", "purge-trash"),
        "expand": steps("controller-expand", "resize", "record-capacity"),
    },
}


@dataclass(frozen=True)
class Config:
    """A backend and KMS the controller harness runs its cases on."""

    backend: str
    kms_id: str
    scenarios: tuple[str, ...]
    every_pair: bool  # every (scenario, point) pair; else each point once, in the first scenario reaching it
    files: tuple[str, ...] | None = None  # only the points of these files (None: all)


_ALL = ("create", "restore", "clone", "snapshot", "delete", "expand")
CONFIGS = {
    # The cheapest: every call through every point.
    "standalone-local": Config("standalone", "local-1", (*_ALL, "delete-in-use"), every_pair=True),
    # The KMS matters where the controller stores, copies or removes a DEK.
    "standalone-vault": Config(
        "standalone",
        "vault-kv",
        ("create", "snapshot", "restore", "delete"),
        every_pair=False,
        files=("services/controller.py",),
    ),
    # A KMIP server wraps the DEKs, its credentials a Secret on the test API server.
    "standalone-kmip": Config(
        "standalone",
        "kmip-rpc",
        ("create", "snapshot", "restore", "delete"),
        every_pair=False,
        files=("services/controller.py",),
    ),
    # Each case starts a plugin: the backend's own points, each once (the controller's are
    # the same code on every backend).
    "rbd-local": Config("rbd", "local-1", _ALL, every_pair=False, files=("volumes/rbd.py",)),
}


def controller_cases() -> list[tuple[str, str, str]]:
    """(config, scenario, point) for every case the host harness runs."""
    code = code_points().points
    cases = []
    for config_name, config in CONFIGS.items():
        seen: set[str] = set()
        for scenario in config.scenarios:
            for point in CONTROLLER_SCENARIOS[config.backend][scenario]:
                if config.files is not None and code.get(point) not in config.files:
                    continue
                if config.every_pair or point not in seen:
                    cases.append((config_name, scenario, point))
                seen.add(point)
    return cases


# --- node cases (VM tier) -------------------------------------------------------------------------------

NODE_SCENARIOS: dict[str, tuple[str, ...]] = {
    "stage": tuple(
        f"node-stage.after-{s}"
        for s in (
            "attach",
            "luks-format",
            "header-backup",
            "open",
            "mkfs",
            "record-filesystem",
            "mark-encrypted",
        )
    ),
    "unstage": ("node-unstage.after-unmount", "node-unstage.after-close"),
    "expand": ("node-expand.after-refresh-attachment", "node-expand.after-resize-mapping"),
}


# --- killing a plugin at a point ------------------------------------------------------------------------


def serve_argv(endpoint: Path, state_dir: Path, kms_config: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "csi_luks.cli", "serve", "--endpoint", f"unix://{endpoint}",
        "--state-dir", str(state_dir), "--kms-config", str(kms_config), *extra,
    ]  # fmt: skip


Reply = TypeVar("Reply")


@contextmanager
def plugin_process(
    argv: list[str], endpoint: Path, env: dict[str, str], ready_timeout: float, new_session: bool = False
) -> Iterator[tuple[subprocess.Popen[str], grpc.Channel]]:
    """`csi-luks serve` as a child process, ready on endpoint; killed afterwards if still alive.

    new_session: in a process group of its own, which a test kills whole (the plugin with the commands
    it runs, as an OOM kill of its container or a power loss does)."""
    endpoint.unlink(missing_ok=True)
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env, start_new_session=new_session)
    channel = grpc.insecure_channel(f"unix://{endpoint}")
    try:
        deadline = time.monotonic() + ready_timeout
        while not endpoint.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"the plugin did not start: {proc.communicate()[1]}")
            time.sleep(0.02)
        grpc.channel_ready_future(channel).result(timeout=ready_timeout)
        yield proc, channel
    finally:
        channel.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def killed_at(
    point: str,
    argv: list[str],
    endpoint: Path,
    base_env: dict[str, str],
    call: Callable[[grpc.Channel], object],
    ready_timeout: float = 60,
) -> str:
    """Make the call on a plugin started with the crash point set; assert it died there by SIGKILL.
    Returns its stderr."""
    with plugin_process(argv, endpoint, {**base_env, CRASH_POINT_ENV: point}, ready_timeout) as (
        proc,
        channel,
    ):
        try:
            call(channel)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc  # the connection died with the process
        else:
            raise AssertionError(f"the call returned: crash point {point} was not reached")
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, (proc.returncode, stderr)
        assert f"crash point {point}" in stderr, stderr
        return stderr

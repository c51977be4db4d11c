"""The VM tier never cascades: a guest dies with its caller, and a failed boot is never followed by another.

A stand-in `vng` (a shell script that starts a long-lived child in its own process group, as vng starts
qemu) shows that run_in_guest kills the whole group on its own deadline and on an interrupt.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from csi_luks.system import vm
from tests.support import guest, guest_pylib


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child of ours that nobody reaped yet is a zombie: gone for our purposes.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1][0] != "Z"


@pytest.fixture(autouse=True)
def no_library_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sessions here boot no real guest: packing the libraries for one would only cost time."""
    monkeypatch.setattr(guest_pylib, "pack", lambda workdir, kubernetes=False: "true")


@pytest.fixture
def fake_vng(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A vng that starts a 'qemu' (sleep) and waits for it; the qemu's pid lands in qemu.pid."""
    pid_file = tmp_path / "qemu.pid"
    script = tmp_path / "vng"
    script.write_text(f"#!/bin/sh\nsleep 300 &\necho $! > {pid_file}\nwait\n")
    script.chmod(0o755)
    monkeypatch.setattr(vm, "find_vng", lambda: str(script))
    monkeypatch.setattr(vm, "find_kernel", lambda: "/boot/vmlinuz-fake")
    yield pid_file


def _qemu_pid(pid_file: Path) -> int:
    for _ in range(100):
        if pid_file.exists() and pid_file.read_text().strip():
            return int(pid_file.read_text())
        time.sleep(0.05)
    raise AssertionError("the fake vng never started its child")


def test_the_guest_is_killed_at_its_deadline(fake_vng: Path, tmp_path: Path) -> None:
    with pytest.raises(vm.GuestUnavailable, match="did not finish within 1s"):
        vm.run_in_guest("true", tmp_path / "work", timeout=1)
    assert not _alive(_qemu_pid(fake_vng))


def test_the_guest_is_killed_when_its_caller_is_interrupted(fake_vng: Path, tmp_path: Path) -> None:
    class Interrupted(BaseException):
        """What pytest-timeout's signal method or Ctrl-C raise in the waiting thread."""

    def interrupt(signum: int, frame: Any) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 1.0)
    try:
        with pytest.raises(Interrupted):
            vm.run_in_guest("true", tmp_path / "work", timeout=60)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert not _alive(_qemu_pid(fake_vng))


def test_the_guest_dies_with_its_caller_even_on_sigkill(fake_vng: Path, tmp_path: Path) -> None:
    """SIGTERM and SIGKILL run no `finally`: a watchdog kills the guest when its caller's end of a pipe
    closes."""
    caller = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from csi_luks.system import vm\n"
            f"vm.find_vng = lambda: {str(fake_vng.parent / 'vng')!r}\n"
            "vm.find_kernel = lambda: '/boot/vmlinuz-fake'\n"
            f"vm.run_in_guest('true', Path({str(tmp_path / 'work')!r}), timeout=300)\n",
        ],
        cwd=Path(__file__).resolve().parents[2],
    )
    qemu = _qemu_pid(fake_vng)
    caller.kill()
    caller.wait()
    for _ in range(100):
        if not _alive(qemu):
            return
        time.sleep(0.05)
    os.kill(qemu, signal.SIGKILL)
    raise AssertionError("the guest outlived its SIGKILLed caller")


def test_a_failed_boot_is_reported_to_every_test_and_never_repeated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    boots: list[str] = []

    def hung_boot(command: str, workdir: Path, **kwargs: Any) -> vm.GuestResult:
        boots.append(command)
        raise KeyboardInterrupt  # as an interrupt or a runner's timeout would end the first boot

    monkeypatch.setattr(vm, "run_in_guest", hung_boot)
    monkeypatch.setattr(vm, "unavailable_reason", lambda: None)
    session = guest.GuestSession(["tests/vm/a.py::test_a", "tests/vm/b.py::test_b"], tmp_path)
    for nodeid in ("tests/vm/a.py::test_a", "tests/vm/b.py::test_b"):
        with pytest.raises(guest.GuestFailure, match=r"interrupted .*KeyboardInterrupt.*no other is booted"):
            session.outcome(nodeid)
    assert len(boots) == 1


def test_a_guest_that_timed_out_is_the_failure_of_every_test(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    boots: list[str] = []

    def slow_boot(command: str, workdir: Path, **kwargs: Any) -> vm.GuestResult:
        boots.append(command)
        raise vm.GuestUnavailable(f"the guest did not finish within {kwargs['timeout']:g}s")

    monkeypatch.setattr(vm, "run_in_guest", slow_boot)
    monkeypatch.setattr(vm, "unavailable_reason", lambda: None)
    session = guest.GuestSession(["tests/vm/a.py::test_a", "tests/vm/b.py::test_b"], tmp_path)
    for nodeid in ("tests/vm/a.py::test_a", "tests/vm/b.py::test_b"):
        with pytest.raises(guest.GuestFailure, match="did not finish within"):
            session.outcome(nodeid)
    assert len(boots) == 1


def test_stand_ins_carry_no_per_test_timeout(pytester: pytest.Pytester) -> None:
    """The guest's deadline is the only one: pytest-timeout must not cut the stand-in that boots it."""
    pytester.makeconftest(
        "from tests.support import guest\n"
        "def pytest_collection_modifyitems(config, items):\n"
        "    guest.proxy_guest_items(config, items)\n"
        "    for item in items:\n"
        "        m = item.get_closest_marker('timeout')\n"
        "        print('TIMEOUT', item.name, m.args if m else None)\n"
    )
    pytester.makepyfile(test_x="import pytest\n@pytest.mark.vm\ndef test_in_guest():\n    pass\n")
    result = pytester.runpytest("--collect-only", "-s", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["TIMEOUT test_in_guest (0,)"])


def test_the_guest_runs_only_the_tests_left_after_deselection(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`-k` or `-m` narrow the guest's run too: the stand-ins are made after deselection, and the guest
    gets exactly their node ids (before, a `-k` run booted a guest for every VM test collected)."""
    root = Path(__file__).resolve().parents[2]
    monkeypatch.setenv("PYTHONPATH", str(root))
    pytester.makepyfile(
        probe=(
            "import pytest\n"
            "from tests.support import guest\n"
            "@pytest.hookimpl(trylast=True)\n"
            "def pytest_collection_finish(session):\n"
            "    nodeids = session.config.stash[guest._SESSION].nodeids\n"
            "    print('GUEST', sorted(i.split('::')[1] for i in nodeids))\n"
        )
    )
    result = pytester.runpytest_subprocess(
        "--collect-only", "-s", "-p", "probe", "-k", "rotation", f"--rootdir={root}",
        str(root / "tests" / "vm" / "test_operations.py"),
    )  # fmt: skip
    result.stdout.fnmatch_lines(
        ["GUEST ['test_node_stage_finishes_a_rotation_killed_after_its_key_was_added']"]
    )


def test_two_guests_boot_at_once_each_for_its_own_tests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real clients' tests (csi-sanity, kubelet) and the kernel tests run in two guests at the same
    time; each test waits for its own guest only, and a failure of one guest is not the other's."""
    import threading

    running: set[str] = set()
    overlapped = threading.Event()
    lock = threading.Lock()

    def boot(command: str, workdir: Path, **kwargs: Any) -> vm.GuestResult:
        name = "clients" if "tests/vm/b.py" in command else "kernel"
        with lock:
            running.add(name)
            if len(running) == 2:
                overlapped.set()
        overlapped.wait(10)
        if name == "clients":
            raise vm.GuestUnavailable("the clients' guest did not finish within 1s")
        report = Path(kwargs["env"][guest.REPORT_ENV])
        outcomes = {"tests/vm/a.py::test_a": {"outcome": "passed", "text": ""}}
        report.write_text(json.dumps({"outcomes": outcomes, "audit": {}}))
        return vm.GuestResult(returncode=0, log="", console="", duration=1.0, workdir=workdir)

    monkeypatch.setattr(vm, "run_in_guest", boot)
    monkeypatch.setattr(vm, "unavailable_reason", lambda: None)
    pool = guest.GuestPool(
        [
            guest.GuestSession(["tests/vm/a.py::test_a"], tmp_path, name="guest-kernel"),
            guest.GuestSession(["tests/vm/b.py::test_b"], tmp_path, name="guest-clients"),
        ]
    )
    pool.start()
    assert pool.session_of("tests/vm/a.py::test_a").outcome("tests/vm/a.py::test_a")["outcome"] == "passed"
    with pytest.raises(guest.GuestFailure, match="clients' guest did not finish"):
        pool.session_of("tests/vm/b.py::test_b").outcome("tests/vm/b.py::test_b")
    assert overlapped.is_set(), "the two guests did not run at the same time"

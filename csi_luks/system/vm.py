"""Run a command inside a throwaway virtme-ng guest that has device-mapper, loop and rbd.

The guest boots Debian's kernel under TCG (KVM guests hang on this kind of machine), shares the host's
file system read-only, and writes its log and exit code into a host directory given as --rwdir: the
console is not a reliable channel (it can be garbled), files are.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODULES = ("dm_crypt", "loop")
_KERNEL = re.compile(r"^vmlinuz-(?P<version>.+)$")


class GuestUnavailable(Exception):
    """No guest can be booted here (virtme-ng, qemu or a guest kernel is missing)."""


@dataclass(frozen=True)
class GuestResult:
    returncode: int
    log: str  # what the guest command printed (stdout and stderr)
    console: str  # virtme-ng/qemu's own output, for boot problems
    duration: float
    workdir: Path


def _version_key(version: str) -> list[int | str]:
    return [int(part) if part.isdigit() else part for part in re.split(r"[.-]", version)]


def find_kernel(boot: Path = Path("/boot"), modules: Path = Path("/lib/modules")) -> str:
    """The guest kernel: $CSI_LUKS_VM_KERNEL, else the newest /boot/vmlinuz-* with its modules installed."""
    override = os.environ.get("CSI_LUKS_VM_KERNEL")
    if override:
        if not Path(override).is_file():
            raise GuestUnavailable(f"CSI_LUKS_VM_KERNEL={override} does not exist")
        return override
    candidates = []
    for path in boot.glob("vmlinuz-*"):
        match = _KERNEL.match(path.name)
        if match and (modules / match.group("version")).is_dir() and os.access(path, os.R_OK):
            candidates.append((_version_key(match.group("version")), str(path)))
    if not candidates:
        raise GuestUnavailable(
            "no guest kernel: install Debian's linux-image-amd64 (scripts/bootstrap.sh does)"
        )
    return max(candidates)[1]


def find_vng() -> str:
    """virtme-ng's `vng`, on PATH or beside this interpreter (the project's virtualenv)."""
    beside = Path(sys.executable).parent / "vng"
    found = shutil.which("vng") or (str(beside) if beside.exists() else None)
    if found is None:
        raise GuestUnavailable("virtme-ng is not installed (pip install virtme-ng; bootstrap does)")
    if shutil.which("qemu-system-x86_64") is None:
        raise GuestUnavailable("qemu-system-x86_64 is missing (apt-get install qemu-system-x86)")
    return found


def unavailable_reason() -> str | None:
    try:
        find_vng()
        find_kernel()
    except GuestUnavailable as exc:
        return str(exc)
    return None


def run_in_guest(
    command: str,
    workdir: Path,
    *,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    modules: Sequence[str] = DEFAULT_MODULES,
    memory: str = "2G",
    timeout: float = 1200.0,
    on_output: Callable[[str], None] | None = None,
    on_start: Callable[[subprocess.Popen[bytes]], None] | None = None,
) -> GuestResult:
    """Boot a guest, run `command` (a shell command line) as root in it, return its exit code and log.

    workdir is a host directory the guest can write; the guest's log and exit code land there.
    on_output, if given, receives the guest command's output as it is written (for progress).
    on_start, if given, receives the guest's process (vng, leader of its process group) once it runs, so
    a caller waiting elsewhere can kill it (kill_group).
    """
    vng = find_vng()
    kernel = find_kernel()
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    log_file, rc_file = workdir / "guest.log", workdir / "guest.rc"
    for stale in (log_file, rc_file):
        stale.unlink(missing_ok=True)
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in (env or {}).items())
    script = workdir / "guest.sh"
    script.write_text(
        "#!/bin/bash\n"
        f"exec >{shlex.quote(str(log_file))} 2>&1\n"
        f"for m in {' '.join(shlex.quote(m) for m in modules)}; do\n"
        '  modprobe "$m" || echo "modprobe $m failed"\n'
        "done\n"
        "export PYTHONDONTWRITEBYTECODE=1\n"  # the shared tree is read-only in the guest
        f"{exports}"
        f"cd {shlex.quote(cwd or os.getcwd())}\n"
        f"{command}\n"
        f"echo $? >{shlex.quote(str(rc_file))}\n"
    )
    argv = [
        vng, "--run", kernel, "--disable-kvm", "--force-9p", "--user", "root",
        "--memory", memory, "--rwdir", str(workdir), "--", f"bash {shlex.quote(str(script))}",
    ]  # fmt: skip
    child_env = dict(os.environ)
    # vng runs virtme-run from PATH: make the virtualenv's bin directory visible to it.
    child_env["PATH"] = f"{Path(vng).parent}{os.pathsep}{child_env.get('PATH', '')}"
    started = time.monotonic()
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=child_env,
        start_new_session=True,
    )
    watchdog: subprocess.Popen[bytes] | None = None
    follower: _LogFollower | None = None
    try:
        # Inside the try: an interrupt while the watchdog starts (a process spawn, slow on a loaded
        # machine) must kill the guest too.
        watchdog = _watchdog(proc.pid)
        if on_start is not None:
            on_start(proc)
        follower = _LogFollower(log_file, on_output) if on_output else None
        console, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        console, _ = proc.communicate()
        (workdir / "console.log").write_bytes(console)
        raise GuestUnavailable(f"the guest did not finish within {timeout:g}s; see {workdir}") from None
    except BaseException:
        # Interrupted (Ctrl-C, a test runner's own timeout, any error here): the guest must not outlive
        # its caller, or guests pile up, each holding a core and gigabytes.
        kill_group(proc)
        raise
    finally:
        if follower:
            follower.stop()
        if watchdog is not None:
            watchdog.stdin.close()  # type: ignore[union-attr]
            watchdog.wait()
    (workdir / "console.log").write_bytes(console)
    log = log_file.read_text(errors="replace") if log_file.exists() else ""
    if rc_file.exists():
        returncode = int(rc_file.read_text().strip() or "1")
    else:
        # The command never reached its end (kernel panic, boot failure): vng's own code is all we have.
        returncode = proc.returncode if proc.returncode != 0 else 1
    return GuestResult(
        returncode=returncode,
        log=log,
        console=console.decode(errors="replace"),
        duration=time.monotonic() - started,
        workdir=workdir,
    )


# Blocks until its stdin closes, then SIGKILLs the process group named by its argument.
_WATCHDOG = """
import os, signal, sys
sys.stdin.buffer.read()
try:
    os.killpg(int(sys.argv[1]), signal.SIGKILL)
except ProcessLookupError:
    pass
"""


def _watchdog(pgid: int) -> subprocess.Popen[bytes]:
    """A process that kills the guest when the write end of its stdin closes: when we are done with the
    guest, or when this process dies in any way (SIGTERM and SIGKILL run no `finally`, but the kernel
    closes our file descriptors)."""
    return subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(pgid)], stdin=subprocess.PIPE, start_new_session=True
    )


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL vng and everything it started (qemu, virtiofsd): they share the session it leads."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    proc.wait()


class _LogFollower:
    """Hands what the guest appends to its log file to a callback, from a background thread."""

    def __init__(self, path: Path, callback: Callable[[str], None], interval: float = 0.3) -> None:
        self._path = path
        self._callback = callback
        self._interval = interval
        self._offset = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        try:
            with self._path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        if data:
            self._offset += len(data)
            self._callback(data.decode(errors="replace"))

    def _follow(self) -> None:
        while not self._done.wait(self._interval):
            self._drain()
        self._drain()

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

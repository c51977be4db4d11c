"""The Python modules every plugin process imports, served to the VM guest from its tmpfs.

The guest's root is the host's over 9p without a page cache, so each process re-reads every module it
imports through the host: importing `csi-luks serve` took 15 s on an idle machine and over 90 s beside a
loaded host, and the kernel tier starts the plugin dozens of times. The host packs what the plugin
imports from the interpreter's library, the virtualenv and its own package into one tar
in the guest's workdir; the guest unpacks it into its tmpfs once and bind-mounts each copied entry over
its original path. Paths and bytes stay the same; only where they are read from changes.

Host: `pack(workdir)` returns the shell lines that do this in the guest.
Guest: `python guest_pylib.py mount ROOT LIST` makes the bind mounts (one process for all of them).
"""

from __future__ import annotations

import compileall
import ctypes
import functools
import json
import os
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

# What one plugin process imports: its own package walked whole, so every backend's libraries are in.
_PROBE = r"""
import importlib, json, os, pkgutil, sys, sysconfig
import csi_luks
with_kubernetes = sys.argv[1] == "kubernetes"
# The kubernetes client (the tenant-aware KMS types' and the e2e tests') is 126 MB: only where it is used.
skip = ("grpc_tools",) if with_kubernetes else ("kubernetes", "grpc_tools")
for info in pkgutil.walk_packages(csi_luks.__path__, "csi_luks."):
    if with_kubernetes or not info.name.startswith("csi_luks.kube"):
        importlib.import_module(info.name)
paths = sysconfig.get_paths()
roots = sorted({paths["stdlib"], paths["platstdlib"], paths["purelib"], paths["platlib"],
                os.path.join(paths["stdlib"], "lib-dynload")}, key=len, reverse=True)
# Read at interpreter start by every Python on the machine, or specific to this one: leave them alone.
private = {"site", "sitecustomize", "usercustomize", "sysconfig", "_distutils_hack", "distutils"}
entries = set()
for name, module in list(sys.modules.items()):
    top = name.split(".")[0]
    if top in private or top.startswith(("_sysconfigdata", "__editable__")):
        continue
    spec = getattr(module, "__spec__", None)
    origin = getattr(spec, "origin", None)
    places = list(getattr(module, "__path__", []) or []) if origin in (None, "namespace") else [origin]
    for place in places:
        if not place or place in ("built-in", "frozen"):
            continue
        for root in roots:
            if place.startswith(root + os.sep):
                first = place[len(root) + 1:].split(os.sep)[0]
                if first in skip or first.removesuffix(".py") in private:  # by file: aliases exist
                    break
                entries.add(os.path.join(root, first))
                if first.endswith(".py"):  # a one-file module: its bytecode sits in the root's __pycache__
                    entries.add(os.path.join(root, "__pycache__"))
                break
print(json.dumps(sorted(entries)))
"""

PACKAGE = Path(__file__).resolve().parents[2] / "csi_luks"
PYLIB_DIR = "/tmp/csi-luks-pylib"  # the guest's own tmpfs


def entries(python: str = sys.executable, *, kubernetes: bool = False) -> list[str]:
    """The library files and directories a plugin process imports (absolute paths on the host); with
    kubernetes, the Kubernetes client's too."""
    listing = subprocess.run(
        [python, "-c", _PROBE, "kubernetes" if kubernetes else "-"],
        check=True, capture_output=True, text=True, timeout=300,
    ).stdout  # fmt: skip
    return [p for p in json.loads(listing) if os.path.exists(p)]


def pack(workdir: Path, *, kubernetes: bool = False) -> str:
    """Pack them into workdir; return the shell lines that unpack and mount them inside the guest.

    kubernetes: for a guest that runs the e2e tier, where the tests and the tenant-aware KMS types import
    the Kubernetes client (about 2 minutes each over 9p under TCG)."""
    workdir.mkdir(parents=True, exist_ok=True)
    tar_path, list_path = workdir / "pylib.tar", workdir / "pylib.json"
    # The plugin's own package too, with its bytecode: the guest cannot write any (read-only tree).
    compileall.compile_dir(str(PACKAGE), quiet=1)
    chosen = [*entries(kubernetes=kubernetes), str(PACKAGE)]
    with tarfile.open(tar_path, "w") as tar:  # uncompressed: unpacking must cost the guest's CPU little
        for path in chosen:
            arcname = path.lstrip("/")
            tar.add(path, arcname=arcname, filter=functools.partial(_wanted, top=arcname))
    list_path.write_text(json.dumps(chosen))
    return (
        f"mkdir -p {PYLIB_DIR} && tar -xf {shlex.quote(str(tar_path))} -C {PYLIB_DIR} && "
        f"{shlex.quote(sys.executable)} -S {shlex.quote(__file__)} mount {PYLIB_DIR} "
        f"{shlex.quote(str(list_path))} || echo 'the library copy failed: imports read over 9p'"
    )


def _wanted(member: tarfile.TarInfo, top: str) -> tarfile.TarInfo | None:
    """Leave out what no plugin process reads: optimised bytecode, and libraries' own test suites."""
    inside = member.name[len(top) :]
    if inside.endswith((".opt-1.pyc", ".opt-2.pyc")) or "/test/" in inside or "/tests/" in inside:
        return None
    if top.endswith("/kubernetes") and inside.startswith("/aio"):  # the asyncio client: 68 MB, unused
        return None
    return member


_MS_BIND = 4096


def mount_copies(root: str, list_path: str) -> int:
    """Bind-mount root/<path> over each listed path; the count mounted."""
    libc = ctypes.CDLL(None, use_errno=True)
    mounted = 0
    for path in json.loads(Path(list_path).read_text()):
        copy = os.path.join(root, path.lstrip("/"))
        if libc.mount(copy.encode(), path.encode(), None, _MS_BIND, None) != 0:
            errno = ctypes.get_errno()
            print(f"bind mount of {copy} over {path} failed: {os.strerror(errno)}", file=sys.stderr)
            continue
        mounted += 1
    print(f"{mounted} library entries served from {root}")
    return mounted


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "mount":
        sys.exit("usage: guest_pylib.py mount ROOT LIST")
    mount_copies(sys.argv[2], sys.argv[3])

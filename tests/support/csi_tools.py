"""The Kubernetes CSI ecosystem's own programs (csi-sanity, the sidecars), built from ../shared/tools.

No registry reachable here ships them: `../shared/tools/build-csi-tools.sh` builds them offline into a
cache outside the checkout. The host builds what a session needs before a guest boots (a build takes
minutes, and the guest hides /var/cache, where the builds are cached, under a tmpfs), copies them into the
guest's work directory and names them in CSI_TOOLS_ENV.
A checkout without ../shared has none of this: tests skip with HOW_TO_GET, unless CI=true, where they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT.parent / "shared" / "tools" / "build-csi-tools.sh"
CSI_TOOLS_ENV = "CSI_LUKS_CSI_TOOLS"  # JSON {"name": "path"}, or {"error": "why none could be had"}
STRICT = os.environ.get("CI", "").lower() in ("1", "true", "yes")
HOW_TO_GET = (
    "csi-sanity, the CSI sidecars and cephcsi are built from ../shared/tools/build-csi-tools.sh, which this "
    "checkout lacks; elsewhere get them with "
    "`go install github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@v5.3.1` "
    "(the sidecars' images from registry.k8s.io/sig-storage, cephcsi from quay.io/cephcsi/cephcsi:v3.8.1), "
    "then name them in "
    f'{CSI_TOOLS_ENV}=\'{{"csi-sanity": "/path/to/csi-sanity", ...}}\''
)


class CsiToolsUnavailable(Exception):
    """The programs cannot be had here; the message says why and how to get them."""


def build(names: list[str]) -> dict[str, str]:
    """Build (or find in the cache) the named programs on the host: {name: path}."""
    if not BUILD_SCRIPT.exists():
        raise CsiToolsUnavailable(HOW_TO_GET)
    result = subprocess.run(
        ["bash", str(BUILD_SCRIPT), *names],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise CsiToolsUnavailable(
            f"{BUILD_SCRIPT} {' '.join(names)} failed (exit {result.returncode}):\n{result.stderr[-4000:]}"
        )
    paths = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    missing = [name for name in names if name not in paths]
    if missing:
        raise CsiToolsUnavailable(f"{BUILD_SCRIPT} did not build {missing}")
    return paths


def handover(names: list[str], directory: Path) -> str:
    """The CSI_TOOLS_ENV value the host gives the guest: the programs copied into directory (which the
    guest can read), or the reason there are none."""
    try:
        given = os.environ.get(CSI_TOOLS_ENV)
        built = json.loads(given) if given else build(names)  # programs the user named, or our builds
    except CsiToolsUnavailable as exc:
        return json.dumps({"error": str(exc)})
    directory.mkdir(parents=True, exist_ok=True)
    handed = {}
    for name, path in built.items():
        copy = directory / name
        if Path(path).is_dir():  # the snapshot CRDs
            shutil.copytree(path, copy)
        else:
            shutil.copy2(path, copy)
        handed[name] = str(copy)
    return json.dumps(handed)


def tool(name: str) -> Path:
    """A program's path; skips the test (fails it under CI=true) when it cannot be had."""
    try:
        return _find(name)
    except CsiToolsUnavailable as exc:
        if STRICT:
            pytest.fail(f"{exc} (CI=true: the real CSI clients must run)")
        pytest.skip(str(exc))


def _find(name: str) -> Path:
    handed = os.environ.get(CSI_TOOLS_ENV)
    paths: dict[str, str] = json.loads(handed) if handed else build([name])
    if "error" in paths:
        raise CsiToolsUnavailable(paths["error"])
    if name not in paths:
        raise CsiToolsUnavailable(f"{name} was not built for this session ({CSI_TOOLS_ENV}); {HOW_TO_GET}")
    path = Path(paths[name])
    # Not os.access(X_OK): over the guest's 9p share it answers False for files that execute fine.
    if not path.is_file():
        raise CsiToolsUnavailable(f"{path} ({name}) does not exist")
    return path

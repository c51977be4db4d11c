"""The library copy for the VM guest: what the plugin imports, never what every Python reads at start."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

from tests.support import guest_pylib


def test_the_copy_holds_the_plugins_libraries_and_leaves_interpreter_start_up_alone(tmp_path: Path) -> None:
    lines = guest_pylib.pack(tmp_path)
    listed = json.loads((tmp_path / "pylib.json").read_text())
    names = {os.path.basename(path) for path in listed}
    assert {"grpc", "cryptography", "hvac", "asyncio", "csi_luks"} <= names
    # Another Python in the guest (Ceph's CLI) must find its own site and sysconfig.
    assert not names & {"site.py", "sysconfig.py", "kubernetes", "grpc_tools"}
    assert all(os.path.isabs(path) and os.path.exists(path) for path in listed)
    with tarfile.open(tmp_path / "pylib.tar") as tar:
        members = tar.getnames()
    assert any(m.endswith("csi_luks/__pycache__/cli.cpython-311.pyc") for m in members)
    assert not any(m.endswith(".opt-1.pyc") for m in members)
    assert str(tmp_path / "pylib.tar") in lines and "mount" in lines


def test_the_e2e_guest_gets_the_kubernetes_client_without_its_asyncio_half(tmp_path: Path) -> None:
    guest_pylib.pack(tmp_path, kubernetes=True)
    listed = {os.path.basename(path) for path in json.loads((tmp_path / "pylib.json").read_text())}
    assert {"kubernetes", "grpc", "csi_luks"} <= listed
    with tarfile.open(tmp_path / "pylib.tar") as tar:
        members = tar.getnames()
    assert any(m.endswith("kubernetes/client/api_client.py") for m in members)
    assert not any("/kubernetes/aio/" in m for m in members)

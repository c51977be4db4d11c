"""A plugin imports only what its configuration uses (issue 24: node memory beside 16 stages at once).

Each check runs in a fresh interpreter: this one has imported every backend for other tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# What a standalone plugin with only `local` KMS entries never needs, and what each costs it at start
# when imported anyway: KMS client libraries, the RBD backend with librbd, librados and pyudev, the
# Kubernetes client, the metrics endpoint's library, and what reading the version from metadata pulls.
NOT_NEEDED = {
    "boto3",
    "csi_luks.kms.aws",
    "csi_luks.kms.kmip",
    "csi_luks.kms.vault",
    "csi_luks.kube",
    "csi_luks.volumes.ceph_csi",
    "csi_luks.volumes.rbd",
    "hvac",
    "importlib.metadata",
    "kmip",
    "kubernetes",
    "prometheus_client",
    "pyudev",
    "rados",
    "rbd",
    "requests",
    "urllib3",
}

# Serves in the given mode from a scratch directory, wraps and unwraps a DEK with the local KMS (what a
# first stage does with its key), stops, and prints the modules it imported.
SERVE = """
import json, sys
from pathlib import Path
from csi_luks.kms.base import KMSContext
from csi_luks.server import PluginServer
from csi_luks.settings import Mode, Settings

root, mode = Path(sys.argv[1]), Mode(sys.argv[2])
kms = {"local-1": {"encryptionKMSType": "local", "keyFile": str(root / "kek")}}
(root / "kms-config.json").write_text(json.dumps(kms))
settings = Settings(endpoint=str(root / "csi.sock"), mode=mode, node_id="n", state_dir=str(root / "state"),
                    kms_config=str(root / "kms-config.json"), grace_period=0)
server = PluginServer(settings)
server.start()
try:
    local = server.kms_config.build("local-1", KMSContext(secrets={}))
    assert local.decrypt_dek("v", local.encrypt_dek("v", "dek")) == "dek"
finally:
    server.stop(0)
print(json.dumps(sorted(sys.modules)))
"""


def imported(script: str, *args: str) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    modules: list[str] = json.loads(result.stdout.splitlines()[-1])
    return set(modules)


def loaded(modules: set[str], names: set[str]) -> list[str]:
    """The names imported, themselves or any of their submodules."""
    return sorted(name for name in names if any(m == name or m.startswith(f"{name}.") for m in modules))


@pytest.mark.parametrize("mode", ["node", "all"])
def test_a_standalone_plugin_with_a_local_kms_imports_no_backend_it_does_not_use(
    tmp_path: Path, mode: str
) -> None:
    modules = imported(SERVE, str(tmp_path), mode)
    assert "csi_luks.kms.local" in modules  # the check saw the KMS in use
    assert loaded(modules, NOT_NEEDED) == []
    assert ("csi_luks.services.controller" in modules) == (mode == "all")  # a node runs no controller


def test_a_kms_type_imports_its_library_when_first_looked_up() -> None:
    script = """
import json, sys
from csi_luks.kms.base import factory_for
from csi_luks.kms.config import KMSConfig
before = "hvac" in sys.modules
factory_for("vault")
print(json.dumps([before, "hvac" in sys.modules]))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout) == [False, True]

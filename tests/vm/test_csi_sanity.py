"""The CSI conformance suite, csi-sanity v5.3.1, against csi-luks started as deploy/ starts it.

Two configurations: standalone unencrypted and standalone encrypted (`local` KMS). Every spec that runs
must pass; the counts are printed (pytest -rA shows them) and a spec that fails is named with its failure
and the plugin logs. An RBD configuration (cephx secrets through --csi.secrets) is not in the suite yet:
through the rbd CLI, at seconds a call under TCG, it did not finish in 27 minutes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.csi_tools import tool
from tests.support.deployed_plugin import PluginProcess, deployed_plugins
from tests.support.guest import ARTIFACTS_ENV

pytestmark = pytest.mark.csi_tools  # the host builds csi-sanity before the guest boots

MiB = 1024 * 1024
RUN_TIMEOUT = 900.0  # seconds; a standalone run takes about 2 minutes under TCG
# 65 of 92 specs apply to what csi-luks advertises (measured: 65 passed, 26 skipped, 1 pending); far
# fewer means a capability stopped being advertised or the suite stopped reaching the plugin.
MIN_PASSED = 50


def _plugin_env(workdir: Path, backend: str) -> dict[str, str | None]:
    kek = workdir / "kek"
    kek.write_bytes(os.urandom(32))
    kek.chmod(0o600)
    kms_config = workdir / "kms-config.json"
    kms_config.write_text(json.dumps({"local-1": {"encryptionKMSType": "local", "keyFile": str(kek)}}))
    return {
        "CSI_LUKS_BACKEND": backend,
        "CSI_LUKS_STATE_DIR": str(workdir / "state"),
        # No Kubernetes API here: the configuration file the ConfigMap would otherwise provide.
        "CSI_LUKS_KMS_CONFIG_MAP": None,
        "CSI_LUKS_KMS_CONFIG": str(kms_config),
        "NODE_ID": "sanity-node",
    }


def _run_sanity(
    workdir: Path,
    plugins: dict[str, PluginProcess],
    parameters: dict[str, str],
) -> Counter[str]:
    """Run csi-sanity; the count of spec outcomes. Fails the test, with what explains it, on any failure."""
    params_file = workdir / "parameters.yaml"
    params_file.write_text(yaml.safe_dump(parameters))
    report = workdir / "sanity-report.json"
    argv = [
        str(tool("csi-sanity")),
        f"--csi.endpoint=unix://{plugins['node'].socket}",
        f"--csi.controllerendpoint=unix://{plugins['controller'].socket}",
        f"--csi.stagingdir={workdir / 'staging'}",
        f"--csi.mountdir={workdir / 'mount'}",
        f"--csi.testvolumesize={64 * MiB}",
        f"--csi.testvolumeexpandsize={128 * MiB}",
        f"--csi.testvolumeparameters={params_file}",
        f"--ginkgo.json-report={report}",
        "--ginkgo.no-color",
    ]
    output = workdir / "sanity-output.txt"
    try:
        with output.open("wb") as out:
            result = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=RUN_TIMEOUT,
                check=False,
            )
    finally:
        _keep_artifacts(workdir, [output, report, *(p.log for p in plugins.values())])
    logs = "\n".join(p.log_tail() for p in plugins.values())
    if not report.exists():
        pytest.fail(
            f"csi-sanity exited {result.returncode} without a report:\n"
            f"{output.read_text(errors='replace')[-6000:]}\n{logs}"
        )
    specs = _specs(json.loads(report.read_text()))
    counts = Counter(spec["State"] for spec in specs)
    print(f"csi-sanity {parameters}: {dict(counts)} (exit {result.returncode})")
    failed = [spec for spec in specs if spec["State"] not in ("passed", "skipped", "pending")]
    if failed:
        described = "\n\n".join(
            f"{_name(spec)}: {spec['State']}\n{(spec.get('Failure') or {}).get('Message', '')[:3000]}"
            for spec in failed
        )
        pytest.fail(f"{len(failed)} csi-sanity spec(s) failed ({dict(counts)}):\n{described}\n\n{logs}")
    assert result.returncode == 0, f"csi-sanity exited {result.returncode}:\n{output.read_text()[-4000:]}"
    assert counts["passed"] >= MIN_PASSED, f"only {dict(counts)}: specs stopped reaching the plugin\n{logs}"
    return counts


def _keep_artifacts(workdir: Path, files: list[Path]) -> None:
    """Copy the run's output and logs where the host can read them (the guest's /tmp dies with it)."""
    artifacts = os.environ.get(ARTIFACTS_ENV)
    if not artifacts:
        return
    target = Path(artifacts) / workdir.name
    target.mkdir(parents=True, exist_ok=True)
    for file in files:
        if file.exists():
            shutil.copy2(file, target / file.name)


def _name(spec: dict[str, Any]) -> str:
    containers: list[str] = spec.get("ContainerHierarchyTexts") or []
    return " ".join([*containers, spec.get("LeafNodeText", "")])


def _specs(report: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The It specs of a ginkgo JSON report (not suite setup nodes)."""
    return [
        spec
        for suite in report
        for spec in suite.get("SpecReports") or []
        if spec.get("LeafNodeType") == "It"
    ]


@pytest.mark.timeout(RUN_TIMEOUT + 120)
def test_csi_sanity_standalone_unencrypted(tmp_path: Path) -> None:
    with deployed_plugins(tmp_path, _plugin_env(tmp_path, "standalone")) as plugins:
        _run_sanity(tmp_path, plugins, {"encrypted": "false"})


@pytest.mark.timeout(RUN_TIMEOUT + 120)
def test_csi_sanity_standalone_encrypted(tmp_path: Path) -> None:
    with deployed_plugins(tmp_path, _plugin_env(tmp_path, "standalone")) as plugins:
        _run_sanity(tmp_path, plugins, {"encrypted": "true", "encryptionKMSID": "local-1"})

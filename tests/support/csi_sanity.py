"""csi-sanity v5.3.1, the CSI conformance suite, run against csi-luks started as deploy/ starts it.

`run_sanity` runs it (optionally on some of its specs, with the CSI secrets of a file), counts the spec
outcomes from its ginkgo JSON report, and fails the test with each failed spec's message and the plugin
logs. The host tier (tests/host/test_csi_sanity_rbd.py) and the VM tier (tests/vm/test_csi_sanity.py)
share it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.ceph import CephCluster
from tests.support.ceph_fixtures import CLUSTER_ID
from tests.support.csi_tools import tool
from tests.support.deployed_plugin import PluginProcess
from tests.support.guest import ARTIFACTS_ENV

MiB = 1024 * 1024
KMS_ID = "local-1"
# The secret kinds of csi-sanity's --csi.secrets file (pkg/sanity CSISecrets): each one a request carries.
SECRET_KINDS = (
    "CreateVolumeSecret",
    "DeleteVolumeSecret",
    "ControllerPublishVolumeSecret",
    "ControllerUnpublishVolumeSecret",
    "ControllerValidateVolumeCapabilitiesSecret",
    "NodeStageVolumeSecret",
    "NodePublishVolumeSecret",
    "CreateSnapshotSecret",
    "DeleteSnapshotSecret",
    "ControllerExpandVolumeSecret",
    "ControllerModifyVolumeSecret",
    "ListSnapshotsSecret",
)
# The Node specs (pkg/sanity/node.go), as a ginkgo regexp; every other spec is the Identity's or a
# controller's (the Controller, snapshot, expansion, modify and GroupController containers).
NODE_SPECS = "Node Service"


@dataclass(frozen=True)
class SanityRun:
    """What to run: the volume parameters, and optionally the secrets and the specs."""

    parameters: Mapping[str, str]
    secrets: Mapping[str, str] | None = None  # sent as every kind of SECRET_KINDS
    focus: str = ""  # ginkgo --focus regexp over the spec texts; "" runs every spec
    skip: str = ""  # ginkgo --skip regexp
    min_passed: int = 1  # fewer passed specs means the suite stopped reaching the plugin
    timeout: float = 900.0  # seconds
    extra_args: list[str] = field(default_factory=list)


def plugin_env(workdir: Path, backend: str, **extra: str | None) -> dict[str, str | None]:
    """The plugin's environment on this machine: a `local` KMS (KMS_ID) with a fresh KEK, and extra."""
    kek = workdir / "kek"
    kek.write_bytes(os.urandom(32))
    kek.chmod(0o600)
    kms_config = workdir / "kms-config.json"
    kms_config.write_text(json.dumps({KMS_ID: {"encryptionKMSType": "local", "keyFile": str(kek)}}))
    return {
        "CSI_LUKS_BACKEND": backend,
        "CSI_LUKS_STATE_DIR": str(workdir / "state"),
        # No Kubernetes API here: the configuration file the ConfigMap would otherwise provide.
        "CSI_LUKS_KMS_CONFIG_MAP": None,
        "CSI_LUKS_KMS_CONFIG": str(kms_config),
        "NODE_ID": "sanity-node",
        **extra,
    }


def rbd_encrypted(
    workdir: Path, ceph: CephCluster, ceph_config: Path
) -> tuple[dict[str, str | None], dict[str, str]]:
    """The plugin's environment and the volume parameters of the RBD encrypted configuration."""
    env = plugin_env(workdir, "rbd", CSI_LUKS_CEPH_CONFIG=str(ceph_config))
    parameters = {"clusterID": CLUSTER_ID, "pool": ceph.pool, "encrypted": "true", "encryptionKMSID": KMS_ID}
    return env, parameters


def run_sanity(workdir: Path, plugins: dict[str, PluginProcess], run: SanityRun) -> Counter[str]:
    """Run csi-sanity; the count of spec outcomes. Fails the test, with what explains it, on any failure.

    A spec that failed in csi-sanity's own connect (see _lost_connect) runs once more, alone with the
    others that did: what counts is how it fares once it reaches the plugin.
    """
    params_file = workdir / "parameters.yaml"
    params_file.write_text(yaml.safe_dump(dict(run.parameters)))
    argv = [
        str(tool("csi-sanity")),
        f"--csi.endpoint=unix://{plugins['node'].socket}",
        f"--csi.controllerendpoint=unix://{plugins['controller'].socket}",
        f"--csi.stagingdir={workdir / 'staging'}",
        f"--csi.mountdir={workdir / 'mount'}",
        f"--csi.testvolumesize={64 * MiB}",
        f"--csi.testvolumeexpandsize={128 * MiB}",
        f"--csi.testvolumeparameters={params_file}",
        "--ginkgo.no-color",
        *run.extra_args,
    ]
    if run.secrets is not None:
        secrets_file = workdir / "secrets.yaml"
        secrets_file.touch(mode=0o600)
        secrets_file.write_text(yaml.safe_dump({kind: dict(run.secrets) for kind in SECRET_KINDS}))
        argv.append(f"--csi.secrets={secrets_file}")
    if run.skip:
        argv.append(f"--ginkgo.skip={run.skip}")
    specs, output, returncode = _run_once(workdir, plugins, run, argv, run.focus, "")
    lost = [spec for spec in specs if _lost_connect(spec)]
    if lost:
        again = focus_on([_name(spec) for spec in lost])
        rerun, output, returncode = _run_once(workdir, plugins, run, argv, again, "-again")
        # ginkgo reports every spec whatever the focus: those it did not select as skipped, its pending
        # ones as pending. The first run counted them already: only the lost specs' outcomes are new.
        wanted = {_name(spec) for spec in lost}
        rerun = [spec for spec in rerun if _name(spec) in wanted]
        print(f"csi-sanity: {len(lost)} spec(s) lost csi-sanity's connect and ran again")
        specs = [spec for spec in specs if not _lost_connect(spec)] + rerun
        unrun = [_name(spec) for spec in rerun if spec["State"] == "skipped"]
        if len(rerun) != len(lost) or unrun:
            pytest.fail(
                f"the rerun of {sorted(wanted)} ran {[_name(s) for s in rerun]} (not selected by the focus: "
                f"{unrun})"
            )
    logs = "\n".join(p.log_tail() for p in plugins.values())
    counts = Counter(spec["State"] for spec in specs)
    selection = f"focus={run.focus!r} skip={run.skip!r}"
    print(f"csi-sanity {dict(run.parameters)} {selection}: {dict(counts)} (exit {returncode})")
    failed = [spec for spec in specs if spec["State"] not in ("passed", "skipped", "pending")]
    if failed:
        described = "\n\n".join(
            f"{_name(spec)}: {spec['State']}\n{(spec.get('Failure') or {}).get('Message', '')[:3000]}"
            for spec in failed
        )
        pytest.fail(f"{len(failed)} csi-sanity spec(s) failed ({dict(counts)}):\n{described}\n\n{logs}")
    assert returncode == 0, f"csi-sanity exited {returncode}:\n{output[-4000:]}"
    assert counts["passed"] >= run.min_passed, (
        f"only {dict(counts)}: specs stopped reaching the plugin\n{logs}"
    )
    return counts


def _run_once(
    workdir: Path, plugins: dict[str, PluginProcess], run: SanityRun, argv: list[str], focus: str, suffix: str
) -> tuple[list[dict[str, Any]], str, int]:
    """One csi-sanity process: its It specs, its output and its exit code."""
    report = workdir / f"sanity-report{suffix}.json"
    output = workdir / f"sanity-output{suffix}.txt"
    focused = [f"--ginkgo.focus={focus}"] if focus else []
    try:
        with output.open("wb") as out:
            result = subprocess.run(
                [*argv, f"--ginkgo.json-report={report}", *focused],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=run.timeout,
                check=False,
            )
    finally:
        keep_artifacts(workdir, [output, report, *(p.log for p in plugins.values())])
    text = output.read_text(errors="replace")
    if not report.exists():
        logs = "\n".join(p.log_tail() for p in plugins.values())
        pytest.fail(f"csi-sanity exited {result.returncode} without a report:\n{text[-6000:]}\n{logs}")
    return _specs(json.loads(report.read_text())), text, result.returncode


def focus_on(names: list[str]) -> str:
    """A ginkgo --focus running exactly the specs of these full names (containers' texts, then the leaf's).

    Anchored at the end only: ginkgo's text of a spec starts before its containers' texts.
    """
    return "|".join(f"{_go_regexp_literal(name)}$" for name in names)


def _go_regexp_literal(text: str) -> str:
    """text as a Go (RE2) regexp matching it literally (Python's re.escape also escapes what RE2 refuses)."""
    return re.sub(r"([\\.+*?()|\[\]{}^$])", r"\\\1", text)


def _lost_connect(spec: dict[str, Any]) -> bool:
    """Whether the spec failed before reaching the plugin, in csi-sanity's utils.Connect.

    Connect waits for a change from the state it reads after dialling; a connection already Ready by then
    never changes, and the spec fails after a minute with "Connection timed out" (kubernetes-csi/csi-test
    #97); seen on this suite's host under load (9 on 2 cores).
    """
    failure = spec.get("Failure") or {}
    where = (failure.get("Location") or {}).get("FileName", "")
    return (
        spec["State"] == "failed"
        and failure.get("FailureNodeType") == "BeforeEach"
        and where.endswith("pkg/sanity/sanity.go")  # TestContext.Setup
        and 's: "Connection timed out"' in failure.get("Message", "")
    )


def specs_of(report: Path) -> list[tuple[str, str]]:
    """(full name, state) of each It spec of a ginkgo JSON report."""
    return [(_name(spec), spec["State"]) for spec in _specs(json.loads(report.read_text()))]


def keep_artifacts(workdir: Path, files: list[Path]) -> None:
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

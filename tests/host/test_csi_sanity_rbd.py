"""csi-sanity v5.3.1 on the RBD backend, encrypted, on the session's real Ceph cluster (host tier).

The controller and node plugins start as deploy/ starts them (CSI_LUKS_BACKEND=rbd, the cluster list in
CSI_LUKS_CEPH_CONFIG, a `local` KMS); every request carries client.csi's cephx userID/userKey through
csi-sanity's --csi.secrets. The host has neither krbd nor device-mapper, so the Identity and Controller
specs run here; the Node specs need both and run in the VM (tests/vm/test_csi_sanity.py).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support.ceph import CephCluster
from tests.support.csi_sanity import NODE_SPECS, SanityRun, focus_on, rbd_encrypted, run_sanity, specs_of
from tests.support.csi_tools import tool
from tests.support.deployed_plugin import deployed_plugins

pytestmark = pytest.mark.csi_tools

RUN_TIMEOUT = 600.0  # seconds; the run takes about 1.5 minutes on 2 shared cores
# 33 of the 69 non-Node specs apply to what csi-luks advertises on RBD (measured: 33 passed, 35 skipped:
# no ListVolumes, GetCapacity, ListSnapshots, ControllerPublish, ModifyVolume or GroupController; 1 pending).
MIN_PASSED = 28


@pytest.mark.timeout(RUN_TIMEOUT + 120)
def test_csi_sanity_rbd_encrypted_identity_and_controller(
    tmp_path: Path, ceph: CephCluster, ceph_config: Path, ceph_secrets: dict[str, str]
) -> None:
    env, parameters = rbd_encrypted(tmp_path, ceph, ceph_config)
    run = SanityRun(parameters, ceph_secrets, skip=NODE_SPECS, min_passed=MIN_PASSED, timeout=RUN_TIMEOUT)
    with deployed_plugins(tmp_path, env) as plugins:
        run_sanity(tmp_path, plugins, run)


def test_a_rerun_focus_selects_exactly_the_named_specs(tmp_path: Path) -> None:
    """What run_sanity reruns after csi-sanity's connect race: csi-sanity itself (a dry run) picks them."""
    names = [
        "Controller Service [Controller Server] CreateVolume should fail when no name is provided",
        "GroupController Service [GroupController Server] GroupControllerGetCapabilities should return "
        "appropriate capabilities",
    ]
    report = tmp_path / "report.json"
    subprocess.run(
        [str(tool("csi-sanity")), "--csi.endpoint=unix:///nonexistent", "--ginkgo.dry-run",
         f"--ginkgo.focus={focus_on(names)}", f"--ginkgo.json-report={report}"],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=True,
    )  # fmt: skip
    selected = [name for name, state in specs_of(report) if state == "passed"]  # a dry run passes them
    assert sorted(selected) == sorted(names)

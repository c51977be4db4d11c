"""The e2e tier's session fixtures: one Kubernetes node per guest boot (`k8s_node`) and csi-luks on it.

Test modules import them from here. Without the programs (a clone without ../shared/tools) the tests
skip with a message saying how to get them; under CI=true that is a failure, as is a failed bring-up.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import guest
from tests.support.kube_node import (
    PROGRESS_ENV,
    CsiDriver,
    KubeNode,
    ProgramsUnavailable,
    kube_node,
    start_driver,
)

__all__ = ["k8s_node", "luks_driver"]

LOCAL_KMS = "local-1"


@pytest.fixture(scope="session")
def k8s_node() -> Iterator[KubeNode]:
    # Short, guest-local paths: kubelet's plugin sockets live below the work directory.
    workdir = Path(tempfile.mkdtemp(prefix="k8s-", dir="/tmp"))
    report = os.environ.get(guest.REPORT_ENV)
    if guest.IN_GUEST and report:  # progress where the host can follow it
        os.environ[PROGRESS_ENV] = str(Path(report).parent / "k8s-progress.log")
    try:
        with kube_node(workdir) as node:
            yield node
    except ProgramsUnavailable as exc:
        if guest.STRICT:
            pytest.fail(f"CI=true, and {exc}")
        pytest.skip(str(exc))
    finally:
        # The guest's /tmp is gone after the run: keep every process's log beside the guest's report.
        if guest.IN_GUEST and report and (workdir / "logs").is_dir():
            shutil.copytree(workdir / "logs", Path(report).parent / "k8s-logs", dirs_exist_ok=True)


@pytest.fixture(scope="session")
def luks_driver(k8s_node: KubeNode) -> CsiDriver:
    """csi-luks with the standalone backend and a `local` KMS, as deploy/kustomize/base runs it."""
    keys = k8s_node.workdir / "keys"
    keys.mkdir(exist_ok=True)
    kms = {LOCAL_KMS: {"encryptionKMSType": "local", "keyFile": str(keys / "kek-1")}}
    return start_driver(k8s_node, kms_config=kms)

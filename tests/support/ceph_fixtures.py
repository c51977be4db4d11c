"""The session's Ceph cluster: the `ceph` fixture.

On the host it builds a new cluster (about 1.2 s). Inside the VM the `ceph` CLI takes seconds a call, so
the host builds the cluster before the guest boots (see guest.py) and hands over its stopped directory;
here it is copied to guest-local storage (9p is slow and the shared tree read-only) and started.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import csi_tools, guest
from tests.support.audit import AUDIT
from tests.support.ceph import CephCluster, ceph_cluster, load_cluster
from tests.support.cephcsi import CephCsi, CephCsiPool, running_cephcsi

__all__ = ["ceph", "ceph_config", "ceph_secrets", "cephcsi", "cephcsi_pool"]

CLUSTER_ID = "test-cluster"  # the session cluster's id in the plugin's cluster configuration


@pytest.fixture(scope="session")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    prebuilt = os.environ.get(guest.CEPH_ENV)
    if not (guest.IN_GUEST and prebuilt):
        with ceph_cluster(tmp_path_factory.mktemp("ceph")) as cluster:
            yield cluster
        return
    error = Path(prebuilt) / guest.CEPH_BUILD_ERROR
    if error.exists():
        pytest.fail(error.read_text())
    # The guest's /tmp is its own tmpfs; the handed-over directory lives on the shared 9p mount.
    started = time.monotonic()
    local = Path(tempfile.mkdtemp(prefix="ceph-", dir="/tmp")) / "cluster"
    cluster = load_cluster(Path(prebuilt)).relocate(local)
    copied = time.monotonic()
    try:
        cluster.start()
        print(
            f"ceph: the host-built cluster copied in {copied - started:.1f}s and started in the guest "
            f"in {time.monotonic() - copied:.1f}s"
        )
        yield cluster
    finally:
        try:
            cluster.shutdown()
        finally:
            # The guest's /tmp is gone after the run: keep its daemon logs beside the host's.
            shutil.copytree(local / "log", Path(prebuilt) / "guest-log", dirs_exist_ok=True)


@pytest.fixture(scope="session")
def ceph_config(ceph: CephCluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The plugin's cluster configuration (ceph-csi's config.json) for the session cluster."""
    path = tmp_path_factory.mktemp("ceph-config") / "config.json"
    # "v1:": the test monitor listens on a random port, where a client would otherwise try msgr v2.
    path.write_text(json.dumps([{"clusterID": CLUSTER_ID, "monitors": [f"v1:{ceph.monitors}"]}]))
    AUDIT.register_ceph_key(ceph.csi.key)
    return path


@pytest.fixture
def ceph_secrets(ceph: CephCluster) -> dict[str, str]:
    """The CSI secrets of client.csi (the provisioner, node-stage and expand secrets)."""
    return {"userID": ceph.csi.id, "userKey": ceph.csi.key}


@pytest.fixture(scope="session")
def cephcsi(ceph: CephCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCsi]:
    """Ceph-CSI's RBD controller (cephcsi v3.8.1) on the session cluster, under the clusterID of
    ceph_config, so its volume handles name the same cluster for csi-luks; its KMS list has the `metadata`
    entry METADATA_KMS_ID (CephCsi.set_kms_config replaces it)."""
    binary = csi_tools.tool("cephcsi")  # skips, or fails under CI=true, when it cannot be built
    with running_cephcsi(binary, ceph, CLUSTER_ID, tmp_path_factory.mktemp("cephcsi")) as running:
        yield running


@pytest.fixture
def cephcsi_pool(ceph: CephCluster, ceph_secrets: dict[str, str]) -> CephCsiPool:
    """The suite's pool and client.csi's secrets; tests.support.cephcsi.new_pool makes a pool of its own."""
    return CephCsiPool(ceph.pool, ceph_secrets)

"""csi-luks driven by a real Kubernetes node: kubelet, the CSI sidecars, PVCs, snapshots and pods (in the VM).

Run it alone with `.venv/bin/python -m pytest tests/vm/test_kubernetes_e2e.py -rA` (one guest, 6 GB).

One cluster per guest boot (`k8s_node`: etcd, kube-apiserver, controller-manager, scheduler, containerd
and kubelet, several minutes under TCG); every scenario runs on it. Nothing here calls the plugin's gRPC
API: kubelet and the sidecars do, as in a cluster. The checks on the node (mappings, loop devices, the
backing store's bytes) read the system directly. Progress of the bring-up goes to k8s-progress.log and
every process's log to k8s-logs/, beside the guest's report.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from csi_luks.luks import Cryptsetup, mapper_name
from csi_luks.volumes.rbd import decode_volume_id
from csi_luks.volumes.standalone import StandaloneBackend
from tests.support.ceph import CephCluster
from tests.support.ceph_fixtures import CLUSTER_ID
from tests.support.kmip_server import SERVER_NAME as KMIP_SERVER_NAME
from tests.support.kmip_server import KMIPServer
from tests.support.kms_env import build_kms_env
from tests.support.kube_node import CsiDriver, KubeNode, start_driver
from tests.support.kube_node_fixture import LOCAL_KMS, k8s_node, luks_driver
from tests.support.kube_workloads import MOUNT, Workloads, mount_path
from tests.support.openbao import OpenBao
from tests.support.operations import vault_kv_has

__all__ = ["k8s_node", "luks_driver"]

# The first test brings the node up (about 7 minutes under TCG); each scenario takes minutes too.
pytestmark = pytest.mark.timeout(1800)

DEK = "csi-luks/dek"
RBD_DRIVER = "rbd.csi-luks.io"
LUKS_MAGIC = b"LUKS\xba\xbe"


@pytest.fixture(scope="module")
def local(luks_driver: CsiDriver) -> Workloads:
    """A namespace and a StorageClass `luks-local` (encrypted, local KMS) shared by the scenarios."""
    work = Workloads(luks_driver)
    work.create_namespace()
    work.storage_class("luks-local", {"encrypted": "true", "encryptionKMSID": LOCAL_KMS})
    return work


def backend(driver: CsiDriver) -> StandaloneBackend:
    return StandaloneBackend(driver.state_dir)


def assert_unstaged(work: Workloads, volume_id: str) -> None:
    """kubelet ran NodeUnstage: nothing of the volume is in use, mapped or attached on the node."""
    work.wait(f"{volume_id} no longer in use on the node", lambda: not work.volume_in_use(volume_id))
    work.wait(
        f"{volume_id} unmapped and detached",
        lambda: (
            not Cryptsetup().status(mapper_name(volume_id)).active
            and backend(work.driver).find_attachment(volume_id) is None
        ),
    )


def assert_ciphertext_only(work: Workloads, volume_id: str, marker: str) -> None:
    data = backend(work.driver).image_path(volume_id).read_bytes()
    assert data[:6] == LUKS_MAGIC, f"no LUKS2 header on {volume_id}\n{work.diagnostics()}"
    assert marker.encode() not in data, f"the marker is in clear on {volume_id}"


def writer(work: Workloads, pod: str, pvc: str, marker: str) -> None:
    """A pod that writes the marker onto its volume; wait until it has."""
    work.pod(pod, pvc, once=f"echo {marker} > {MOUNT}/marker && sync && echo {pod} > {MOUNT}/written-by")
    work.running(pod)
    work.wait(f"{pod} wrote the marker", lambda: work.read_pod_file(pod, pvc, "written-by") == pod)


def reader(work: Workloads, pod: str, pvc: str) -> str:
    """A pod that reads the marker (and copies what it read to a file of its own); what it read."""
    work.pod(pod, pvc, once=f"cat {MOUNT}/marker > {MOUNT}/seen-by-{pod}")
    work.running(pod)
    seen: str = work.wait(f"{pod} read the marker", lambda: work.read_pod_file(pod, pvc, f"seen-by-{pod}"))
    return seen


def write_unstage_and_read_back(work: Workloads, pvc: str, volume_id: str, marker: str, prefix: str) -> None:
    """A pod writes the marker (the volume mapped meanwhile), goes; only ciphertext is left at rest; a
    second pod reads the marker back through a new stage, and goes."""
    writer(work, f"{prefix}writer", pvc, marker)
    assert Cryptsetup().status(mapper_name(volume_id)).active, work.diagnostics()
    work.delete("pod", f"{prefix}writer")
    assert_unstaged(work, volume_id)
    assert_ciphertext_only(work, volume_id, marker)
    assert reader(work, f"{prefix}reader", pvc) == marker, work.diagnostics()
    work.delete("pod", f"{prefix}reader")
    assert_unstaged(work, volume_id)


def test_node_comes_up_and_registers_the_driver(k8s_node: KubeNode, luks_driver: CsiDriver) -> None:
    print(f"bring-up: {k8s_node.bring_up_seconds:.0f}s")
    assert not k8s_node.processes.dead(), k8s_node.diagnostics()


def test_encrypted_pvc_pod_lifecycle_keeps_data_encrypted_at_rest(local: Workloads) -> None:
    marker = f"csi-luks-e2e-marker-{os.urandom(8).hex()}"
    local.pvc("data", "luks-local")
    volume_id = local.bound_volume("data").spec.csi.volume_handle
    assert DEK in backend(local.driver).get(volume_id).metadata  # the local KMS: wrapped, in its metadata

    write_unstage_and_read_back(local, "data", volume_id, marker, prefix="")


def test_snapshot_restore_and_clone_are_readable_each_with_its_own_dek(local: Workloads) -> None:
    marker = f"csi-luks-e2e-snapshot-{os.urandom(8).hex()}"
    local.snapshot_class("luks-snapshots")
    local.pvc("origin", "luks-local")
    origin = local.bound_volume("origin").spec.csi.volume_handle
    writer(local, "origin-writer", "origin", marker)
    local.delete("pod", "origin-writer")
    assert_unstaged(local, origin)

    local.snapshot("origin-snap", "origin", "luks-snapshots")
    snapshot = local.snapshot_handle(local.ready_snapshot("origin-snap"))
    local.pvc(
        "restored",
        "luks-local",
        "96Mi",
        {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "origin-snap"},
    )
    local.pvc("cloned", "luks-local", "64Mi", {"kind": "PersistentVolumeClaim", "name": "origin"})
    restored = local.bound_volume("restored").spec.csi.volume_handle
    cloned = local.bound_volume("cloned").spec.csi.volume_handle
    deks = {i: backend(local.driver).get(i).metadata[DEK] for i in (origin, snapshot, restored, cloned)}
    assert len(set(deks.values())) == 4, f"a DEK is shared: {deks}"

    copy = "; ".join(f"cat {mount_path(i)}/marker > {mount_path(i)}/seen" for i in (0, 1))
    local.pod("copies-reader", "restored", "cloned", once=copy)
    local.running("copies-reader")
    for pvc in ("restored", "cloned"):
        seen = local.wait(
            f"copies-reader read {pvc}", lambda p=pvc: local.read_pod_file("copies-reader", p, "seen")
        )
        assert seen == marker, local.diagnostics()
    local.delete("pod", "copies-reader")
    for volume_id in (restored, cloned):
        assert_unstaged(local, volume_id)


def filesystem_kib(work: Workloads, pod: str, pvc: str) -> int:
    """The size of the pod's /data file system as the pod sees it (its `df -kP`, every second: POSIX
    output keeps a long device name and its numbers on one line, where busybox would wrap them)."""
    line = work.read_pod_file(pod, pvc, "df")
    return int(line.split()[1]) if line else 0


def test_online_expansion_grows_the_filesystem_in_the_pod(local: Workloads) -> None:
    local.pvc("growing", "luks-local", "64Mi")
    volume_id = local.bound_volume("growing").spec.csi.volume_handle
    df = f"df -kP {MOUNT} | tail -n 1 > {MOUNT}/df.new && mv {MOUNT}/df.new {MOUNT}/df"
    local.pod("grower", "growing", loop=df)
    local.running("grower")
    before = local.wait("the pod's df", lambda: filesystem_kib(local, "grower", "growing"))
    local.resize("growing", "192Mi")
    local.wait("the PVC's capacity reaches 192Mi", lambda: local.capacity("growing") == "192Mi")
    after = local.wait(
        "the pod's file system grows past 150 MiB",
        lambda: (kib := filesystem_kib(local, "grower", "growing")) > 150 * 1024 and kib,
    )
    assert after > before, local.diagnostics()
    local.delete("pod", "grower")
    assert_unstaged(local, volume_id)


def test_node_plugin_restart_keeps_the_pod_data_and_a_later_unstage_works(local: Workloads) -> None:
    marker = f"csi-luks-e2e-restart-{os.urandom(8).hex()}"
    local.pvc("steady", "luks-local")
    volume_id = local.bound_volume("steady").spec.csi.volume_handle
    # The pod counts, and copies the marker it reads, every second.
    live = f"i=$((i+1)); echo $i $(cat {MOUNT}/marker) > {MOUNT}/live.new && mv {MOUNT}/live.new {MOUNT}/live"
    local.pod("steady-user", "steady", once=f"echo {marker} > {MOUNT}/marker; i=0", loop=live)
    local.running("steady-user")

    def count() -> int:
        text = local.read_pod_file("steady-user", "steady", "live") or "0 none"
        number, seen = text.split()
        assert seen == marker, f"the pod read {seen!r}"
        return int(number)

    local.wait("the pod reads its marker", count)
    local.driver.restart_node_plugin()
    local.wait("the restarted node plugin listens", local.driver.node_socket.is_socket)
    after_restart = count()
    local.wait("the pod keeps reading its data", lambda: count() > after_restart + 2)
    local.delete("pod", "steady-user")
    assert_unstaged(local, volume_id)  # by the new process, from what it finds on the system


def test_vault_tenant_serviceaccount_writes_the_dek_of_a_pvc_in_its_namespace(
    local: Workloads, session_bao: OpenBao, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """vaulttenantsa: the plugin logs in to OpenBao as the PVC namespace's ServiceAccount.

    The namespace reaches CreateVolume only through external-provisioner's --extra-create-metadata; a
    namespace whose ServiceAccount OpenBao's role does not bind gets no volume.
    """
    env = build_kms_env(session_bao, local.node.api, tmp_path_factory.mktemp("e2e-kms-env"))
    entry = {
        "encryptionKMSType": "vaulttenantsa", "vaultAddress": session_bao.address,
        "vaultRole": "tenant", "vaultPassphrasePath": "e2e-tenants/",
    }  # fmt: skip
    config = json.loads(local.driver.kms_config.read_text())
    local.driver.kms_config.write_text(json.dumps({**config, "tenant-sa": entry}))
    tenant = Workloads(local.driver, env.tenant.namespace)
    tenant.create_namespace()
    tenant.storage_class("luks-tenant-sa", {"encrypted": "true", "encryptionKMSID": "tenant-sa"})
    tenant.pvc("tenant-data", "luks-tenant-sa")
    volume_id = tenant.bound_volume("tenant-data").spec.csi.volume_handle
    stored = env.bao.client().secrets.kv.v2.read_secret_version(
        path=f"e2e-tenants/{volume_id}", mount_point="secret", raise_on_deleted_version=True
    )
    assert len(stored["data"]["data"]["passphrase"]) == 43

    marker = f"csi-luks-e2e-tenant-{os.urandom(8).hex()}"
    writer(tenant, "tenant-user", "tenant-data", marker)
    tenant.delete("pod", "tenant-user")
    assert_unstaged(tenant, volume_id)

    # The outsider's ServiceAccount is bound to no role: provisioning fails and leaves no volume.
    outsider = Workloads(local.driver, env.outsider.namespace)
    outsider.create_namespace()
    before = {v.volume_id for v in backend(local.driver).list()}
    outsider.pvc("outsider-data", "luks-tenant-sa")
    outsider.wait(
        "ProvisioningFailed (permission denied) for the outsider's PVC",
        lambda: "ProvisioningFailed" in (text := outsider.events_text()) and "ermission" in text,
    )
    assert {v.volume_id for v in backend(local.driver).list()} <= before | {volume_id}
    outsider.delete("pvc", "outsider-data")

    tenant.delete("pvc", "tenant-data")
    tenant.wait(
        "the DEK removed from OpenBao with the volume",
        lambda: not vault_kv_has(env.bao, f"e2e-tenants/{volume_id}"),
    )


def test_kmip_wraps_the_dek_of_a_pvc_through_its_lifecycle(
    local: Workloads, session_kmip: KMIPServer
) -> None:
    """The `kmip` type (Encrypt/Decrypt on the KMIP server), its certificates a Secret the plugin reads from
    the cluster: create, stage, write, unstage, stage again, read, delete; the DEK only ever wrapped."""
    local.apply({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "e2e-kmip", "namespace": "kube-system"},
        "stringData": session_kmip.secret_data(),
    })  # fmt: skip
    entry = {
        "encryptionKMSType": "kmip", "KMIP_ENDPOINT": session_kmip.endpoint, "KMIP_SECRET_NAME": "e2e-kmip",
        "KMIP_SECRET_NAMESPACE": "kube-system", "TLS_SERVER_NAME": KMIP_SERVER_NAME, "USE_CRYPTO_RPC": "true",
    }  # fmt: skip
    config = json.loads(local.driver.kms_config.read_text())
    local.driver.kms_config.write_text(json.dumps({**config, "e2e-kmip": entry}))
    local.storage_class("luks-kmip", {"encrypted": "true", "encryptionKMSID": "e2e-kmip"})
    local.pvc("kmip-data", "luks-kmip")
    volume_id = local.bound_volume("kmip-data").spec.csi.volume_handle
    wrapped = backend(local.driver).get(volume_id).metadata[DEK]
    assert wrapped and len(wrapped) > 43, wrapped  # the KMIP server's ciphertext, not a bare passphrase

    marker = f"csi-luks-e2e-kmip-{os.urandom(8).hex()}"
    write_unstage_and_read_back(local, "kmip-data", volume_id, marker, prefix="kmip-")

    local.delete("pvc", "kmip-data")
    local.wait(f"{volume_id} and its wrapped DEK deleted",
               lambda: volume_id not in {v.volume_id for v in backend(local.driver).list()})  # fmt: skip


@pytest.fixture(scope="module")
def rbd(k8s_node: KubeNode, ceph: CephCluster, ceph_config: Path) -> Workloads:
    """A second driver, rbd.csi-luks.io, on the guest's Ceph cluster; cephx through a Secret."""
    keys = k8s_node.workdir / "rbd-keys"
    keys.mkdir(exist_ok=True)
    driver = start_driver(
        k8s_node, name=RBD_DRIVER, backend="rbd", ceph_config=ceph_config,
        kms_config={LOCAL_KMS: {"encryptionKMSType": "local", "keyFile": str(keys / "kek-1")}},
    )  # fmt: skip
    work = Workloads(driver)
    work.create_namespace()
    work.apply({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "cephx-csi", "namespace": "kube-system"},
        "stringData": {"userID": ceph.csi.id, "userKey": ceph.csi.key},
    })  # fmt: skip
    secret = {"name": "cephx-csi", "namespace": "kube-system"}
    secret_params = {
        f"csi.storage.k8s.io/{kind}-secret-{field}": value
        for kind in ("provisioner", "node-stage", "controller-expand")
        for field, value in secret.items()
    }
    work.storage_class("luks-rbd", {
        "clusterID": CLUSTER_ID, "pool": ceph.pool, "encrypted": "true", "encryptionKMSID": LOCAL_KMS,
        **secret_params,
    })  # fmt: skip
    return work


def test_rbd_backend_lifecycle_through_kubelet(rbd: Workloads, ceph: CephCluster, tmp_path: Path) -> None:
    marker = f"csi-luks-e2e-rbd-{os.urandom(8).hex()}"
    rbd.pvc("rbd-data", "luks-rbd")
    volume_id = rbd.bound_volume("rbd-data").spec.csi.volume_handle
    spec = decode_volume_id(volume_id).spec
    writer(rbd, "rbd-writer", "rbd-data", marker)
    assert Path("/sys/bus/rbd/devices").exists() and os.listdir("/sys/bus/rbd/devices"), rbd.diagnostics()
    rbd.delete("pod", "rbd-writer")
    rbd.wait(f"{volume_id} no longer in use on the node", lambda: not rbd.volume_in_use(volume_id))
    rbd.wait(
        f"{volume_id} unmapped (dm-crypt and krbd)",
        lambda: (
            not Cryptsetup().status(mapper_name(volume_id)).active and not os.listdir("/sys/bus/rbd/devices")
        ),
    )
    exported = tmp_path / "image.raw"
    ceph.run("rbd", "export", "--no-progress", spec, str(exported))
    data = exported.read_bytes()
    assert data[:6] == LUKS_MAGIC and marker.encode() not in data, "the image is not ciphertext only"

    assert reader(rbd, "rbd-reader", "rbd-data") == marker, rbd.diagnostics()
    rbd.delete("pod", "rbd-reader")
    rbd.delete("pvc", "rbd-data")
    image = spec.split("/")[-1]
    rbd.wait(f"the image {image} removed", lambda: image not in ceph.run("rbd", "ls", ceph.pool))


def test_deleting_pvcs_removes_volumes_snapshots_and_deks_and_leaves_nothing_on_the_node(
    local: Workloads,
) -> None:
    for kind in ("pod", "volumesnapshot", "pvc"):
        for name in local.names(kind):
            local.delete(kind, name)
    local.wait("the driver's PersistentVolumes deleted", lambda: not local.driver_objects()[0])
    local.wait("the driver's VolumeSnapshotContents deleted", lambda: not local.driver_objects()[1])
    left = backend(local.driver).list()
    assert not left, f"volumes or snapshots (and their DEKs) left: {left}\n{local.diagnostics()}"
    assert not [m for m in os.listdir("/dev/mapper") if m.startswith("luks-")], local.diagnostics()
    loops = subprocess.run(["losetup", "--list", "--noheadings", "--output=BACK-FILE"],
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert str(local.driver.state_dir) not in loops, loops
    mounts = Path("/proc/self/mounts").read_text()
    assert str(local.node.kubelet_root / "plugins" / "kubernetes.io" / "csi") not in mounts, mounts

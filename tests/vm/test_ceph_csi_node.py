"""The way off Ceph-CSI and back, on a node (runs in the VM): the real cephcsi v3.8.1 and csi-luks stage
the same encrypted RBD volume in turn, each reading what the other wrote.

cephcsi runs as controller and node plugin in a mount namespace of its own (tests/support/cephcsi.py):
what it mounts is read through CephCsi.inside(). Its DeleteVolume needs a mgr, which this guest spares:
csi-luks deletes the volumes (as Ceph-CSI would, tests/host/test_ceph_csi_volumes.py).
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import hvac.exceptions
import kubernetes.client as k8s
import pytest

from csi_luks import kube as plugin_kube
from csi_luks.csi import csi_pb2
from csi_luks.csiaddons import encryptionkeyrotation_pb2 as rotation_pb
from csi_luks.csiaddons import encryptionkeyrotation_pb2_grpc as rotation_grpc
from csi_luks.kms.base import KMSContext
from csi_luks.kms.config import KMSConfig
from csi_luks.kms.metadata import MetadataKMS
from csi_luks.operations.commands import header_backup
from csi_luks.operations.status import volume_status
from csi_luks.operations.tool import EXIT_OK, Tool
from csi_luks.volumes.ceph_clusters import CephClusters
from csi_luks.volumes.rbd import RbdBackend
from tests.support import cephcsi as oracle
from tests.support import csi_tools
from tests.support.ceph import CephCluster
from tests.support.ceph_fixtures import CLUSTER_ID
from tests.support.cephcsi import CephCsi, running_cephcsi
from tests.support.kube import KubeCluster, kube_cluster
from tests.support.openbao import OpenBao
from tests.support.plugin import MiB, RunningPlugin, mount_capability, running_plugin

pytestmark = pytest.mark.csi_tools  # the host hands cephcsi to the guest

ENCRYPTED, DEK = "rbd.csi.ceph.com/encrypted", "rbd.csi.ceph.com/dek"


@pytest.fixture(scope="module")
def ceph_csi(ceph: CephCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCsi]:
    binary = csi_tools.tool("cephcsi")
    root = tmp_path_factory.mktemp("cephcsi-node")
    with running_cephcsi(binary, ceph, CLUSTER_ID, root, node=True, mgr=False) as running:
        yield running


@pytest.fixture
def plugin(tmp_path: Path, ceph_config: Path) -> Iterator[RunningPlugin]:
    """csi-luks (controller and node) with Ceph-CSI's KMS entry under Ceph-CSI's id."""
    root = tmp_path / "plugin"
    root.mkdir()
    (root / "kms-config.json").write_text(
        f'{{"{oracle.METADATA_KMS_ID}": {{"encryptionKMSType": "metadata"}}}}'
    )
    with running_plugin(root, ceph_config=ceph_config) as running:
        yield running


@pytest.fixture
def creds(ceph_secrets: dict[str, str]) -> dict[str, str]:
    """The provisioner's and node's secrets: client.csi, and the `metadata` KMS's passphrase."""
    return {**ceph_secrets, oracle.PASSPHRASE_KEY: secrets.token_urlsafe(24)}


def stage(plugin: RunningPlugin, volume: csi_pb2.Volume, staging: Path, creds: dict[str, str]) -> None:
    staging.mkdir(parents=True, exist_ok=True)
    plugin.node.NodeStageVolume(
        csi_pb2.NodeStageVolumeRequest(
            volume_id=volume.volume_id, staging_target_path=str(staging),
            volume_capability=mount_capability(), volume_context=dict(volume.volume_context), secrets=creds,
        ),
        timeout=600,
    )  # fmt: skip


def unstage(plugin: RunningPlugin, volume_id: str, staging: Path) -> None:
    request = csi_pb2.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=str(staging))
    plugin.node.NodeUnstageVolume(request, timeout=600)


def meta(ceph: CephCluster, volume_id: str) -> dict[str, str]:
    return oracle.image_meta(ceph, ceph.pool, f"csi-vol-{oracle.decode_handle(volume_id).uuid}")


def plain_dek(creds: dict[str, str], volume_id: str, wrapped: str) -> str:
    kms = MetadataKMS("check", {}, KMSContext({oracle.PASSPHRASE_KEY: creds[oracle.PASSPHRASE_KEY]}))
    return kms.decrypt_dek(volume_id, wrapped)


def delete(plugin: RunningPlugin, volume_id: str, creds: dict[str, str]) -> None:
    plugin.controller.DeleteVolume(
        csi_pb2.DeleteVolumeRequest(volume_id=volume_id, secrets=creds), timeout=120
    )


def test_a_volume_ceph_csi_formatted_and_filled_opens_under_csi_luks_grows_rotates_and_goes_back(
    ceph_csi: CephCsi,
    plugin: RunningPlugin,
    ceph: CephCluster,
    ceph_config: Path,
    creds: dict[str, str],
    tmp_path: Path,
) -> None:
    volume = ceph_csi.create_volume("pvc-vm-takeover-1", 128 * MiB, ceph.pool, creds)
    handle = volume.volume_id

    # Ceph-CSI stages it first: its own luksFormat and mkfs, then the user's data.
    mounted = ceph_csi.stage(volume, ceph_csi.shared_dir / "stage-1", creds)
    ceph_csi.inside("sh", "-c", f"echo ceph-csi-wrote > {mounted}/from-ceph-csi && sync -f {mounted}")
    ceph_csi.unstage(handle, ceph_csi.shared_dir / "stage-1")
    assert meta(ceph, handle)[ENCRYPTED] == "encrypted"
    first_dek = plain_dek(creds, handle, meta(ceph, handle)[DEK])

    # The operator's first look: `csi-luks status` finds the DEK opening Ceph-CSI's key slot and no header
    # backup yet; `csi-luks header backup` makes one, and the volume is consistent.
    tool = Tool(
        RbdBackend(CephClusters(ceph_config), tmp_path / "tool-state", resume_flattens=False).for_request(
            creds, one_request=False
        ),
        KMSConfig(None, {oracle.METADATA_KMS_ID: {"encryptionKMSType": "metadata"}}),
        secrets=creds,
    )
    seen = volume_status(tool, handle)
    assert (seen.state, seen.dek_retrievable, seen.dek_slot, seen.header_backup) == (
        "encrypted",
        True,
        0,
        "missing",
    )
    assert header_backup(tool, [handle]) == EXIT_OK
    seen = volume_status(tool, handle)
    assert seen.header_backup == "matches" and seen.consistent, seen.problems

    # csi-luks takes it over: opens Ceph-CSI's header with Ceph-CSI's DEK, never formats.
    staging = tmp_path / "staging"
    stage(plugin, volume, staging, creds)
    assert (staging / "from-ceph-csi").read_text() == "ceph-csi-wrote\n"
    (staging / "from-csi-luks").write_text("csi-luks-wrote\n")
    os.sync()
    # A snapshot of it and a restore (csi-luks volumes, with its DEK): both files on the restored volume.
    snapshot = plugin.controller.CreateSnapshot(
        csi_pb2.CreateSnapshotRequest(name="snap-vm-takeover-1", source_volume_id=handle, secrets=creds),
        timeout=300,
    ).snapshot
    restored = plugin.controller.CreateVolume(
        csi_pb2.CreateVolumeRequest(
            name="pvc-vm-takeover-1-restored",
            capacity_range=csi_pb2.CapacityRange(required_bytes=128 * MiB),
            volume_capabilities=[mount_capability()],
            parameters={
                "clusterID": CLUSTER_ID,
                "pool": ceph.pool,
                "encrypted": "true",
                "encryptionKMSID": oracle.METADATA_KMS_ID,
            },
            secrets=creds,
            volume_content_source=csi_pb2.VolumeContentSource(
                snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snapshot.snapshot_id)
            ),
        ),
        timeout=300,
    ).volume
    stage(plugin, restored, tmp_path / "restored", creds)
    assert (tmp_path / "restored" / "from-ceph-csi").read_text() == "ceph-csi-wrote\n"
    assert (tmp_path / "restored" / "from-csi-luks").read_text() == "csi-luks-wrote\n"
    unstage(plugin, restored.volume_id, tmp_path / "restored")
    delete(plugin, restored.volume_id, creds)
    plugin.controller.DeleteSnapshot(
        csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot.snapshot_id, secrets=creds), timeout=300
    )
    # Grows it (controller and node) ...
    plugin.controller.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(
            volume_id=handle, capacity_range=csi_pb2.CapacityRange(required_bytes=256 * MiB),
            volume_capability=mount_capability(), secrets=creds,
        ),
        timeout=120,
    )  # fmt: skip
    plugin.node.NodeExpandVolume(
        csi_pb2.NodeExpandVolumeRequest(
            volume_id=handle, volume_path=str(staging), staging_target_path=str(staging),
            capacity_range=csi_pb2.CapacityRange(required_bytes=256 * MiB),
            volume_capability=mount_capability(),
        ),
        timeout=600,
    )  # fmt: skip
    stats = os.statvfs(staging)
    assert stats.f_blocks * stats.f_frsize > 200 * MiB
    # ... and rotates its key, which Ceph-CSI never could: a new DEK, in Ceph-CSI's key, Ceph-CSI's format.
    rotation_grpc.EncryptionKeyRotationControllerStub(plugin.channel).EncryptionKeyRotate(
        rotation_pb.EncryptionKeyRotateRequest(volume_id=handle, volume_path=str(staging), secrets=creds),
        timeout=600,
    )
    after = meta(ceph, handle)
    assert plain_dek(creds, handle, after[DEK]) != first_dek
    assert after[ENCRYPTED] == "encrypted"
    unstage(plugin, handle, staging)

    # The way back: Ceph-CSI stages it again, opens it with the rotated DEK, and finds both files.
    mounted = ceph_csi.stage(volume, ceph_csi.shared_dir / "stage-2", creds)
    found = ceph_csi.inside("cat", f"{mounted}/from-ceph-csi", f"{mounted}/from-csi-luks")
    assert found == "ceph-csi-wrote\ncsi-luks-wrote\n"
    size = int(ceph_csi.inside("df", "--block-size=1", "--output=size", str(mounted)).split()[-1])
    assert size > 200 * MiB  # the filesystem csi-luks grew
    ceph_csi.unstage(handle, ceph_csi.shared_dir / "stage-2")
    delete(plugin, handle, creds)


def test_a_volume_ceph_csi_never_staged_is_formatted_once_by_csi_luks_and_opens_under_ceph_csi(
    ceph_csi: CephCsi, plugin: RunningPlugin, ceph: CephCluster, creds: dict[str, str], tmp_path: Path
) -> None:
    volume = ceph_csi.create_volume("pvc-vm-takeover-2", 96 * MiB, ceph.pool, creds)
    handle = volume.volume_id
    assert meta(ceph, handle)[ENCRYPTED] == "encryptionPrepared"
    dek = plain_dek(creds, handle, meta(ceph, handle)[DEK])

    staging = tmp_path / "staging"
    stage(plugin, volume, staging, creds)  # the first stage: luksFormat with Ceph-CSI's DEK, mkfs
    (staging / "from-csi-luks").write_text("formatted by csi-luks\n")
    os.sync()
    unstage(plugin, handle, staging)
    assert meta(ceph, handle)[ENCRYPTED] == "encrypted"  # Ceph-CSI must not format it again
    assert plain_dek(creds, handle, meta(ceph, handle)[DEK]) == dek
    stage(plugin, volume, staging, creds)  # exactly once: the file is still there
    assert (staging / "from-csi-luks").read_text() == "formatted by csi-luks\n"
    unstage(plugin, handle, staging)

    mounted = ceph_csi.stage(volume, ceph_csi.shared_dir / "stage-3", creds)
    assert ceph_csi.inside("cat", f"{mounted}/from-csi-luks") == "formatted by csi-luks\n"
    ceph_csi.unstage(handle, ceph_csi.shared_dir / "stage-3")
    delete(plugin, handle, creds)


@pytest.fixture(scope="module")
def kube_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeCluster]:
    """An API server of this module's own (Ceph-CSI's vaulttokens reads the tenant's token Secret through
    it), stopped before the next module: the guest's Kubernetes e2e needs the cores."""
    with kube_cluster(tmp_path_factory.mktemp("kube-cephcsi"), ready_timeout=600) as cluster:
        yield cluster


def test_a_vault_volume_ceph_csi_formatted_opens_under_csi_luks_and_goes_back(
    ceph_csi: CephCsi,
    ceph: CephCluster,
    ceph_config: Path,
    ceph_secrets: dict[str, str],
    kube_api: KubeCluster,
    session_bao: OpenBao,
    tmp_path: Path,
) -> None:
    """Ceph-CSI's `vaulttokens` on OpenBao: Ceph-CSI formats and fills the volume, csi-luks (the same KMS
    entry; the tenant from Ceph-CSI's journal, the token from Ceph-CSI's default Secret) opens it and
    writes, and Ceph-CSI opens it again."""
    api = kube_api.api_client()
    core = k8s.CoreV1Api(api)
    tenant = "cephcsi-tenant"
    core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=tenant)))
    root = session_bao.client()
    token = oracle.vault_tenant_token(root, "cephcsi-node")
    core.create_namespaced_secret(
        tenant,
        k8s.V1Secret(metadata=k8s.V1ObjectMeta(name="ceph-csi-kms-token"), string_data={"token": token}),
    )
    entry = {"encryptionKMSType": "vaulttokens", "vaultAddress": session_bao.address,
             "vaultBackendPath": "secret/", "vaultBackend": "kv-v2"}  # fmt: skip
    with running_cephcsi(
        csi_tools.tool("cephcsi"), ceph, CLUSTER_ID, tmp_path / "cephcsi", kms_config={"vault-tokens": entry},
        node=True, mgr=False, kube=kube_api,
    ) as vault_csi:  # fmt: skip
        creds = dict(ceph_secrets)
        volume = vault_csi.create_volume(
            "pvc-vm-takeover-vault", 96 * MiB, ceph.pool, creds, kms_id="vault-tokens",
            more_parameters={"csi.storage.k8s.io/pvc/namespace": tenant},
        )  # fmt: skip
        handle = volume.volume_id
        mounted = vault_csi.stage(volume, vault_csi.shared_dir / "stage-v1", creds)
        vault_csi.inside("sh", "-c", f"echo ceph-csi-wrote > {mounted}/from-ceph-csi && sync -f {mounted}")
        vault_csi.unstage(handle, vault_csi.shared_dir / "stage-v1")
        assert meta(ceph, handle)[ENCRYPTED] == "encrypted" and DEK not in meta(ceph, handle)

        root_dir = tmp_path / "plugin"
        root_dir.mkdir()
        (root_dir / "kms-config.json").write_text(json.dumps({"vault-tokens": entry}))
        plugin_kube.set_api_client(api)
        try:
            with running_plugin(root_dir, ceph_config=ceph_config) as plugin:
                staging = tmp_path / "staging"
                stage(plugin, volume, staging, creds)
                assert (staging / "from-ceph-csi").read_text() == "ceph-csi-wrote\n"
                (staging / "from-csi-luks").write_text("csi-luks-wrote\n")
                os.sync()
                unstage(plugin, handle, staging)
                mounted = vault_csi.stage(volume, vault_csi.shared_dir / "stage-v2", creds)
                found = vault_csi.inside("cat", f"{mounted}/from-ceph-csi", f"{mounted}/from-csi-luks")
                assert found == "ceph-csi-wrote\ncsi-luks-wrote\n"
                vault_csi.unstage(handle, vault_csi.shared_dir / "stage-v2")
                delete(plugin, handle, creds)
        finally:
            plugin_kube.set_api_client(None)
    with pytest.raises(hvac.exceptions.InvalidPath):  # the DEK went with the volume
        root.secrets.kv.v2.read_secret_version(
            path=handle, mount_point="secret", raise_on_deleted_version=True
        )

"""Ceph-CSI's own RBD driver (`cephcsi` v3.8.1) as a controller on the session's Ceph cluster: the oracle.

csi-luks takes volumes over from Ceph-CSI and hands them back, so the formats Ceph-CSI leaves in the
cluster (volume handles, image names, image-meta keys, the RADOS omap journal, the wrapped DEK) are
checked against the real driver rather than assumed. The binary is built from ../shared/tools
(tests/support/csi_tools.py); without it the tests skip, or fail under CI=true.

cephcsi reads fixed paths: its cluster list from /etc/ceph-csi-config/config.json, its KMS list from
/etc/ceph-csi-encryption-kms-config/config.json; it writes /etc/ceph/ceph.conf and /etc/ceph/keyring if
missing, and each request's cephx key to a temporary file under /tmp/csi/keys. None of these may exist on
the host, so it runs in a mount namespace of its own (NAMESPACE_SCRIPT, as root: `unshare --mount
--propagation private`, so nothing mounted there propagates back):

- /etc is an overlay whose upper layer is a tmpfs mounted only in the namespace: the directories Ceph-CSI
  needs can be made there, and whatever it writes is gone with the namespace. A tmpfs rather than a
  directory of the test's: overlayfs refuses an upper layer on overlayfs, which a container's /tmp is.
- /etc/ceph is a tmpfs: cephcsi writes its own minimal ceph.conf, and no host ceph.conf (another
  cluster's mon_host, an admin keyring) reaches it.
- /etc/ceph-csi-config and /etc/ceph-csi-encryption-kms-config are bind mounts of the test's directories,
  so a test rewrites either configuration from the host (cephcsi reads both at every request).
- /tmp is a tmpfs holding csi/keys. The socket directory (the test's, under /tmp) is bind-mounted back
  over it: parked under the private /etc before /tmp is covered, then moved to its own path. A unix
  socket is found by inode, so the host connects to it through its own view of the same directory.

- The binary is bind-mounted at /etc/cephcsi-binary: a guest is handed it under /tmp, which is covered.

The namespace dies with cephcsi, and its mounts with it: a killed session leaves nothing to unmount.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import grpc
import hvac
import rados
import rbd

from csi_luks.csi import csi_pb2, csi_pb2_grpc
from tests.support import serve_process
from tests.support.audit import AUDIT
from tests.support.ceph import CephCluster
from tests.support.kms_env import DEK_POLICY
from tests.support.kube import KubeCluster
from tests.support.plugin import block_capability, mount_capability
from tests.support.serve_process import ServeProcess

DRIVER_NAME = "rbd.csi.ceph.com"
INSTANCE_ID = "default"  # --instanceid: names the journal's directory objects
VOLUMES_DIRECTORY = f"csi.volumes.{INSTANCE_ID}"  # omap: csi.volume.<request name> -> uuid
SNAPSHOTS_DIRECTORY = f"csi.snaps.{INSTANCE_ID}"  # omap: csi.snap.<request name> -> uuid
METADATA_KMS_ID = "cephcsi-metadata"  # the KMS entry of type `metadata` the fixture configures
PASSPHRASE_KEY = "encryptionPassphrase"  # the secret's name in the request (Ceph-CSI's secretskms.go)
# Ceph-CSI's volume handle (internal/util/volid.go): version 1, the clusterID's length and the pool id
# in hex, the journal's uuid.
HANDLE = re.compile(
    r"^0001-(?P<length>[0-9a-f]{4})-(?P<cluster_id>.+)-(?P<pool_id>[0-9a-f]{16})-"
    r"(?P<uuid>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$"
)

NAMESPACE_SCRIPT = r"""
set -eu
private=$1 config=$2 kms=$3 sockets=$4 binary=$5
shift 5
mount -t tmpfs -o mode=0700 cephcsi-private "$private"
mkdir "$private/etc-upper" "$private/etc-work"
mount -t overlay cephcsi-etc -o "lowerdir=/etc,upperdir=$private/etc-upper,workdir=$private/etc-work" /etc
mkdir -p /etc/ceph /etc/ceph-csi-config /etc/ceph-csi-encryption-kms-config /etc/cephcsi-sockets
mount -t tmpfs -o mode=0755 cephcsi-ceph /etc/ceph
mount --bind "$config" /etc/ceph-csi-config
mount --bind "$kms" /etc/ceph-csi-encryption-kms-config
mount --bind "$sockets" /etc/cephcsi-sockets
touch /etc/cephcsi-binary
mount --bind "$binary" /etc/cephcsi-binary
mount -t tmpfs -o mode=1777 cephcsi-tmp /tmp
mkdir -p /tmp/csi/keys "$sockets"
mount --move /etc/cephcsi-sockets "$sockets"
exec /etc/cephcsi-binary "$@"
"""


@dataclass(frozen=True)
class Handle:
    """A Ceph-CSI volume or snapshot handle, decoded."""

    cluster_id: str
    pool_id: int
    uuid: str


def decode_handle(handle: str) -> Handle:
    match = HANDLE.match(handle)
    if match is None:
        raise ValueError(f"not a Ceph-CSI handle: {handle!r}")
    cluster_id = match["cluster_id"]
    if int(match["length"], 16) != len(cluster_id):
        raise ValueError(f"{handle!r}: the clusterID's length field says {int(match['length'], 16)}")
    return Handle(cluster_id, int(match["pool_id"], 16), match["uuid"])


@dataclass(frozen=True)
class CephCsiPool:
    """A pool Ceph-CSI provisions in, with the CSI secrets of a user that may use it."""

    name: str
    secrets: Mapping[str, str]

    def with_passphrase(self, passphrase: str) -> dict[str, str]:
        """The secrets plus the `metadata` KMS's passphrase, as a StorageClass's provisioner secret."""
        return {**self.secrets, PASSPHRASE_KEY: passphrase}


def vault_tenant_token(client: hvac.Client, policy: str = "cephcsi-dek") -> str:
    """A Vault token for a tenant of Ceph-CSI's Vault types: the DEK paths, and sys/mounts, which Ceph-CSI's
    Vault client reads when it connects (csi-luks needs no more than the DEK paths)."""
    client.sys.create_or_update_policy(
        name=policy, policy=DEK_POLICY + 'path "sys/mounts" { capabilities = ["read"] }'
    )
    token: str = client.auth.token.create(policies=[policy], ttl="1h")["auth"]["client_token"]
    return token


def new_pool(ceph: CephCluster, name: str) -> CephCsiPool:
    """A new pool, and a new cephx user whose rbd profile covers just that pool."""
    ceph.create_pool(name)
    user = ceph.create_user(f"client.csi-{name}", {"mon": "profile rbd", "osd": f"profile rbd pool={name}"})
    AUDIT.register_ceph_key(user.key)
    return CephCsiPool(name, {"userID": user.id, "userKey": user.key})


@dataclass
class CephCsi:
    """A running cephcsi controller, its configuration files, and a gRPC client of it."""

    process: ServeProcess
    channel: grpc.Channel
    cluster_id: str
    config_dir: Path  # config.json: the cluster list
    kms_config_dir: Path  # config.json: the KMS list
    # A directory cephcsi and the test both see (its /tmp is its own): staging paths go here. What cephcsi
    # mounts stays in its mount namespace; inside() reaches it.
    shared_dir: Path

    @property
    def node(self) -> csi_pb2_grpc.NodeStub:
        return csi_pb2_grpc.NodeStub(self.channel)

    def inside(self, *argv: str, timeout: float = 120) -> str:
        """Run argv in cephcsi's mount namespace (where its NodeStage mounted the volume); its stdout."""
        result = subprocess.run(
            ["nsenter", "--target", str(self.process.proc.pid), "--mount", *argv],
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"{argv} in cephcsi's namespace failed: {result.stderr.strip()}")
        return result.stdout

    def stage(self, volume: csi_pb2.Volume, staging: Path, secrets: Mapping[str, str]) -> Path:
        """NodeStageVolume (ext4); the directory Ceph-CSI mounted it at (<staging>/<volume id>, seen
        through inside())."""
        staging.mkdir(parents=True, exist_ok=True)
        self.node.NodeStageVolume(
            csi_pb2.NodeStageVolumeRequest(
                volume_id=volume.volume_id, staging_target_path=str(staging),
                volume_capability=mount_capability(), volume_context=dict(volume.volume_context),
                secrets=dict(secrets),
            ),
            timeout=600,
        )  # fmt: skip
        return staging / volume.volume_id

    def unstage(self, volume_id: str, staging: Path) -> None:
        self.node.NodeUnstageVolume(
            csi_pb2.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=str(staging)),
            timeout=600,
        )

    @property
    def controller(self) -> csi_pb2_grpc.ControllerStub:
        return csi_pb2_grpc.ControllerStub(self.channel)

    @property
    def identity(self) -> csi_pb2_grpc.IdentityStub:
        return csi_pb2_grpc.IdentityStub(self.channel)

    def log(self, limit: int = 20000) -> str:
        return self.process.output(limit)

    def set_kms_config(self, entries: Mapping[str, Mapping[str, str]]) -> None:
        """Replace the KMS list (read again at every request), e.g. {"id": {"encryptionKMSType": "..."}}."""
        _write_json(self.kms_config_dir / "config.json", entries)

    def kms_config(self) -> dict[str, dict[str, str]]:
        loaded: dict[str, dict[str, str]] = json.loads((self.kms_config_dir / "config.json").read_text())
        return loaded

    def parameters(
        self, pool: str, kms_id: str | None = METADATA_KMS_ID, encrypted: bool = True, **extra: str
    ) -> dict[str, str]:
        """StorageClass parameters as Ceph-CSI takes them (those of the external-provisioner left out)."""
        params = {"clusterID": self.cluster_id, "pool": pool, "imageFeatures": "layering"}
        if encrypted:
            params["encrypted"] = "true"
            if kms_id is not None:
                params["encryptionKMSID"] = kms_id
        return {**params, **extra}

    def create_volume(
        self,
        name: str,
        size: int,
        pool: str,
        secrets: Mapping[str, str],
        kms_id: str | None = METADATA_KMS_ID,
        encrypted: bool = True,
        block: bool = False,
        source: csi_pb2.VolumeContentSource | None = None,
        more_parameters: Mapping[str, str] | None = None,
        **extra: str,
    ) -> csi_pb2.Volume:
        """CreateVolume; the volume (its volume_id is Ceph-CSI's handle, its volume_context the
        imageName, pool, journalPool, clusterID... a node plugin gets)."""
        request = csi_pb2.CreateVolumeRequest(
            name=name,
            capacity_range=csi_pb2.CapacityRange(required_bytes=size),
            volume_capabilities=[block_capability() if block else mount_capability()],
            parameters={**self.parameters(pool, kms_id, encrypted, **extra), **(more_parameters or {})},
            secrets=dict(secrets),
        )
        if source is not None:
            request.volume_content_source.CopyFrom(source)
        volume: csi_pb2.Volume = self.controller.CreateVolume(request, timeout=120).volume
        return volume

    def delete_volume(self, volume_id: str, secrets: Mapping[str, str]) -> None:
        self.controller.DeleteVolume(
            csi_pb2.DeleteVolumeRequest(volume_id=volume_id, secrets=dict(secrets)), timeout=120
        )

    def expand_volume(
        self, volume_id: str, size: int, secrets: Mapping[str, str], block: bool = False
    ) -> csi_pb2.ControllerExpandVolumeResponse:
        response: csi_pb2.ControllerExpandVolumeResponse = self.controller.ControllerExpandVolume(
            csi_pb2.ControllerExpandVolumeRequest(
                volume_id=volume_id,
                capacity_range=csi_pb2.CapacityRange(required_bytes=size),
                volume_capability=block_capability() if block else mount_capability(),
                secrets=dict(secrets),
            ),
            timeout=120,
        )
        return response

    def create_snapshot(
        self, name: str, volume_id: str, secrets: Mapping[str, str], pool: str | None = None
    ) -> csi_pb2.Snapshot:
        """CreateSnapshot (VolumeSnapshotClass parameters: clusterID, and the snapshot's pool if given)."""
        parameters = {"clusterID": self.cluster_id, **({"pool": pool} if pool else {})}
        snapshot: csi_pb2.Snapshot = self.controller.CreateSnapshot(
            csi_pb2.CreateSnapshotRequest(
                name=name, source_volume_id=volume_id, parameters=parameters, secrets=dict(secrets)
            ),
            timeout=120,
        ).snapshot
        return snapshot

    def delete_snapshot(self, snapshot_id: str, secrets: Mapping[str, str]) -> None:
        self.controller.DeleteSnapshot(
            csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot_id, secrets=dict(secrets)), timeout=120
        )


def _write_json(path: Path, value: object) -> None:
    """Written whole and renamed into place: cephcsi may read it at any moment."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value))
    partial.replace(path)


@contextmanager
def running_cephcsi(
    binary: Path,
    ceph: CephCluster,
    cluster_id: str,
    root: Path,
    kms_config: Mapping[str, Mapping[str, str]] | None = None,
    node: bool = False,
    mgr: bool = True,
    kube: KubeCluster | None = None,
) -> Iterator[CephCsi]:
    """cephcsi as an RBD controller (and with node, a node plugin) for `ceph` under `cluster_id`, in its
    own mount namespace; stopped (with anything it started) on exit. `root` is an empty directory of the
    test session's. Without mgr, its DeleteVolume cannot finish (a guest spares the mgr's start). With kube,
    it reaches that API server (its tenant Vault types read Secrets and ConfigMaps) as an administrator."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        raise RuntimeError("cephcsi runs in a mount namespace of its own: this needs root and unshare(1)")
    private, config, kms, sockets = (root / name for name in ("private", "config", "kms-config", "sockets"))
    for directory in (private, config, kms, sockets):
        directory.mkdir(parents=True)
    # "v1:": the test monitor listens on a random port, where a client would otherwise try msgr v2.
    _write_json(
        config / "config.json",
        [{"clusterID": cluster_id, "monitors": [f"v1:{ceph.monitors}"], "rbd": {"radosNamespace": ""}}],
    )
    _write_json(
        kms / "config.json",
        {METADATA_KMS_ID: {"encryptionKMSType": "metadata"}} if kms_config is None else kms_config,
    )
    if mgr:
        ceph.start_mgr()  # DeleteVolume hangs without one (see CephCluster.start_mgr)
    endpoint = sockets / "cephcsi.sock"
    argv = [
        "unshare", "--mount", "--propagation", "private", "sh", "-c", NAMESPACE_SCRIPT, "cephcsi-namespace",
        str(private), str(config), str(kms), str(sockets), str(binary),
        "--type=rbd", "--controllerserver=true", f"--drivername={DRIVER_NAME}",
        "--nodeid=csi-luks-test", f"--instanceid={INSTANCE_ID}", f"--endpoint=unix://{endpoint}",
        f"--csi-addons-endpoint=unix://{sockets / 'csi-addons.sock'}", "--v=5",
        *(["--nodeserver=true", f"--stagingpath={sockets}/"] if node else []),
    ]  # fmt: skip
    # Nothing of the test's environment: no CEPH_CONF naming the admin keyring.
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
    if kube is not None:
        # In the directory it shares: its /tmp is its own. The CA inline, for the same reason.
        kubeconfig = sockets / "kubeconfig"
        ca_data = base64.b64encode(kube.ca_pem.encode()).decode()
        _write_json(kubeconfig, {
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {
                "server": kube.url, "certificate-authority-data": ca_data}}],
            "users": [{"name": "admin", "user": {"token": kube.admin_token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "admin"}}],
        })  # fmt: skip
        env["KUBERNETES_CONFIG_PATH"] = str(kubeconfig)
    started = time.monotonic()
    process = serve_process.start(argv, endpoint, env, log=root / "cephcsi.log", new_session=True)
    print(f"cephcsi: serving on {endpoint} after {time.monotonic() - started:.1f}s")
    channel = grpc.insecure_channel(f"unix://{endpoint}")
    try:
        yield CephCsi(process, channel, cluster_id, config, kms, sockets)
    finally:
        channel.close()
        pid = process.proc.pid
        process.stop()
        # Its own session (new_session): whatever it started and left is in its process group.
        with suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


# Reading what Ceph-CSI left, as client.admin through Ceph's Python bindings --------------------------


@contextmanager
def _ioctx(ceph: CephCluster, pool: str) -> Iterator[rados.Ioctx]:
    cluster = rados.Rados(conffile=str(ceph.conf), name="client.admin")
    cluster.connect(timeout=30)
    try:
        ioctx = cluster.open_ioctx(pool)
        try:
            yield ioctx
        finally:
            ioctx.close()
    finally:
        cluster.shutdown()


def pool_id(ceph: CephCluster, pool: str) -> int:
    with _ioctx(ceph, pool) as ioctx:
        return int(ioctx.get_pool_id())


def images(ceph: CephCluster, pool: str) -> list[str]:
    with _ioctx(ceph, pool) as ioctx:
        return sorted(rbd.RBD().list(ioctx))


def image_meta(ceph: CephCluster, pool: str, image: str) -> dict[str, str]:
    with _ioctx(ceph, pool) as ioctx, rbd.Image(ioctx, image, read_only=True) as opened:
        return dict(opened.metadata_list())


def image_id(ceph: CephCluster, pool: str, image: str) -> str:
    with _ioctx(ceph, pool) as ioctx, rbd.Image(ioctx, image, read_only=True) as opened:
        return str(opened.id())


def image_size(ceph: CephCluster, pool: str, image: str) -> int:
    with _ioctx(ceph, pool) as ioctx, rbd.Image(ioctx, image, read_only=True) as opened:
        return int(opened.size())


def trash(ceph: CephCluster, pool: str) -> dict[str, str]:
    """The pool's RBD trash: {image id: image name}."""
    with _ioctx(ceph, pool) as ioctx:
        return {entry["id"]: entry["name"] for entry in rbd.RBD().trash_list(ioctx)}


def objects(ceph: CephCluster, pool: str) -> list[str]:
    """Every RADOS object's name in the pool (the default namespace)."""
    with _ioctx(ceph, pool) as ioctx:
        return sorted(entry.key for entry in ioctx.list_objects())


def omap(ceph: CephCluster, pool: str, name: str) -> dict[str, str] | None:
    """An object's omap (its values decoded as UTF-8), or None when there is no such object."""
    with _ioctx(ceph, pool) as ioctx, rados.ReadOpCtx() as op:
        try:
            values, _ = ioctx.get_omap_vals(op, "", "", 10000)
            ioctx.operate_read_op(op, name)
        except rados.ObjectNotFound:
            return None
        return {key: value.decode() for key, value in values}

"""The RBD backend on a real one-OSD Ceph cluster (memstore, cephx), built for the run (tests/support/ceph).

Each gRPC figure (a `csi-luks` controller served in this process, encrypted volumes with a `local` KMS)
is set beside the bare librbd calls it stands for, over one open connection, in the same run:

- CreateVolume: create + the metadata keys a new encrypted volume gets; DeleteVolume: a remove.
- CreateSnapshot and a restore from it, of a volume with `written` MiB written and of a nearly empty one
  (the copy must not cost more for more data: copy-on-write), and beside a bare snapshot + clone v2.

Medians of `samples`, taken in alternation.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import rados
import rbd

from bench.table import Row, Target
from csi_luks.csi import csi_pb2
from csi_luks.settings import Mode
from csi_luks.volumes.rbd import decode_volume_id
from tests.support.ceph import CephCluster, ceph_cluster
from tests.support.plugin import MiB, RunningPlugin, running_plugin

CLUSTER_ID = "bench"
SIZE = 64 * MiB
TWICE = Target("ratio", "<=", 2)
THRICE = Target("ratio", "<=", 3)
FLAT = Target("ratio", "<=", 1.5)  # a copy of a written volume against one of a nearly empty volume


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def _timed(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def _write(ceph: CephCluster, pool: str, image: str, mib: int) -> None:
    ceph.run("rbd", "bench", "--io-type", "write", "--io-size", "4M", "--io-total", f"{mib}M",
             "--io-pattern", "seq", f"{pool}/{image}", timeout=1800)  # fmt: skip


# What CreateVolume writes on a new encrypted volume (tests/host/test_rbd_controller.py counts its calls):
# the record, the wrapped DEK, the state. The bare reference writes as many keys, over one open.
NEW_VOLUME_KEYS = (
    "csi-luks/name", "csi-luks/capacity", "csi-luks/encrypted", "csi-luks/kms-id", "csi-luks/volume-id",
    "csi-luks/dek", "csi-luks/encryption-state",
)  # fmt: skip


class _Bare:
    """The librbd calls themselves, over one connection as the same cephx user."""

    def __init__(self, ceph: CephCluster) -> None:
        self.cluster = rados.Rados(rados_id=ceph.csi.id.removeprefix("client."), conffile=None)
        self.cluster.conf_set("mon_host", f"v1:{ceph.monitors}")
        self.cluster.conf_set("key", ceph.csi.key)
        self.cluster.conf_set("rbd_default_clone_format", "2")
        self.cluster.connect()
        self.ioctx = self.cluster.open_ioctx(ceph.pool)
        self.rbd = rbd.RBD()

    def create(self, name: str) -> None:
        self.rbd.create(self.ioctx, name, SIZE + 16 * MiB, old_format=False)
        with rbd.Image(self.ioctx, name) as image:
            for key in NEW_VOLUME_KEYS:
                image.metadata_set(key, name)

    def remove(self, name: str) -> None:
        self.rbd.remove(self.ioctx, name)

    def snapshot_and_clone(self, source: str, name: str) -> None:
        with rbd.Image(self.ioctx, source) as image:
            image.create_snap(name)
        self.rbd.clone(self.ioctx, source, name, self.ioctx, name)
        with rbd.Image(self.ioctx, source) as image:
            image.remove_snap(name)  # clone v2: it waits in the snapshot trash

    def close(self) -> None:
        self.ioctx.close()
        self.cluster.shutdown()


def measure(samples: int = 10, written_mib: int = 1024) -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="csi-luks-bench-rbd-") as scratch:
        root = Path(scratch)
        with ceph_cluster(root / "ceph") as ceph:
            config = root / "ceph-config.json"
            config.write_text(json.dumps([{"clusterID": CLUSTER_ID, "monitors": [f"v1:{ceph.monitors}"]}]))
            secrets = {"userID": ceph.csi.id, "userKey": ceph.csi.key}
            parameters = {"clusterID": CLUSTER_ID, "pool": ceph.pool, "encrypted": "true",
                          "encryptionKMSID": "local-1"}  # fmt: skip
            bare = _Bare(ceph)
            try:
                with running_plugin(root / "plugin", mode=Mode.CONTROLLER, ceph_config=config) as plugin:
                    return _measure(plugin, ceph, bare, secrets, parameters, samples, written_mib)
            finally:
                bare.close()


def _measure(
    plugin: RunningPlugin,
    ceph: CephCluster,
    bare: _Bare,
    secrets: dict[str, str],
    parameters: dict[str, str],
    samples: int,
    written_mib: int,
) -> list[Row]:
    def create(name: str) -> str:
        return plugin.create(name, SIZE, parameters, secrets=secrets).volume_id

    def delete(volume_id: str) -> None:
        plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id, secrets=secrets))

    create(f"warm-{time.time_ns()}")  # the connection is made once, as in a running plugin
    grpc_create, grpc_delete, bare_create, bare_delete = [], [], [], []
    for i in range(samples):
        started = time.perf_counter()
        volume_id = create(f"pvc-bench-{i}")
        grpc_create.append(time.perf_counter() - started)
        bare_create.append(_timed(partial(bare.create, f"bare-{i}")))
        grpc_delete.append(_timed(partial(delete, volume_id)))
        bare_delete.append(_timed(partial(bare.remove, f"bare-{i}")))

    # Two sources: nearly empty, and written_mib written (through the image: ciphertext to Ceph alike).
    empty, full = create("pvc-bench-empty"), create("pvc-bench-full")
    for volume_id, mib in ((empty, 1), (full, written_mib)):
        _write(ceph, ceph.pool, decode_volume_id(volume_id).image, mib)
    bare_source = decode_volume_id(full).image  # the same data (the test OSD holds 2 GiB, not two copies)

    snap: dict[str, list[float]] = {"empty": [], "full": [], "bare": []}
    restore: dict[str, list[float]] = {"empty": [], "full": []}
    made: list[tuple[str, str]] = []
    for i in range(samples):
        for label, source in (("empty", empty), ("full", full)):
            started = time.perf_counter()
            snapshot_id = plugin.snapshot(f"snap-{label}-{i}", source, secrets=secrets).snapshot_id
            snap[label].append(time.perf_counter() - started)
            started = time.perf_counter()
            restored = plugin.copy(f"pvc-{label}-restore-{i}", None, parameters, snapshot_id=snapshot_id,
                                   secrets=secrets).volume_id  # fmt: skip
            restore[label].append(time.perf_counter() - started)
            made.append((snapshot_id, restored))
        snap["bare"].append(_timed(partial(bare.snapshot_and_clone, bare_source, f"bare-clone-{i}")))
    for snapshot_id, restored in made:
        delete(restored)
        plugin.controller.DeleteSnapshot(
            csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot_id, secrets=secrets)
        )
    for i in range(samples):
        bare.remove(f"bare-clone-{i}")

    written = f"{written_mib} MiB written"
    return [
        Row("RBD CreateVolume (64 MiB, encrypted, gRPC)", _median_ms(grpc_create), "ms",
            reference=_median_ms(bare_create), reference_name="librbd create + 7 meta", target=TWICE),
        Row("RBD DeleteVolume (gRPC)", _median_ms(grpc_delete), "ms",
            reference=_median_ms(bare_delete), reference_name="librbd remove", target=TWICE),
        Row(f"RBD CreateSnapshot, {written}", _median_ms(snap["full"]), "ms",
            reference=_median_ms(snap["empty"]), reference_name="nearly empty", target=FLAT),
        Row(f"RBD CreateSnapshot, {written}, vs bare", _median_ms(snap["full"]), "ms",
            reference=_median_ms(snap["bare"]), reference_name="librbd snap + clone v2", target=THRICE),
        Row(f"RBD restore, {written}", _median_ms(restore["full"]), "ms",
            reference=_median_ms(restore["empty"]), reference_name="nearly empty", target=FLAT),
        Row(f"RBD restore, {written}, vs bare", _median_ms(restore["full"]), "ms",
            reference=_median_ms(snap["bare"]), reference_name="librbd snap + clone v2", target=THRICE),
    ]  # fmt: skip

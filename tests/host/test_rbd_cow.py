"""Copy-on-write snapshots, restores and clones on the host's real Ceph cluster: clone v2 parents, the RBD
trash for images others still need, the bounded clone chain, and the connection cache under faults."""

from __future__ import annotations

import base64
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_luks.csi import csi_pb2
from csi_luks.settings import Mode
from csi_luks.volume_metadata import STATE
from csi_luks.volumes import rbd as rbd_backend
from csi_luks.volumes.base import BackendPermissionDenied
from csi_luks.volumes.ceph_clusters import CephClusters
from csi_luks.volumes.rbd import RbdBackend, decode_volume_id
from csi_luks.volumes.rbd_chain import FLATTEN, FLATTENS, SOFT_DEPTH
from tests.host.test_rbd_controller import (
    digest,
    encrypted,
    exists,
    fill,
    image_meta,
    image_size,
    spec,
    trash,
)
from tests.support.ceph import CephCluster
from tests.support.plugin import MiB, RunningPlugin, running_plugin


@pytest.fixture
def plugin(tmp_path: Path, ceph_config: Path) -> Iterator[RunningPlugin]:
    with running_plugin(tmp_path, mode=Mode.CONTROLLER, ceph_config=ceph_config) as running:
        yield running


def parent_of(ceph: CephCluster, object_id: str) -> str | None:
    """The image the object's image is a clone of (None: it stands alone)."""
    info = json.loads(ceph.run("rbd", "info", "--format", "json", spec(object_id)))
    parent = info.get("parent")
    return None if parent is None else str(parent["image"])


def delete_volume(plugin: RunningPlugin, volume_id: str, secrets: dict[str, str]) -> None:
    plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id, secrets=secrets))


def delete_snapshot(plugin: RunningPlugin, snapshot_id: str, secrets: dict[str, str]) -> None:
    plugin.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot_id, secrets=secrets))


def another_key() -> str:
    """A well-formed cephx key that is nobody's (type AES, no creation time, 16 random bytes)."""
    return base64.b64encode(b"\x01\x00" + bytes(8) + b"\x10\x00" + os.urandom(16)).decode()


def written_source(plugin: RunningPlugin, ceph: CephCluster, name: str, secrets: dict[str, str]) -> str:
    source = plugin.create(name, 24 * MiB, encrypted(ceph), secrets=secrets).volume_id
    ceph.run("rbd", "image-meta", "set", spec(source), STATE, "encrypted")  # as after its first NodeStage
    fill(ceph, source)
    return source


def test_snapshot_restore_and_clone_are_clones_and_the_parent_deleted_first_waits_in_the_trash(
    plugin: RunningPlugin, ceph: CephCluster, ceph_secrets: dict[str, str]
) -> None:
    source = written_source(plugin, ceph, "pvc-cow-src", ceph_secrets)
    length = image_size(ceph, source)
    source_digest = digest(ceph, source, length)
    snapshot = plugin.snapshot("snap-cow", source, secrets=ceph_secrets).snapshot_id
    restored = plugin.copy("pvc-cow-restored", 48 * MiB, encrypted(ceph), snapshot_id=snapshot,
                           secrets=ceph_secrets).volume_id  # fmt: skip
    clone = plugin.copy(
        "pvc-cow-clone", None, encrypted(ceph), volume_id=source, secrets=ceph_secrets
    ).volume_id
    # Copy-on-write: each is a clone of its source image, not a copy; no snapshot is left on the source.
    assert parent_of(ceph, snapshot) == parent_of(ceph, clone) == decode_volume_id(source).image
    assert parent_of(ceph, restored) == decode_volume_id(snapshot).image
    assert json.loads(ceph.run("rbd", "snap", "ls", "--format", "json", spec(source))) == []
    # Each object its own metadata: its own id as owner, its own wrapped DEK entry.
    for copy in (snapshot, restored, clone):
        meta = image_meta(ceph, copy)
        assert meta["csi-luks/volume-id"] == copy and meta["csi-luks/source"] in (source, snapshot)
        assert meta["csi-luks/dek"] != image_meta(ceph, source)["csi-luks/dek"]

    # The source goes first: its image waits in the trash, and its copies read on.
    delete_volume(plugin, source, ceph_secrets)
    everything = (source, snapshot, restored, clone)
    assert not exists(ceph, source) and trash(ceph, *everything) == [decode_volume_id(source).image]
    for copy in (snapshot, restored, clone):
        assert digest(ceph, copy, length) == source_digest
    # A restore from the snapshot whose volume is gone still works.
    again = plugin.copy("pvc-cow-again", None, encrypted(ceph), snapshot_id=snapshot,
                        secrets=ceph_secrets).volume_id  # fmt: skip
    assert digest(ceph, again, length) == source_digest

    # The snapshot next: two restores need its image.
    delete_snapshot(plugin, snapshot, ceph_secrets)
    assert trash(ceph, *everything) == sorted(decode_volume_id(i).image for i in (source, snapshot))
    delete_volume(plugin, clone, ceph_secrets)  # the source still feeds the snapshot's image
    assert trash(ceph, *everything) == sorted(decode_volume_id(i).image for i in (source, snapshot))
    delete_volume(plugin, restored, ceph_secrets)
    assert digest(ceph, again, length) == source_digest
    delete_volume(plugin, again, ceph_secrets)  # the last dependant: the whole chain is purged
    assert trash(ceph, *everything, again) == []


def test_a_deep_chain_is_flattened_in_the_background_past_the_soft_depth_and_at_once_at_the_hard(
    plugin: RunningPlugin, ceph: CephCluster, ceph_secrets: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    source = written_source(plugin, ceph, "pvc-chain-0", ceph_secrets)
    length = image_size(ceph, source)
    source_digest = digest(ceph, source, length)
    chain = [source]
    for depth in range(1, SOFT_DEPTH + 1):
        chain.append(plugin.copy(f"pvc-chain-{depth}", None, encrypted(ceph), volume_id=chain[-1],
                                 secrets=ceph_secrets).volume_id)  # fmt: skip
    # Below the soft depth each stays a clone; at it, a background flatten detaches the newest.
    assert all(
        parent_of(ceph, chain[i]) == decode_volume_id(chain[i - 1]).image for i in range(1, SOFT_DEPTH)
    )
    assert FLATTENS.wait(60)
    deepest = chain[-1]
    assert parent_of(ceph, deepest) is None and FLATTEN not in image_meta(ceph, deepest)
    assert digest(ceph, deepest, length) == source_digest

    # The hard depth (lowered here, with the soft one out of the way): flattened before CreateVolume returns.
    monkeypatch.setattr(rbd_backend, "SOFT_DEPTH", 100)
    monkeypatch.setattr(rbd_backend, "HARD_DEPTH", 2)
    hard = plugin.copy("pvc-chain-hard", None, encrypted(ceph), volume_id=chain[1],
                       secrets=ceph_secrets).volume_id  # fmt: skip
    assert parent_of(ceph, hard) is None and FLATTENS.running() == []
    assert digest(ceph, hard, length) == source_digest

    for volume_id in reversed([*chain, hard]):
        delete_volume(plugin, volume_id, ceph_secrets)
    assert trash(ceph, *chain, hard) == []


def test_an_interrupted_background_flatten_is_taken_up_by_the_next_call(
    plugin: RunningPlugin, ceph: CephCluster, ceph_secrets: dict[str, str]
) -> None:
    source = plugin.create("pvc-owed", 8 * MiB, encrypted(ceph), secrets=ceph_secrets).volume_id
    clone = plugin.copy("pvc-owed-clone", None, encrypted(ceph), volume_id=source,
                        secrets=ceph_secrets).volume_id  # fmt: skip
    # As a plugin killed before its flatten finished leaves it: the marker, and the parent still there.
    ceph.run("rbd", "image-meta", "set", spec(clone), FLATTEN, "pending")
    plugin.server.backend.for_request(ceph_secrets).get(clone)
    assert FLATTENS.wait(60)
    assert parent_of(ceph, clone) is None and FLATTEN not in image_meta(ceph, clone)
    for volume_id in (source, clone):
        delete_volume(plugin, volume_id, ceph_secrets)
    assert trash(ceph, source, clone) == []


def test_concurrent_requests_share_one_connection_and_a_wrong_key_is_permission_denied(
    ceph: CephCluster, ceph_config: Path, tmp_path: Path
) -> None:
    base = RbdBackend(CephClusters(ceph_config), tmp_path)
    secrets = {"userID": ceph.csi.id, "userKey": ceph.csi.key}
    ids = [
        base.volume_id_for(f"pvc-shared-{i}", {"clusterID": "test-cluster", "pool": ceph.pool})
        for i in range(6)
    ]
    errors: list[BaseException] = []

    def work(volume_id: str) -> None:
        try:
            request = base.for_request(secrets)
            request.create(volume_id, volume_id, 4 * MiB, {"csi-luks/name": volume_id})
            request.delete(volume_id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == [] and base.connections.connects == 1 and base.connections.open_count() == 1

    # Another key for the same user: a connection of its own, refused by the cluster.
    wrong = base.for_request({"userID": ceph.csi.id, "userKey": another_key()})
    with pytest.raises(BackendPermissionDenied, match="authentication refused"):
        wrong.get(ids[0])
    assert base.connections.open_count() == 1  # the refused one is not kept

    # Idle: closed; the next call connects again.
    base.connections.idle_close = 0
    assert base.connections.close_idle() == 1 and base.connections.open_count() == 0
    base.for_request(secrets).delete(ids[0])
    assert base.connections.connects == 2
    base.connections.close()

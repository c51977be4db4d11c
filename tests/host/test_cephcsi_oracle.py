"""What the real Ceph-CSI (cephcsi v3.8.1) leaves in the cluster, checked rather than assumed.

csi-luks serves volumes Ceph-CSI created and hands them back: these are the formats it relies on, read
from a real cephcsi controller on the session cluster (tests/support/cephcsi.py).
"""

from __future__ import annotations

import json
import re
import secrets
import time
from pathlib import Path

from csi_luks.kms.base import KMSContext
from csi_luks.kms.metadata import MetadataKMS
from tests.support import cephcsi as oracle
from tests.support.ceph import CephCluster
from tests.support.cephcsi import CephCsi, CephCsiPool
from tests.support.plugin import MiB

# Ceph-CSI's DEK (the LUKS passphrase): 20 random bytes, URL-safe base64 (internal/util/crypto.go).
PLAIN_DEK = re.compile(r"^[A-Za-z0-9_-]{27}=$")
ENCRYPTED = "rbd.csi.ceph.com/encrypted"
DEK = "rbd.csi.ceph.com/dek"


def unwrap(passphrase: str, object_id: str, wrapped: str) -> str:
    """The DEK, unwrapped by csi-luks's own `metadata` KMS with the passphrase Ceph-CSI was given and the
    volume's (or snapshot's) handle as the salt: a successful AES-GCM decrypt proves the format."""
    kms = MetadataKMS("cephcsi", {}, KMSContext({oracle.PASSPHRASE_KEY: passphrase}))
    return kms.decrypt_dek(object_id, wrapped)


def wait_purged(ceph: CephCluster, pool: str, image: str) -> None:
    """Ceph-CSI moves a deleted image to the trash and has the mgr's rbd_support remove it from there."""
    deadline = time.monotonic() + 60
    while image in oracle.trash(ceph, pool).values():
        assert time.monotonic() < deadline, f"{image} is still in the trash"
        time.sleep(0.2)


def test_an_encrypted_volume_its_metadata_kms_dek_journal_expansion_and_deletion(
    cephcsi: CephCsi, ceph: CephCluster, cephcsi_pool: CephCsiPool
) -> None:
    pool = cephcsi_pool.name
    passphrase = secrets.token_urlsafe(24)
    creds = cephcsi_pool.with_passphrase(passphrase)
    volume = cephcsi.create_volume("pvc-oracle-1", 32 * MiB, pool, creds)

    # The handle: 0001-<clusterID length, 4 hex>-<clusterID>-<pool id, 16 hex>-<uuid>.
    handle = oracle.decode_handle(volume.volume_id)
    assert handle.cluster_id == cephcsi.cluster_id == "test-cluster"
    assert handle.pool_id == oracle.pool_id(ceph, pool)
    assert volume.volume_id == f"0001-000c-test-cluster-{handle.pool_id:016x}-{handle.uuid}"
    image = f"csi-vol-{handle.uuid}"
    assert volume.capacity_bytes == 32 * MiB
    assert dict(volume.volume_context) == {
        "clusterID": "test-cluster", "pool": pool, "journalPool": pool, "imageName": image,
        "imageFeatures": "layering", "encrypted": "true", "encryptionKMSID": oracle.METADATA_KMS_ID,
    }  # fmt: skip
    assert image in oracle.images(ceph, pool)
    # No room added for the LUKS header: it lives inside the requested size.
    assert oracle.image_size(ceph, pool, image) == 32 * MiB

    # Image-meta: the state, and the DEK wrapped by the passphrase with the handle as salt.
    meta = oracle.image_meta(ceph, pool, image)
    assert sorted(meta) == [DEK, ENCRYPTED] and meta[ENCRYPTED] == "encryptionPrepared"
    assert sorted(json.loads(meta[DEK])) == ["dek", "nonce"]
    assert PLAIN_DEK.match(unwrap(passphrase, volume.volume_id, meta[DEK]))

    # The journal: the name directory, and the volume's own omap.
    directory = oracle.omap(ceph, pool, oracle.VOLUMES_DIRECTORY)
    assert directory is not None and directory["csi.volume.pvc-oracle-1"] == handle.uuid
    assert oracle.omap(ceph, pool, f"csi.volume.{handle.uuid}") == {
        "csi.imageid": oracle.image_id(ceph, pool, image),
        "csi.imagename": image,
        "csi.volname": "pvc-oracle-1",
        "csi.volume.encryptKMS": oracle.METADATA_KMS_ID,
        "csi.volume.encryptionType": "block",
    }

    # The same request again: the same volume (the journal finds it).
    assert cephcsi.create_volume("pvc-oracle-1", 32 * MiB, pool, creds).volume_id == volume.volume_id

    expanded = cephcsi.expand_volume(volume.volume_id, 48 * MiB, creds)
    assert expanded.capacity_bytes == 48 * MiB and expanded.node_expansion_required
    assert oracle.image_size(ceph, pool, image) == 48 * MiB

    cephcsi.delete_volume(volume.volume_id, creds)
    assert image not in oracle.images(ceph, pool)
    wait_purged(ceph, pool, image)
    directory = oracle.omap(ceph, pool, oracle.VOLUMES_DIRECTORY)
    assert directory is None or "csi.volume.pvc-oracle-1" not in directory
    assert oracle.omap(ceph, pool, f"csi.volume.{handle.uuid}") is None
    assert not [name for name in oracle.objects(ceph, pool) if handle.uuid in name]
    cephcsi.delete_volume(volume.volume_id, creds)  # a repeated delete is a no-op
    # Its fixed paths existed only in its mount namespace.
    for fixed in ("/etc/ceph-csi-config", "/etc/ceph-csi-encryption-kms-config", "/tmp/csi"):
        assert not Path(fixed).exists()


def test_a_snapshot_in_a_pool_of_its_own_and_every_object_ceph_csi_leaves(
    cephcsi: CephCsi, ceph: CephCluster
) -> None:
    pool = oracle.new_pool(ceph, "cephcsi-oracle")
    passphrase = secrets.token_urlsafe(24)
    creds = pool.with_passphrase(passphrase)
    volume = cephcsi.create_volume("pvc-oracle-2", 16 * MiB, pool.name, creds)
    handle = oracle.decode_handle(volume.volume_id)
    assert handle.pool_id == oracle.pool_id(ceph, pool.name) != oracle.pool_id(ceph, ceph.pool)
    image = f"csi-vol-{handle.uuid}"
    image_id = oracle.image_id(ceph, pool.name, image)
    # Every object of a pool that holds one Ceph-CSI volume.
    assert oracle.objects(ceph, pool.name) == sorted([
        "csi.volumes.default", f"csi.volume.{handle.uuid}",
        "rbd_directory", "rbd_info", f"rbd_id.{image}", f"rbd_header.{image_id}",
    ])  # fmt: skip
    volume_dek = unwrap(passphrase, volume.volume_id, oracle.image_meta(ceph, pool.name, image)[DEK])

    snapshot = cephcsi.create_snapshot("snap-oracle-2", volume.volume_id, creds)
    assert snapshot.source_volume_id == volume.volume_id and snapshot.ready_to_use
    snap = oracle.decode_handle(snapshot.snapshot_id)
    assert (snap.cluster_id, snap.pool_id) == ("test-cluster", handle.pool_id) and snap.uuid != handle.uuid
    snap_image = f"csi-snap-{snap.uuid}"
    assert snap_image in oracle.images(ceph, pool.name)
    # The snapshot is an image of its own, with the volume's DEK wrapped again under the snapshot's handle.
    snap_meta = oracle.image_meta(ceph, pool.name, snap_image)
    assert snap_meta[ENCRYPTED] == "encryptionPrepared"
    assert unwrap(passphrase, snapshot.snapshot_id, snap_meta[DEK]) == volume_dek
    snaps = oracle.omap(ceph, pool.name, oracle.SNAPSHOTS_DIRECTORY)
    assert snaps == {"csi.snap.snap-oracle-2": snap.uuid}
    assert oracle.omap(ceph, pool.name, f"csi.snap.{snap.uuid}") == {
        "csi.imageid": oracle.image_id(ceph, pool.name, snap_image),
        "csi.imagename": snap_image,
        "csi.snapname": "snap-oracle-2",
        "csi.source": image,
        "csi.volume.encryptKMS": oracle.METADATA_KMS_ID,
        "csi.volume.encryptionType": "block",
    }

    cephcsi.delete_snapshot(snapshot.snapshot_id, creds)
    cephcsi.delete_volume(volume.volume_id, creds)
    for name in (snap_image, image):
        wait_purged(ceph, pool.name, name)
    assert oracle.images(ceph, pool.name) == []
    # Left: the pool's own objects, and the journal's (now empty) directories.
    assert oracle.objects(ceph, pool.name) == [
        "csi.snaps.default", "csi.volumes.default", "rbd_directory", "rbd_info", "rbd_trash",
    ]  # fmt: skip
    assert oracle.omap(ceph, pool.name, oracle.VOLUMES_DIRECTORY) in ({}, None)
    assert oracle.omap(ceph, pool.name, oracle.SNAPSHOTS_DIRECTORY) in ({}, None)

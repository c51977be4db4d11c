"""Restore-after-rotation on a copy-on-write RBD chain, and its parent deleted first, on the host's real Ceph.

A volume restored from a snapshot is a clone of the snapshot's image: its LUKS header is, until written,
the snapshot's. Rotating the restored volume's DEK writes its header (a new key slot, the old one wiped),
and copy-on-write keeps those writes in the clone: the snapshot's header and DEK stay as they were, and
each opens with its own DEK.

The host maps no RBD image, so the volume's "device" for the rotation is the image read through librbd
(as client.admin) into a file, and the file's header written back through librbd afterwards: the path a
mapped image's writes take, the clone's copy-on-write included. The volume is formatted the same way,
as its first NodeStage would format it. Headers are then checked on what librbd reads of each image.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import rados
import rbd

from csi_luks.csiaddons import encryptionkeyrotation_pb2 as pb
from csi_luks.luks import Cryptsetup, FormatOptions
from csi_luks.operations.header_backup import header_backup_matches, refresh_header_backup
from csi_luks.operations.tool import Tool
from csi_luks.services.rotation import EncryptionKeyRotationService
from csi_luks.settings import Mode
from csi_luks.volume_metadata import LUKS_HEADER_BYTES, STATE, EncryptionState
from csi_luks.volumes.rbd import RbdBackend, decode_volume_id
from tests.host.test_rbd_controller import encrypted, image_meta, trash
from tests.host.test_rbd_cow import delete_snapshot, delete_volume, parent_of
from tests.support.ceph import CephCluster
from tests.support.plugin import MiB, RunningPlugin, running_plugin


@pytest.fixture
def plugin(tmp_path: Path, ceph_config: Path) -> Iterator[RunningPlugin]:
    """A controller on the session's Ceph cluster (the rotation service is served by node plugins: it is
    called in-process on this one's backend)."""
    with running_plugin(tmp_path / "plugin", mode=Mode.CONTROLLER, ceph_config=ceph_config) as running:
        yield running


@contextlib.contextmanager
def _image(ceph: CephCluster, object_id: str) -> Iterator[rbd.Image]:
    """The object's image opened through librbd as client.admin."""
    ref = decode_volume_id(object_id)
    with rados.Rados(conffile=str(ceph.conf)) as cluster, cluster.open_ioctx(ref.pool) as ioctx:
        image = rbd.Image(ioctx, ref.image)
        try:
            yield image
        finally:
            image.close()


def _read(ceph: CephCluster, object_id: str, path: Path) -> Path:
    """The whole image, as librbd reads it (a clone's unwritten parts from its parents), into path."""
    with _image(ceph, object_id) as image:
        path.write_bytes(image.read(0, int(image.size())))
    return path


def _write_header(ceph: CephCluster, object_id: str, source: Path) -> None:
    """The LUKS header area of source written into the image through librbd."""
    with _image(ceph, object_id) as image, source.open("rb") as f:
        image.write(f.read(LUKS_HEADER_BYTES), 0)


def _header_digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.sha256(f.read(LUKS_HEADER_BYTES)).hexdigest()


@pytest.fixture
def librbd_key_device(ceph: CephCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """RbdBackend.key_device as the image read into a file and its header written back; the volumes it
    served, in order."""
    served: list[str] = []

    @contextlib.contextmanager
    def key_device(self: RbdBackend, volume_id: str) -> Iterator[str]:
        path = _read(ceph, volume_id, tmp_path / f"device-{len(served)}.img")
        served.append(volume_id)
        yield str(path)
        _write_header(ceph, volume_id, path)

    monkeypatch.setattr(RbdBackend, "key_device", key_device)
    return served


def test_a_restore_rotates_its_dek_while_its_snapshot_keeps_the_old_one_and_outlives_its_parents(
    plugin: RunningPlugin,
    ceph: CephCluster,
    ceph_secrets: dict[str, str],
    tmp_path: Path,
    librbd_key_device: list[str],
) -> None:
    cryptsetup = Cryptsetup()
    tool = Tool(plugin.server.backend.for_request(ceph_secrets, one_request=False), plugin.server.kms_config,
                cryptsetup, ceph_secrets)  # fmt: skip

    def dek(object_id: str) -> str:
        encryption = tool.encryption(object_id)
        try:
            return encryption.get_passphrase(object_id)
        finally:
            encryption.close()

    def header(object_id: str, tag: str) -> Path:
        return _read(ceph, object_id, tmp_path / f"{decode_volume_id(object_id).image}-{tag}.img")

    # The source, formatted with its DEK as its first NodeStage would: header, header backup, state.
    source = plugin.create("pvc-rot-src", 24 * MiB, encrypted(ceph), secrets=ceph_secrets).volume_id
    formatted = header(source, "blank")
    cryptsetup.format(str(formatted), dek(source), FormatOptions())
    _write_header(ceph, source, formatted)
    refresh_header_backup(cryptsetup, tool.backend, source, str(formatted))
    tool.backend.set_metadata(source, STATE, EncryptionState.ENCRYPTED.value)

    snapshot = plugin.snapshot("snap-rot", source, secrets=ceph_secrets).snapshot_id
    restored = plugin.copy("pvc-rot-restored", None, encrypted(ceph), snapshot_id=snapshot,
                           secrets=ceph_secrets).volume_id  # fmt: skip
    assert parent_of(ceph, restored) == decode_volume_id(snapshot).image  # copy-on-write
    old = dek(restored)
    snapshot_dek = dek(snapshot)
    snapshot_header = header(snapshot, "before")
    assert cryptsetup.slot_of(str(snapshot_header), snapshot_dek) == 0
    assert cryptsetup.slot_of(str(header(restored, "before")), old) == 0
    snapshot_wrapped = image_meta(ceph, snapshot)["csi-luks/dek"]

    # EncryptionKeyRotate of the restore (the csi-addons call; `csi-luks rotate` runs the same KeyRotation).
    service = EncryptionKeyRotationService(plugin.server.backend, plugin.server.kms_config,
                                           plugin.server.locks, cryptsetup)  # fmt: skip
    service.EncryptionKeyRotate(pb.EncryptionKeyRotateRequest(volume_id=restored, secrets=ceph_secrets), None)
    assert librbd_key_device == [restored]
    new = dek(restored)
    assert new != old
    rotated = header(restored, "after")
    assert cryptsetup.active_slots(str(rotated)) == [cryptsetup.slot_of(str(rotated), new)]
    assert cryptsetup.slot_of(str(rotated), old) is None  # the old key slot is wiped
    assert header_backup_matches(cryptsetup, tool.backend, restored, str(rotated))
    assert tool.record(restored).state is EncryptionState.ENCRYPTED

    # The snapshot: its DEK, its header (byte for byte) and its header backup as before; it opens still.
    assert dek(snapshot) == snapshot_dek and image_meta(ceph, snapshot)["csi-luks/dek"] == snapshot_wrapped
    unchanged = header(snapshot, "after")
    assert _header_digest(unchanged) == _header_digest(snapshot_header)
    assert cryptsetup.slot_of(str(unchanged), snapshot_dek) == 0
    assert cryptsetup.slot_of(str(unchanged), new) is None
    assert header_backup_matches(cryptsetup, tool.backend, snapshot, str(unchanged))
    # A restore made after the rotation is the snapshot's header, opened by its own DEK.
    again = plugin.copy("pvc-rot-again", None, encrypted(ceph), snapshot_id=snapshot,
                        secrets=ceph_secrets).volume_id  # fmt: skip
    assert cryptsetup.slot_of(str(header(again, "made")), dek(again)) == 0

    # Parents first: the source, then the snapshot, go while the restores still need their images.
    delete_volume(plugin, source, ceph_secrets)
    delete_snapshot(plugin, snapshot, ceph_secrets)
    everything = (source, snapshot, restored, again)
    assert trash(ceph, *everything) == sorted(decode_volume_id(i).image for i in (source, snapshot))
    for volume_id, key in ((restored, new), (again, dek(again))):
        opened = header(volume_id, "orphaned")
        assert cryptsetup.slot_of(str(opened), key) is not None
        assert header_backup_matches(cryptsetup, tool.backend, volume_id, str(opened))
    assert cryptsetup.slot_of(str(header(restored, "orphaned-old")), old) is None
    delete_volume(plugin, restored, ceph_secrets)
    delete_volume(plugin, again, ceph_secrets)  # the last dependant: the chain is purged
    assert trash(ceph, *everything) == []
    assert librbd_key_device == [restored]  # only the rotated volume was ever a key device

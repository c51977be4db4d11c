"""Per-class LUKS parameters and space reclaim on real dm-crypt (runs in the VM; issue 22).

- A class with encryptionDiscard: a 1 GiB standalone volume, 512 MiB written then deleted,
  NodeReclaimSpace gives at least 90 % of it back to the sparse file; the flags (discard and two perf
  flags) are in the LUKS2 header after the first stage and in the dm-crypt table after a restage.
  `csi-luks luks-flags` turns them off on the staged volume (refresh: the live table changes; reclaim
  then frees nothing and says why) and discard on again while unstaged (open+close; the next stage
  applies it, and reclaim frees again).
- Representative cipher / key size / sector size combinations (every cipher csi-luks offers, every key
  size of aes-xts, every sector size) format, open, expand and survive a restage; luksDump shows what the
  class asked for. A class without discard: reclaim frees nothing and says so.
- A cipher the kernel cannot run: FAILED_PRECONDITION, nothing written, nothing left attached.

- RBD on the real Ceph cluster (krbd; images with layering, exclusive-lock, object-map, fast-diff,
  deep-flatten): a 1 GiB volume with discard, 512 MiB written then deleted, NodeReclaimSpace brings
  `rbd du`'s used bytes down by at least 90 % of it, and ControllerReclaimSpace (librbd sparsify) answers
  the usage before and after; a volume without discard: NodeReclaimSpace is refused, saying why, and
  neither reclaim frees the deleted data.

Why the RBD reclaim needs the product's two measures, as measured in this guest (kernel 6.1, Ceph 16, a
memstore OSD): `rbd du` counts whole 4 MiB objects, and only a discard of a whole object deletes one.
krbd's default alloc_size (64 KiB) is its discard granularity, and the block layer cuts fstrim's long
discards into 4 MiB pieces aligned only to that: each piece covered the ends of two objects, which krbd
truncated or zeroed and kept (NodeReclaimSpace freed 43.8 %, sparsify the rest). Mapped with alloc_size
at the object size, the pieces are whole objects, which krbd deletes: 100.8 % (the 512 MiB and one
object ext4 had used besides). And ext4 gives a deleted file's blocks back to the free-space map fstrim
reads only at its journal commit: an fstrim right after the delete freed one object; the node runs
`sync -f` first.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_luks.csi import csi_pb2
from csi_luks.csiaddons import reclaimspace_pb2 as reclaim_pb
from csi_luks.csiaddons import reclaimspace_pb2_grpc as reclaim_grpc
from csi_luks.luks import Cryptsetup, mapper_name
from csi_luks.operations.luks_flags import TEMPORARY_PREFIX, luks_flags
from csi_luks.operations.tool import Tool
from csi_luks.system.filesystem import Filesystems
from csi_luks.volume_metadata import LUKS_CIPHER, LUKS_DISCARD, STATE
from csi_luks.volumes.rbd import decode_volume_id
from tests.support.ceph import CephCluster
from tests.support.plugin import MiB, RunningPlugin, mount_capability, running_plugin

pytestmark = pytest.mark.timeout(1800)
GiB = 1024 * MiB
BASE = {"encrypted": "true", "encryptionKMSID": "local-1"}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("luks-parameters")


@pytest.fixture(scope="module")
def plugin(root: Path) -> Iterator[RunningPlugin]:
    with running_plugin(root / "standalone") as running:
        yield running


@pytest.fixture(scope="module")
def rbd_plugin(root: Path, ceph_config: Path) -> Iterator[RunningPlugin]:
    with running_plugin(root / "rbd", ceph_config=ceph_config) as running:
        yield running


def _stage(
    plugin: RunningPlugin, volume_id: str, staging: Path, secrets: dict[str, str] | None = None
) -> None:
    plugin.node.NodeStageVolume(
        csi_pb2.NodeStageVolumeRequest(
            volume_id=volume_id, staging_target_path=str(staging), volume_capability=mount_capability(),
            secrets=secrets or {},
        )
    )  # fmt: skip


def _unstage(plugin: RunningPlugin, volume_id: str, staging: Path) -> None:
    plugin.node.NodeUnstageVolume(
        csi_pb2.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=str(staging))
    )


def _delete(plugin: RunningPlugin, volume_id: str, secrets: dict[str, str] | None = None) -> None:
    plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id, secrets=secrets or {}))


def _reclaim(
    plugin: RunningPlugin, volume_id: str, staging: Path, secrets: dict[str, str] | None = None
) -> reclaim_pb.NodeReclaimSpaceResponse:
    response: reclaim_pb.NodeReclaimSpaceResponse = reclaim_grpc.ReclaimSpaceNodeStub(
        plugin.channel
    ).NodeReclaimSpace(
        reclaim_pb.NodeReclaimSpaceRequest(
            volume_id=volume_id, staging_target_path=str(staging), volume_capability=mount_capability(),
            secrets=secrets or {},
        )
    )  # fmt: skip
    return response


def _reclaim_refused(plugin: RunningPlugin, volume_id: str, staging: Path) -> str:
    with pytest.raises(grpc.RpcError) as info:
        _reclaim(plugin, volume_id, staging)
    print(f"{info.value.code()}: {info.value.details()}")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value.details()
    return str(info.value.details())


def _allocated(plugin: RunningPlugin, volume_id: str) -> int:
    return plugin.backend.image_path(volume_id).stat().st_blocks * 512


def _write_and_delete(directory: Path, size: int) -> None:
    """size bytes written to a file through the filesystem (so through dm-crypt), durably, then deleted."""
    path = directory / "filler"
    chunk = b"\xa5" * (4 * MiB)
    with path.open("wb") as f:
        for _ in range(size // len(chunk)):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    path.unlink()
    os.sync()


def _luks_dump(device: str) -> str:
    return subprocess.run(
        ["cryptsetup", "luksDump", device], capture_output=True, text=True, check=True
    ).stdout


def _header_flags(device: str) -> list[str]:
    """The Flags line of luksDump's text: the header's persistent flags."""
    match = re.search(r"^Flags:\s*(.*)$", _luks_dump(device), re.MULTILINE)
    assert match is not None
    flags = match.group(1).split()
    return [] if flags == ["(no", "flags)"] else flags


def _table_flags(volume_id: str) -> list[str]:
    """The optional parameters of the volume's dm-crypt table line (`dmsetup table`; the key is masked
    by dmsetup, and not kept here either): what the kernel really applies."""
    line = subprocess.run(
        ["dmsetup", "table", mapper_name(volume_id)], capture_output=True, text=True, check=True
    ).stdout.split()
    # start length crypt cipher key iv_offset device offset [#opt_params opt_params...]; of the optional
    # parameters only the flags (not sector_size:N, iv_large_sectors)
    optional = line[9 : 9 + int(line[8])] if len(line) > 8 else []
    return [flag for flag in optional if flag in _DM_FLAGS]


_DM_FLAGS = {
    "allow_discards",
    "same_cpu_crypt",
    "submit_from_crypt_cpus",
    "no_read_workqueue",
    "no_write_workqueue",
}


def _tool(plugin: RunningPlugin) -> Tool:
    return Tool(plugin.backend, plugin.server.kms_config)


def test_a_discard_class_reclaims_space_and_its_flags_persist_and_change(
    plugin: RunningPlugin, root: Path
) -> None:
    parameters = {
        **BASE, "encryptionDiscard": "true", "encryptionPerfFlags": "no_read_workqueue,no_write_workqueue"
    }  # fmt: skip
    volume_id = plugin.create("reclaim-1g", GiB, parameters).volume_id
    image = str(plugin.backend.image_path(volume_id))
    staging = root / "staging-reclaim"
    _stage(plugin, volume_id, staging)
    assert _header_flags(image) == ["allow-discards", "no-read-workqueue", "no-write-workqueue"]
    base = _allocated(plugin, volume_id)
    _write_and_delete(staging, 512 * MiB)
    full = _allocated(plugin, volume_id)
    assert full - base >= 500 * MiB, (base, full)
    response = _reclaim(plugin, volume_id, staging)
    after = _allocated(plugin, volume_id)
    print(f"1 GiB volume: {base} bytes allocated, {full} after 512 MiB written and deleted, "
          f"{after} after reclaim")  # fmt: skip
    print(f"NodeReclaimSpace: pre {response.pre_usage.usage_bytes}, post {response.post_usage.usage_bytes}")
    assert full - after >= 0.9 * 512 * MiB
    assert abs(response.pre_usage.usage_bytes - full) < 16 * MiB and response.post_usage.usage_bytes == after

    # A restage opens with no flags given: the header's are applied.
    _unstage(plugin, volume_id, staging)
    _stage(plugin, volume_id, staging)
    assert _table_flags(volume_id) == ["allow_discards", "no_read_workqueue", "no_write_workqueue"]
    assert _header_flags(image) == ["allow-discards", "no-read-workqueue", "no-write-workqueue"]

    # Off while staged: the live table and the header change at once, and reclaim says why it cannot run.
    assert luks_flags(_tool(plugin), [volume_id], False, ()) == 0
    assert _table_flags(volume_id) == [] and _header_flags(image) == []
    assert plugin.backend.get(volume_id).metadata.get(LUKS_DISCARD, "") == ""
    _write_and_delete(staging, 32 * MiB)
    kept = _allocated(plugin, volume_id)
    message = _reclaim_refused(plugin, volume_id, staging)
    assert "does not pass discards" in message and f"csi-luks luks-flags {volume_id} --discard on" in message
    assert _allocated(plugin, volume_id) >= kept - MiB  # nothing freed (a journal block may be written)

    # Discard on while unstaged: stored through a temporary mapping, applied at the next stage.
    _unstage(plugin, volume_id, staging)
    assert luks_flags(_tool(plugin), [volume_id], True, None) == 0
    assert _header_flags(image) == ["allow-discards"]
    assert not Cryptsetup().status(mapper_name(volume_id, prefix=TEMPORARY_PREFIX)).active
    assert plugin.backend.find_attachment(volume_id) is None
    assert plugin.backend.get(volume_id).metadata[LUKS_DISCARD] == "true"
    _stage(plugin, volume_id, staging)
    assert _table_flags(volume_id) == ["allow_discards"]
    _reclaim(plugin, volume_id, staging)
    assert kept - _allocated(plugin, volume_id) >= 0.9 * 32 * MiB
    _unstage(plugin, volume_id, staging)
    _delete(plugin, volume_id)


# Representative, not the full product (44 stage cycles under TCG, about a minute each): one cipher of
# each family csi-luks offers (AES-XTS, Serpent-XTS, AES-CBC-ESSIV, Adiantum), every sector size, three key
# sizes: (cipher, key size, sector size). Twofish-XTS and XChaCha20-Adiantum are not staged here.
COMBINATIONS = [
    ("aes-xts-plain64", 512, 512),
    ("serpent-xts-plain64", 256, 1024),
    ("aes-cbc-essiv:sha256", 128, 4096),
    ("xchacha12,aes-adiantum-plain64", 256, 2048),
]


@pytest.mark.parametrize(("cipher", "key_size", "sector_size"), COMBINATIONS)
def test_cipher_key_size_and_sector_size_format_open_expand_and_restage(
    plugin: RunningPlugin, root: Path, cipher: str, key_size: int, sector_size: int
) -> None:
    parameters = {
        **BASE, "encryptionCipher": cipher, "encryptionKeySize": str(key_size),
        "encryptionSectorSize": str(sector_size),
    }  # fmt: skip
    name = f"combo-{hashlib.sha256(f'{cipher}{key_size}{sector_size}'.encode()).hexdigest()[:8]}"
    volume_id = plugin.create(name, 32 * MiB, parameters).volume_id
    staging = root / f"staging-{name}"
    _stage(plugin, volume_id, staging)
    header = Cryptsetup().dump(str(plugin.backend.image_path(volume_id)))
    print(f"{cipher} {key_size} {sector_size}: luksDump cipher {header.cipher}, key {header.key_size_bits} "
          f"bits, sector {header.sector_size}")  # fmt: skip
    assert (header.cipher, header.key_size_bits, header.sector_size) == (cipher, key_size, sector_size)
    status = Cryptsetup().status(mapper_name(volume_id))
    assert (status.cipher, status.key_size_bits, status.sector_size) == (cipher, key_size, sector_size)
    (staging / "marker").write_bytes(b"marker " + cipher.encode())

    plugin.controller.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(
            volume_id=volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=48 * MiB)
        )
    )
    grown = plugin.node.NodeExpandVolume(
        csi_pb2.NodeExpandVolumeRequest(volume_id=volume_id, volume_path=str(staging))
    ).capacity_bytes
    assert grown >= 48 * MiB
    assert os.statvfs(staging).f_blocks * os.statvfs(staging).f_frsize > 34 * MiB  # more than 32 MiB holds

    if (cipher, key_size, sector_size) == COMBINATIONS[0]:  # a class without discard
        _write_and_delete(staging, 8 * MiB)
        kept = _allocated(plugin, volume_id)
        assert "does not pass discards" in _reclaim_refused(plugin, volume_id, staging)
        assert _allocated(plugin, volume_id) >= kept - MiB

    _unstage(plugin, volume_id, staging)
    _stage(plugin, volume_id, staging)
    assert (staging / "marker").read_bytes() == b"marker " + cipher.encode()
    assert Cryptsetup().status(mapper_name(volume_id)).sector_size == sector_size
    _unstage(plugin, volume_id, staging)
    _delete(plugin, volume_id)


def test_a_cipher_the_kernel_cannot_run_is_refused_before_anything_is_written(
    plugin: RunningPlugin, root: Path
) -> None:
    volume_id = plugin.create("no-such-cipher", 32 * MiB).volume_id
    # The controller offers only ciphers of its list; a node whose kernel lacks one of them is what this
    # stands for (no cipher of the list is missing from the guest's kernel).
    plugin.backend.set_metadata(volume_id, LUKS_CIPHER, "nosuch-xts-plain64")
    image = plugin.backend.image_path(volume_id)
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    staging = root / "staging-no-such-cipher"
    with pytest.raises(grpc.RpcError) as info:
        _stage(plugin, volume_id, staging)
    print(f"{info.value.code()}: {info.value.details()}")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value.details()
    assert "cannot run cipher nosuch-xts-plain64" in str(info.value.details())
    assert "nothing was written" in str(info.value.details())
    assert hashlib.sha256(image.read_bytes()).hexdigest() == digest and image.stat().st_blocks == 0
    assert plugin.backend.get(volume_id).metadata[STATE] == "prepared"
    assert plugin.backend.fetch_header_backup(volume_id) is None
    assert plugin.backend.find_attachment(volume_id) is None
    assert not Cryptsetup().status(mapper_name(volume_id)).active
    assert not Filesystems().is_mounted(str(staging))
    _delete(plugin, volume_id)


def _rbd_used(ceph: CephCluster, volume_id: str) -> int:
    """`rbd du`'s used bytes of the volume's image (asked as client.admin, with the rbd CLI)."""
    du = json.loads(ceph.run("rbd", "du", "--format", "json", decode_volume_id(volume_id).spec))
    return sum(int(image["used_size"]) for image in du["images"] if not image.get("snapshot"))


def _controller_reclaim(
    plugin: RunningPlugin, volume_id: str, secrets: dict[str, str]
) -> reclaim_pb.ControllerReclaimSpaceResponse:
    response: reclaim_pb.ControllerReclaimSpaceResponse = reclaim_grpc.ReclaimSpaceControllerStub(
        plugin.channel
    ).ControllerReclaimSpace(reclaim_pb.ControllerReclaimSpaceRequest(volume_id=volume_id, secrets=secrets))
    return response


def test_rbd_reclaim_frees_what_was_deleted_with_discard_and_says_why_not_without(
    rbd_plugin: RunningPlugin, ceph: CephCluster, ceph_secrets: dict[str, str], root: Path
) -> None:
    rbd = {"clusterID": "test-cluster", "pool": ceph.pool}
    parameters = {**rbd, **BASE, "encryptionDiscard": "true"}
    volume_id = rbd_plugin.create("rbd-reclaim-1g", GiB, parameters, secrets=ceph_secrets).volume_id
    staging = root / "staging-rbd-reclaim"
    _stage(rbd_plugin, volume_id, staging, ceph_secrets)
    # krbd mapped it with alloc_size at the object size: discards reach it cut at object boundaries.
    device = rbd_plugin.server.backend.find_attachment(volume_id)
    assert device is not None
    assert Path(f"/sys/block/{Path(device).name}/queue/discard_granularity").read_text().strip() == "4194304"
    base = _rbd_used(ceph, volume_id)
    _write_and_delete(staging, 512 * MiB)
    full = _rbd_used(ceph, volume_id)
    assert full - base >= 500 * MiB, (base, full)
    response = _reclaim(rbd_plugin, volume_id, staging, ceph_secrets)
    after = _rbd_used(ceph, volume_id)
    print(f"RBD 1 GiB volume with discard: rbd du {base} bytes after the first stage, {full} after 512 MiB "
          f"written and deleted, {after} after NodeReclaimSpace: {100 * (full - after) / (512 * MiB):.1f} % "
          f"of the 512 MiB freed")  # fmt: skip
    print(f"NodeReclaimSpace: pre {response.pre_usage.usage_bytes}, post {response.post_usage.usage_bytes}")
    assert full - after >= 0.9 * 512 * MiB
    assert abs(response.pre_usage.usage_bytes - full) <= 16 * MiB and response.post_usage.usage_bytes == after
    _unstage(rbd_plugin, volume_id, staging)
    controller = _controller_reclaim(rbd_plugin, volume_id, ceph_secrets)
    swept = _rbd_used(ceph, volume_id)
    print(f"ControllerReclaimSpace: pre {controller.pre_usage.usage_bytes}, post "
          f"{controller.post_usage.usage_bytes}; rbd du {swept}")  # fmt: skip
    # (the unstage's own writes land in objects that exist already)
    assert abs(controller.pre_usage.usage_bytes - after) <= 16 * MiB
    assert controller.post_usage.usage_bytes == swept <= controller.pre_usage.usage_bytes
    _delete(rbd_plugin, volume_id, ceph_secrets)

    # Without discard: the deleted data's ciphertext stays in the image, and the answers say why.
    plain = rbd_plugin.create("rbd-reclaim-plain", 256 * MiB, {**rbd, **BASE}, secrets=ceph_secrets).volume_id
    staging = root / "staging-rbd-plain"
    _stage(rbd_plugin, plain, staging, ceph_secrets)
    base = _rbd_used(ceph, plain)
    _write_and_delete(staging, 64 * MiB)
    kept = _rbd_used(ceph, plain)
    # (objects the filesystem had used already hold part of it: measured 56 of the 64 MiB in new ones)
    assert kept - base >= 48 * MiB, (base, kept)
    message = _reclaim_refused(rbd_plugin, plain, staging)
    assert "does not pass discards" in message and f"csi-luks luks-flags {plain} --discard on" in message
    still = _rbd_used(ceph, plain)
    _unstage(rbd_plugin, plain, staging)
    controller = _controller_reclaim(rbd_plugin, plain, ceph_secrets)
    print(f"RBD volume without discard: rbd du {base} after the first stage, {kept} after 64 MiB written "
          f"and deleted, {still} after NodeReclaimSpace was refused; ControllerReclaimSpace pre "
          f"{controller.pre_usage.usage_bytes}, post {controller.post_usage.usage_bytes}")  # fmt: skip
    assert still >= kept  # nothing freed (a journal block may be written)
    # Ciphertext is never zeros: sparsify finds nothing of the deleted data to free.
    assert controller.post_usage.usage_bytes >= kept - 4 * MiB
    _delete(rbd_plugin, plain, ceph_secrets)

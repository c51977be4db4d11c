"""StaleMappings reads a /sys/block look-alike: which of our mappings lost their backing device, and why."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_luks.csi import csi_pb2
from csi_luks.errors import CsiError
from csi_luks.kms.config import KMSConfig
from csi_luks.locks import OperationLocks
from csi_luks.luks import Cryptsetup
from csi_luks.luks.stale import StaleMapping, StaleMappings
from csi_luks.services.node import NodeService
from csi_luks.system.runner import CommandError
from csi_luks.volume_metadata import ENCRYPTED, STATE
from csi_luks.volumes.standalone import StandaloneBackend
from tests.support.plugin import mount_capability
from tests.unit.test_luks_engine import FakeRunner

RESTAGE = "unstage and restage the volume"


class FakeSysBlock:
    """/sys/block with dm devices whose slaves/ link to backing devices (and those list their holders)."""

    def __init__(self, root: Path) -> None:
        self.block = root / "block"
        self.block.mkdir()

    def disk(self, name: str, size: int = 65536, image: str | None = None) -> Path:
        disk = self.block / name
        (disk / "holders").mkdir(parents=True)
        (disk / "size").write_text(f"{size}\n")
        if image is not None:
            (disk / "loop").mkdir()
            (disk / "loop" / "backing_file").write_text(image + "\n")
        return disk

    def mapping(self, device: str, name: str, *backing: str, uuid: str | None = None) -> None:
        """uuid: dm/uuid; by default what cryptsetup gives a LUKS2 mapping (CRYPT-LUKS2-...-NAME)."""
        dm = self.block / device
        (dm / "dm").mkdir(parents=True)
        (dm / "dm" / "name").write_text(name + "\n")
        (dm / "dm" / "uuid").write_text((f"CRYPT-LUKS2-{'0' * 32}-{name}" if uuid is None else uuid) + "\n")
        (dm / "slaves").mkdir()
        for disk in backing:
            (dm / "slaves" / disk).symlink_to(Path("..", "..", disk))
            if (self.block / disk / "holders").is_dir():
                (self.block / disk / "holders" / device).symlink_to(Path("..", "..", device))

    def remove_disk(self, name: str) -> None:
        """What del_gendisk leaves: the disk's directory gone, the holder's slave link dangling."""
        shutil.rmtree(self.block / name)


def test_healthy_mappings_and_foreign_ones_are_not_stale(tmp_path: Path) -> None:
    sys = FakeSysBlock(tmp_path)
    sys.disk("rbd0")
    sys.disk("loop3", image="/var/lib/csi-luks/volumes/vol-a/image")
    sys.disk("sda")
    sys.mapping("dm-0", "luks-rbd-healthy", "rbd0")
    sys.mapping("dm-1", "luks-vol-a", "loop3")
    sys.mapping("dm-2", "root_crypt", "sda")  # not ours: another prefix
    stale = StaleMappings(sys_block=sys.block)
    assert stale.find() == []
    assert stale.check("luks-rbd-healthy") is None
    assert stale.check("luks-absent") is None


def test_an_unmapped_rbd_device_leaves_a_dangling_slave_link(tmp_path: Path) -> None:
    sys = FakeSysBlock(tmp_path)
    sys.disk("rbd0")
    sys.mapping("dm-4", "luks-vol-1", "rbd0")
    sys.remove_disk("rbd0")
    assert not os.path.exists(sys.block / "dm-4" / "slaves" / "rbd0")
    expected = StaleMapping(
        "luks-vol-1", "dm-4", f"has lost its backing device /dev/rbd0 (unmapped?); {RESTAGE}"
    )
    stale = StaleMappings(sys_block=sys.block)
    assert stale.find() == [expected]
    assert stale.check("luks-vol-1") == expected
    assert expected.message == (
        "dm-crypt mapping luks-vol-1 has lost its backing device /dev/rbd0 (unmapped?); "
        "unstage and restage the volume"
    )


def test_a_device_name_reused_by_a_new_device_is_still_stale(tmp_path: Path) -> None:
    """rbd0 unmapped, then another image mapped as rbd0: the link resolves, but not to our holder."""
    sys = FakeSysBlock(tmp_path)
    sys.disk("rbd0")
    sys.mapping("dm-4", "luks-vol-1", "rbd0")
    sys.remove_disk("rbd0")
    sys.disk("rbd0")
    found = StaleMappings(sys_block=sys.block).check("luks-vol-1")
    assert found is not None and "/dev/rbd0 (unmapped?; the name is reused)" in found.problem


def test_disconnected_nbd_no_slave_and_loop_without_image_are_stale(tmp_path: Path) -> None:
    sys = FakeSysBlock(tmp_path)
    sys.disk("nbd0", size=0)  # rbd-nbd gone: the device stays, with no capacity
    sys.disk("loop1")  # no loop/backing_file: detached
    sys.mapping("dm-1", "luks-nbd-vol", "nbd0")
    sys.mapping("dm-2", "luks-loop-vol", "loop1")
    sys.mapping("dm-3", "luks-bare", )  # fmt: skip
    problems = {m.name: m.problem for m in StaleMappings(sys_block=sys.block).find()}
    assert problems == {
        "luks-bare": f"has no backing device left; {RESTAGE}",
        "luks-loop-vol": (
            f"has lost its backing device /dev/loop1 (the loop device has no image file); {RESTAGE}"
        ),
        "luks-nbd-vol": f"has lost its backing device /dev/nbd0 (size 0: disconnected?); {RESTAGE}",
    }


def test_a_loop_image_deleted_while_attached_is_reported_with_its_path(tmp_path: Path) -> None:
    sys = FakeSysBlock(tmp_path)
    sys.disk("loop7", image="/state/volumes/vol-b/image (deleted)")
    sys.mapping("dm-7", "luks-vol-b", "loop7")
    found = StaleMappings(sys_block=sys.block).check("luks-vol-b")
    assert found is not None
    assert found.problem.startswith(
        "is on /dev/loop7, whose image file /state/volumes/vol-b/image was deleted"
    )


def test_only_mappings_the_predicate_owns_are_checked(tmp_path: Path) -> None:
    """A host's own luks-UUID disk has our prefix but is no volume of this backend."""
    sys = FakeSysBlock(tmp_path)
    sys.mapping("dm-0", "luks-0b1c2d3e", )  # fmt: skip
    sys.mapping("dm-1", "luks-vol-9", )  # fmt: skip
    stale = StaleMappings(sys_block=sys.block, is_ours=lambda name: name == "luks-vol-9")
    assert [m.name for m in stale.find()] == ["luks-vol-9"]
    assert stale.check("luks-0b1c2d3e") is None


def test_without_sysfs_nothing_is_stale(tmp_path: Path) -> None:
    assert StaleMappings(sys_block=tmp_path / "absent").find() == []


VOLUME = "sa-0b7e3d7c-1f7a-5f1e-9c1a-2f5d0f6a7b8c"
MAPPER = f"luks-{VOLUME}"


class _DeadFilesystems:
    """A staging mount whose plain unmount fails (a filesystem on a dead device); a lazy one succeeds."""

    def __init__(self) -> None:
        self.unmounts: list[tuple[str, bool]] = []

    def unmount(self, target: str, lazy: bool = False) -> None:
        self.unmounts.append((target, lazy))
        if not lazy:
            raise CommandError(["umount", target], 32, "", f"umount: {target}: target is busy.")


def _node(tmp_path: Path, stale: bool, *cryptsetup_answers: tuple[int, str, str]) -> tuple[NodeService, Any]:
    sys = FakeSysBlock(tmp_path)
    sys.disk("rbd0")
    sys.mapping("dm-0", MAPPER, "rbd0")
    if stale:
        sys.remove_disk("rbd0")
    runner = FakeRunner(list(cryptsetup_answers))
    filesystems = _DeadFilesystems()
    node = NodeService(
        "node-1", StandaloneBackend(tmp_path / "state"), KMSConfig(None, {}), OperationLocks(),
        Cryptsetup(runner=runner, sys_block=sys.block),  # type: ignore[arg-type]
        filesystems,  # type: ignore[arg-type]
        StaleMappings(sys_block=sys.block),
    )  # fmt: skip
    return node, (runner, filesystems)


def _unstage(node: NodeService) -> None:
    request = csi_pb2.NodeUnstageVolumeRequest(volume_id=VOLUME, staging_target_path="/staging")
    node.NodeUnstageVolume(request, None)


def test_unstage_of_a_stale_mapping_unmounts_lazily_and_closes_deferred_when_plain_ones_fail(
    tmp_path: Path,
) -> None:
    busy = (5, "", f"Device {MAPPER} is still in use.")
    node, (runner, filesystems) = _node(tmp_path, True, busy, (0, "", ""))
    _unstage(node)
    assert filesystems.unmounts == [("/staging", False), ("/staging", True)]
    # The mapping is found open in sysfs, not by `cryptsetup status`.
    assert [c.argv[1:] for c in runner.calls] == [["close", MAPPER], ["close", "--deferred", MAPPER]]


def test_unstage_of_a_healthy_mapping_never_falls_back(tmp_path: Path) -> None:
    node, (runner, filesystems) = _node(tmp_path, False)
    with pytest.raises(CommandError):
        _unstage(node)
    assert filesystems.unmounts == [("/staging", False)]
    assert runner.calls == []


def test_stage_over_a_stale_mapping_is_refused_before_the_backend_is_asked(tmp_path: Path) -> None:
    node, (runner, _) = _node(tmp_path, True)
    request = csi_pb2.NodeStageVolumeRequest(
        volume_id=VOLUME, staging_target_path="/staging", volume_capability=mount_capability()
    )
    with pytest.raises(CsiError) as refused:
        node.NodeStageVolume(request, None)  # the volume does not even exist: no backend call was made
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert str(refused.value) == (
        f"volume {VOLUME} cannot be staged: dm-crypt mapping {MAPPER} has lost its backing device "
        f"/dev/rbd0 (unmapped?); {RESTAGE}"
    )
    assert runner.calls == []


def test_publish_over_a_stale_mapping_is_refused(tmp_path: Path) -> None:
    node, _ = _node(tmp_path, True)
    node.backend.create(VOLUME, "pvc-1", 1024 * 1024, {ENCRYPTED: "true", STATE: "encrypted"})
    request = csi_pb2.NodePublishVolumeRequest(
        volume_id=VOLUME, target_path=str(tmp_path / "target"), staging_target_path="/staging",
        volume_capability=mount_capability(),
    )  # fmt: skip
    with pytest.raises(CsiError) as refused:
        node.NodePublishVolume(request, None)
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert f"dm-crypt mapping {MAPPER} has lost its backing device /dev/rbd0" in str(refused.value)
    assert not (tmp_path / "target").exists()

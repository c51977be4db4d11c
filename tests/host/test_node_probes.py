"""Which devices a NodeStage probes with blkid: on a first stage the device before formatting (never
format a device that holds data) unless the backend proves it was never written, and the new mapping
only when this call did not write its LUKS header itself; on a restage the mapping only (not even that
when the recorded filesystem's superblock is there: tests/host/test_superblock.py), and the device when
it turns out to have no LUKS header.

Real cryptsetup on the volume's image file (format, header backup); the mapping and the filesystem side
are recorded stand-ins, since this tier has no device-mapper.
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import grpc
import pytest

from csi_luks.csi import csi_pb2
from csi_luks.errors import CsiError
from csi_luks.locks import OperationLocks
from csi_luks.luks import Cryptsetup, FormatOptions, OpenOptions, Passphrase, mapper_path
from csi_luks.luks.stale import StaleMappings
from csi_luks.services.node import NodeService
from csi_luks.system.device_io import read_first_block
from csi_luks.system.filesystem import Probe
from csi_luks.volume_metadata import FILESYSTEM, STATE
from tests.support.operations import Volumes
from tests.support.plugin import MiB, mount_capability

UUID = "0b7e3d7c-1f7a-4f1e-9c1a-2f5d0f6a7b8c"


class _NoMapper(Cryptsetup):
    """cryptsetup on image files, with open and the cipher check (which need device-mapper) recorded."""

    def check_cipher(self, device: str, options: FormatOptions) -> None:
        pass

    def open(self, device: str, name: str, passphrase: Passphrase, options: OpenOptions | None = None) -> str:
        self.verify_passphrase(device, passphrase)  # the DEK opens the header
        return mapper_path(name)


class _Filesystems:
    """Records probes; a device holds what types says (by default nothing); nothing is mounted."""

    def __init__(self, types: dict[str, str] | None = None) -> None:
        self.types = types or {}
        self.probes: list[str] = []
        self.made: list[str] = []

    def probe(self, device: str) -> Probe:
        self.probes.append(device)
        found = self.types.get(device)
        return Probe(type=found, uuid=UUID if found == "ext4" else None)

    def is_mounted(self, target: str) -> bool:
        return False

    def mkfs(self, device: str, fstype: str) -> str:
        self.made.append(device)
        return UUID

    def mount(self, device: str, target: str, fstype: str, flags: list[str]) -> None:
        pass


@pytest.fixture(autouse=True)
def _device_mapper(monkeypatch: pytest.MonkeyPatch) -> None:
    """A node's kernel, with device-mapper (its /sys/block stand-in lists no mapping)."""
    monkeypatch.setattr("csi_luks.luks.cryptsetup.device_mapper_registered", lambda: True)


@pytest.fixture
def volumes(tmp_path: Path) -> Volumes:
    return Volumes(tmp_path, {"local-1": {"encryptionKMSType": "local", "keyFile": str(tmp_path / "kek")}})


def _stage(volumes: Volumes, volume_id: str, tmp_path: Path, filesystems: _Filesystems) -> None:
    """NodeStageVolume with the image file as the attached device and a /sys/block with no dm device."""
    backend = volumes.backend
    image = volumes.image(volume_id)
    mp = pytest.MonkeyPatch()
    mp.setattr(backend, "attach", lambda _volume_id: image)
    mp.setattr(backend, "find_attachment", lambda _volume_id: image)
    sys_block = tmp_path / "sys-block"
    sys_block.mkdir(exist_ok=True)
    node = NodeService(
        "node-1", backend, volumes.config, OperationLocks(), _NoMapper(sys_block=sys_block),
        filesystems,  # type: ignore[arg-type]
        StaleMappings(sys_block=sys_block),
    )  # fmt: skip
    staging = str(tmp_path / "staging")
    request = csi_pb2.NodeStageVolumeRequest(
        volume_id=volume_id, staging_target_path=staging, volume_capability=mount_capability()
    )
    try:
        node.NodeStageVolume(request, None)
    finally:
        mp.undo()


def test_a_first_stage_of_a_never_written_image_probes_nothing_and_not_the_mapping_it_just_made(
    volumes: Volumes, tmp_path: Path
) -> None:
    """The sparse image has no data extent: nothing can be on it, so no blkid before luksFormat."""
    volume_id = volumes.create("pvc-probes", "local-1")
    filesystems = _Filesystems()
    _stage(volumes, volume_id, tmp_path, filesystems)
    mapping = mapper_path(f"luks-{volume_id}")
    assert filesystems.probes == []
    assert filesystems.made == [mapping]
    assert volumes.backend.get(volume_id).metadata[STATE] == "encrypted"
    assert FILESYSTEM in volumes.backend.get(volume_id).metadata
    assert volumes.backend.fetch_header_backup(volume_id) is not None


def test_a_first_stage_of_an_image_with_data_probes_the_device_once(volumes: Volumes, tmp_path: Path) -> None:
    """Bytes were written (even ones no probe recognises): blkid decides, before luksFormat."""
    volume_id = volumes.create("pvc-written", "local-1")
    with open(volumes.image(volume_id), "r+b") as f:
        f.seek(5 * MiB)
        f.write(b"somebody's bytes")
    filesystems = _Filesystems()
    _stage(volumes, volume_id, tmp_path, filesystems)
    assert filesystems.probes == [volumes.image(volume_id)]  # the data-safety probe, and only it
    assert filesystems.made == [mapper_path(f"luks-{volume_id}")]


def test_a_first_stage_refuses_a_written_image_its_probe_finds_a_filesystem_on(
    volumes: Volumes, tmp_path: Path
) -> None:
    volume_id = volumes.create("pvc-has-fs", "local-1")
    with open(volumes.image(volume_id), "r+b") as f:
        f.write(b"\1" * 4096)
    filesystems = _Filesystems({volumes.image(volume_id): "xfs"})
    with pytest.raises(CsiError) as refused:
        _stage(volumes, volume_id, tmp_path, filesystems)
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "refusing to format it" in str(refused.value)
    assert filesystems.made == [] and not volumes.tool.cryptsetup.is_luks(volumes.image(volume_id))


def test_a_stage_over_a_header_it_did_not_write_probes_the_mapping_too(
    volumes: Volumes, tmp_path: Path
) -> None:
    """A retry after a crash that followed luksFormat: the mapping may hold the filesystem made before."""
    volume_id = volumes.create("pvc-retry", "local-1")
    volumes.tool.cryptsetup.format(volumes.image(volume_id), volumes.dek(volume_id), FormatOptions())
    filesystems = _Filesystems({volumes.image(volume_id): "crypto_LUKS"})
    _stage(volumes, volume_id, tmp_path, filesystems)
    assert filesystems.probes == [volumes.image(volume_id), mapper_path(f"luks-{volume_id}")]


def test_a_restage_probes_the_mapping_only(volumes: Volumes, tmp_path: Path) -> None:
    volume_id = volumes.create("pvc-restage", "local-1")
    _stage(volumes, volume_id, tmp_path, _Filesystems())
    mapping = mapper_path(f"luks-{volume_id}")
    filesystems = _Filesystems({volumes.image(volume_id): "crypto_LUKS", mapping: "ext4"})
    _stage(volumes, volume_id, tmp_path, filesystems)
    assert filesystems.probes == [mapping] and filesystems.made == []


def _mapping_holds_ext4(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mapping: str, filesystem_uuid: str
) -> None:
    """The mapping's first block (read by the node in-process) is that of a real ext4 with this UUID."""
    image = tmp_path / "mapping-ext4.img"
    with image.open("wb") as f:
        f.truncate(64 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-U", filesystem_uuid, str(image)], check=True)
    real = read_first_block
    monkeypatch.setattr(
        "csi_luks.services.node.read_first_block",
        lambda device: real(str(image) if device == mapping else device),
    )


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded-uuid", "another-uuid"])
def test_a_restage_probes_the_mapping_only_when_its_superblock_is_not_the_recorded_filesystem(
    volumes: Volumes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recorded: bool
) -> None:
    """The superblock on the mapping carries the UUID recorded at the first stage: mounted, no blkid.
    Another UUID: blkid says what is there."""
    volume_id = volumes.create("pvc-restage-known" if recorded else "pvc-restage-other", "local-1")
    _stage(volumes, volume_id, tmp_path, _Filesystems())
    mapping = mapper_path(f"luks-{volume_id}")
    _mapping_holds_ext4(monkeypatch, tmp_path, mapping, UUID if recorded else str(uuid.uuid4()))
    filesystems = _Filesystems({volumes.image(volume_id): "crypto_LUKS", mapping: "ext4"})
    _stage(volumes, volume_id, tmp_path, filesystems)
    assert filesystems.probes == ([] if recorded else [mapping]) and filesystems.made == []
    assert volumes.backend.get(volume_id).metadata[FILESYSTEM] == f"ext4 {UUID}"


def test_a_restage_over_a_lost_header_probes_the_device_to_say_what_it_holds(
    volumes: Volumes, tmp_path: Path
) -> None:
    volume_id = volumes.create("pvc-lost-header", "local-1")
    _stage(volumes, volume_id, tmp_path, _Filesystems())
    with open(volumes.image(volume_id), "r+b") as f:
        f.write(bytes(4 * MiB))  # the header, both copies, gone
    filesystems = _Filesystems()
    with pytest.raises(CsiError) as refused:
        _stage(volumes, volume_id, tmp_path, filesystems)
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "has no LUKS header (found nothing)" in str(refused.value)
    assert "csi-luks header restore" in str(refused.value)
    assert filesystems.probes == [volumes.image(volume_id)] and filesystems.made == []

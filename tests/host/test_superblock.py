"""The filesystem UUID read from a superblock in-process (system/superblock.py), against what mkfs wrote
and blkid reads: real mkfs.ext4 and mkfs.xfs on image files."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest

from csi_luks.luks import Cryptsetup, FormatOptions
from csi_luks.system.device_io import read_first_block
from csi_luks.system.superblock import superblock_uuid

MiB = 1 << 20


def _image(tmp_path: Path, name: str, size: int = 300 * MiB) -> Path:
    image = tmp_path / name
    with image.open("wb") as f:
        f.truncate(size)
    return image


def _blkid_uuid(image: Path) -> str:
    return subprocess.run(["blkid", "-p", "-o", "value", "-s", "UUID", str(image)],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip


@pytest.mark.parametrize(
    ("fs_type", "mkfs"),
    [("ext4", ["mkfs.ext4", "-q", "-F", "-U"]), ("xfs", ["mkfs.xfs", "-q", "-f", "-m"])],
)
def test_the_uuid_mkfs_wrote_is_read_from_the_first_block(
    tmp_path: Path, fs_type: str, mkfs: list[str]
) -> None:
    image = _image(tmp_path, f"{fs_type}.img")
    chosen = str(uuid.uuid4())
    subprocess.run([*mkfs, f"uuid={chosen}" if fs_type == "xfs" else chosen, str(image)], check=True)
    first_block = read_first_block(str(image))
    assert superblock_uuid(first_block, fs_type) == chosen == _blkid_uuid(image)
    other = "xfs" if fs_type == "ext4" else "ext4"
    assert superblock_uuid(first_block, other) is None  # another type's superblock is not this one


def test_no_uuid_from_zeros_a_luks_header_or_a_damaged_superblock(tmp_path: Path) -> None:
    blank = _image(tmp_path, "blank.img", 16 * MiB)
    assert superblock_uuid(read_first_block(str(blank)), "ext4") is None
    luks = _image(tmp_path, "luks.img", 32 * MiB)
    Cryptsetup().format(str(luks), "0123456789abcdef0123456789abcdef0123456789a", FormatOptions())
    assert superblock_uuid(read_first_block(str(luks)), "ext4") is None
    assert superblock_uuid(read_first_block(str(luks)), "xfs") is None
    ext4 = _image(tmp_path, "ext4.img", 64 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(ext4)], check=True)
    with ext4.open("r+b") as f:
        f.seek(1024 + 0x38)
        f.write(b"\0\0")  # the magic gone
    assert superblock_uuid(read_first_block(str(ext4)), "ext4") is None

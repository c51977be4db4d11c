"""The read-only filesystem check behind `csi-luks fsck`, on real e2fsprogs and xfsprogs over image files,
and the raw LUKS2 label read that tells a half-made format of ours from a foreign header."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from csi_luks.luks.status import luks2_label
from csi_luks.system.filesystem import Filesystems

MiB = 1024 * 1024


def _image(tmp_path: Path, fstype: str, size: int) -> Path:
    image = tmp_path / f"{fstype}.img"
    with open(image, "wb") as f:
        f.truncate(size)
    mkfs = ["mkfs.ext4", "-q", "-F"] if fstype == "ext4" else ["mkfs.xfs", "-q"]
    subprocess.run([*mkfs, str(image)], check=True, capture_output=True)
    return image


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _zero(image: Path, offset: int, length: int) -> None:
    with open(image, "r+b") as f:
        f.seek(offset)
        f.write(bytes(length))


def test_a_clean_ext4_is_clean_and_nothing_is_written(tmp_path: Path) -> None:
    image = _image(tmp_path, "ext4", 64 * MiB)
    before = _digest(image)
    check = Filesystems().check(str(image), "ext4")
    assert check.clean, check
    assert check.summary == "e2fsck -n found no problem"
    assert _digest(image) == before


def test_a_wiped_ext4_superblock_is_found_from_a_backup_with_the_command_that_repairs_it(
    tmp_path: Path,
) -> None:
    image = _image(tmp_path, "ext4", 64 * MiB)  # under 512 MiB: 1 KiB blocks, first backup at 8193
    _zero(image, 0, 4096)
    before = _digest(image)
    check = Filesystems().check(str(image), "ext4")
    assert not check.clean
    assert "the primary superblock is damaged; e2fsck read a backup one" in check.summary, check
    assert f"e2fsck -f -y {image}" in check.summary
    assert _digest(image) == before  # -n: read-only even from a backup
    subprocess.run(["e2fsck", "-f", "-y", str(image)], check=False, capture_output=True)
    assert Filesystems().check(str(image), "ext4").clean  # the advice repairs it


def test_an_ext4_with_every_superblock_gone_says_so(tmp_path: Path) -> None:
    image = tmp_path / "nothing.img"
    with open(image, "wb") as f:
        f.truncate(16 * MiB)
    check = Filesystems().check(str(image), "ext4")
    assert not check.clean
    assert check.summary == "no ext4 superblock found, neither the primary nor a backup (exit 8)"


def test_xfs_is_checked_with_xfs_repair_n(tmp_path: Path) -> None:
    image = _image(tmp_path, "xfs", 320 * MiB)
    before = _digest(image)
    assert Filesystems().check(str(image), "xfs").clean
    _zero(image, 0, 512)  # the primary superblock
    check = Filesystems().check(str(image), "xfs")
    assert not check.clean
    assert f"xfs_repair {image}" in check.summary
    assert _digest(image) != before


def test_the_raw_luks2_label_reads_a_header_whose_checksum_is_broken(tmp_path: Path) -> None:
    image = tmp_path / "luks.img"
    with open(image, "wb") as f:
        f.truncate(32 * MiB)
    subprocess.run(
        ["cryptsetup", "luksFormat", "--type", "luks2", "--batch-mode", "--pbkdf", "pbkdf2",
         "--pbkdf-force-iterations", "1000", "--label", "sa-volume", "--key-file=-", str(image)],
        input=b"passphrase", check=True, capture_output=True,
    )  # fmt: skip
    block = image.read_bytes()[:4096]
    assert luks2_label(block) == "sa-volume"
    torn = block[:400] + bytes(len(block) - 400)  # the checksum and JSON gone, as a torn write leaves them
    assert luks2_label(torn) == "sa-volume"
    assert luks2_label(bytes(4096)) is None
    luks1 = b"LUKS\xba\xbe\x00\x01" + bytes(4088)
    assert luks2_label(luks1) is None


@pytest.mark.parametrize("fstype", ["btrfs", ""])
def test_only_the_filesystems_csi_luks_makes_are_checked(tmp_path: Path, fstype: str) -> None:
    with pytest.raises(ValueError, match="not supported"):
        Filesystems().check(str(tmp_path / "any"), fstype)

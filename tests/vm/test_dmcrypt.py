"""Real dm-crypt in the guest kernel: open, status, write through the mapping, close, resize."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from csi_luks.luks import Cryptsetup, DeviceBusy, WrongPassphrase, mapper_name
from csi_luks.system.kernel import device_mapper_missing_reason
from csi_luks.system.loop import LoopDevices

MiB = 1024 * 1024


@pytest.fixture
def loop_image(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    image = tmp_path / "volume.img"
    with image.open("wb") as f:
        f.truncate(64 * MiB)
    loops = LoopDevices()
    device = loops.attach(str(image))
    yield image, device
    loops.detach(device)


def _write(path: str, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(path: str, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def test_guest_has_device_mapper() -> None:
    assert device_mapper_missing_reason() is None


def test_dm_crypt_lifecycle_keeps_only_ciphertext_on_disk(
    loop_image: tuple[Path, str], new_passphrase: Callable[[], bytes]
) -> None:
    image, device = loop_image
    cryptsetup = Cryptsetup()
    passphrase = new_passphrase()
    cryptsetup.format(device, passphrase)
    name = mapper_name(f"vm-lifecycle-{secrets.token_hex(4)}")
    mapped = cryptsetup.open(device, name, passphrase)
    try:
        assert mapped == f"/dev/mapper/{name}"
        assert cryptsetup.open(device, name, passphrase) == mapped  # idempotent
        status = cryptsetup.status(name)
        assert status.active and status.type == "LUKS2"
        assert status.cipher == "aes-xts-plain64" and status.key_size_bits == 512
        assert status.device == device and status.loop_file == str(image)
        assert status.key_location == "dm-crypt"  # --disable-keyring: resize needs no passphrase
        # 48 MiB of the 64 MiB image are data (16 MiB header area).
        assert status.size_sectors == 48 * MiB // 512

        marker = b"CSI-LUKS-PLAINTEXT-MARKER " * 40000  # ~1 MiB of recognisable plaintext
        _write(mapped, 4 * MiB, marker)
        assert _read(mapped, 4 * MiB, len(marker)) == marker
    finally:
        cryptsetup.close(name)
    assert not cryptsetup.status(name).active
    cryptsetup.close(name)  # closing a closed mapping is a no-op

    on_disk = image.read_bytes()
    assert b"CSI-LUKS-PLAINTEXT-MARKER" not in on_disk
    assert on_disk[:6] == b"LUKS\xba\xbe"

    # Grow the backing file, then the loop device, then the mapping: no passphrase needed.
    mapped = cryptsetup.open(device, name, passphrase)
    try:
        with image.open("r+b") as f:
            f.truncate(128 * MiB)
        LoopDevices().refresh_size(device)
        cryptsetup.resize(name)
        assert cryptsetup.status(name).size_sectors == 112 * MiB // 512
        assert _read(mapped, 4 * MiB, len(marker)) == marker
        _write(mapped, 100 * MiB, marker)  # the new space is usable
        assert _read(mapped, 100 * MiB, len(marker)) == marker
    finally:
        cryptsetup.close(name)
    assert b"CSI-LUKS-PLAINTEXT-MARKER" not in image.read_bytes()


def test_wrong_passphrase_maps_nothing(
    loop_image: tuple[Path, str], new_passphrase: Callable[[], bytes]
) -> None:
    _, device = loop_image
    cryptsetup = Cryptsetup()
    cryptsetup.format(device, new_passphrase())
    name = mapper_name(f"vm-wrong-{secrets.token_hex(4)}")
    with pytest.raises(WrongPassphrase):
        cryptsetup.open(device, name, new_passphrase())
    assert not cryptsetup.status(name).active
    assert not Path(f"/dev/mapper/{name}").exists()


def test_mapping_name_held_by_another_device_is_busy(
    tmp_path: Path, loop_image: tuple[Path, str], new_passphrase: Callable[[], bytes]
) -> None:
    _, device = loop_image
    other_image = tmp_path / "other.img"
    with other_image.open("wb") as f:
        f.truncate(32 * MiB)
    loops = LoopDevices()
    other = loops.attach(str(other_image))
    cryptsetup = Cryptsetup()
    first, second = new_passphrase(), new_passphrase()
    cryptsetup.format(device, first)
    cryptsetup.format(other, second)
    name = mapper_name(f"vm-busy-{secrets.token_hex(4)}")
    cryptsetup.open(device, name, first)
    try:
        with pytest.raises(DeviceBusy, match="already exists"):
            cryptsetup.open(other, name, second)
    finally:
        cryptsetup.close(name)
        loops.detach(other)

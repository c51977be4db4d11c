"""Real cryptsetup on plain image files: everything that needs no device-mapper."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from csi_luks.luks import (
    Cryptsetup,
    DeviceNotFound,
    FormatOptions,
    KeySlotError,
    LuksError,
    NotLuksDevice,
    WrongPassphrase,
)
from tests.support.audit import ArgvAudit

MiB = 1024 * 1024
Passphrases = Callable[[], bytes]


def _image(tmp_path: Path, name: str = "volume.img", size: int = 32 * MiB) -> str:
    path = tmp_path / name
    with path.open("wb") as f:
        f.truncate(size)
    return str(path)


@pytest.fixture
def cryptsetup() -> Cryptsetup:
    return Cryptsetup()


def test_format_writes_a_luks2_header_with_our_defaults(
    tmp_path: Path, cryptsetup: Cryptsetup, new_passphrase: Passphrases
) -> None:
    image = _image(tmp_path)
    assert not cryptsetup.is_luks(image)
    cryptsetup.format(image, new_passphrase(), FormatOptions(label="pvc-0001"))
    assert cryptsetup.is_luks(image)
    header = cryptsetup.dump(image)
    assert header.version == 2 and header.label == "pvc-0001" and header.uuid
    assert header.cipher == "aes-xts-plain64" and header.key_size_bits == 512
    assert header.data_offset_bytes == 16 * MiB
    assert list(header.keyslots) == [0]
    assert header.keyslots[0].kdf == "pbkdf2" and header.keyslots[0].iterations == 1000


def test_format_with_bounded_argon2_and_sector_size(
    tmp_path: Path, cryptsetup: Cryptsetup, new_passphrase: Passphrases
) -> None:
    image = _image(tmp_path)
    passphrase = new_passphrase()
    options = FormatOptions(pbkdf="argon2id", pbkdf_memory_kib=8192, pbkdf_iterations=4, sector_size=4096)
    cryptsetup.format(image, passphrase, options)
    header = cryptsetup.dump(image)
    slot = header.keyslots[0]
    assert (slot.kdf, slot.memory_kib, slot.iterations, slot.parallel) == ("argon2id", 8192, 4, 1)
    assert header.sector_size == 4096
    assert cryptsetup.verify_passphrase(image, passphrase) == 0


def test_verify_right_and_wrong_passphrase(
    tmp_path: Path, cryptsetup: Cryptsetup, new_passphrase: Passphrases
) -> None:
    image = _image(tmp_path)
    passphrase = new_passphrase()
    cryptsetup.format(image, passphrase)
    assert cryptsetup.verify_passphrase(image, passphrase) == 0
    with pytest.raises(WrongPassphrase) as info:
        cryptsetup.verify_passphrase(image, new_passphrase())
    assert "No key available" in str(info.value)


def test_binary_passphrase_with_newline_is_used_verbatim(
    tmp_path: Path, cryptsetup: Cryptsetup, argv_audit: ArgvAudit
) -> None:
    # --key-file=- reads to EOF: a trailing newline is part of the key, not a terminator.
    image = _image(tmp_path)
    passphrase = b"line-one\nline-two\n"
    argv_audit.register(passphrase)
    cryptsetup.format(image, passphrase)
    assert cryptsetup.verify_passphrase(image, passphrase) == 0
    with pytest.raises(WrongPassphrase):
        cryptsetup.verify_passphrase(image, passphrase.rstrip(b"\n"))


def test_add_and_kill_key_slots(tmp_path: Path, cryptsetup: Cryptsetup, new_passphrase: Passphrases) -> None:
    image = _image(tmp_path)
    old, new = new_passphrase(), new_passphrase()
    cryptsetup.format(image, old)
    cryptsetup.add_key(image, old, new, slot=1)
    assert set(cryptsetup.dump(image).keyslots) == {0, 1}
    assert cryptsetup.verify_passphrase(image, new) == 1
    with pytest.raises(KeySlotError):
        cryptsetup.add_key(image, old, new_passphrase(), slot=1)  # slot taken
    with pytest.raises(WrongPassphrase):
        cryptsetup.add_key(image, new_passphrase(), new_passphrase(), slot=2)  # not authorised
    # Rotation's last step: wipe the old slot, proven safe by the new passphrase.
    cryptsetup.kill_slot(image, 0, remaining_passphrase=new)
    assert set(cryptsetup.dump(image).keyslots) == {1}
    with pytest.raises(WrongPassphrase):
        cryptsetup.verify_passphrase(image, old)
    with pytest.raises(KeySlotError, match="locked out"):
        cryptsetup.kill_slot(image, 1, remaining_passphrase=new)
    with pytest.raises(KeySlotError):
        cryptsetup.kill_slot(image, 5, remaining_passphrase=new)  # not an active slot
    assert cryptsetup.verify_passphrase(image, new) == 1


def test_not_a_luks_device(tmp_path: Path, cryptsetup: Cryptsetup, new_passphrase: Passphrases) -> None:
    image = _image(tmp_path)
    assert cryptsetup.is_luks(image) is False
    with pytest.raises(NotLuksDevice):
        cryptsetup.verify_passphrase(image, new_passphrase())
    with pytest.raises(NotLuksDevice):
        cryptsetup.dump(image)


def test_missing_device(tmp_path: Path, cryptsetup: Cryptsetup, new_passphrase: Passphrases) -> None:
    missing = str(tmp_path / "absent.img")
    with pytest.raises(DeviceNotFound):
        cryptsetup.is_luks(missing)
    with pytest.raises(DeviceNotFound):
        cryptsetup.verify_passphrase(missing, new_passphrase())


def test_failure_messages_never_carry_the_passphrase(
    tmp_path: Path, cryptsetup: Cryptsetup, new_passphrase: Passphrases
) -> None:
    image = _image(tmp_path)
    cryptsetup.format(image, new_passphrase())
    wrong = new_passphrase()
    with pytest.raises(WrongPassphrase) as info:
        cryptsetup.verify_passphrase(image, wrong)
    assert wrong.decode() not in str(info.value) + info.value.stderr


def test_header_backup_and_restore_bring_a_wiped_header_back(
    tmp_path: Path, cryptsetup: Cryptsetup, new_passphrase: Passphrases
) -> None:
    image = _image(tmp_path)
    passphrase = new_passphrase()
    cryptsetup.format(image, passphrase)
    backup = str(tmp_path / "header.backup")
    cryptsetup.header_backup(image, backup)
    assert Path(backup).stat().st_size == 16 * MiB  # the header and the whole key-slot area
    with open(image, "r+b") as f:
        f.write(bytes(4 * MiB))
    assert not cryptsetup.is_luks(image)
    with pytest.raises(NotLuksDevice):
        cryptsetup.verify_passphrase(image, passphrase)
    cryptsetup.header_restore(image, backup)
    assert cryptsetup.verify_passphrase(image, passphrase) == 0


def test_header_backup_refuses_an_existing_file_and_a_non_luks_device(
    tmp_path: Path, cryptsetup: Cryptsetup, new_passphrase: Passphrases
) -> None:
    image = _image(tmp_path)
    with pytest.raises(NotLuksDevice):
        cryptsetup.header_backup(image, str(tmp_path / "none"))
    cryptsetup.format(image, new_passphrase())
    existing = tmp_path / "existing"
    existing.write_bytes(b"keep me")
    with pytest.raises(LuksError):
        cryptsetup.header_backup(image, str(existing))
    assert existing.read_bytes() == b"keep me"


def test_a_restored_backup_brings_back_the_key_slots_it_held(
    tmp_path: Path, cryptsetup: Cryptsetup, new_passphrase: Passphrases
) -> None:
    image = _image(tmp_path)
    first, second = new_passphrase(), new_passphrase()
    cryptsetup.format(image, first)
    backup = str(tmp_path / "before-add")
    cryptsetup.header_backup(image, backup)
    cryptsetup.add_key(image, first, second, slot=1)
    assert cryptsetup.active_slots(image) == [0, 1]
    cryptsetup.header_restore(image, backup)
    assert cryptsetup.active_slots(image) == [0]
    with pytest.raises(WrongPassphrase):
        cryptsetup.verify_passphrase(image, second)

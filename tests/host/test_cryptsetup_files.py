"""Real cryptsetup on plain image files: everything that needs no device-mapper."""

from __future__ import annotations

import subprocess
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
from csi_luks.luks.header import read_luks2_header_backup
from csi_luks.operations.header_backup import read_header_backup
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


# --- the header backup read straight from the device (read_luks2_header_backup) ----------------------


def _format_with_sizes(image: str, passphrase: bytes, metadata: str, keyslots: str) -> None:
    """luksFormat with non-default LUKS2 area sizes (FormatOptions does not choose them)."""
    argv = [
        "cryptsetup", "luksFormat", "--type", "luks2", "--batch-mode", "--pbkdf", "pbkdf2",
        "--pbkdf-force-iterations", "1000", "--luks2-metadata-size", metadata,
        "--luks2-keyslots-size", keyslots, "--key-file=-", image,
    ]  # fmt: skip
    subprocess.run(argv, input=passphrase, check=True, capture_output=True)


def _cryptsetups_backup(cryptsetup: Cryptsetup, image: str, tmp_path: Path) -> bytes:
    path = tmp_path / f"luksHeaderBackup-{len(list(tmp_path.iterdir()))}"
    cryptsetup.header_backup(image, str(path))
    return path.read_bytes()


@pytest.mark.parametrize(
    "layout",
    [
        "our defaults",
        "two key slots",
        "argon2id, 4096-byte sectors",
        "64k metadata, 2m key slots",
        "2m metadata, 2m key slots",  # header copies longer than the stream's 1 MiB chunk
    ],
)
def test_the_header_backup_read_from_the_device_is_luksHeaderBackups_byte_for_byte_and_restores(
    tmp_path: Path, cryptsetup: Cryptsetup, new_passphrase: Passphrases, layout: str
) -> None:
    image = _image(tmp_path)
    passphrase, second = new_passphrase(), new_passphrase()
    if layout.endswith("m key slots"):
        _format_with_sizes(image, passphrase, layout.split()[0], "2m")
    elif layout == "argon2id, 4096-byte sectors":
        options = FormatOptions(pbkdf="argon2id", pbkdf_memory_kib=8192, pbkdf_iterations=4, sector_size=4096)
        cryptsetup.format(image, passphrase, options)
    else:
        cryptsetup.format(image, passphrase, FormatOptions(label="pvc-direct"))
    if layout == "two key slots":
        cryptsetup.add_key(image, passphrase, second, slot=1)
    direct = read_luks2_header_backup(image)
    assert direct is not None
    assert direct == _cryptsetups_backup(cryptsetup, image, tmp_path)
    sizes = {"64k": 2 * 64 * 1024 + 2 * MiB, "2m": 2 * 2 * MiB + 2 * MiB}
    expected_size = sizes.get(layout.split()[0], 16 * MiB)
    assert len(direct) == expected_size
    # luksHeaderRestore takes it back onto a device whose header and key slots are gone.
    with open(image, "r+b") as f:
        f.write(bytes(len(direct)))
    assert not cryptsetup.is_luks(image)
    restored = tmp_path / "direct.backup"
    restored.write_bytes(direct)
    cryptsetup.header_restore(image, str(restored))
    assert cryptsetup.verify_passphrase(image, passphrase) == 0
    if layout == "two key slots":
        assert cryptsetup.verify_passphrase(image, second) == 1


def _damage(image: str, offset: int, data: bytes) -> None:
    with open(image, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize(
    "damage",
    [
        "primary binary header wiped",
        "primary JSON changed (checksum no longer matches)",
        "secondary header wiped",
        "secondary with another sequence id",
    ],
)
def test_a_header_cryptsetup_must_judge_is_left_to_cryptsetup(
    tmp_path: Path, cryptsetup: Cryptsetup, new_passphrase: Passphrases, damage: str
) -> None:
    """Not read directly: cryptsetup picks the copy it trusts (and says when none is), and the volume's
    backup is then cryptsetup's own, as before."""
    image = _image(tmp_path)
    cryptsetup.format(image, new_passphrase())
    hdr_size = 16 * 1024
    if damage == "primary binary header wiped":
        _damage(image, 0, bytes(4096))
    elif damage.startswith("primary JSON"):
        _damage(image, 4096, b"{ ")
    elif damage == "secondary header wiped":
        _damage(image, hdr_size, bytes(4096))
    else:
        _damage(image, hdr_size + 16, (999).to_bytes(8, "big"))
    assert read_luks2_header_backup(image) is None
    assert read_header_backup(cryptsetup, image) == _cryptsetups_backup(cryptsetup, image, tmp_path)


def test_nothing_is_read_directly_from_a_luks1_device_or_one_without_a_header(
    tmp_path: Path, cryptsetup: Cryptsetup, new_passphrase: Passphrases
) -> None:
    image = _image(tmp_path)
    assert read_luks2_header_backup(image) is None
    assert read_luks2_header_backup(str(tmp_path / "absent")) is None
    with pytest.raises(NotLuksDevice):
        read_header_backup(cryptsetup, image)  # cryptsetup's answer, as before
    subprocess.run(
        ["cryptsetup", "luksFormat", "--type", "luks1", "--batch-mode", "--pbkdf-force-iterations", "1000",
         "--key-file=-", image],
        input=new_passphrase(), check=True, capture_output=True,
    )  # fmt: skip
    assert read_luks2_header_backup(image) is None
    assert read_header_backup(cryptsetup, image) == _cryptsetups_backup(cryptsetup, image, tmp_path)

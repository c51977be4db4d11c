"""StorageClass LUKS parameters: what is accepted, what is refused and how it is said, what reaches
cryptsetup, and how the volume's metadata and header flags read back."""

from __future__ import annotations

import json

import pytest

from csi_luks.luks.cryptsetup import classify
from csi_luks.luks.errors import CipherUnavailable
from csi_luks.luks.parameters import ActivationFlags, LuksParameterError, LuksParameters, parse_perf_flags
from csi_luks.luks.status import parse_dump
from csi_luks.system.runner import CommandError
from csi_luks.volume_metadata import VolumeRecord, luks_metadata


def test_no_parameters_mean_the_defaults() -> None:
    luks = LuksParameters.from_parameters({})
    assert luks == LuksParameters() and not luks.any
    options = luks.format_options("label")
    assert (options.cipher, options.key_size, options.sector_size) == ("aes-xts-plain64", 512, None)
    assert luks.flags.open_options(persistent=True).args() == ["--persistent"]
    assert not luks.flags.any


def test_a_full_class_reaches_format_and_open_options() -> None:
    luks = LuksParameters.from_parameters({
        "encryptionCipher": "serpent-xts-plain64", "encryptionKeySize": "256",
        "encryptionSectorSize": "4096", "encryptionDiscard": "true",
        "encryptionPerfFlags": " no_write_workqueue,no_read_workqueue ,no_read_workqueue",
    })  # fmt: skip
    options = luks.format_options("vol")
    assert (options.cipher, options.key_size, options.sector_size, options.label) == (
        "serpent-xts-plain64", 256, 4096, "vol",
    )  # fmt: skip
    assert luks.flags.perf_flags == ("no_read_workqueue", "no_write_workqueue")  # ordered, no duplicates
    assert luks.flags.open_options(persistent=True).args() == [
        "--allow-discards", "--perf-no_read_workqueue", "--perf-no_write_workqueue", "--persistent",
    ]  # fmt: skip
    assert luks.flags.header_names() == ["allow-discards", "no-read-workqueue", "no-write-workqueue"]


def test_a_cipher_without_key_size_gets_its_own_default() -> None:
    assert (
        LuksParameters.from_parameters({"encryptionCipher": "aes-cbc-essiv:sha256"})
        .format_options(None)
        .key_size
        == 256
    )
    adiantum = LuksParameters.from_parameters({"encryptionCipher": "xchacha12,aes-adiantum-plain64"})
    assert adiantum.format_options(None).key_size == 256


@pytest.mark.parametrize(
    ("parameters", "words"),
    [
        ({"encryptionCipher": "aes-ecb"}, ["aes-ecb", "allowed:", "aes-xts-plain64", "aes-adiantum"]),
        ({"encryptionKeySize": "384"}, ["384", "aes-xts-plain64", "allowed: 256, 512"]),
        (
            {"encryptionCipher": "xchacha20,aes-adiantum-plain64", "encryptionKeySize": "512"},
            ["512", "xchacha20,aes-adiantum-plain64", "allowed: 256"],
        ),
        ({"encryptionKeySize": "big"}, ["big", "allowed: 256, 512"]),
        ({"encryptionSectorSize": "8192"}, ["8192", "allowed: 512, 1024, 2048, 4096"]),
        ({"encryptionDiscard": "yes"}, ["encryptionDiscard", '"true" or "false"']),
        ({"encryptionPerfFlags": "no_read_workqueue,fast"}, ["fast", "allowed:", "same_cpu_crypt"]),
    ],
)
def test_impossible_combinations_are_refused_naming_the_allowed_values(
    parameters: dict[str, str], words: list[str]
) -> None:
    with pytest.raises(LuksParameterError) as info:
        LuksParameters.from_parameters(parameters)
    assert all(word in str(info.value) for word in words), str(info.value)


def test_perf_flags_none_clears() -> None:
    assert parse_perf_flags("none") == () and parse_perf_flags("") == ()


def test_metadata_round_trip_records_only_what_differs() -> None:
    assert luks_metadata(LuksParameters()) == {}
    luks = LuksParameters("aes-cbc-essiv:sha256", 128, 1024, ActivationFlags(True, ("same_cpu_crypt",)))
    metadata = luks_metadata(luks)
    assert metadata == {
        "csi-luks/luks-cipher": "aes-cbc-essiv:sha256", "csi-luks/luks-key-size": "128",
        "csi-luks/luks-sector-size": "1024", "csi-luks/luks-discard": "true",
        "csi-luks/luks-perf-flags": "same_cpu_crypt",
    }  # fmt: skip
    assert VolumeRecord.parse(metadata).luks == luks
    assert VolumeRecord.parse({}).luks == LuksParameters()


def test_header_flags_are_read_from_luks2_metadata() -> None:
    meta = {
        "segments": {"0": {"type": "crypt", "encryption": "aes-xts-plain64", "sector_size": 4096}},
        "keyslots": {},
        "config": {"flags": ["allow-discards", "no-write-workqueue"]},
    }
    header = parse_dump(json.dumps(meta), "Version: 2\n")
    assert header.flags == ("allow-discards", "no-write-workqueue")
    flags = ActivationFlags.from_header(header.flags)
    assert flags == ActivationFlags(True, ("no_write_workqueue",))
    assert flags.describe() == "discard, no_write_workqueue"


@pytest.mark.parametrize(
    "stderr",
    [
        "Cipher nosuch-xts-plain64 (key size 512 bits) is not available.\n",  # the AF_ALG check
        # dm-crypt refusing the table (what the guest kernel's cryptsetup 2.6.1 said, in the VM tier)
        "device-mapper: reload ioctl on temporary-cryptsetup-1026 (254:0) failed: No such file or directory\n"
        "Failed to setup dm-crypt key mapping for device /dev/loop0.\n"
        "Check that kernel supports nosuch-xts-plain64 cipher (check syslog for more info).\n",
    ],
)
def test_cryptsetup_refusing_a_cipher_the_kernel_lacks_is_cipher_unavailable(stderr: str) -> None:
    error = classify(CommandError(["cryptsetup"], 1, "", stderr), "luksFormat")
    assert isinstance(error, CipherUnavailable)
    assert "nosuch-xts-plain64" in str(error)

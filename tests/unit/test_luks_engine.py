"""Argument building and error mapping of the cryptsetup engine, against a recording fake runner."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from csi_luks.kms.kdf import KDFSlots
from csi_luks.luks import (
    CipherUnavailable,
    Cryptsetup,
    CryptsetupMissing,
    CryptsetupTimeout,
    DeviceBusy,
    DeviceMapperUnavailable,
    DeviceNotFound,
    FormatOptions,
    KeySlotError,
    LuksDeviceIOError,
    LuksError,
    NotLuksDevice,
    OpenOptions,
    WrongPassphrase,
    mapper_name,
)
from csi_luks.luks.cryptsetup import classify
from csi_luks.system.runner import CommandError, CommandNotFound, CommandResult, CommandTimeout, SecretPipe

INACTIVE = "/dev/mapper/n is inactive.\n"


@dataclass
class Call:
    argv: list[str | SecretPipe]
    stdin: bytes | None


@dataclass
class FakeRunner:
    """Answers each call with the next scripted (rc, stdout, stderr)."""

    answers: list[tuple[int, str, str]]
    calls: list[Call] = field(default_factory=list)

    def run(
        self,
        argv: Sequence[str | SecretPipe],
        *,
        stdin: bytes | None = None,
        timeout: float | None = None,
        check: bool = True,
        **_: object,
    ) -> CommandResult:
        self.calls.append(Call(list(argv), stdin))
        rc, out, err = self.answers.pop(0)
        words = [a for a in argv if isinstance(a, str)]
        if check and rc:
            raise CommandError(words, rc, out, err)
        return CommandResult(words, rc, out, err, 0.0)


def engine(*answers: tuple[int, str, str], sys_block: Path | None = None) -> tuple[Cryptsetup, FakeRunner]:
    """An engine on scripted answers; without sys_block, it asks `cryptsetup status` for open mappings (as
    where /sys/block cannot tell), so the status answers come first."""
    runner = FakeRunner(list(answers))
    return Cryptsetup(runner=runner, sys_block=sys_block), runner  # type: ignore[arg-type]


def test_format_builds_luks2_arguments_and_sends_the_passphrase_on_stdin() -> None:
    cs, runner = engine((0, "", ""))
    cs.format("/dev/loop3", b"pass-1", FormatOptions(sector_size=4096, label="pvc-9"))
    (call,) = runner.calls
    assert call.stdin == b"pass-1"
    assert "pass-1" not in " ".join(map(str, call.argv))
    argv = call.argv
    assert argv[:4] == ["cryptsetup", "luksFormat", "--type", "luks2"]
    assert "--key-file=-" in argv and "--batch-mode" in argv
    assert argv[argv.index("--cipher") + 1] == "aes-xts-plain64"
    assert argv[argv.index("--key-size") + 1] == "512"
    assert argv[argv.index("--pbkdf") + 1] == "pbkdf2"
    assert argv[argv.index("--pbkdf-force-iterations") + 1] == "1000"
    assert argv[argv.index("--sector-size") + 1] == "4096"
    assert argv[argv.index("--label") + 1] == "pvc-9"
    assert argv[-1] == "/dev/loop3"


def test_argon2_is_bounded_in_memory() -> None:
    args = FormatOptions(pbkdf="argon2id", pbkdf_memory_kib=65536).pbkdf_args()
    assert args == ["--pbkdf", "argon2id", "--pbkdf-force-iterations", "4", "--pbkdf-memory", "65536",
                    "--pbkdf-parallel", "1"]  # fmt: skip
    assert "--pbkdf-memory" in FormatOptions(pbkdf="argon2i").pbkdf_args()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"pbkdf": "scrypt"},
        {"key_size": 500},
        {"pbkdf_memory_kib": 4096},  # memory is argon2-only
        {"pbkdf": "argon2id", "pbkdf_memory_kib": 4 * 1024 * 1024},  # above the 1 GiB cap
        {"sector_size": 3000},
        {"label": "x" * 48},
        {"key_slot": 32},
    ],
)
def test_format_options_reject_bad_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        FormatOptions(**kwargs)  # type: ignore[arg-type]


def test_open_disables_the_keyring_and_passes_performance_flags() -> None:
    cs, runner = engine((4, INACTIVE, ""), (0, "", ""))
    path = cs.open("/dev/rbd0", "luks-v", "pw-open", OpenOptions(allow_discards=True, no_read_workqueue=True))
    assert path == "/dev/mapper/luks-v"
    status_call, open_call = runner.calls
    assert status_call.argv == ["cryptsetup", "status", "luks-v"]
    assert open_call.stdin == b"pw-open"
    assert open_call.argv == [
        "cryptsetup", "open", "--type", "luks2", "--disable-keyring", "--key-file=-",
        "--allow-discards", "--perf-no_read_workqueue", "/dev/rbd0", "luks-v",
    ]  # fmt: skip


def test_open_is_idempotent_for_the_same_device() -> None:
    cs, runner = engine((0, "/dev/mapper/v is active.\n  device:  /dev/loop0\n", ""))
    assert cs.open("/dev/loop0", "v", "pw") == "/dev/mapper/v"
    assert len(runner.calls) == 1  # no second open


def test_open_refuses_a_name_held_by_another_device() -> None:
    cs, _ = engine((0, "/dev/mapper/v is active.\n  device:  /dev/loop7\n", ""))
    with pytest.raises(DeviceBusy, match="/dev/loop7"):
        cs.open("/dev/loop0", "v", "pw")


def test_close_of_an_inactive_mapping_does_nothing() -> None:
    cs, runner = engine((4, INACTIVE, ""))
    cs.close("n")
    assert len(runner.calls) == 1


NO_DM = "Cannot initialize device-mapper. Is dm_mod kernel module loaded?\n"


def test_close_on_a_kernel_without_device_mapper_has_nothing_to_close(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("csi_luks.luks.cryptsetup.device_mapper_registered", lambda: False)
    cs, runner = engine((1, "", NO_DM))
    cs.close("n")  # no mapping can exist: NodeUnstageVolume of a never-staged volume succeeds
    assert len(runner.calls) == 1
    with pytest.raises(DeviceMapperUnavailable):  # status itself still says why it cannot look
        engine((1, "", NO_DM))[0].status("n")


def test_close_when_device_mapper_is_there_but_unreachable_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The driver is registered, so a mapping may be open behind the error (no privileges, no control node).
    monkeypatch.setattr("csi_luks.luks.cryptsetup.device_mapper_registered", lambda: True)
    with pytest.raises(DeviceMapperUnavailable):
        engine((1, "", NO_DM))[0].close("n")

    def unreadable() -> bool:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("csi_luks.luks.cryptsetup.device_mapper_registered", unreadable)
    with pytest.raises(DeviceMapperUnavailable):
        engine((1, "", NO_DM))[0].close("n")


def test_resize_without_passphrase_has_no_stdin() -> None:
    cs, runner = engine((0, "", ""), (0, "", ""))
    cs.resize("luks-v")
    cs.resize("luks-v", size_sectors=2048, passphrase="pw-r")
    assert runner.calls[0].argv == ["cryptsetup", "resize", "luks-v"] and runner.calls[0].stdin is None
    assert runner.calls[1].argv == ["cryptsetup", "resize", "--size", "2048", "--key-file=-", "luks-v"]
    assert runner.calls[1].stdin == b"pw-r"


def test_add_key_sends_the_new_key_through_a_pipe() -> None:
    cs, runner = engine((0, "", ""))
    cs.add_key("/dev/x", b"old-pw", b"new-pw", slot=1)
    (call,) = runner.calls
    assert call.stdin == b"old-pw"
    assert isinstance(call.argv[-1], SecretPipe) and call.argv[-1].data == b"new-pw"
    assert call.argv[call.argv.index("--key-slot") + 1] == "1"


def test_kill_slot_refuses_to_lock_the_volume_out() -> None:
    cs, runner = engine((0, "Key slot 1 unlocked.\n", ""))
    with pytest.raises(KeySlotError, match="locked out"):
        cs.kill_slot("/dev/x", 1, "pw")
    assert len(runner.calls) == 1


def test_empty_passphrase_is_refused() -> None:
    cs, _ = engine()
    with pytest.raises(ValueError):
        cs.format("/dev/x", b"")


@pytest.mark.parametrize(
    ("rc", "stderr", "kind"),
    [
        (2, "No key available with this passphrase.", WrongPassphrase),
        (1, "Device /x is not a valid LUKS device.", NotLuksDevice),
        (4, "Device /x does not exist or access denied.", DeviceNotFound),
        (5, "Cannot use device x, name is invalid or still in use.", DeviceBusy),
        (1, "Cannot initialize device-mapper. Is dm_mod kernel module loaded?", DeviceMapperUnavailable),
        (1, "Key slot 3 is full, please select another one.", KeySlotError),
        (1, "Keyslot 5 is not active.", KeySlotError),
        (1, "Cannot wipe header on device /dev/loop1.", LuksDeviceIOError),
        (1, "IO error while decrypting keyslot.", LuksDeviceIOError),
        (1, "something new", LuksError),
    ],
)
def test_classify_maps_exit_codes_and_messages(rc: int, stderr: str, kind: type[LuksError]) -> None:
    error = classify(CommandError(["cryptsetup"], rc, "", stderr), "op")
    assert type(error) is kind
    assert stderr in str(error) and error.returncode == rc


def test_classify_missing_binary_and_timeout() -> None:
    assert isinstance(classify(CommandNotFound(["cryptsetup"]), "op"), CryptsetupMissing)
    assert isinstance(classify(CommandTimeout(["cryptsetup"], 5, "", ""), "op"), CryptsetupTimeout)


@pytest.mark.parametrize(
    ("volume_id", "expected"),
    [
        ("pvc-1234", "luks-pvc-1234"),
        ("0001-0009-rook-ceph-0000000000000002-b0a1", "luks-0001-0009-rook-ceph-0000000000000002-b0a1"),
    ],
)
def test_mapper_name_keeps_safe_ids(volume_id: str, expected: str) -> None:
    assert mapper_name(volume_id) == expected


def test_mapper_name_sanitizes_and_disambiguates() -> None:
    a, b = mapper_name("pool/image"), mapper_name("pool_image")
    assert "/" not in a and a != b and a.startswith("luks-pool_image-")
    long_name = mapper_name("v" * 300)
    assert len(long_name) <= 100 and long_name != mapper_name("v" * 299)
    with pytest.raises(ValueError):
        mapper_name("")


@pytest.mark.parametrize(
    ("unreadable", "kind"), [("Input/output error", LuksDeviceIOError), (None, LuksError)]
)
def test_a_silent_resize_failure_on_an_unreadable_device_is_an_io_error(
    monkeypatch: pytest.MonkeyPatch, unreadable: str | None, kind: type[LuksError]
) -> None:
    read: list[str] = []

    def read_error(device: str) -> str | None:
        read.append(device)
        return unreadable

    monkeypatch.setattr("csi_luks.luks.cryptsetup.read_error", read_error)
    cs, _ = engine((1, "", ""), (0, "/dev/mapper/v is active.\n  device:  /dev/loop3\n", ""))
    with pytest.raises(LuksError) as info:
        cs.resize("v")  # cryptsetup exits 1 and prints nothing when it cannot read the header
    assert type(info.value) is kind and read == ["/dev/loop3"]
    if unreadable:
        assert "resize" in str(info.value) and "/dev/loop3: Input/output error" in str(info.value)


def test_not_a_luks_device_on_an_unreadable_device_is_an_io_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("csi_luks.luks.cryptsetup.read_error", lambda device: "Input/output error")
    cs, _ = engine((4, INACTIVE, ""), (1, "", "Device /dev/loop1 is not a valid LUKS device."))
    with pytest.raises(LuksDeviceIOError, match=r"luksOpen.*not a valid LUKS device.*I/O error"):
        cs.open("/dev/loop1", "v", "pw")


def test_an_io_error_in_cryptsetups_words_names_the_device() -> None:
    cs, _ = engine((1, "", "Device wipe error, offset 0."))
    with pytest.raises(LuksDeviceIOError) as info:
        cs.format("/dev/loop1", "pw")
    assert str(info.value).startswith("luksFormat: I/O error from the device: Device wipe error")
    assert str(info.value).endswith("the device is /dev/loop1")


def test_cipher_check_maps_read_only_with_a_throwaway_key_and_a_refused_table_is_cipher_unavailable(
    tmp_path: Path,
) -> None:
    device = tmp_path / "device"
    device.write_bytes(b"\0" * 4096)
    options = FormatOptions(cipher="serpent-xts-plain64", key_size=256, sector_size=1024)
    inactive = (4, "", "")  # the close's status: the mapping is already gone
    cs, runner = engine((0, "", ""), inactive)
    cs.check_cipher(str(device), options)
    argv = runner.calls[0].argv
    assert argv[:4] == ["cryptsetup", "open", "--type", "plain"] and "--readonly" in argv
    assert (
        argv[argv.index("--cipher") + 1] == "serpent-xts-plain64"
        and argv[argv.index("--sector-size") + 1] == "1024"
    )
    assert len(runner.calls[0].stdin or b"") == 32  # the throwaway key, on stdin only
    refused = (
        "device-mapper: reload ioctl on csi-luks-cipher-check-1 (254:0) failed: No such file or directory\n"
    )
    cs, _ = engine((4, "", refused))
    with pytest.raises(
        CipherUnavailable, match="refused serpent-xts-plain64 with a 256-bit key, 1024-byte sectors"
    ):
        cs.check_cipher(str(device), options)


class _ConcurrencyRunner:
    """Each command sleeps a moment; the most commands seen running at once is kept."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = self.most = 0
        self.commands: list[str] = []

    def run(self, argv: Sequence[str | SecretPipe], **_: object) -> CommandResult:
        with self.lock:
            self.commands.append(str(argv[1]))
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(0.05)
        with self.lock:
            self.running -= 1
        return CommandResult([a for a in argv if isinstance(a, str)], 0, "", "", 0.05)


def _at_once(action: Callable[[], object], count: int) -> None:
    """count calls of action, all at once; each must succeed."""
    with ThreadPoolExecutor(count) as pool:
        for future in [pool.submit(action) for _ in range(count)]:
            future.result()


def test_commands_given_a_passphrase_wait_for_the_kdf_slots(tmp_path: Path) -> None:
    """luksFormat and open run a PBKDF (argon2id takes its memory cost per call): 8 at once run 2 at a
    time under 2 slots; commands without a passphrase (close) are not held back."""
    runner = _ConcurrencyRunner()
    engine = Cryptsetup(runner=runner, sys_block=tmp_path, kdf_slots=KDFSlots(2))  # type: ignore[arg-type]
    _at_once(lambda: engine.format("/dev/loop9", "secret-passphrase"), 8)
    assert runner.most == 2
    runner.most = 0
    _at_once(lambda: engine._run("luksClose", ["close", "n"]), 8)
    assert runner.most > 2


def test_the_cipher_check_takes_no_kdf_slot(tmp_path: Path) -> None:
    """Its throwaway key goes to dm-crypt as it is: no derivation, so no wait behind a busy KDF slot."""
    slots = KDFSlots(1)
    engine = Cryptsetup(runner=_ConcurrencyRunner(), sys_block=tmp_path, kdf_slots=slots)  # type: ignore[arg-type]
    with slots.held():  # the only slot is taken: a check that waited for it would never return
        engine.check_cipher("/dev/loop9", FormatOptions())


def test_a_command_that_finds_every_kdf_slot_held_past_its_timeout_fails_without_running(
    tmp_path: Path,
) -> None:
    """Slots held by commands stuck on dead devices hold another open up for its timeout, not for good."""
    runner = _ConcurrencyRunner()
    slots = KDFSlots(1)
    engine = Cryptsetup(runner=runner, sys_block=tmp_path, kdf_slots=slots, timeout=0.2)  # type: ignore[arg-type]
    with slots.held(), pytest.raises(CryptsetupTimeout, match="key-derivation slots stayed busy"):
        engine.open("/dev/loop9", "n", "secret-passphrase")
    assert "open" not in runner.commands  # luksOpen never started (a status lookup may have)

"""Never format data, at the filesystem layer too (runs in the VM, real dm-crypt, standalone backend).

- A filesystem csi-luks made is recorded in the volume's metadata; once recorded, NodeStage never runs
  mkfs again: a damaged filesystem (its superblock wiped in ciphertext) is FAILED_PRECONDITION naming the
  volume and the filesystem's UUID, nothing is written, and the hint in the message recovers it.
- A volume staged before that record existed (encrypted, staged: no record) is treated the same way.
- A luksFormat killed with the whole plugin inside cryptsetup's own writes (LUKS magic on the disk, no key
  slot complete) is formatted again by the retry: the volume was still `prepared`, it never held data. A
  LUKS header that csi-luks did not begin is left alone.
- A mount flag the filesystem refuses is INVALID_ARGUMENT naming the flag, with nothing left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_luks.csi import csi_pb2, csi_pb2_grpc
from csi_luks.encryption import volume_encryption
from csi_luks.kms.base import KMSContext
from csi_luks.luks import Cryptsetup, mapper_name, mapper_path
from csi_luks.operations.fsck import fsck
from csi_luks.operations.tool import Tool
from csi_luks.system.filesystem import Filesystems
from csi_luks.volume_metadata import FILESYSTEM, LUKS_HEADER_BYTES, STATE, FilesystemRecord
from tests.support.crash_harness import plugin_process, serve_argv
from tests.support.fault_layer import FaultLayer
from tests.support.plugin import MiB, RunningPlugin, block_capability, mount_capability, running_plugin

pytestmark = pytest.mark.timeout(900)  # the in-cryptsetup kill starts one plugin process (a minute under TCG)
SIZE = 64 * MiB
DATA = b"the user's file, written before the damage\n" * 100


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fs-safety")


@pytest.fixture(scope="module")
def plugin(root: Path) -> Iterator[RunningPlugin]:
    with running_plugin(root) as running:
        yield running


def _stage_request(
    volume_id: str, staging: Path, capability: csi_pb2.VolumeCapability | None = None
) -> csi_pb2.NodeStageVolumeRequest:
    return csi_pb2.NodeStageVolumeRequest(
        volume_id=volume_id,
        staging_target_path=str(staging),
        volume_capability=capability or mount_capability(),
    )


def _stage(plugin: RunningPlugin, volume_id: str, staging: Path) -> None:
    plugin.node.NodeStageVolume(_stage_request(volume_id, staging))


def _unstage(plugin: RunningPlugin, volume_id: str, staging: Path) -> None:
    plugin.node.NodeUnstageVolume(
        csi_pb2.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=str(staging))
    )


def _metadata(plugin: RunningPlugin, volume_id: str) -> dict[str, str]:
    return plugin.backend.get(volume_id).metadata


def _image(plugin: RunningPlugin, volume_id: str) -> Path:
    return Path(plugin.backend.image_path(volume_id))


def _digest(plugin: RunningPlugin, volume_id: str) -> str:
    return subprocess.run(
        ["sha256sum", str(_image(plugin, volume_id))], capture_output=True, text=True, check=True
    ).stdout.split()[0]


def _refused(call: object, code: grpc.StatusCode, *words: str) -> str:
    """call fails with code, and its message says each of words; returns the message."""
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    print(f"{info.value.code()}: {info.value.details()}")  # what an operator reads, in the report
    assert info.value.code() == code, info.value.details()
    missing = [word for word in words if word not in info.value.details()]
    assert not missing, (missing, info.value.details())
    return str(info.value.details())


def _stage_refused_untouched(plugin: RunningPlugin, volume_id: str, staging: Path, *words: str) -> None:
    """NodeStage fails with FAILED_PRECONDITION saying words, writes nothing and leaves nothing behind."""
    before = _digest(plugin, volume_id)
    _refused(
        lambda: _stage(plugin, volume_id, staging), grpc.StatusCode.FAILED_PRECONDITION, volume_id, *words
    )
    assert _digest(plugin, volume_id) == before
    _assert_nothing_left(plugin, volume_id, staging)


def _assert_nothing_left(plugin: RunningPlugin, volume_id: str, staging: Path) -> None:
    assert not Filesystems().is_mounted(str(staging))
    assert not Cryptsetup().status(mapper_name(volume_id)).active
    assert plugin.backend.find_attachment(volume_id) is None


def _staged_once_with_a_file(plugin: RunningPlugin, root: Path, name: str) -> tuple[str, Path]:
    volume_id = plugin.create(name, SIZE).volume_id
    staging = root / f"staging-{name}"
    _stage(plugin, volume_id, staging)
    (staging / "data").write_bytes(DATA)
    _unstage(plugin, volume_id, staging)
    return volume_id, staging


def _damage(plugin: RunningPlugin, volume_id: str, data: bytes) -> None:
    """Overwrite the start of the LUKS data area (ciphertext) with data, as a torn write or a stray wipe."""
    with open(_image(plugin, volume_id), "r+b") as image:
        image.seek(LUKS_HEADER_BYTES)
        image.write(data)
        image.flush()
        os.fsync(image.fileno())


def _delete(plugin: RunningPlugin, volume_id: str) -> None:
    plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id))


@pytest.mark.parametrize(
    "damage",
    [pytest.param(bytes(4096), id="superblock-zeroed"), pytest.param(os.urandom(MiB), id="first-mib")],
)
def test_a_damaged_filesystem_is_refused_and_never_made_again(
    plugin: RunningPlugin,
    root: Path,
    damage: bytes,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
) -> None:
    volume_id, staging = _staged_once_with_a_file(plugin, root, f"damaged-{request.node.callspec.id}")
    record = FilesystemRecord.parse(_metadata(plugin, volume_id)[FILESYSTEM])
    assert record is not None and record.type == "ext4" and record.uuid
    _damage(plugin, volume_id, damage)
    _stage_refused_untouched(  # no mkfs, no write at all
        plugin, volume_id, staging, record.uuid, "no filesystem is found", "nothing was formatted", "e2fsck",
        "header restore",
    )  # fmt: skip
    before = _digest(plugin, volume_id)
    assert _metadata(plugin, volume_id)[STATE] == "encrypted"
    if damage == bytes(4096):
        # `csi-luks fsck`, as the message advises: read-only, it finds the filesystem from a backup.
        assert _fsck(plugin, volume_id, capsys) == (
            1,
            "the primary superblock is damaged; e2fsck read a backup one",
        )
        assert _digest(plugin, volume_id) == before
        _recover_with_a_backup_superblock(plugin, volume_id)
        assert _fsck(plugin, volume_id, capsys) == (
            0,
            "e2fsck -n found no problem",
        )
        _stage(plugin, volume_id, staging)
        assert (staging / "data").read_bytes() == DATA  # the message's advice brought the file back
        _unstage(plugin, volume_id, staging)
    _delete(plugin, volume_id)


def _fsck(plugin: RunningPlugin, volume_id: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """`csi-luks fsck VOLUME_ID` (the command's code, in this process): its exit code, and the part of its
    report that matters here, checked to be in what it printed."""
    capsys.readouterr()
    code = fsck(Tool(plugin.backend, plugin.server.kms_config), [volume_id])
    printed = capsys.readouterr()
    report = printed.out + printed.err
    print(report)
    for verdict in ("the primary superblock is damaged; e2fsck read a backup one",
                    "e2fsck -n found no problem"):  # fmt: skip
        if verdict in report:
            return code, verdict
    return code, report


def _recover_with_a_backup_superblock(plugin: RunningPlugin, volume_id: str) -> None:
    """What the refusal tells an operator to do: e2fsck with a backup superblock (1 KiB blocks here)."""
    device = plugin.backend.attach(volume_id)
    passphrase = volume_encryption(
        plugin.server.kms_config, "local-1", KMSContext(secrets={}), plugin.backend
    ).get_passphrase(volume_id)
    Cryptsetup().open(device, mapper_name(volume_id), passphrase)
    try:
        result = subprocess.run(
            ["e2fsck", "-f", "-y", "-b", "8193", mapper_path(mapper_name(volume_id))],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert result.returncode in (0, 1), result  # 1: errors corrected
    finally:
        Cryptsetup().close(mapper_name(volume_id))
        plugin.backend.detach(volume_id)


def test_a_volume_staged_before_filesystems_were_recorded_is_never_formatted(
    plugin: RunningPlugin, root: Path
) -> None:
    """The upgrade path: an `encrypted` volume without a record was staged (only a NodeStage moves it past
    `prepared`, and that NodeStage made its filesystem), so it is treated as holding one."""
    volume_id, staging = _staged_once_with_a_file(plugin, root, "before-the-record")
    recorded = _metadata(plugin, volume_id)[FILESYSTEM]
    plugin.backend.remove_metadata(volume_id, FILESYSTEM)  # as an earlier csi-luks left it
    _stage(plugin, volume_id, staging)
    assert (staging / "data").read_bytes() == DATA
    assert _metadata(plugin, volume_id)[FILESYSTEM] == recorded  # recorded at this stage
    _unstage(plugin, volume_id, staging)
    plugin.backend.remove_metadata(volume_id, FILESYSTEM)
    _damage(plugin, volume_id, bytes(4096))
    _stage_refused_untouched(
        plugin, volume_id, staging, "before csi-luks recorded filesystems", "nothing was formatted"
    )
    _delete(plugin, volume_id)


def test_a_raw_block_volume_is_recorded_and_never_given_a_filesystem(
    plugin: RunningPlugin, root: Path
) -> None:
    volume_id = plugin.create("raw-block", SIZE).volume_id
    staging = root / "staging-raw-block"
    plugin.node.NodeStageVolume(_stage_request(volume_id, staging, block_capability()))
    assert _metadata(plugin, volume_id)[FILESYSTEM] == "block"
    assert _metadata(plugin, volume_id)[STATE] == "encrypted"
    _unstage(plugin, volume_id, staging)
    # The workload's bytes may look like nothing to blkid: a mount stage must not make a filesystem over them.
    _stage_refused_untouched(plugin, volume_id, staging, "raw block data", "nothing was formatted")
    _delete(plugin, volume_id)


def test_an_unknown_mount_flag_is_invalid_argument_naming_it(plugin: RunningPlugin, root: Path) -> None:
    volume_id = plugin.create("mount-flags", SIZE).volume_id
    staging = root / "staging-mount-flags"
    capability = mount_capability()
    capability.mount.mount_flags.extend(["noatime", "nosuchoption"])
    _refused(
        lambda: plugin.node.NodeStageVolume(_stage_request(volume_id, staging, capability)),
        grpc.StatusCode.INVALID_ARGUMENT,
        volume_id, "'nosuchoption'",
    )  # fmt: skip
    _assert_nothing_left(plugin, volume_id, staging)
    _stage(plugin, volume_id, staging)  # the same volume with good flags
    _unstage(plugin, volume_id, staging)
    _delete(plugin, volume_id)


def test_a_luks_format_killed_inside_cryptsetup_is_formatted_again(plugin: RunningPlugin, root: Path) -> None:
    """SIGKILL of the plugin's whole process group while luksFormat writes: every write waits 300 ms in a
    dm-delay device, and the kill lands once the second header copy is on the disk, before the key slot's
    entry is: a LUKS2 header with no key slot, which nothing can open."""
    subprocess.run(["modprobe", "dm_delay"], check=True)
    volume_id = plugin.create("format-killed", SIZE).volume_id
    staging = root / "staging-format-killed"
    layer = FaultLayer(_image(plugin, volume_id), f"delay-{volume_id[-12:]}")
    layer.install()
    try:
        layer.delay_writes(300)
        argv = serve_argv(root / "kill.sock", root / "state", root / "kms-config.json", "--mode", "node")
        with plugin_process(argv, root / "kill.sock", {**os.environ}, 300, new_session=True) as (
            proc,
            channel,
        ):
            pending = csi_pb2_grpc.NodeStub(channel).NodeStageVolume.future(
                _stage_request(volume_id, staging)
            )
            _wait_for_bytes(layer.real, 16384, b"SKUL\xba\xbe", pending)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        layer.clear()  # the writes in flight land; nothing after them was issued
        header = Cryptsetup().dump(str(layer.real))
        assert header.keyslots == {}, header  # the window of the issue: LUKS magic, no key slot
        assert header.label == volume_id
        assert _metadata(plugin, volume_id)[STATE] == "prepared"
        _stage(plugin, volume_id, staging)
        assert len(Cryptsetup().dump(str(layer.real)).keyslots) == 1
        assert _metadata(plugin, volume_id)[STATE] == "encrypted"
        (staging / "data").write_bytes(DATA)
        _unstage(plugin, volume_id, staging)
        _stage(plugin, volume_id, staging)
        assert (staging / "data").read_bytes() == DATA
        _unstage(plugin, volume_id, staging)
    finally:
        layer.clear()
        layer.remove()
    _delete(plugin, volume_id)


def _wait_for_bytes(path: Path, offset: int, expected: bytes, pending: grpc.Future) -> None:
    deadline = time.monotonic() + 300
    fd = os.open(path, os.O_RDONLY)  # pread: no buffer of ours between the polls and the file
    try:
        while time.monotonic() < deadline:
            if os.pread(fd, len(expected), offset) == expected:
                return
            assert not pending.done(), f"the stage ended before the header was written: {pending.exception()}"
            time.sleep(0.01)
    finally:
        os.close(fd)
    raise AssertionError(f"no {expected!r} at offset {offset} of {path} within 300 s")


def test_a_luks_header_csi_luks_did_not_begin_is_left_alone(plugin: RunningPlugin, root: Path) -> None:
    volume_id = plugin.create("foreign-header", SIZE).volume_id
    staging = root / "staging-foreign-header"
    subprocess.run(
        ["cryptsetup", "luksFormat", "--type", "luks2", "--batch-mode", "--pbkdf", "pbkdf2",
         "--pbkdf-force-iterations", "1000", "--label", "someone-else", "--key-file=-",
         str(_image(plugin, volume_id))],
        input=b"not the volume's DEK", check=True, capture_output=True,
    )  # fmt: skip
    _stage_refused_untouched(plugin, volume_id, staging, "'someone-else'", "left untouched")
    _delete(plugin, volume_id)

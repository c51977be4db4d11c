"""The system calls the node makes in place of losetup, mount and umount, on this host's kernel: what they
make is what the programs make, and where one fails the program runs instead and its error is the caller's.

Each action runs in a timed call, whose spans show what it cost: a system call's name (LOOP_CONFIGURE,
mount(2)) alone means no process ran.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from csi_luks.system import loop, mount_syscalls
from csi_luks.system.filesystem import Filesystems
from csi_luks.system.loop import LoopDevices
from csi_luks.system.runner import CommandError
from csi_luks.timing import CallTiming, collecting, timed_call
from csi_luks.volumes.standalone import StandaloneBackend
from tests.support.plugin import mount_capability, running_plugin, stage_and_publish, unpublish_and_unstage

MiB = 1024 * 1024
LOOP_GET_STATUS64 = 0x4C05
LOOP_INFO64 = struct.Struct("=5Q 4I 64s 64s 32s 2Q")
C_LOCALE = {**os.environ, "LC_ALL": "C", "LANG": "C"}  # as the runner runs the programs

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists(loop.LOOP_CONTROL), reason="needs root and /dev/loop-control"
)


def spans(action: Callable[[], object]) -> list[str]:
    """The processes and system calls action ran, by name."""
    call = CallTiming("test")
    with timed_call(call):
        action()
    return [span.name for span in call.steps]


def sparse_image(path: Path, size: int = 64 * MiB) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def sysfs(device: str, name: str) -> str:
    return Path(f"/sys/block/{os.path.basename(device)}/{name}").read_text().strip()


def losetup_attach(image: str, *flags: str) -> str:
    return subprocess.run(
        ["losetup", "--find", "--show", *flags, image], capture_output=True, text=True, check=True
    ).stdout.strip()


def mount_options(target: str) -> tuple[str, str, str]:
    """(per-mount options, filesystem type, superblock options) of the topmost mount at target."""
    with open("/proc/self/mountinfo") as mountinfo:
        found = [line.split() for line in mountinfo if line.split()[4] == target]
    fields = found[-1]
    after = fields.index("-")
    return fields[5], fields[after + 1], fields[after + 3]


@pytest.fixture
def loops(tmp_path: Path) -> Iterator[LoopDevices]:
    """LoopDevices; every loop device left over a file of this test is detached at the end."""
    devices = LoopDevices()
    yield devices
    for device, back in list(devices._table()):
        if back.startswith(str(tmp_path)):
            subprocess.run(["losetup", "--detach", device], check=False)


@pytest.fixture
def ext4(tmp_path: Path, loops: LoopDevices) -> Iterator[str]:
    """A loop device over an image holding ext4; nothing left mounted under tmp_path at the end."""
    device = losetup_attach(sparse_image(tmp_path / "ext4.img"))
    subprocess.run(["mkfs.ext4", "-q", "-F", device], capture_output=True, check=True)
    yield device
    while True:
        with open("/proc/self/mountinfo") as mountinfo:
            ours = [line.split()[4] for line in mountinfo if line.split()[4].startswith(str(tmp_path))]
        if not ours:
            break
        subprocess.run(["umount", "--lazy", ours[-1]], check=True)


# --- loop devices --------------------------------------------------------------------------------------


def test_attach_configures_a_free_device_by_ioctl_as_losetup_would(
    tmp_path: Path, loops: LoopDevices
) -> None:
    image = sparse_image(tmp_path / "a.img")
    device = ""

    def attach() -> None:
        nonlocal device
        device = loops.attach(image)

    assert spans(attach) == ["LOOP_CONFIGURE"]
    assert sysfs(device, "loop/backing_file") == image
    assert sysfs(device, "size") == str(64 * MiB // 512)
    assert loops.find(image) == device
    assert spans(lambda: loops.attach(image)) == []  # attached already: found in sysfs
    # The kernel took the file name from the struct as packed (losetup -l reads it where sysfs is not).
    fd = os.open(device, os.O_RDONLY)
    try:
        info = LOOP_INFO64.unpack(fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(LOOP_INFO64.size)))
    finally:
        os.close(fd)
    assert info[9] == image.encode()[:63].ljust(64, b"\0")  # cut to fit, terminated
    # What losetup makes of a file alike, for the same direct I/O request, is the same device.
    other = losetup_attach(sparse_image(tmp_path / "b.img"), "--direct-io=on")
    for name in (
        "loop/dio",
        "loop/offset",
        "loop/sizelimit",
        "loop/autoclear",
        "ro",
        "queue/logical_block_size",
    ):
        assert sysfs(device, name) == sysfs(other, name), name
    assert sysfs(device, "loop/dio") == "1"  # tmp_path's file system takes O_DIRECT


def test_set_capacity_and_detach_by_ioctl(tmp_path: Path, loops: LoopDevices) -> None:
    image = sparse_image(tmp_path / "a.img")
    device = loops.attach(image)
    os.truncate(image, 96 * MiB)
    assert spans(lambda: loops.refresh_size(device)) == ["LOOP_SET_CAPACITY"]
    assert sysfs(device, "size") == str(96 * MiB // 512)
    assert spans(lambda: loops.detach(device)) == ["LOOP_CLR_FD"]
    assert loops.find(image) is None
    assert not Path(f"/sys/block/{os.path.basename(device)}/loop/backing_file").exists()


def test_a_free_device_taken_meanwhile_is_passed_over(
    tmp_path: Path, loops: LoopDevices, monkeypatch: pytest.MonkeyPatch
) -> None:
    """losetup attaches another file to the device the kernel just offered: LOOP_CONFIGURE is refused with
    EBUSY there, and the next free device is asked for."""
    intruder = sparse_image(tmp_path / "intruder.img")
    real_ioctl = fcntl.ioctl
    taken: list[str] = []

    def racing_ioctl(fd: int, request: int, arg: object = 0) -> object:
        result = real_ioctl(fd, request, arg)  # type: ignore[call-overload]
        if request == loop.LOOP_CTL_GET_FREE and not taken:
            taken.append(f"/dev/loop{result}")
            subprocess.run(["losetup", taken[0], intruder], check=True)
        return result

    monkeypatch.setattr(fcntl, "ioctl", racing_ioctl)
    image = sparse_image(tmp_path / "a.img")
    device = loops.attach(image)
    assert device != taken[0] and sysfs(taken[0], "loop/backing_file") == intruder
    assert sysfs(device, "loop/backing_file") == image


def test_concurrent_attaches_each_get_a_device_of_their_own(tmp_path: Path, loops: LoopDevices) -> None:
    """16 stages at once ask for the same free device; the losers of each LOOP_CONFIGURE ask again."""
    images = [sparse_image(tmp_path / f"{i}.img", MiB) for i in range(16)]
    barrier = threading.Barrier(len(images))

    def attach(image: str) -> tuple[str, list[str]]:
        attached: list[str] = []
        barrier.wait()
        ran = spans(lambda: attached.append(loops.attach(image)))
        return attached[0], ran

    with ThreadPoolExecutor(max_workers=len(images)) as pool:
        results = list(pool.map(attach, images))
    assert [ran for _, ran in results] == [["LOOP_CONFIGURE"]] * len(images)
    devices = [device for device, _ in results]
    assert len(set(devices)) == len(images)
    assert [sysfs(device, "loop/backing_file") for device in devices] == images


def test_where_the_ioctls_fail_losetup_does_it_and_reports_its_own_errors(
    tmp_path: Path, loops: LoopDevices, monkeypatch: pytest.MonkeyPatch
) -> None:
    def before_linux_5_8(fd: int, request: int, arg: object = 0) -> object:
        raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))

    monkeypatch.setattr(fcntl, "ioctl", before_linux_5_8)
    image = sparse_image(tmp_path / "a.img")
    device = ""

    def attach() -> None:
        nonlocal device
        device = loops.attach(image)

    assert spans(attach) == ["LOOP_CONFIGURE", "losetup"]
    assert sysfs(device, "loop/backing_file") == image and sysfs(device, "loop/dio") == "1"
    os.truncate(image, 96 * MiB)
    assert spans(lambda: loops.refresh_size(device)) == ["LOOP_SET_CAPACITY", "losetup"]
    assert sysfs(device, "size") == str(96 * MiB // 512)
    assert spans(lambda: loops.detach(device)) == ["LOOP_CLR_FD", "losetup"]
    assert loops.find(image) is None
    monkeypatch.undo()
    # No such device: the open fails, and the error is losetup's (a loop device detached above is not
    # used here: another process may have attached it since).
    missing = str(tmp_path / "loop-missing")
    with pytest.raises(CommandError) as failed:
        loops.detach(missing)
    program = subprocess.run(
        ["losetup", "--detach", missing], capture_output=True, text=True, check=False, env=C_LOCALE
    )
    assert failed.value.argv == ["losetup", "--detach", missing]
    assert (failed.value.returncode, failed.value.stderr) == (program.returncode, program.stderr)


# --- mounts --------------------------------------------------------------------------------------------


def test_a_mount_of_kernel_flags_is_one_system_call_and_so_is_its_unmount(ext4: str, tmp_path: Path) -> None:
    target = str(tmp_path / "staging")
    filesystems = Filesystems()
    assert spans(lambda: filesystems.mount(ext4, target, "ext4", ["nodev", "noatime"])) == ["mount(2)"]
    per_mount, fstype, _ = mount_options(target)
    assert fstype == "ext4" and {"rw", "nodev", "noatime"} <= set(per_mount.split(","))
    Path(target, "file").write_text("written")
    assert spans(lambda: filesystems.unmount(target)) == ["umount2(2)"]
    assert not filesystems.is_mounted(target)


@pytest.mark.parametrize(
    "options",
    [
        [],
        ["defaults"],
        ["ro"],
        ["ro", "rw"],
        ["nosuid", "nodev", "noexec"],
        ["nosuid,suid", "nodev", "dev", "noexec", "exec"],
        ["sync"],
        ["sync", "async"],
        ["dirsync"],
        ["noatime"],
        ["noatime", "atime"],
        ["nodiratime"],
        ["nodiratime", "diratime"],
        ["relatime"],
        ["norelatime"],
        ["strictatime"],
        ["lazytime"],
        ["lazytime", "nolazytime"],
    ],
)
def test_each_kernel_flag_mounts_as_mount_8_mounts_it(ext4: str, tmp_path: Path, options: list[str]) -> None:
    target = str(tmp_path / "staging")
    filesystems = Filesystems()
    assert spans(lambda: filesystems.mount(ext4, target, "ext4", options)) == ["mount(2)"]
    ours = mount_options(target)
    filesystems.unmount(target)
    subprocess.run(["mount", "-t", "ext4", *(["-o", ",".join(options)] if options else []), ext4, target],
                   check=True)  # fmt: skip
    assert ours == mount_options(target)
    filesystems.unmount(target)


def test_a_filesystem_option_or_no_type_is_left_to_the_program(ext4: str, tmp_path: Path) -> None:
    target = str(tmp_path / "staging")
    filesystems = Filesystems()
    assert spans(lambda: filesystems.mount(ext4, target, "ext4", ["discard", "nodev"])) == ["mount"]
    per_mount, _, per_filesystem = mount_options(target)
    assert "discard" in per_filesystem.split(",") and "nodev" in per_mount.split(",")
    filesystems.unmount(target)
    assert spans(lambda: filesystems.mount(ext4, target)) == ["mount"]  # mount(8) finds the type
    assert mount_options(target)[1] == "ext4"


def test_a_refused_mount_fails_with_the_programs_error(ext4: str, tmp_path: Path) -> None:
    target = str(tmp_path / "staging")
    filesystems = Filesystems()
    failed: list[CommandError] = []

    def mount_as_xfs() -> None:
        with pytest.raises(CommandError) as raised:
            filesystems.mount(ext4, target, "xfs", ["nodev"])
        failed.append(raised.value)

    assert spans(mount_as_xfs) == ["mount(2)", "mount"]
    (error,) = failed
    argv = ["mount", "-t", "xfs", "-o", "nodev", ext4, target]
    program = subprocess.run(argv, capture_output=True, text=True, check=False, env=C_LOCALE)
    assert error.argv == argv and (error.returncode, error.stderr) == (program.returncode, program.stderr)
    assert "wrong fs type" in str(error)
    assert not filesystems.is_mounted(target)


def test_a_mount_refused_by_the_system_call_alone_is_made_by_the_program(
    ext4: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refused(*_: object) -> None:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(mount_syscalls, "_mount", refused)
    target = str(tmp_path / "staging")
    filesystems = Filesystems()
    assert spans(lambda: filesystems.mount(ext4, target, "ext4", ["nodev"])) == ["mount(2)", "mount"]
    assert "nodev" in mount_options(target)[0].split(",")


def test_binds_read_write_and_read_only_as_mount_8_makes_them(ext4: str, tmp_path: Path) -> None:
    staging, target, read_only, by_program = (str(tmp_path / name) for name in ("s", "t", "ro", "program"))
    filesystems = Filesystems()
    filesystems.mount(ext4, staging, "ext4", ["nosuid", "nodev"])
    assert spans(lambda: filesystems.bind_mount(staging, target, readonly=False)) == ["mount(2)"]
    Path(target, "file").write_text("through the bind")
    assert Path(staging, "file").read_text() == "through the bind"
    assert spans(lambda: filesystems.bind_mount(staging, target, readonly=False)) == []  # bound already

    assert spans(lambda: filesystems.bind_mount(staging, read_only, readonly=True)) == ["mount(2)"]
    with pytest.raises(OSError) as refused:
        Path(read_only, "file").write_text("refused")
    assert refused.value.errno == errno.EROFS
    Path(by_program).mkdir()
    subprocess.run(["mount", "-o", "bind,ro", staging, by_program], check=True)
    assert mount_options(read_only) == mount_options(by_program)
    assert mount_options(target) == mount_options(staging)  # a plain bind keeps the source's flags


def test_a_read_only_bind_left_writable_by_a_crash_is_finished_by_the_retry(
    ext4: str, tmp_path: Path
) -> None:
    """A crash between the bind and its read-only remount (two system calls) left a writable bind: the
    retried publish makes it read-only, never reports a writable one as done."""
    staging, target = str(tmp_path / "s"), str(tmp_path / "t")
    filesystems = Filesystems()
    filesystems.mount(ext4, staging, "ext4", [])
    Path(target).mkdir()
    mount_syscalls.mount(staging, target, None, mount_syscalls.MS_BIND)  # the first of the two calls
    filesystems.bind_mount(staging, target, readonly=True)
    assert "ro" in mount_options(target)[0].split(",")
    with pytest.raises(OSError) as refused:
        Path(target, "file").write_text("refused")
    assert refused.value.errno == errno.EROFS


def test_a_block_device_binds_read_only_onto_a_file(ext4: str, tmp_path: Path) -> None:
    target, by_program = str(tmp_path / "publish" / "device"), tmp_path / "program"
    filesystems = Filesystems()
    assert spans(lambda: filesystems.bind_mount(ext4, target, True, target_is_file=True)) == ["mount(2)"]
    assert os.stat(target).st_rdev == os.stat(ext4).st_rdev
    by_program.touch()
    subprocess.run(["mount", "-o", "bind,ro", ext4, str(by_program)], check=True)
    assert "ro" in mount_options(target)[0].split(",")
    assert mount_options(target) == mount_options(str(by_program))
    filesystems.unmount(target)
    assert not filesystems.is_mounted(target)


def test_a_busy_mount_fails_with_umounts_error_and_goes_lazily(ext4: str, tmp_path: Path) -> None:
    target = str(tmp_path / "staging")
    filesystems = Filesystems()
    filesystems.mount(ext4, target, "ext4")
    with open(Path(target, "held"), "w") as held:
        failed: list[CommandError] = []

        def unmount() -> None:
            with pytest.raises(CommandError) as raised:
                filesystems.unmount(target)
            failed.append(raised.value)

        assert spans(unmount) == ["umount2(2)", "umount"]
        assert failed[0].argv == ["umount", target] and "target is busy" in failed[0].stderr
        assert spans(lambda: filesystems.unmount(target, lazy=True)) == ["umount2(2)"]
        assert not filesystems.is_mounted(target)
        held.write("still writable through the open file")


def test_stacked_mounts_are_all_unmounted(ext4: str, tmp_path: Path) -> None:
    target = str(tmp_path / "staging")
    filesystems = Filesystems()
    filesystems.mount(ext4, target, "ext4")
    other = tmp_path / "other"
    other.mkdir()
    filesystems.bind_mount(str(other), str(tmp_path / "bound"), readonly=False)
    filesystems.mount(str(tmp_path / "bound"), target, options=["bind"])  # a mount stacked on ours
    assert spans(lambda: filesystems.unmount(target)) == ["umount2(2)", "umount2(2)"]
    assert not filesystems.is_mounted(target)


def test_a_bind_whose_read_only_remount_is_refused_is_undone_before_the_program_binds(
    ext4: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Never a read-write bind left under (or instead of) the read-only one asked for."""
    staging, target = str(tmp_path / "s"), str(tmp_path / "t")
    filesystems = Filesystems()
    filesystems.mount(ext4, staging, "ext4")
    real_mount = mount_syscalls._mount

    def remount_refused(source: str, target: str, fstype: str | None, flags: int) -> None:
        if flags & mount_syscalls.MS_REMOUNT:
            raise OSError(errno.EPERM, os.strerror(errno.EPERM))
        real_mount(source, target, fstype, flags)

    monkeypatch.setattr(mount_syscalls, "_mount", remount_refused)
    assert spans(lambda: filesystems.bind_mount(staging, target, readonly=True)) == ["mount(2)", "mount"]
    with open("/proc/self/mountinfo") as mountinfo:
        at_target = [line.split()[5] for line in mountinfo if line.split()[4] == target]
    assert len(at_target) == 1 and "ro" in at_target[0].split(",")


def test_a_volumes_node_lifecycle_runs_no_losetup_mount_or_umount(tmp_path: Path) -> None:
    """Stage, publish read-only, unpublish, unstage of an unencrypted volume (this host has no
    device-mapper for an encrypted one): each call's breakdown names the system calls, not the programs."""
    with running_plugin(tmp_path / "plugin") as plugin, collecting() as calls:
        volume_id = plugin.create("pvc-syscalls", 64 * MiB, {"encrypted": "false"}).volume_id
        staging, target = str(tmp_path / "staging"), str(tmp_path / "target")
        stage_and_publish(plugin.node, volume_id, staging, target, mount_capability(), readonly=True)
        assert "ro" in mount_options(target)[0].split(",")
        unpublish_and_unstage(plugin.node, volume_id, staging, target)
    ran = {
        call.method.rsplit("/", 1)[-1]: [
            p.name for span in call.steps for p in ([span] if span.process else span.processes())
        ]
        for call in calls
        if "/Node" in call.method
    }
    assert ran["NodeStageVolume"] == ["LOOP_CONFIGURE", "blkid", "mkfs.ext4", "mount(2)"]
    assert ran["NodePublishVolume"] == ["mount(2)"]
    assert ran["NodeUnpublishVolume"] == ["umount2(2)"]
    assert ran["NodeUnstageVolume"] == ["umount2(2)", "cryptsetup", "LOOP_CLR_FD"]
    image = StandaloneBackend(plugin.state_dir).image_path(volume_id)
    assert image.is_file() and LoopDevices().find(str(image)) is None

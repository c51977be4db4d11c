"""Which mount requests mount(2) makes by itself: only those whose options are all kernel mount flags."""

from __future__ import annotations

import pytest

from csi_luks.system.mount_syscalls import (
    MS_BIND,
    MS_DIRSYNC,
    MS_LAZYTIME,
    MS_NOATIME,
    MS_NODEV,
    MS_NODIRATIME,
    MS_NOEXEC,
    MS_NOSUID,
    MS_RDONLY,
    MS_RELATIME,
    MS_STRICTATIME,
    MS_SYNCHRONOUS,
    kernel_flags,
    mount,
    unmount,
)


@pytest.mark.parametrize(
    ("options", "flags"),
    [
        ([], 0),
        (["defaults"], 0),
        (["ro"], MS_RDONLY),
        (["nosuid", "nodev", "noexec"], MS_NOSUID | MS_NODEV | MS_NOEXEC),
        (["sync", "dirsync"], MS_SYNCHRONOUS | MS_DIRSYNC),
        (["noatime", "nodiratime"], MS_NOATIME | MS_NODIRATIME),
        (["relatime"], MS_RELATIME),
        (["strictatime", "lazytime"], MS_STRICTATIME | MS_LAZYTIME),
        (["bind,ro"], MS_BIND | MS_RDONLY),  # one item of several options, as bind_mount passes them
        # An inverting option clears what an earlier one set; the last word wins, as in mount(8).
        (["ro", "rw"], 0),
        (["rw", "ro"], MS_RDONLY),
        (["nosuid,suid,nodev,dev,noexec,exec"], 0),
        (["sync", "async", "noatime", "atime", "nodiratime", "diratime"], 0),
        (["relatime", "norelatime", "lazytime", "nolazytime"], 0),
        (["defaults", "ro"], MS_RDONLY),
    ],
)
def test_options_that_are_kernel_flags_become_the_flags(options: list[str], flags: int) -> None:
    assert kernel_flags(options) == flags


@pytest.mark.parametrize(
    "options",
    [
        ["discard"],  # ext4's own: only the filesystem's option string carries it
        ["ro", "data=ordered"],
        ["_netdev"],  # userspace options: libmount keeps them, the kernel never sees them
        ["nofail"],
        ["x-systemd.automount"],
        ['context="system_u:object_r:container_file_t:s0"'],  # SELinux: libmount rewrites it
        ["rbind"],  # recursive: not in the list the system call is trusted with
        ["remount"],
        ["ro,"],  # an empty option: left to mount(8) to judge
        ["RO"],
    ],
)
def test_any_other_option_leaves_the_mount_to_the_program(options: list[str]) -> None:
    assert kernel_flags(options) is None


def test_a_nul_in_a_path_is_refused_before_any_system_call() -> None:
    """C would read "/dev/loop1\\0x" as /dev/loop1: another device than the one named."""
    with pytest.raises(ValueError, match="null byte"):
        mount("/dev/loop1\0x", "/mnt", "ext4", 0)
    with pytest.raises(ValueError, match="null byte"):
        mount("/dev/loop1", "/mnt", "ext4\0", 0)
    with pytest.raises(ValueError, match="null byte"):
        unmount("/mnt\0/x")

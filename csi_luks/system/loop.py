"""Loop devices over image files, found again after a restart from the kernel's own table.

Attach, detach and resize are the ioctls losetup makes, made here without its process; losetup runs
instead where they fail (an older kernel, no /dev/loop-control), so that its own report is what the
caller sees on every failure.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

from csi_luks import timing
from csi_luks.system.programs import LOSETUP
from csi_luks.system.runner import Runner

log = logging.getLogger(__name__)

SYS_BLOCK = Path("/sys/block")
LOOP_CONTROL = "/dev/loop-control"
DELETED_MARK = " (deleted)"  # the kernel's mark on a backing file that was unlinked while attached

# <linux/loop.h>
LOOP_CLR_FD = 0x4C01
LOOP_GET_STATUS64 = 0x4C05
LOOP_SET_CAPACITY = 0x4C07
LOOP_CONFIGURE = 0x4C0A  # Linux 5.8
LOOP_CTL_GET_FREE = 0x4C82
LO_FLAGS_DIRECT_IO = 16
LO_NAME_SIZE = 64
# struct loop_config: u32 fd, u32 block_size, struct loop_info64 info, u64 __reserved[8]; loop_info64 is
# u64 lo_device, lo_inode, lo_rdevice, lo_offset, lo_sizelimit; u32 lo_number, lo_encrypt_type,
# lo_encrypt_key_size, lo_flags; u8 lo_file_name[64], lo_crypt_name[64], lo_encrypt_key[32]; u64 lo_init[2].
# Every field is naturally aligned, so the standard sizes without padding are the C layout.
LOOP_CONFIG = struct.Struct("=II 5Q 4I 64s 64s 32s 2Q 8Q")
LOOP_INFO64 = struct.Struct("=5Q 4I 64s 64s 32s 2Q")
_FREE_DEVICE_TRIES = 64  # as losetup: another process or a concurrent stage may take a free device first


class LoopDevices:
    def __init__(self, runner: Runner | None = None, sys_block: Path = SYS_BLOCK) -> None:
        self.runner = runner or Runner()
        self.sys_block = sys_block

    def find(self, backing_file: str) -> str | None:
        """The loop device backing_file is attached to, if any (no in-memory state needed)."""
        wanted = os.path.realpath(backing_file)
        for device, back in self._table():
            back = back.removesuffix(DELETED_MARK)
            if back and os.path.realpath(back) == wanted:
                return device
        return None

    def _table(self) -> Iterator[tuple[str, str]]:
        """(device, backing file) of each attached loop device.

        Read from sysfs, where losetup reads it too, without a process per call (DeleteVolume asks twice);
        through losetup where /sys/block cannot be listed.
        """
        try:
            names = sorted(e.name for e in os.scandir(self.sys_block) if e.name.startswith("loop"))
        except OSError:
            listing = self.runner.run([LOSETUP, "--list", "--json", "--output", "NAME,BACK-FILE"]).stdout
            for device in json.loads(listing or '{"loopdevices": []}').get("loopdevices", []):
                yield str(device["name"]), device.get("back-file") or ""
            return
        for name in names:
            try:
                back = (self.sys_block / name / "loop" / "backing_file").read_text().rstrip("\n")
            except OSError:
                continue  # not attached (no loop/ directory), or detached meanwhile
            yield f"/dev/{name}", back

    def attach(self, backing_file: str) -> str:
        """Attach (idempotently) and return the device path."""
        existing = self.find(backing_file)
        if existing:
            return existing
        # Direct I/O: a write the storage refuses fails the writer (luksFormat, mkfs) at once. Buffered, the
        # loop device's writes land in the backing file's page cache and a failed writeback is lost
        # (cryptsetup ignores the fsync error): luksFormat "succeeds" with no header on the disk.
        direct_io = _opens_for_direct_io(backing_file)
        try:
            with timing.system_call("LOOP_CONFIGURE"):
                return _configure_free_device(backing_file, direct_io)
        except OSError as exc:
            log.debug("attaching %s by ioctl failed (%s); running losetup", backing_file, exc)
        flags = ["--direct-io=on"] if direct_io else []
        return self.runner.run([LOSETUP, "--find", "--show", *flags, backing_file]).stdout.strip()

    def detach(self, device: str) -> None:
        if not _device_ioctl(device, LOOP_CLR_FD, "LOOP_CLR_FD"):
            self.runner.run([LOSETUP, "--detach", device])

    def refresh_size(self, device: str) -> None:
        """Make the loop device pick up a grown backing file."""
        if not _device_ioctl(device, LOOP_SET_CAPACITY, "LOOP_SET_CAPACITY"):
            self.runner.run([LOSETUP, "--set-capacity", device])


def backing_file_id(device: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file device reads: a loop device's backing file (LOOP_GET_STATUS64, the
    file the kernel holds, even when its name now belongs to another), or a regular file itself;
    None for anything else. OSError if device cannot be opened."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        found = os.fstat(fd)
        if stat.S_ISREG(found.st_mode):
            return found.st_dev, found.st_ino
        if not stat.S_ISBLK(found.st_mode):
            return None
        try:
            info = fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(LOOP_INFO64.size))
        except OSError:
            return None  # not a loop device, or one with no file
        lo_device, lo_inode = LOOP_INFO64.unpack_from(info)[:2]
        return lo_device, lo_inode
    finally:
        os.close(fd)


def loop_config(backing_fd: int, file_name: str, direct_io: bool) -> bytes:
    """struct loop_config for LOOP_CONFIGURE: the whole file, the device's default block size."""
    name = os.fsencode(file_name)[: LO_NAME_SIZE - 1]  # pack pads with NULs: always terminated
    flags = LO_FLAGS_DIRECT_IO if direct_io else 0
    return LOOP_CONFIG.pack(backing_fd, 0, 0, 0, 0, 0, 0, 0, 0, 0, flags, name, b"", b"", 0, 0, *[0] * 8)


def _configure_free_device(backing_file: str, direct_io: bool) -> str:
    """Attach backing_file to a free loop device as `losetup --find --show` does: the file opened
    read-write (O_DIRECT with direct I/O), its canonical path as the device's file name."""
    backing = os.open(backing_file, os.O_RDWR | os.O_CLOEXEC | (os.O_DIRECT if direct_io else 0))
    try:
        config = loop_config(backing, os.path.realpath(backing_file), direct_io)
        control = os.open(LOOP_CONTROL, os.O_RDWR | os.O_CLOEXEC)
        try:
            for _ in range(_FREE_DEVICE_TRIES):
                device = f"/dev/loop{fcntl.ioctl(control, LOOP_CTL_GET_FREE)}"
                loop = os.open(device, os.O_RDWR | os.O_CLOEXEC)
                try:
                    fcntl.ioctl(loop, LOOP_CONFIGURE, config)
                    return device
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        raise
                finally:
                    os.close(loop)  # the kernel holds the backing file itself once configured
        finally:
            os.close(control)
    finally:
        os.close(backing)
    raise OSError(errno.EBUSY, "each free loop device was taken before it could be configured")


def _device_ioctl(device: str, request: int, name: str) -> bool:
    """Make an argument-less ioctl on device; False where it failed (the program then reports why)."""
    try:
        with timing.system_call(name):
            fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
            try:
                fcntl.ioctl(fd, request, 0)
            finally:
                os.close(fd)
    except OSError as exc:
        log.debug("%s on %s failed (%s); running losetup", name, device, exc)
        return False
    return True


def _opens_for_direct_io(path: str) -> bool:
    """Whether path opens with O_DIRECT, as losetup --direct-io=on opens it (tmpfs before Linux 6.6 refuses
    with EINVAL, and losetup would then fail instead of falling back to buffered I/O)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return False  # losetup's own open reports a missing or unreadable file
    os.close(fd)
    return True

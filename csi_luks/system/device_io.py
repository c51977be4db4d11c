"""A block device that failed I/O: the storage under a volume is at fault, not the request or the plugin."""

from __future__ import annotations

import errno
import mmap
import os
import re

# strerror(EIO) as the tools print it (blkid, e2fsprogs, xfsprogs, mount), and cryptsetup's own wordings of
# a read or write the device refused.
_IO_ERROR = re.compile(
    r"Input/output error|I/O error|IO error|Cannot wipe header on device|Device wipe error|Failed to write",
    re.IGNORECASE,
)
_BLOCK = 4096  # O_DIRECT wants the buffer, offset and length aligned to the logical block size


class DeviceIOError(Exception):
    """A command failed because the device returned I/O errors; a retry can pass once the storage is back."""


def reports_io_error(output: str) -> bool:
    """True when a failed command's output says the device returned an I/O error."""
    return _IO_ERROR.search(output) is not None


def read_first_block(device: str) -> bytes:
    """The device's first 4 KiB, read directly (past the page cache); OSError if it cannot be read."""
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    try:
        with mmap.mmap(-1, _BLOCK) as buffer:  # page-aligned, as O_DIRECT needs
            length = os.preadv(fd, [buffer], 0)
            return bytes(buffer[:length])
    finally:
        os.close(fd)


def read_error(device: str) -> str | None:
    """Why the device's first block cannot be read, or None when it can.

    Some tools take an unreadable device for an empty one (blkid finds "nothing"; cryptsetup says "not a
    valid LUKS device", or nothing at all): one direct read, past the page cache, tells the two apart.
    """
    try:
        read_first_block(device)
    except OSError as exc:
        # Not there, or not ours to read: the caller's own error says more.
        return os.strerror(exc.errno) if exc.errno == errno.EIO else None
    return None

"""mount(2) and umount2(2) through libc, for the mounts whose options are all kernel mount flags.

Anything else (a filesystem's own options, libmount's userspace ones, SELinux contexts) needs what mount(8)
does with it, so `kernel_flags` declines it and the caller runs the program.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_REMOUNT = 32
MS_DIRSYNC = 128
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MS_LAZYTIME = 1 << 25
MNT_DETACH = 2

# Each option as util-linux's libmount maps it: a flag it sets, or (an inverting option) clears.
_FLAG_OPTIONS: dict[str, tuple[int, bool]] = {
    "ro": (MS_RDONLY, True),
    "rw": (MS_RDONLY, False),
    "nosuid": (MS_NOSUID, True),
    "suid": (MS_NOSUID, False),
    "nodev": (MS_NODEV, True),
    "dev": (MS_NODEV, False),
    "noexec": (MS_NOEXEC, True),
    "exec": (MS_NOEXEC, False),
    "sync": (MS_SYNCHRONOUS, True),
    "async": (MS_SYNCHRONOUS, False),
    "dirsync": (MS_DIRSYNC, True),
    "noatime": (MS_NOATIME, True),
    "atime": (MS_NOATIME, False),
    "nodiratime": (MS_NODIRATIME, True),
    "diratime": (MS_NODIRATIME, False),
    "relatime": (MS_RELATIME, True),
    "norelatime": (MS_RELATIME, False),
    "strictatime": (MS_STRICTATIME, True),
    "lazytime": (MS_LAZYTIME, True),
    "nolazytime": (MS_LAZYTIME, False),
    "bind": (MS_BIND, True),
    "defaults": (0, True),  # mount(8)'s rw,suid,dev,exec,async: the kernel's defaults already
}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def kernel_flags(options: Sequence[str]) -> int | None:
    """The mount flags of options (comma-separated within an item, too), applied in order as mount(8)
    applies them; None when any option is not one of them."""
    flags = 0
    for option in ",".join(options).split(",") if options else []:
        known = _FLAG_OPTIONS.get(option)
        if known is None:
            return None
        flag, sets = known
        flags = flags | flag if sets else flags & ~flag
    return flags


def mount(source: str, target: str, fstype: str | None, flags: int) -> None:
    """Mount as mount(8) does with these flags: a bind that asks for more than the bind (read-only, say)
    is a bind and then a remount of it with exactly those flags, which the kernel ignores on the bind
    itself (util-linux 2.38 so drops the nosuid, nodev, noexec the bind took from its source; 2.39's
    mount_setattr keeps them). OSError if the kernel refuses; a bind whose remount is refused is undone."""
    if not flags & MS_BIND or flags == MS_BIND:
        _mount(source, target, fstype, flags)
        return
    _mount(source, target, None, MS_BIND)
    try:
        _mount("none", target, None, MS_REMOUNT | flags)
    except OSError:
        unmount(target, lazy=True)  # nobody has used the bind yet; never leave it without its flags
        raise


def unmount(target: str, lazy: bool = False) -> None:
    if _libc.umount2(_c_string(target), MNT_DETACH if lazy else 0) != 0:
        _raise_errno(target)


def _mount(source: str, target: str, fstype: str | None, flags: int) -> None:
    kind = _c_string(fstype) if fstype else None
    if _libc.mount(_c_string(source), _c_string(target), kind, flags, None) != 0:
        _raise_errno(target)


def _c_string(text: str) -> bytes:
    """text for a C call; a NUL inside would cut it short there (another path), so it is refused as the
    os module and subprocess refuse it."""
    encoded = os.fsencode(text)
    if b"\0" in encoded:
        raise ValueError("embedded null byte")
    return encoded


def _raise_errno(path: str) -> None:
    error = ctypes.get_errno()
    raise OSError(error, os.strerror(error), path)

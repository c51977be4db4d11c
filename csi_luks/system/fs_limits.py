"""The smallest device each filesystem's mkfs accepts, and the typed failure of a mkfs below it.

CreateVolume refuses a volume too small for the filesystem its capabilities name (OUT_OF_RANGE, before
anything is made); the node maps mkfs's own refusal to the same error, for volumes made before the check
or a mkfs whose minimum differs from the one recorded here.
"""

from __future__ import annotations

import re

from csi_luks.system.runner import CommandError

MiB = 1024 * 1024
# mkfs.xfs (xfsprogs 6.1, Debian 12) exits 1 with "Filesystem must be larger than 300MB." below 300 MiB:
# measured on sparse files, 300 MiB is formatted, 300 MiB - 4 KiB and 299 MiB are refused.
MIN_BYTES = {"xfs": 300 * MiB}
_TOO_SMALL = re.compile(r"(?i)filesystem must be larger than (\d+)\s*MB")


class FilesystemTooSmall(Exception):
    """The device is smaller than the filesystem's minimum: the size is the problem (OUT_OF_RANGE)."""


def too_small(fs_type: str, size_bytes: int) -> str | None:
    """Why a device of size_bytes cannot hold fs_type (None when it can, as far as we know)."""
    minimum = MIN_BYTES.get(fs_type)
    if minimum is None or size_bytes >= minimum:
        return None
    return (
        f"an {fs_type} filesystem needs at least {minimum} bytes ({minimum // MiB} MiB: mkfs.{fs_type} "
        f"refuses less), not {size_bytes}: ask for at least {minimum // MiB} MiB, or another fsType"
    )


def raise_if_too_small(device: str, fs_type: str, error: CommandError) -> None:
    """FilesystemTooSmall if a failed mkfs of fs_type on device said the device is below its minimum.

    For Filesystems.mkfs: `except CommandError as exc: raise_if_too_small(device, fstype, exc); raise`.
    """
    found = _TOO_SMALL.search(f"{error.stderr}\n{error.stdout}")
    if found is None:
        return
    raise FilesystemTooSmall(
        f"mkfs.{fs_type} refused {device}: the volume is smaller than an {fs_type} filesystem's minimum "
        f"({found.group(1)} MB, mkfs.{fs_type} says); it can never hold one: expand the volume to at "
        f"least that, or recreate it with another fsType"
    ) from error

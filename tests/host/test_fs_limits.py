"""The filesystem minimums csi-luks knows (csi_luks/system/fs_limits.py) against the real mkfs: the bound
is where mkfs itself draws it, and its refusal below it is typed (OUT_OF_RANGE), not INTERNAL."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from csi_luks.errors import status_for
from csi_luks.system.fs_limits import MIN_BYTES, FilesystemTooSmall, raise_if_too_small, too_small
from csi_luks.system.programs import MKFS_XFS
from csi_luks.system.runner import CommandError, Runner


def _mkfs_xfs(tmp_path: Path, size: int) -> CommandError | None:
    image = tmp_path / f"xfs-{size}.img"
    with open(image, "wb") as f:
        os.ftruncate(f.fileno(), size)
    try:
        Runner().run([MKFS_XFS, "-q", str(image)], timeout=120)
    except CommandError as exc:
        return exc
    finally:
        image.unlink()
    return None


def test_the_xfs_minimum_is_where_mkfs_xfs_draws_it_and_its_refusal_is_out_of_range(tmp_path: Path) -> None:
    minimum = MIN_BYTES["xfs"]
    assert _mkfs_xfs(tmp_path, minimum) is None
    assert too_small("xfs", minimum) is None
    refused = _mkfs_xfs(tmp_path, minimum - 4096)
    assert refused is not None
    assert too_small("xfs", minimum - 4096) is not None
    with pytest.raises(FilesystemTooSmall) as info:
        raise_if_too_small("/dev/mapper/luks-x", "xfs", refused)
    code, message = status_for(info.value)
    assert code == grpc.StatusCode.OUT_OF_RANGE
    assert "/dev/mapper/luks-x" in message and "300 MB" in message and "expand the volume" in message


def test_other_mkfs_failures_are_left_as_they_are() -> None:
    other = CommandError(["mkfs.xfs", "-q", "/dev/x"], 1, "", "mkfs.xfs: cannot open /dev/x: Device busy")
    raise_if_too_small("/dev/x", "xfs", other)  # returns: the caller re-raises the original error
    assert too_small("ext4", 1024 * 1024) is None  # no minimum known: mkfs decides

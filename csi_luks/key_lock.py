"""A volume's key lock, across processes on one node: the plugin's EncryptionKeyRotate (or a NodeStage
finishing a rotation) and an operator's `csi-luks rotate`, `header backup|restore` or `migrate` never
change one volume's key slots or DEK at the same time. An flock, which the kernel drops when its holder
dies: a killed rotation leaves no lock behind. A second taker is refused, not queued (ABORTED).
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from csi_luks.refusal import OperationRefused


class KeyOperationBusy(OperationRefused):
    """Another process on this node is changing the volume's key slots or DEK right now (ABORTED: a
    retry later succeeds; the operator commands report it like any refusal, exit code 1)."""


@contextmanager
def key_operation_lock(directory: Path, volume_id: str, operation: str) -> Iterator[None]:
    """Hold the volume's key lock (a file under directory) for operation, or raise KeyOperationBusy
    naming the holder. volume_id must already be checked against the backend's id form."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(directory / f"{volume_id}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise KeyOperationBusy(
                f"{holder} is changing the key of volume {volume_id} right now; {operation} will succeed "
                "once it is done"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{operation} (pid {os.getpid()})".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # the lock file stays (unlinking it would race a waiting locker)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)

"""Per-volume operation locks: a second operation on a volume in flight is refused, not queued.

Refusing with ABORTED (as the CSI spec asks) lets the CO retry with backoff instead of piling up
threads behind a slow cryptsetup or mkfs. These guard the calls of one plugin process; key_lock.py
guards a volume's key across processes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from csi_luks.errors import CsiError


class OperationLocks:
    def __init__(self) -> None:
        self._held: dict[str, str] = {}
        self._lock = threading.Lock()

    @contextmanager
    def hold(self, key: str, operation: str) -> Iterator[None]:
        with self._lock:
            running = self._held.get(key)
            if running is not None:
                raise CsiError(
                    grpc.StatusCode.ABORTED,
                    f"{running} is already in progress on {key}; {operation} will succeed on retry",
                )
            self._held[key] = operation
        try:
            yield
        finally:
            with self._lock:
                del self._held[key]

"""Memory-hard key derivations, a bounded number at once in the whole process.

The `metadata` KMS derives each volume's wrapping key with scrypt at N=2^15, r=8: 128 * r * N bytes,
32 MiB a call. Ceph-CSI derives without a bound, and its users see the controller OOM-killed when many
PVCs are created at once (ceph/ceph-csi#3472): 16 gRPC workers deriving together hold 512 MiB. Here a
derivation waits for one of `--max-concurrent-kdfs` slots (default 4, 128 MiB), held for the
derivation alone: never across a KMS or Kubernetes call or a file write. On the node, a cryptsetup
command given a passphrase holds one for its run (its PBKDF is the derivation: Ceph-CSI's argon2id takes
32 MiB a call), waiting at most the command's own timeout for it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from csi_luks import timing

DEFAULT_MAX_KDFS = 4

Derived = TypeVar("Derived")


class KDFSlots:
    """At most `limit` derivations at once; the limit may change while derivations run."""

    def __init__(self, limit: int = DEFAULT_MAX_KDFS) -> None:
        self._changed = threading.Condition()
        self._limit = _checked(limit)
        self._running = 0

    @property
    def limit(self) -> int:
        return self._limit

    def set_limit(self, limit: int) -> None:
        with self._changed:
            self._limit = _checked(limit)
            self._changed.notify_all()

    @contextmanager
    def held(self, timeout: float | None = None) -> Iterator[None]:
        """A slot for the block; with timeout, TimeoutError if none frees within it (slots held by
        commands stuck on dead devices must not stop every other derivation for good)."""
        with timing.step("kdf-wait"), self._changed:
            if not self._changed.wait_for(lambda: self._running < self._limit, timeout):
                raise TimeoutError(f"all {self._limit} key-derivation slots stayed busy for {timeout:g} s")
            self._running += 1
        try:
            with timing.step("kdf"):
                yield
        finally:
            with self._changed:
                self._running -= 1
                self._changed.notify()

    def run(self, derive: Callable[[], Derived]) -> Derived:
        """derive(), once a slot is free."""
        with self.held():
            return derive()


def _checked(limit: int) -> int:
    if limit < 1:
        raise ValueError(f"the number of concurrent key derivations must be at least 1, not {limit}")
    return limit


# The process's slots: the server sets their number from its settings (server.py).
SLOTS = KDFSlots()

"""How deep a chain of RBD clones may grow, and the flattens that keep it so.

A snapshot is a clone of its volume, and a restore or a clone a clone of its source: each adds one image
to the chain a read may have to walk down (and keeps every image above it alive, in the RBD trash once
deleted). Ceph-CSI bounds the chain with a soft and a hard depth (its defaults, 4 and 8, are kept here):

- depth >= SOFT_DEPTH: the new image is flattened in the background after CreateVolume/CreateSnapshot
  returned; the image carries the marker FLATTEN until the flatten is done, so one a restarted plugin
  never finished is taken up again by the next call that reads the image with credentials;
- depth >= HARD_DEPTH: CreateVolume/CreateSnapshot flattens the new image before it returns (it costs
  as much as the data the chain holds: the price of a chain this deep).

The depth of an image is the number of images above it (0: not a clone).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from csi_luks.volume_metadata import PREFIX

log = logging.getLogger(__name__)

SOFT_DEPTH, HARD_DEPTH = 4, 8
FLATTEN = PREFIX + "flatten"  # image metadata: "pending" while a background flatten is owed
PENDING = "pending"


class BackgroundFlattens:
    """The flattens running in this process, one thread each, by image spec."""

    def __init__(self) -> None:
        self._running: set[str] = set()
        self._lock = threading.Lock()
        self.finished = 0  # flattens completed (tests and metrics)

    def running(self) -> list[str]:
        with self._lock:
            return sorted(self._running)

    def start(self, spec: str, work: Callable[[], None]) -> bool:
        """Run work in a thread unless a flatten of spec is running already; whether it started."""
        with self._lock:
            if spec in self._running:
                return False
            self._running.add(spec)

        def run() -> None:
            try:
                work()
                with self._lock:
                    self.finished += 1
            except Exception:  # a thread's failure is logged; the image's marker stays for a retry
                log.exception("background flatten of %s failed; the next call reading it retries", spec)
            finally:
                with self._lock:
                    self._running.discard(spec)

        threading.Thread(target=run, name=f"flatten {spec}", daemon=True).start()
        return True

    def wait(self, timeout: float) -> bool:
        """Whether every running flatten finished within timeout (tests)."""
        deadline = time.monotonic() + timeout
        while self.running():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True


# One per process: a flatten outlives the request that started it.
FLATTENS = BackgroundFlattens()

"""Waiting for a device node: woken by udev events, with a deadline (not a sleep loop)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator

import pyudev

from csi_luks import timing

# The longest we sleep between checks if no event comes: it bounds the wait for a node whose event
# arrived before the monitor started, or on a machine where netlink is not available to us.
_RECHECK = 0.5


class DeviceWaitTimeout(Exception):
    """The device node did not appear in time."""


@contextlib.contextmanager
def block_device_events() -> Iterator[Callable[[str, float], None]]:
    """Start listening for block-device events; yields wait(path, timeout).

    Listening starts before the caller acts (maps a device), so the event cannot slip by unseen.
    """
    monitor: pyudev.Monitor | None
    try:
        monitor = pyudev.Monitor.from_netlink(pyudev.Context())
        monitor.filter_by("block")
        monitor.start()
    except (OSError, ImportError):
        monitor = None  # no netlink socket for us: fall back to rechecking

    def wait(path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with timing.step("udev-wait"):
            while not os.path.exists(path):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DeviceWaitTimeout(f"{path} did not appear within {timeout:g}s")
                if monitor is None:
                    time.sleep(min(remaining, _RECHECK))
                else:
                    monitor.poll(timeout=min(remaining, _RECHECK))

    yield wait

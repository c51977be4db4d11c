"""Test-only crash points: with CSI_LUKS_CRASH_POINT (read once, at import) naming
`<operation>.before-<step>` or `<operation>.after-<step>`, the process SIGKILLs itself there, so tests
can prove that a kill between any two durable steps converges.

Every `Step("<operation>", "<step>")` is written with literal strings: the crash-point harness
(tests/support/crash_harness.py) finds them in the source, so a new step without a harness case fails
a test. Without the environment variable a step costs one comparison with None."""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass

log = logging.getLogger(__name__)

CRASH_POINT_ENV = "CSI_LUKS_CRASH_POINT"
_CRASH_POINT = os.environ.get(CRASH_POINT_ENV) or None


def crash_point(name: str) -> None:
    if _CRASH_POINT is not None and name == _CRASH_POINT:
        log.warning("crash point %s: killing this process (test only)", name)
        os.kill(os.getpid(), signal.SIGKILL)


def crash_points(operation: str, steps: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(f"{operation}.{when}-{step}" for step in steps for when in ("before", "after"))


@dataclass
class Step:
    """A block between the crash points `<operation>.before-<step>` and `<operation>.after-<step>`."""

    operation: str
    name: str

    def __enter__(self) -> None:
        if _CRASH_POINT is not None:
            crash_point(f"{self.operation}.before-{self.name}")

    def __exit__(self, kind: object, value: object, traceback: object) -> None:
        if kind is None and _CRASH_POINT is not None:
            crash_point(f"{self.operation}.after-{self.name}")

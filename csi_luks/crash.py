"""Test-only crash points: with CSI_LUKS_CRASH_POINT (read once, at import) naming
`<operation>.before-<step>` or `<operation>.after-<step>`, the process SIGKILLs itself there, so tests
can prove that a kill between any two durable steps converges.

Every `Step("<operation>", "<step>")` is written with literal strings: the crash-point harness
(tests/support/crash_harness.py) finds them in the source, so a new step without a harness case fails
a test. Without the environment variable a step costs one comparison with None.

A Step is also a timed step of the call it runs in (timing.py), under its step's name: the points a
crash test names are the parts an operator's timing breakdown shows. The crash points are taken outside
the timed block, so timing changes nothing about where or when a process is killed."""

from __future__ import annotations

import logging
import os
import signal
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

from csi_luks import timing

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
    _timed: AbstractContextManager[None] | None = field(default=None, init=False, repr=False)

    def __enter__(self) -> None:
        if _CRASH_POINT is not None:
            crash_point(f"{self.operation}.before-{self.name}")
        self._timed = timing.step(self.name)
        self._timed.__enter__()

    def __exit__(self, kind: object, value: object, traceback: object) -> None:
        if self._timed is not None:
            self._timed.__exit__(kind, value, traceback)  # type: ignore[arg-type]
            self._timed = None
        if kind is None and _CRASH_POINT is not None:
            crash_point(f"{self.operation}.after-{self.name}")

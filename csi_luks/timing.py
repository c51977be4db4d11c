"""Where a call's time goes: each step it marks and each process it starts, timed, per call.

The server's interceptor times every call in a `CallTiming` (`timed_call`); inside it, `step("name")`
blocks (and every `crash.Step`) time themselves, and the runner reports each process it ran
(`process`). Steps nest: a process or a step inside another is that step's part. At the end of the
call the breakdown is logged at debug level as one line, observed by the metrics, and handed to any
`collecting` listener (the bench).

The call's timing lives in a context variable: gRPC runs each call on one thread of its pool, so
concurrent calls never share one, and outside a call (the operator commands, the tests calling a
service directly) a step costs one context-variable read and records nothing.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

OTHER = "other"  # the time of a call that no step covers


@dataclass
class Span:
    """A timed part of a call: a step (its parts inside) or a process (a program's name, or a system call
    made in its place)."""

    name: str
    seconds: float = 0.0
    process: bool = False
    parts: list[Span] = field(default_factory=list)

    def processes(self) -> Iterator[Span]:
        """Every process run within this span, at any depth."""
        for part in self.parts:
            if part.process:
                yield part
            else:
                yield from part.processes()


@dataclass
class CallTiming:
    """One call's steps and processes, in the order they ran; recorded by the call's own thread."""

    method: str
    subject: str | None = None  # what the call is about (a volume id), for the log line only
    seconds: float = 0.0
    steps: list[Span] = field(default_factory=list)
    _open: list[Span] = field(default_factory=list, repr=False)

    def _parts(self) -> list[Span]:
        return self._open[-1].parts if self._open else self.steps

    def add_process(self, program: str, seconds: float) -> None:
        self._parts().append(Span(program, seconds, process=True))

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[Span]:
        span = Span(name)
        self._parts().append(span)
        self._open.append(span)
        started = time.perf_counter()
        try:
            yield span
        finally:
            span.seconds = time.perf_counter() - started
            self._open.pop()

    def breakdown(self) -> dict[str, float]:
        """Seconds by top-level step name (a step run twice counts both), then `other`: the rest."""
        totals: dict[str, float] = {}
        for span in self.steps:
            totals[span.name] = totals.get(span.name, 0.0) + span.seconds
        totals[OTHER] = max(0.0, self.seconds - sum(span.seconds for span in self.steps))
        return totals

    def render(self) -> str:
        """`NodeStageVolume vol-x in 905 ms: attach 12 ms (losetup 10 ms), luks-format 840 ms
        (cryptsetup 831 ms), ..., other 5 ms`."""
        head = f"{self.method.rsplit('/', 1)[-1]}{' ' + self.subject if self.subject else ''}"
        parts = [_render_span(span) for span in self.steps]
        parts.append(f"{OTHER} {_ms(self.breakdown()[OTHER])}")
        return f"{head} in {_ms(self.seconds)}: {', '.join(parts)}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds >= 0.01 else f"{seconds * 1000:.1f} ms"


def _render_span(span: Span) -> str:
    text = f"{span.name} {_ms(span.seconds)}"
    if span.parts:
        text += f" ({', '.join(_render_span(part) for part in span.parts)})"
    return text


_CURRENT: ContextVar[CallTiming | None] = ContextVar("csi_luks_call_timing", default=None)
_listeners: list[Callable[[CallTiming], None]] = []
_listeners_lock = threading.Lock()


@contextlib.contextmanager
def timed_call(timing: CallTiming) -> Iterator[CallTiming]:
    """Time one call: steps and processes run inside (on this thread) are recorded into timing."""
    token = _CURRENT.set(timing)
    started = time.perf_counter()
    try:
        yield timing
    finally:
        timing.seconds = time.perf_counter() - started
        _CURRENT.reset(token)
        with _listeners_lock:
            listeners = list(_listeners)
        for listener in listeners:
            listener(timing)


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    """A timed step of the current call (nothing outside one). Names are literals: they are metric labels."""
    timing = _CURRENT.get()
    if timing is None:
        yield
        return
    with timing.step(name):
        yield


def process(argv0: str, seconds: float) -> None:
    """The runner ran a process: counted in the current step under its program's name."""
    timing = _CURRENT.get()
    if timing is not None:
        timing.add_process(os.path.basename(argv0), seconds)


@contextlib.contextmanager
def system_call(name: str) -> Iterator[None]:
    """A system call made in place of a process (`mount(2)` for mount): counted as that process would be,
    so the breakdown shows what replaced it; a failed one too (the fallback's process follows it)."""
    timing = _CURRENT.get()
    if timing is None:
        yield
        return
    started = time.perf_counter()
    try:
        yield
    finally:
        timing.add_process(name, time.perf_counter() - started)


@contextlib.contextmanager
def collecting() -> Iterator[list[CallTiming]]:
    """Every call timed in this process while the block runs (a bench reads its breakdowns)."""
    found: list[CallTiming] = []
    lock = threading.Lock()

    def listener(timing: CallTiming) -> None:
        with lock:
            found.append(timing)

    with _listeners_lock:
        _listeners.append(listener)
    try:
        yield found
    finally:
        with _listeners_lock:
            _listeners.remove(listener)

"""Where the time of a flow goes, side by side: the plugin's steps (timing.py) against the raw commands.

Each sample of a flow is a mapping part -> seconds: for the plugin a call's top-level steps (and the
processes each ran, as `step/program`), `other` (the handler's time no step covers) and `grpc` (the rest
of the time the client waited); for the raw flow each command. The table shows the
median of each part over the samples (a part missing from a sample counts 0 there), so the medians of
the parts need not add up to the median of the totals, which is shown too.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import zip_longest

from bench.table import markdown
from csi_luks.timing import OTHER, CallTiming

TOTAL = "total"
GRPC = "grpc"  # a call's time outside the server's handler: the channel, (de)serialising, the thread pool


def call_parts(call: CallTiming) -> dict[str, float]:
    """A call's sample: its top-level steps, the processes of each as `step/program`, `other`, `total`."""
    parts: dict[str, float] = {}
    for span in call.steps:
        parts[span.name] = parts.get(span.name, 0.0) + span.seconds
        for process in [span] if span.process else span.processes():
            key = span.name if span.process else f"{span.name}/{process.name}"
            if key != span.name:
                parts[key] = parts.get(key, 0.0) + process.seconds
    parts[OTHER] = call.breakdown()[OTHER]
    parts[TOTAL] = call.seconds
    return parts


@dataclass
class FlowTimes:
    """The samples of one flow (e.g. the plugin's first NodeStage), each part -> seconds."""

    samples: list[dict[str, float]] = field(default_factory=list)

    def add(self, parts: dict[str, float]) -> None:
        self.samples.append(parts)

    def medians_ms(self) -> dict[str, float]:
        """Median ms of each part, in the order the parts were first seen."""
        names: dict[str, None] = {}
        for sample in self.samples:
            names.update(dict.fromkeys(sample))
        return {
            name: statistics.median(sample.get(name, 0.0) for sample in self.samples) * 1000 for name in names
        }


def _lines(medians: dict[str, float], with_processes: bool) -> list[tuple[str, str]]:
    """(part, "ms (processes)") for each top-level part, `other` and `total` last."""
    lines = []
    for name, ms in medians.items():
        if "/" in name or name in (OTHER, TOTAL):
            continue
        inside = [
            f"{key.split('/', 1)[1]} {ms_:.1f}" for key, ms_ in medians.items() if key.startswith(name + "/")
        ]
        lines.append((name, f"{ms:.1f}" + (f" ({', '.join(inside)})" if with_processes and inside else "")))
    for name in (OTHER, TOTAL):
        if name in medians:
            lines.append((name, f"{medians[name]:.1f}"))
    return lines


def render(title: str, plugin: FlowTimes, raw: FlowTimes) -> str:
    """One flow's table: the plugin's steps (processes inside in brackets) beside the raw commands."""
    ours, theirs = plugin.medians_ms(), raw.medians_ms()
    rows = [("plugin step", "median ms (processes inside)", "raw command", "median ms")]
    for left, right in zip_longest(_lines(ours, True), _lines(theirs, False), fillvalue=("", "")):
        rows.append((*left, *right))
    processes = sum(ms for name, ms in ours.items() if "/" in name)
    head = (
        f"{title}: plugin {ours.get(TOTAL, 0):.1f} ms against raw {theirs.get(TOTAL, 0):.1f} ms; "
        f"the plugin's processes {processes:.1f} ms, the rest is Python, the KMS and waits"
    )
    return head + "\n" + markdown(rows)


def render_all(flows: Iterable[tuple[str, FlowTimes, FlowTimes]]) -> str:
    return "\n".join(render(title, plugin, raw) for title, plugin, raw in flows)

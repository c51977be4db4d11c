"""The benchmark results table: one row per measurement, its reference, their ratio and the target."""

from __future__ import annotations

import dataclasses
import json
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

_COMPARE: dict[str, Callable[[float, float], bool]] = {"<=": operator.le, ">=": operator.ge}


@dataclass(frozen=True)
class Target:
    """A bound on a row's ratio (value / reference) or on its value itself."""

    on: Literal["ratio", "value"]
    op: Literal["<=", ">="]
    bound: float

    def met(self, value: float, ratio: float | None) -> bool | None:
        """Whether the measurement meets the target; None when there is no ratio to judge."""
        measured = ratio if self.on == "ratio" else value
        return None if measured is None else _COMPARE[self.op](measured, self.bound)

    def __str__(self) -> str:
        return f"{'ratio' if self.on == 'ratio' else 'value'} {self.op} {self.bound:g}"


@dataclass(frozen=True)
class Row:
    """value measured through the plugin; reference the same work done bare, in the same run."""

    name: str
    value: float
    unit: str
    reference: float | None = None
    reference_name: str = ""
    target: Target | None = None

    @property
    def ratio(self) -> float | None:
        if self.reference is None or self.reference == 0:
            return None
        return self.value / self.reference

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.target.met(self.value, self.ratio)


HEADER = ("measurement", "value", "reference", "ratio", "target", "met")


def _number(value: float, unit: str) -> str:
    digits = 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 2
    return f"{value:.{digits}f} {unit}"


def cells(row: Row) -> tuple[str, str, str, str, str, str]:
    reference = "" if row.reference is None else f"{_number(row.reference, row.unit)} ({row.reference_name})"
    ratio = "" if row.ratio is None else f"{row.ratio:.2f}x"
    met = {None: "", True: "yes", False: "NO"}[row.met]
    return (row.name, _number(row.value, row.unit), reference, ratio, str(row.target or ""), met)


def render(rows: Iterable[Row]) -> str:
    """A Markdown table (it reads as plain text too, and pastes into the README as is)."""
    return markdown([HEADER, *(cells(row) for row in rows)])


def markdown(lines: Sequence[tuple[str, ...]]) -> str:
    """Lines of cells as a Markdown table, the first line its header, every column aligned."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]

    def format_line(line: tuple[str, ...]) -> str:
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)) + " |"

    separator = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([format_line(lines[0]), separator, *map(format_line, lines[1:])]) + "\n"


def rows_to_json(rows: Iterable[Row]) -> str:
    """Rows as JSON: how the guest hands the node part's rows to the host that prints the table."""
    return json.dumps([dataclasses.asdict(row) for row in rows])


def rows_from_json(text: str) -> list[Row]:
    rows = []
    for raw in json.loads(text):
        target = raw.pop("target")
        rows.append(Row(**raw, target=Target(**target) if target is not None else None))
    return rows


def missed(rows: Iterable[Row]) -> list[Row]:
    return [row for row in rows if row.met is False]

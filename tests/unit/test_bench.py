"""The host-independent parts of bench/: the table, its targets, the guest hand-over and the command line."""

from __future__ import annotations

import os

import pytest

from bench.__main__ import HOST_PARTS, parse_args
from bench.breakdown import GRPC, TOTAL, FlowTimes, call_parts
from bench.breakdown import render as render_breakdown
from bench.kdf import peak_rss_mib
from bench.node import CEPH_CSI_FLAGS, _run, plugin_format_flags
from bench.table import Row, Target, missed, render, rows_from_json, rows_to_json
from csi_luks.luks import Cryptsetup
from csi_luks.timing import OTHER, CallTiming, Span
from tests.unit.test_luks_engine import FakeRunner

PAIRS = Row("vault pairs", 96.0, "pairs/s", 120.0, "bare hvac", Target("ratio", ">=", 0.8))
SLOW = Row("NodeStage, first", 330.0, "ms", 250.0, "raw commands", Target("ratio", "<=", 1.1))
MEMORY = Row("memory.peak", 151.5, "MiB", target=Target("value", "<=", 150))
PLAIN = Row("start to ready", 0.93, "s")


def test_ratios_and_targets() -> None:
    assert PAIRS.ratio == pytest.approx(0.8) and PAIRS.met is True  # the bound itself is met
    assert SLOW.ratio == pytest.approx(1.32) and SLOW.met is False
    assert MEMORY.ratio is None and MEMORY.met is False  # a bound on the value needs no reference
    assert PLAIN.met is None
    assert Row("r", 1.0, "ms", 0.0, "zero", Target("ratio", "<=", 1)).met is None  # no ratio to judge
    assert missed([PAIRS, SLOW, MEMORY, PLAIN]) == [SLOW, MEMORY]


def test_the_table_aligns_every_column_and_says_what_was_met() -> None:
    lines = render([PAIRS, SLOW, MEMORY, PLAIN]).splitlines()
    assert lines[0].split("|")[1:-1] == [
        f" {h.ljust(len(c) - 2)} " for h, c in zip(
            ("measurement", "value", "reference", "ratio", "target", "met"), lines[2].split("|")[1:-1],
            strict=True,
        )
    ]  # fmt: skip
    assert len({len(line) for line in lines}) == 1  # a rectangle: every column padded alike
    assert set(lines[1]) == {"|", "-"}
    cells = [[cell.strip() for cell in line.split("|")[1:-1]] for line in lines[2:]]
    assert cells[0] == ["vault pairs", "96.0 pairs/s", "120 pairs/s (bare hvac)", "0.80x", "ratio >= 0.8",
                        "yes"]  # fmt: skip
    assert cells[1][3:] == ["1.32x", "ratio <= 1.1", "NO"]
    assert cells[2] == ["memory.peak", "152 MiB", "", "", "value <= 150", "NO"]
    assert cells[3] == ["start to ready", "0.93 s", "", "", "", ""]


def test_rows_survive_the_trip_from_the_guest() -> None:
    rows = [PAIRS, SLOW, MEMORY, PLAIN]
    assert rows_from_json(rows_to_json(rows)) == rows


def test_the_default_parts_are_the_host_parts_and_the_guest_adds_node() -> None:
    assert parse_args([]).parts == list(HOST_PARTS)
    assert parse_args(["--vm"]).parts == [*HOST_PARTS, "node"]
    args = parse_args(["vault", "--pairs", "50"])
    assert (args.parts, args.pairs, args.vm, args.rows_out) == (["vault"], 50, False, None)
    assert parse_args(["node"], dm_crypt=True).parts == ["node"]  # inside the guest


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [(["node"], "needs dm-crypt"), (["disk"], "unknown part"), (["--pairs", "0"], "at least 1")],
)
def test_bad_command_lines_are_refused(
    argv: list[str], complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(argv, dm_crypt=False)
    assert info.value.code == 2
    assert complaint in capsys.readouterr().err


def test_the_raw_flow_formats_with_exactly_the_plugins_flags() -> None:
    runner = FakeRunner([(0, "", "")])
    Cryptsetup(runner=runner).format("/dev/loop9", b"k")  # type: ignore[arg-type]
    (call,) = runner.calls
    plugin = [a for a in call.argv if isinstance(a, str)]
    assert plugin[plugin.index("luksFormat") + 1 : -1] == ["--type", "luks2", "--batch-mode",
        *plugin_format_flags()[2:], "--key-file=-"]  # fmt: skip
    assert plugin_format_flags()[:2] == ["--type", "luks2"]
    assert "--pbkdf-memory" in CEPH_CSI_FLAGS and "argon2id" in CEPH_CSI_FLAGS


def _stage_call(seconds: dict[str, float], processes: dict[str, float], other: float) -> CallTiming:
    """A NodeStage's timing as the plugin records it, with made-up durations."""
    call = CallTiming("/csi.v1.Node/NodeStageVolume", "vol-x")
    for name, spent in seconds.items():
        span = Span(name, spent)
        if name in processes:
            span.parts.append(Span("cryptsetup", processes[name], process=True))
        call.steps.append(span)
    call.seconds = sum(seconds.values()) + other
    return call


def test_the_breakdown_names_each_step_and_its_processes_beside_the_raw_commands() -> None:
    plugin, raw = FlowTimes(), FlowTimes()
    for format_s, open_s, other in ((0.84, 0.05, 0.004), (0.86, 0.07, 0.006), (0.80, 0.06, 0.005)):
        call = _stage_call({"attach": 0.012, "luks-format": format_s, "open": open_s},
                           {"luks-format": format_s - 0.01, "open": open_s - 0.005}, other)  # fmt: skip
        plugin.add({**call_parts(call), GRPC: 0.002, TOTAL: call.seconds + 0.002})
    for luks_format in (0.82, 0.83, 0.81):
        raw.add({"losetup --find": 0.01, "cryptsetup luksFormat": luks_format, TOTAL: luks_format + 0.01})
    medians = plugin.medians_ms()
    assert medians["luks-format"] == pytest.approx(840)
    assert medians["luks-format/cryptsetup"] == pytest.approx(830)
    assert medians[OTHER] == pytest.approx(5) and medians[GRPC] == pytest.approx(2)
    text = render_breakdown("NodeStage, first", plugin, raw)
    lines = text.splitlines()
    assert lines[0].startswith("NodeStage, first: plugin 908.0 ms against raw 830.0 ms; ")
    assert "the plugin's processes 885.0 ms" in lines[0]
    assert lines[1].split("|")[1:5] == [
        " plugin step ", " median ms (processes inside) ", " raw command           ", " median ms ",
    ]  # fmt: skip
    body = [[cell.strip() for cell in line.split("|")[1:5]] for line in lines[3:]]
    assert body == [
        ["attach", "12.0", "losetup --find", "10.0"],
        ["luks-format", "840.0 (cryptsetup 830.0)", "cryptsetup luksFormat", "820.0"],
        ["open", "60.0 (cryptsetup 55.0)", "total", "830.0"],
        ["grpc", "2.0", "", ""],
        [OTHER, "5.0", "", ""],
        [TOTAL, "908.0", "", ""],
    ]


def test_a_part_missing_from_some_samples_counts_zero_there() -> None:
    flow = FlowTimes()
    flow.add({"mount": 0.01})
    flow.add({"mount": 0.01, "grow": 0.3})
    flow.add({"mount": 0.01})
    assert flow.medians_ms() == {"mount": pytest.approx(10), "grow": 0}


def test_raw_commands_are_timed_by_name() -> None:
    times: dict[str, float] = {}
    _run(["true"], times=times)
    _run(["sh", "-c", "sleep 0.02"], times=times, name="mount")
    _run(["true"], times=times)
    assert set(times) == {"true", "mount"} and times["mount"] >= 0.02


def test_peak_rss_is_read_from_the_process_status() -> None:
    before = peak_rss_mib(os.getpid())
    ballast = b"\x01" * (64 * 1024 * 1024)  # written, so resident
    assert peak_rss_mib(os.getpid()) >= before and peak_rss_mib(os.getpid()) >= 64
    del ballast

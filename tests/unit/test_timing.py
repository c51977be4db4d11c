"""Per-call timing (timing.py): steps and processes recorded into the call that ran them, and only it."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest

from csi_luks import timing
from csi_luks.crash import Step
from csi_luks.csi import csi_pb2
from csi_luks.metrics import STAGE
from csi_luks.server import _CallInterceptor
from csi_luks.system.runner import CommandError, Runner
from csi_luks.timing import OTHER, CallTiming, collecting, step, timed_call
from tests.unit.test_metrics import VOLUME, _call, _Details, _labels, _metrics, _value


def test_a_step_outside_a_call_records_nothing_and_still_runs() -> None:
    ran = []
    with step("attach"):
        ran.append(1)
    Runner().run(["true"])  # no call: the runner's report goes nowhere
    assert ran == [1]


def test_steps_nest_and_processes_count_in_the_step_that_ran_them() -> None:
    call = CallTiming("/csi.v1.Node/NodeStageVolume", "vol-x")
    with timed_call(call):
        with step("attach"):
            Runner().run(["true"])
        with step("luks-format"):
            with step("unwrap-dek"):
                time.sleep(0.01)
            Runner().run(["sh", "-c", "sleep 0.02"])
        Runner().run(["true"])  # outside any step: a part of the call of its own
    assert [span.name for span in call.steps] == ["attach", "luks-format", "true"]
    attach, luks_format, loose = call.steps
    assert [(p.name, p.process) for p in attach.parts] == [("true", True)]
    assert [p.name for p in luks_format.parts] == ["unwrap-dek", "sh"]
    assert luks_format.parts[0].seconds >= 0.01 and luks_format.parts[1].seconds >= 0.02
    assert luks_format.seconds >= luks_format.parts[0].seconds + luks_format.parts[1].seconds
    assert [p.name for p in luks_format.processes()] == ["sh"] and loose.process
    breakdown = call.breakdown()
    assert list(breakdown) == ["attach", "luks-format", "true", OTHER]
    assert sum(breakdown.values()) == pytest.approx(call.seconds)
    line = call.render()
    assert line.startswith("NodeStageVolume vol-x in ")
    assert ": attach " in line and "(true " in line and "luks-format " in line
    assert "(unwrap-dek 1" in line and ", sh " in line and line.endswith(" ms")
    assert f", {OTHER} " in line


def test_a_failed_or_timed_out_process_and_a_failing_step_are_timed_too() -> None:
    call = CallTiming("m")
    with timed_call(call):
        with pytest.raises(CommandError), step("mount"):
            Runner().run(["false"])
        with pytest.raises(CommandError):
            Runner().run(["sleep", "5"], timeout=0.05)
    mount, sleep = call.steps
    assert mount.name == "mount" and [p.name for p in mount.parts] == ["false"]
    assert sleep.process and 0.05 <= sleep.seconds < 5


def test_a_system_call_made_in_place_of_a_process_is_counted_as_one() -> None:
    with timing.system_call("mount(2)"):  # no call: recorded nowhere
        pass
    call = CallTiming("/csi.v1.Node/NodeStageVolume")
    with timed_call(call):
        with step("mount"):
            with pytest.raises(OSError), timing.system_call("mount(2)"):
                raise OSError("refused: the fallback's process follows, and both are counted")
            Runner().run(["true"])
        with timing.system_call("umount2(2)"):
            time.sleep(0.01)
    mount, unmount = call.steps
    assert [(p.name, p.process) for p in mount.parts] == [("mount(2)", True), ("true", True)]
    assert unmount.name == "umount2(2)" and unmount.process and unmount.seconds >= 0.01
    assert "(mount(2) " in call.render()


def test_a_crash_step_is_a_timed_step_under_its_name() -> None:
    call = CallTiming("/csi.v1.Controller/CreateVolume")
    with timed_call(call), Step("create-volume", "backing-store"):
        with Step("standalone-create", "meta"):
            pass
        with pytest.raises(ValueError), Step("standalone-create", "image"):
            raise ValueError("a failed step is timed and its block's error passes")
    (store,) = call.steps
    assert store.name == "backing-store" and [p.name for p in store.parts] == ["meta", "image"]


def test_concurrent_calls_each_get_their_own_steps_only() -> None:
    """gRPC runs calls on a thread pool: 16 calls at once, each recording its own steps."""
    barrier = threading.Barrier(16)

    def one_call(i: int) -> CallTiming:
        call = CallTiming("m", f"vol-{i}")
        with timed_call(call):
            barrier.wait()
            for n in range(20):
                with step(f"s{i}"):
                    if n % 10 == 0:
                        Runner().run(["true"])
        return call

    with ThreadPoolExecutor(max_workers=16) as pool:
        calls = list(pool.map(one_call, range(16)))
    for i, call in enumerate(calls):
        assert [span.name for span in call.steps] == [f"s{i}"] * 20
        assert sum(1 for span in call.steps for _ in span.processes()) == 2


def test_collecting_sees_every_call_while_it_listens() -> None:
    with collecting() as found:
        with timed_call(CallTiming("a")), step("x"):
            pass
        with timed_call(CallTiming("b")):
            pass
    with timed_call(CallTiming("c")):
        pass
    assert [call.method for call in found] == ["a", "b"]
    assert not timing._listeners


def _stage_in_steps(_request: Any, _context: Any) -> csi_pb2.NodeStageVolumeResponse:
    with step("attach"):
        Runner().run(["true"])
    with step("mount"):
        pass
    return csi_pb2.NodeStageVolumeResponse()


def test_the_interceptor_logs_one_breakdown_line_and_feeds_the_step_histograms(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = _metrics()
    request = csi_pb2.NodeStageVolumeRequest(volume_id=VOLUME, staging_target_path="/s")
    with caplog.at_level(logging.DEBUG, logger="csi_luks.server"):
        handler = grpc.unary_unary_rpc_method_handler(_stage_in_steps)
        wrapped = _CallInterceptor(metrics).intercept_service(lambda _: handler, _Details(STAGE))
        wrapped.unary_unary(request, None)
    (line,) = [r.getMessage() for r in caplog.records if "NodeStageVolume " + VOLUME in r.getMessage()]
    assert "attach " in line and "(true " in line and "mount " in line and line.endswith("-> OK")
    step_count = "csi_luks_step_duration_seconds_count"
    assert _value(metrics, step_count, method=STAGE, step="attach") == 1
    assert _value(metrics, step_count, method=STAGE, step="mount") == 1
    assert _value(metrics, step_count, method=STAGE, step=OTHER) == 1
    assert _value(metrics, "csi_luks_process_duration_seconds_count", method=STAGE, program="true") == 1
    # No volume id in any label: the cardinality is the code's steps and programs.
    labels = _labels(metrics, step_count) + _labels(metrics, "csi_luks_process_duration_seconds_count")
    assert labels and not any(VOLUME in value for found in labels for value in found.values())


def test_a_call_without_steps_logs_no_breakdown(caplog: pytest.LogCaptureFixture) -> None:
    metrics = _metrics()
    request = csi_pb2.NodeStageVolumeRequest(volume_id=VOLUME, staging_target_path="/s")
    with caplog.at_level(logging.DEBUG, logger="csi_luks.server"):
        _call(metrics, STAGE, request, csi_pb2.NodeStageVolumeResponse())
    assert not [r for r in caplog.records if " in " in r.getMessage() and "ms:" in r.getMessage()]
    assert _value(metrics, "csi_luks_step_duration_seconds_count", method=STAGE, step=OTHER) is None

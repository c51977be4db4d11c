"""The JSON log format and the request id that lines logged during a call carry."""

from __future__ import annotations

import json
import logging
import sys

from csi_luks.logs import CALL_FIELDS, JsonFormatter, current_request_id, request_scope


def _record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("csi_luks.test", logging.WARNING, __file__, 1, message, args, None)
    record.__dict__.update(extra)
    return record


def test_a_line_is_one_json_object_with_time_level_logger_and_message() -> None:
    line = JsonFormatter().format(_record("volume %s: %d tries", "v-1", 3))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "warning" and entry["logger"] == "csi_luks.test"
    assert entry["message"] == "volume v-1: 3 tries"
    assert entry["time"].endswith("+00:00")
    assert "request_id" not in entry


def test_lines_inside_a_request_scope_carry_its_id_and_the_scope_ends_with_it() -> None:
    with request_scope("r-1"):
        assert json.loads(JsonFormatter().format(_record("inside")))["request_id"] == "r-1"
        with request_scope("r-2"):
            assert current_request_id() == "r-2"
        assert current_request_id() == "r-1"
    assert current_request_id() is None


def test_call_fields_are_top_level_keys_and_absent_ones_are_left_out() -> None:
    fields = {"method": "/csi.v1.Node/NodeStageVolume", "volume_id": None, "code": "OK", "duration_ms": 1.5}
    entry = json.loads(JsonFormatter().format(_record("done", **{CALL_FIELDS: fields})))
    assert entry["method"] == "/csi.v1.Node/NodeStageVolume" and entry["code"] == "OK"
    assert entry["duration_ms"] == 1.5 and "volume_id" not in entry


def test_an_exception_stays_inside_the_one_line() -> None:
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = JsonFormatter().format(record)
    assert len(line.splitlines()) == 1
    assert "RuntimeError: boom\nsecond line" in json.loads(line)["exception"]

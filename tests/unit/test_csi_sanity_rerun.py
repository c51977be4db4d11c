"""run_sanity's rerun of specs that lost csi-sanity's own connect (kubernetes-csi/csi-test #97): ginkgo
reports every spec in every run, whatever the focus (those it did not select as skipped, its pending ones
as pending), and the rerun must not take them for extra specs it ran (the suite failed so, under load,
with the connect race: once with one pending spec, once with the specs the focus left out)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support import csi_sanity

LOST: dict[str, Any] = {
    "State": "failed",
    "LeafNodeType": "It",
    "ContainerHierarchyTexts": ["CreateSnapshot [Controller Server]"],
    "LeafNodeText": "should fail when no name is provided",
    "Failure": {
        "FailureNodeType": "BeforeEach",
        "Location": {"FileName": "/src/csi-test-v5.3.1/pkg/sanity/sanity.go"},
        "Message": 'Unexpected error:\n    {\n        s: "Connection timed out",\n    }\noccurred',
    },
}
PENDING: dict[str, Any] = {
    "State": "pending",
    "LeafNodeType": "It",
    "ContainerHierarchyTexts": [],
    "LeafNodeText": "pagination",
}
PASSED: dict[str, Any] = {
    "State": "passed",
    "LeafNodeType": "It",
    "ContainerHierarchyTexts": [],
    "LeafNodeText": "other",
}


class _Plugin:
    def log_tail(self) -> str:
        return ""


def _plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, _Plugin]:
    """Stand-ins for the two plugin processes, and no csi-sanity to find."""
    monkeypatch.setattr(csi_sanity, "tool", lambda name: Path("/bin/true"))
    plugins = {"node": _Plugin(), "controller": _Plugin()}
    plugins["node"].socket = tmp_path / "node.sock"  # type: ignore[attr-defined]
    plugins["controller"].socket = tmp_path / "controller.sock"  # type: ignore[attr-defined]
    return plugins


def test_the_rerun_of_a_lost_connect_ignores_the_pending_specs_ginkgo_always_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs: list[list[dict[str, Any]]] = [
        [LOST, PENDING, PASSED],  # the whole run: one spec lost its connect
        # The rerun, focused on that spec: ginkgo also reports the specs it did not select, as skipped.
        [{**LOST, "State": "passed", "Failure": None}, PENDING, {**PASSED, "State": "skipped"}],
    ]
    focuses: list[str] = []

    def run_once(*args: Any) -> tuple[list[dict[str, Any]], str, int]:
        focuses.append(args[4])
        return runs[len(focuses) - 1], "", 0

    monkeypatch.setattr(csi_sanity, "_run_once", run_once)
    plugins = _plugins(tmp_path, monkeypatch)
    counts = csi_sanity.run_sanity(tmp_path, plugins, csi_sanity.SanityRun({}))  # type: ignore[arg-type]
    assert counts == {"passed": 2, "pending": 1}
    assert focuses[1] == csi_sanity.focus_on(
        ["CreateSnapshot [Controller Server] should fail when no name is provided"]
    )


def test_a_lost_spec_the_rerun_s_focus_does_not_select_fails_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = [[LOST, PASSED], [{**LOST, "State": "skipped", "Failure": None}, {**PASSED, "State": "skipped"}]]
    monkeypatch.setattr(csi_sanity, "_run_once", lambda *args: (runs.pop(0), "", 0))
    plugins = _plugins(tmp_path, monkeypatch)
    with pytest.raises(pytest.fail.Exception, match="not selected by the focus"):
        csi_sanity.run_sanity(tmp_path, plugins, csi_sanity.SanityRun({}))  # type: ignore[arg-type]

"""The crash-point registry: the points the code names and the points the harnesses run are one set."""

from __future__ import annotations

from pathlib import Path

from csi_luks.operations import migration, rotation
from tests.support.crash_harness import (
    CONTROLLER_SCENARIOS,
    NODE_SCENARIOS,
    code_points,
    controller_cases,
)


def test_every_crash_point_in_the_code_has_a_harness_case_and_every_case_a_point() -> None:
    code = code_points()
    assert code.problems == []
    controller = {point for _, _, point in controller_cases()}
    node = {point for points in NODE_SCENARIOS.values() for point in points}
    # The rotation and migration matrices (tests/host/test_rotation.py, test_migration.py) run these.
    operations = set(rotation.CRASH_POINTS) | set(migration.CRASH_POINTS)
    covered = controller | node | operations
    print("\ncrash points covered:")
    for point in sorted(covered):
        print(f"  {point:55} {code.points.get(point, 'NOT IN THE CODE')}")
    assert set(code.points) - covered == set(), "crash points without a harness case"
    assert covered - set(code.points) == set(), "harness cases for crash points the code does not have"
    # Each scenario names only points of the code (the host harness skips none of them).
    for backend in CONTROLLER_SCENARIOS.values():
        for points in backend.values():
            assert set(points) <= set(code.points)
    # Node points are only on the node; controller points never there.
    assert all(code.points[p] == "services/node.py" for p in node)
    assert not any(code.points[p] == "services/node.py" for p in controller)


def test_the_registry_finds_a_new_step_and_refuses_computed_names(tmp_path: Path) -> None:
    package = tmp_path
    (package / "module.py").write_text(
        "from csi_luks.crash import Step, crash_point\n"
        "with Step('op', 'write'):\n    pass\n"
        "crash_point('op.after-sync')\n"
        "with Step('op', name):\n    pass\n"
    )
    found = code_points(package)
    assert found.points == {
        "op.before-write": "module.py",
        "op.after-write": "module.py",
        "op.after-sync": "module.py",
    }
    assert len(found.problems) == 1 and "module.py:5" in found.problems[0]

"""Session-wide test wiring: tiers by directory, the VM bridge, and the passphrase argv audit."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import guest
from tests.support.audit import AUDIT, ArgvAudit

AUDIT.install()

# Session fixtures of real servers (Kubernetes API server, OpenBao, Ceph), started only for tests using them.
pytest_plugins = ["tests.support.kms_fixtures", "tests.support.ceph_fixtures", "pytester"]

_TIERS = {"unit": None, "host": None, "vm": "vm"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "audit: the argv audit, run after every other test")
    report_path = os.environ.get(guest.REPORT_ENV)
    if guest.IN_GUEST and report_path:
        config.pluginmanager.register(guest.GuestReporter(report_path), "csi-luks-guest-reporter")
    if not guest.IN_GUEST:
        config.pluginmanager.register(_GuestProxies(), "csi-luks-guest-proxies")


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    tests_root = Path(__file__).parent
    for item in items:
        tier = item.path.relative_to(tests_root).parts[0] if item.path.is_relative_to(tests_root) else ""
        if _TIERS.get(tier) == "vm":
            item.add_marker(pytest.mark.vm)
    # The audit checks what every other test spawned, so it runs last.
    items.sort(key=lambda item: item.get_closest_marker("audit") is not None)


class _GuestProxies:
    """Swaps the VM tests for their stand-ins after -k/-m deselection (trylast), so the guest runs
    exactly the selected tests."""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        guest.proxy_guest_items(config, items)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> None:
        """The guests boot as the tests start, and run while the host runs its own tier."""
        if not session.config.option.collectonly:
            guest.start_guests(session.config)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        guest.stop_guests(session.config)  # an interrupted session leaves no guest behind


@pytest.fixture(scope="session")
def argv_audit() -> ArgvAudit:
    return AUDIT


@pytest.fixture
def new_passphrase() -> Callable[[], bytes]:
    """A factory of random passphrases that the argv audit checks for leaks."""
    return AUDIT.new_passphrase

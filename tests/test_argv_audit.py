"""The argv audit: no passphrase or cephx key in the argv or environment of any cryptsetup or Ceph call."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support import guest
from tests.support.audit import ArgvAudit


def _all_leaks(argv_audit: ArgvAudit, in_guest: dict[str, Any] | None) -> list[str]:
    return argv_audit.leaks() + (in_guest["leaks"] if in_guest else [])


@pytest.mark.audit
def test_no_passphrase_in_any_cryptsetup_argv_or_environment(
    request: pytest.FixtureRequest, argv_audit: ArgvAudit
) -> None:
    in_guest = guest.guest_audit(request.config)
    calls = len(argv_audit.spawns) + (in_guest["cryptsetup_calls"] if in_guest else 0)
    if not argv_audit.passphrases and in_guest is None:
        if guest.STRICT:
            pytest.fail("CI used no passphrase with cryptsetup: the host and VM tiers did not run")
        pytest.skip("no test used a passphrase with cryptsetup (only unit tests were selected)")
    assert calls > 0, "passphrases were made but no cryptsetup call was recorded: the audit hook is broken"
    leaks = _all_leaks(argv_audit, in_guest)
    assert leaks == [], f"passphrases leaked: {leaks}"
    print(
        f"argv audit: {calls} cryptsetup calls ({len(argv_audit.spawns)} on the host, "
        f"{in_guest['cryptsetup_calls'] if in_guest else 0} in the VM) checked against "
        f"{len(argv_audit.passphrases)} host passphrases: no leak"
    )


def test_audit_catches_a_passphrase_in_argv_and_in_environment(tmp_path: Path) -> None:
    fake = tmp_path / "cryptsetup"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    audit = ArgvAudit()
    audit.install()
    secret = audit.new_passphrase().decode()
    subprocess.run([str(fake), "luksOpen", f"--key={secret}"], check=True)
    subprocess.run([str(fake), "status"], check=True, env={**os.environ, "KEY": secret})
    subprocess.run([str(fake), "status"], check=True)
    assert len(audit.spawns) == 3
    assert audit.leaks() == ["in argv of `" + str(fake) + " luksOpen`", f"in the environment of `{fake}`"]


@pytest.mark.audit
def test_no_cephx_key_in_any_ceph_argv_or_environment(
    request: pytest.FixtureRequest, argv_audit: ArgvAudit
) -> None:
    in_guest = guest.guest_audit(request.config)
    guest_keys = in_guest.get("ceph_keys", 0) if in_guest else 0
    if not argv_audit.ceph_keys and not guest_keys:
        if guest.STRICT:
            pytest.fail("CI made no cephx key: the Ceph tests did not run")
        pytest.skip("no test used the Ceph cluster")
    calls = len(argv_audit.ceph_spawns) + (in_guest.get("ceph_calls", 0) if in_guest else 0)
    assert calls > 0, "cephx keys were made but no Ceph CLI call was recorded: the audit hook is broken"
    leaks = _all_leaks(argv_audit, in_guest)
    assert leaks == [], f"secrets leaked: {leaks}"
    print(
        f"argv audit: {calls} Ceph CLI calls checked against {len(argv_audit.ceph_keys)} host and "
        f"{guest_keys} guest cephx keys: no leak"
    )


def test_audit_catches_a_cephx_key_in_argv(tmp_path: Path) -> None:
    fake = tmp_path / "rbd"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    audit = ArgvAudit()
    audit.install()
    audit.register_ceph_key("AQBfakefakefakefakefakefakefakefake==")
    subprocess.run([str(fake), "map", "--key=AQBfakefakefakefakefakefakefakefake=="], check=True)
    subprocess.run([str(fake), "map", "--keyfile", "/dev/null"], check=True)
    assert len(audit.ceph_spawns) == 2
    assert audit.spawns == []
    assert audit.leaks() == [f"in argv of `{fake} map`"]

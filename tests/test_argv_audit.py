"""The argv audit: no passphrase in the argv or environment of any cryptsetup call of the session."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.support import guest
from tests.support.audit import ArgvAudit


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
    leaks = argv_audit.leaks() + (in_guest["leaks"] if in_guest else [])
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

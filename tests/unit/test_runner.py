from __future__ import annotations

import pytest

from csi_luks.system.runner import (
    REDACTED,
    CommandError,
    CommandNotFound,
    CommandTimeout,
    Runner,
    SecretPipe,
    redact,
)


def test_redact_replaces_longest_secret_first() -> None:
    assert redact("key abcdef and abc", ["abc", "abcdef"]) == f"key {REDACTED} and {REDACTED}"
    assert redact("nothing here", [b"", ""]) == "nothing here"


def test_stdin_reaches_the_child_and_is_redacted_from_its_output() -> None:
    result = Runner().run(["sh", "-c", "cat; echo oops >&2"], stdin=b"s3cr3t-value")
    assert result.stdout == REDACTED
    assert result.returncode == 0


def test_failure_raises_with_redacted_stderr() -> None:
    with pytest.raises(CommandError) as info:
        Runner().run(["sh", "-c", 'read x; echo "bad key $x" >&2; exit 3'], stdin=b"hunter2-hunter2\n")
    assert info.value.returncode == 3
    assert "hunter2" not in str(info.value) and REDACTED in info.value.stderr


def test_check_false_returns_the_failure() -> None:
    result = Runner().run(["sh", "-c", "exit 4"], check=False)
    assert result.returncode == 4


def test_secret_pipe_is_named_by_fd_path_not_content() -> None:
    result = Runner().run(["sh", "-c", 'echo "$1"; cat "$1"', "sh", SecretPipe(b"pipe-secret-123")])
    path, content = result.stdout.splitlines()
    assert path.startswith("/proc/self/fd/")
    assert content == REDACTED
    assert "pipe-secret-123" not in " ".join(result.argv)


def test_missing_command_is_typed() -> None:
    with pytest.raises(CommandNotFound):
        Runner().run(["csi-luks-no-such-command"])


def test_timeout_kills_and_is_typed() -> None:
    with pytest.raises(CommandTimeout) as info:
        Runner().run(["sleep", "5"], timeout=0.2)
    assert info.value.timeout == 0.2


def test_child_gets_a_fixed_locale() -> None:
    assert Runner(env={"PATH": "/usr/bin:/bin"}).run(["sh", "-c", "echo $LC_ALL"]).stdout.strip() == "C"

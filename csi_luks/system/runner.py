"""The one place external commands are run.

Secrets go to a child only on stdin or through anonymous pipes, never in argv or the environment, and
are redacted from everything a command prints before it reaches a log or an exception.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from csi_luks import timing

log = logging.getLogger(__name__)

REDACTED = "<redacted>"

# A stable, parseable locale for every tool we read the output of.
_CHILD_ENV_OVERRIDES = {"LC_ALL": "C", "LANG": "C"}


def redact(text: str, secrets: Iterable[bytes | str]) -> str:
    """Replace every occurrence of each secret in text (longest first, so no fragment survives)."""
    values = sorted(
        {s.decode("utf-8", "replace") if isinstance(s, bytes) else s for s in secrets if s},
        key=len,
        reverse=True,
    )
    for value in values:
        text = text.replace(value, REDACTED)
    return text


class CommandError(Exception):
    """A command failed; argv and output are already redacted."""

    def __init__(self, argv: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        detail = stderr.strip() or stdout.strip() or "no output"
        super().__init__(f"{argv[0]} exited with {returncode}: {detail}")


class CommandNotFound(CommandError):
    """The executable is not installed (or not on PATH)."""

    def __init__(self, argv: Sequence[str]) -> None:
        super().__init__(argv, 127, "", f"{argv[0]}: command not found")


class CommandTimeout(CommandError):
    """The command ran past its deadline and was killed."""

    def __init__(self, argv: Sequence[str], timeout: float, stdout: str, stderr: str) -> None:
        super().__init__(argv, -9, stdout, stderr or f"killed after {timeout:g}s")
        self.timeout = timeout


@dataclass(frozen=True)
class CommandResult:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    duration: float


@dataclass(frozen=True)
class SecretPipe:
    """Bytes handed to the child through an anonymous pipe, named to it as /proc/self/fd/N.

    /proc/self/fd is used rather than /dev/fd or /dev/stdin, which some container runtimes lack.
    """

    data: bytes = field(repr=False)


def _argv_with_pipes(
    argv: Sequence[str | SecretPipe],
) -> tuple[list[str], list[int], list[tuple[int, bytes]]]:
    """Turn SecretPipe placeholders into /proc/self/fd paths; returns argv, fds to pass, writers."""
    out: list[str] = []
    pass_fds: list[int] = []
    writers: list[tuple[int, bytes]] = []
    for arg in argv:
        if isinstance(arg, SecretPipe):
            read_fd, write_fd = os.pipe()
            pass_fds.append(read_fd)
            writers.append((write_fd, arg.data))
            out.append(f"/proc/self/fd/{read_fd}")
        else:
            out.append(arg)
    return out, pass_fds, writers


class Runner:
    """Runs commands with a timeout, secrets on stdin/pipes, and redacted output."""

    def __init__(self, default_timeout: float = 120.0, env: Mapping[str, str] | None = None) -> None:
        self.default_timeout = default_timeout
        self._env = dict(os.environ if env is None else env)
        self._env.update(_CHILD_ENV_OVERRIDES)

    def run(
        self,
        argv: Sequence[str | SecretPipe],
        *,
        stdin: bytes | None = None,
        secrets: Iterable[bytes | str] = (),
        timeout: float | None = None,
        check: bool = True,
    ) -> CommandResult:
        """Run argv; stdin (if any) is written and closed. Raises CommandError when check is set."""
        secret_list = list(secrets)
        if stdin is not None:
            secret_list.append(stdin)
        secret_list.extend(a.data for a in argv if isinstance(a, SecretPipe))
        real_argv, pass_fds, writers = _argv_with_pipes(argv)
        deadline = self.default_timeout if timeout is None else timeout
        started = time.monotonic()
        try:
            # Pipe contents (a passphrase or two) fit the pipe buffer, so writing before the child
            # starts cannot block.
            for fd, data in writers:
                os.write(fd, data)
                os.close(fd)
            writers = []
            proc = subprocess.run(
                real_argv,
                input=stdin if stdin is not None else b"",
                capture_output=True,
                timeout=deadline,
                env=self._env,
                pass_fds=pass_fds,
                check=False,
            )
        except FileNotFoundError as exc:
            raise CommandNotFound(real_argv) from exc
        except subprocess.TimeoutExpired as exc:
            timing.process(real_argv[0], time.monotonic() - started)
            raise CommandTimeout(
                real_argv,
                deadline,
                redact(_text(exc.stdout), secret_list),
                redact(_text(exc.stderr), secret_list),
            ) from None
        finally:
            for fd, _ in writers:
                os.close(fd)
            for fd in pass_fds:
                os.close(fd)
        duration = time.monotonic() - started
        timing.process(real_argv[0], duration)
        result = CommandResult(
            argv=real_argv,
            returncode=proc.returncode,
            stdout=redact(_text(proc.stdout), secret_list),
            stderr=redact(_text(proc.stderr), secret_list),
            duration=duration,
        )
        log.debug(
            "ran %s -> %d in %.2fs", redact(" ".join(real_argv), secret_list), proc.returncode, duration
        )
        if check and proc.returncode != 0:
            raise CommandError(real_argv, proc.returncode, result.stdout, result.stderr)
        return result


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    if isinstance(data, str):
        return data
    return data.decode("utf-8", "replace")

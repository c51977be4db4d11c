"""Records the argv and environment of every cryptsetup process the test session spawns.

It hooks Python's own `subprocess.Popen` audit event, below the project's runner, so a call that
bypassed the runner would be recorded too.
"""

from __future__ import annotations

import os
import secrets
import sys
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Spawn:
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]


@dataclass
class ArgvAudit:
    spawns: list[Spawn] = field(default_factory=list)
    passphrases: set[str] = field(default_factory=set)

    def install(self) -> None:
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple[Any, ...]) -> None:
        if event != "subprocess.Popen":
            return
        executable, argv, _cwd, env = args
        words = [os.fsdecode(a) for a in (argv if isinstance(argv, list | tuple) else [argv])]
        program = os.path.basename(os.fsdecode(executable or words[0]))
        if program != "cryptsetup":
            return
        environment = os.environ if env is None else env
        self.spawns.append(
            Spawn(
                argv=tuple(words),
                env=tuple((os.fsdecode(k), os.fsdecode(v)) for k, v in environment.items()),
            )
        )

    def new_passphrase(self) -> bytes:
        """A fresh random passphrase (like the plugin's), registered for the leak check."""
        value = secrets.token_urlsafe(32)
        self.register(value)
        return value.encode()

    def register(self, passphrase: bytes | str) -> None:
        self.passphrases.add(passphrase.decode() if isinstance(passphrase, bytes) else passphrase)

    def leaks(self) -> list[str]:
        """Where a registered passphrase showed up; the passphrase itself is never printed."""
        found = []
        for spawn in self.spawns:
            for secret in self.passphrases:
                if any(secret in word for word in spawn.argv):
                    found.append(
                        f"in argv of `{spawn.argv[0]} {spawn.argv[1] if len(spawn.argv) > 1 else ''}`"
                    )
                if any(secret in key or secret in value for key, value in spawn.env):
                    found.append(f"in the environment of `{spawn.argv[0]}`")
        return found


AUDIT = ArgvAudit()

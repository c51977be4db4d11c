"""Records the argv and environment of every cryptsetup and Ceph CLI process the test session spawns.

It hooks Python's own `subprocess.Popen` audit event, below the project's runner, so a call that
bypassed the runner would be recorded too.
"""

from __future__ import annotations

import os
import secrets
import sys
from dataclasses import dataclass, field
from typing import Any

# Ceph's programs that take cephx keys (through keyrings or keyfiles, never argv).
CEPH_PROGRAMS = frozenset({"ceph", "rbd", "rados", "rbd-nbd", "ceph-authtool", "ceph-mon", "ceph-osd"})


@dataclass(frozen=True)
class Spawn:
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]


@dataclass
class ArgvAudit:
    spawns: list[Spawn] = field(default_factory=list)
    passphrases: set[str] = field(default_factory=set)
    ceph_spawns: list[Spawn] = field(default_factory=list)
    ceph_keys: set[str] = field(default_factory=set)
    programs: list[str] = field(default_factory=list)  # every process spawned, by program name

    def install(self) -> None:
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple[Any, ...]) -> None:
        if event != "subprocess.Popen":
            return
        executable, argv, _cwd, env = args
        words = [os.fsdecode(a) for a in (argv if isinstance(argv, list | tuple) else [argv])]
        program = os.path.basename(os.fsdecode(executable or words[0]))
        self.programs.append(program)
        if program == "cryptsetup":
            calls = self.spawns
        elif program in CEPH_PROGRAMS:
            calls = self.ceph_spawns
        else:
            return
        environment = os.environ if env is None else env
        calls.append(
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

    def register_ceph_key(self, key: str) -> None:
        """A cephx key (base64) that no recorded process may carry in its argv or environment."""
        self.ceph_keys.add(key)

    def leaks(self) -> list[str]:
        """Where a registered passphrase or cephx key showed up; the secret itself is never printed."""
        found = []
        for spawn in self.spawns + self.ceph_spawns:
            for secret in self.passphrases | self.ceph_keys:
                if any(secret in word for word in spawn.argv):
                    found.append(
                        f"in argv of `{spawn.argv[0]} {spawn.argv[1] if len(spawn.argv) > 1 else ''}`"
                    )
                if any(secret in key or secret in value for key, value in spawn.env):
                    found.append(f"in the environment of `{spawn.argv[0]}`")
        return found


AUDIT = ArgvAudit()

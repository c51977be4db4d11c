"""Records every file system change the in-process plugin makes, from Python's own audit events.

The gRPC server runs its calls on worker threads named `csi_*` (server.py); events raised on those
threads are the plugin's, whatever else the test process does meanwhile. A write to a path is an
`open` for writing or creating, a mkdir, rename, unlink, rmdir, rmtree, link, symlink, chmod, chown,
utime or a temporary file or directory. Commands the plugin runs are recorded with their argv.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# Event name -> positions of its path arguments.
_PATH_EVENTS = {
    "os.mkdir": (0,),
    "os.rename": (0, 1),  # os.replace too
    "os.remove": (0,),  # os.unlink too
    "os.rmdir": (0,),
    "os.link": (0, 1),
    "os.symlink": (0, 1),
    "os.chmod": (0,),
    "os.chown": (0,),
    "os.utime": (0,),
    "os.truncate": (0,),
    "shutil.rmtree": (0,),
    "tempfile.mkdtemp": (0,),
    "tempfile.mkstemp": (0,),
}


def _absolute(path: str, event: str, dir_fds: list[int]) -> str:
    """The path, made absolute against the directory fd it is relative to (rmtree's unlinks), if any."""
    if os.path.isabs(path):
        return path
    if dir_fds and event.startswith("os."):
        try:
            return os.path.join(os.readlink(f"/proc/self/fd/{dir_fds[-1]}"), path)
        except OSError:
            pass
    return os.path.abspath(path)


def _is_plugin_thread() -> bool:
    return threading.current_thread().name.startswith("csi")


@dataclass
class FileAudit:
    writes: list[tuple[str, str]] = field(default_factory=list)  # (event, absolute path)
    commands: list[tuple[str, ...]] = field(default_factory=list)
    recording: bool = False
    _installed: bool = False

    def install(self) -> None:
        if not self._installed:
            sys.addaudithook(self._hook)
            self._installed = True

    def _hook(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.recording or not _is_plugin_thread():
            return
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & _WRITE_FLAGS
            )
            if writing and isinstance(path, str | bytes | os.PathLike):
                self.writes.append((event, os.path.abspath(os.fsdecode(path))))
        elif event in _PATH_EVENTS:
            # The last argument of these events is a dir_fd (None, or a directory the path is relative to).
            last = args[-1]
            dir_fds = [last] if isinstance(last, int) and not isinstance(last, bool) and last >= 0 else []
            for index in _PATH_EVENTS[event]:
                path = args[index] if index < len(args) else None
                if isinstance(path, str | bytes | os.PathLike):
                    self.writes.append((event, _absolute(os.fsdecode(path), event, dir_fds)))
        elif event == "subprocess.Popen":
            argv = args[1]
            self.commands.append(
                tuple(os.fsdecode(a) for a in (argv if isinstance(argv, list | tuple) else [argv]))
            )

    def outside(self, *allowed: Path) -> list[tuple[str, str]]:
        """The writes to paths under none of `allowed` (compared after resolving symlinks in the parents)."""
        roots = [os.path.realpath(a) for a in allowed]

        def inside(path: str) -> bool:
            try:
                real = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
            except ValueError:  # a NUL byte: no system call took it
                return True
            return any(real == root or real.startswith(root + os.sep) for root in roots)

        return [(event, path) for event, path in self.writes if not inside(path)]


FILE_AUDIT = FileAudit()

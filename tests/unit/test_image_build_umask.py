"""The image's root is built under docker build's umask, whatever the building process's is: an in-process
plugin narrows the process-wide umask while it binds its socket, and the build may run in another thread
meanwhile (the VM tier's handover). Seen: the image's /opt/csi-luks made 0600, its entrypoint unrunnable."""

from __future__ import annotations

import os
from pathlib import Path

from tests.support import image_rootfs


def test_build_steps_run_under_umask_022_whatever_the_process_umask(tmp_path: Path) -> None:
    made = tmp_path / "made"
    old = os.umask(0o177)
    try:
        image_rootfs._checked(["mkdir", str(made)])
    finally:
        os.umask(old)
    assert made.stat().st_mode & 0o777 == 0o755

"""Kernel RBD in the guest: map an image of the session's Ceph cluster as client.csi with a keyfile."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

from tests.support.ceph import CephCluster

MiB = 1024 * 1024
BLOCK = 4096


def _map(ceph: CephCluster, spec: str) -> str:
    device = ceph.run("rbd", "map", spec, *ceph.csi.args()).strip()
    subprocess.run(["udevadm", "settle", "--timeout=60"], check=True)
    return device


def _mapped(ceph: CephCluster) -> list[dict[str, Any]]:
    devices: list[dict[str, Any]] = json.loads(ceph.run("rbd", "device", "list", "--format", "json"))
    return devices


def _aligned(data: bytes) -> mmap.mmap:
    # O_DIRECT needs a page-aligned buffer; an anonymous mmap is one.
    buffer = mmap.mmap(-1, len(data))
    buffer.write(data)
    return buffer


def test_map_write_unmap_map_read(ceph: CephCluster) -> None:
    subprocess.run(["modprobe", "rbd"], check=True)
    name = f"krbd-{uuid.uuid4().hex[:8]}"
    spec = f"{ceph.pool}/{name}"
    ceph.run("rbd", "create", "--size", "16M", spec, *ceph.csi.args())
    marker = f"csi-luks krbd marker {name}".encode().ljust(BLOCK, b"\0")

    device = _map(ceph, spec)
    assert device.startswith("/dev/rbd")
    assert Path(f"/dev/rbd/{ceph.pool}/{name}").resolve() == Path(device)
    assert int(Path(f"/sys/block/{Path(device).name}/size").read_text()) * 512 == 16 * MiB
    [entry] = [d for d in _mapped(ceph) if d["name"] == name]
    assert (entry["pool"], entry["device"]) == (ceph.pool, device)

    fd = os.open(device, os.O_WRONLY | os.O_DIRECT)
    try:
        assert os.pwritev(fd, [_aligned(marker)], MiB) == BLOCK
    finally:
        os.close(fd)
    ceph.run("rbd", "unmap", device)
    subprocess.run(["udevadm", "settle", "--timeout=60"], check=True)
    assert [d for d in _mapped(ceph) if d["name"] == name] == []

    # The data went to the OSD, not a page cache: a fresh mapping reads it back, and so does librbd.
    device = _map(ceph, spec)
    try:
        fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
        try:
            buffer = mmap.mmap(-1, BLOCK)
            assert os.preadv(fd, [buffer], MiB) == BLOCK
            assert bytes(buffer) == marker
        finally:
            os.close(fd)
    finally:
        ceph.run("rbd", "unmap", device)
    exported = Path("/tmp") / f"{name}.raw"
    ceph.run("rbd", "export", spec, str(exported), *ceph.csi.args())
    with exported.open("rb") as f:
        f.seek(MiB)
        assert f.read(BLOCK) == marker
    exported.unlink()
    ceph.run("rbd", "rm", spec, *ceph.csi.args())

"""`csi-luks demo`: a full encrypted-volume lifecycle on this machine, each step timed.

It serves the plugin on a scratch socket, then formats, opens, fills, closes, inspects, reopens, grows
and tears down one encrypted volume on a sparse file attached as a loop device, proving on the way that
the backing file holds a LUKS2 header and no plaintext. Where this kernel has no device-mapper, the demo
runs itself inside a virtme-ng guest (Debian's kernel) and says so.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TextIO, TypeVar

import grpc

from csi_luks.csi import csi_pb2, csi_pb2_grpc
from csi_luks.luks import Cryptsetup, mapper_name
from csi_luks.server import PluginServer
from csi_luks.settings import Mode, Settings
from csi_luks.system import vm
from csi_luks.system.filesystem import Filesystems
from csi_luks.system.kernel import device_mapper_missing_reason
from csi_luks.system.loop import LoopDevices

MiB = 1024 * 1024
IN_GUEST_ENV = "CSI_LUKS_DEMO_IN_GUEST"
T = TypeVar("T")


class DemoFailed(Exception):
    pass


class Steps:
    """Prints each step with its duration; the first failure ends the demo."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.count = 0
        self.started = time.monotonic()

    @contextmanager
    def step(self, title: str) -> Iterator[Callable[[str], None]]:
        self.count += 1
        self.out.write(f"[{self.count:2d}] {title} ... ")
        self.out.flush()
        details: list[str] = []
        began = time.monotonic()
        try:
            yield details.append
        except Exception:
            self.out.write(f"FAILED after {time.monotonic() - began:.2f}s\n")
            raise
        self.out.write(f"ok ({time.monotonic() - began:.2f}s)\n")
        for line in details:
            self.out.write(f"       {line}\n")
        self.out.flush()


def check(condition: bool, message: str) -> None:
    if not condition:
        raise DemoFailed(message)


def run(out: TextIO = sys.stdout, size_mib: int = 64, log_level: str = "warning") -> int:
    reason = device_mapper_missing_reason()
    if reason is not None and os.environ.get(IN_GUEST_ENV) != "1":
        return _run_in_guest(reason, out, log_level)
    try:
        _lifecycle(Steps(out), size_mib)
    except Exception as exc:
        out.write(f"\ndemo failed: {exc}\n")
        return 1
    out.write("\ndemo passed: the volume's data was readable only through its key\n")
    return 0


def _run_in_guest(reason: str, out: TextIO, log_level: str) -> int:
    out.write(f"This kernel cannot run dm-crypt ({reason}).\n")
    out.write("Running the demo inside a virtme-ng VM with Debian's kernel (about 20 s to boot) ...\n\n")
    out.flush()
    workdir = Path(tempfile.mkdtemp(prefix="csi-luks-demo-"))

    def show(text: str) -> None:
        out.write(text)
        out.flush()

    try:
        result = vm.run_in_guest(
            f"{sys.executable} -m csi_luks.cli --log-level {log_level} demo",
            workdir,
            env={IN_GUEST_ENV: "1"},
            on_output=show,
        )
    except vm.GuestUnavailable as exc:
        out.write(f"demo failed: cannot boot the VM: {exc}\n")
        return 1
    if result.returncode != 0 and not result.log:
        out.write(f"the VM failed before the demo started; console:\n{result.console[-4000:]}\n")
    out.write(f"\n(VM exited {result.returncode} after {result.duration:.0f}s)\n")
    shutil.rmtree(workdir, ignore_errors=True)
    return result.returncode


def _lifecycle(steps: Steps, size_mib: int) -> None:
    cryptsetup, loops, filesystems = Cryptsetup(), LoopDevices(), Filesystems()
    with ExitStack() as cleanup:
        scratch = Path(tempfile.mkdtemp(prefix="csi-luks-demo-"))
        cleanup.callback(shutil.rmtree, scratch, ignore_errors=True)
        image, mountpoint = scratch / "volume.img", scratch / "mnt"
        marker = f"csi-luks demo marker {secrets.token_hex(8)}".encode()

        with steps.step("start the plugin and ask it over gRPC who it is") as note:
            server = PluginServer(Settings(endpoint=str(scratch / "csi.sock"), mode=Mode.ALL))
            server.start()
            cleanup.callback(server.stop, 5)
            with grpc.insecure_channel(f"unix://{scratch / 'csi.sock'}") as channel:
                identity = csi_pb2_grpc.IdentityStub(channel)
                info = identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
                ready = identity.Probe(csi_pb2.ProbeRequest()).ready.value
            check(ready, "the plugin is not ready (see its log above)")
            note(f"{info.name} {info.vendor_version}, ready={ready}")

        with steps.step(f"create a {size_mib} MiB sparse volume and attach it") as note:
            with image.open("wb") as f:
                f.truncate(size_mib * MiB)
            device = loops.attach(str(image))
            cleanup.callback(loops.detach, device)
            note(f"{image} on {device}")

        passphrase = secrets.token_urlsafe(32).encode()  # 256 random bits, like every volume's DEK
        name = mapper_name(f"demo-{secrets.token_hex(4)}")
        mapped = f"/dev/mapper/{name}"

        with steps.step("format it as LUKS2 (only because it is empty)") as note:
            found = filesystems.probe(device)
            check(found.empty, f"the device is not empty ({found}); refusing to format")
            cryptsetup.format(device, passphrase)
            note(f"blkid now says {filesystems.probe(device).type}")

        with steps.step("open it, make an ext4 filesystem, mount it"):
            cryptsetup.open(device, name, passphrase)
            cleanup.callback(cryptsetup.close, name)
            filesystems.mkfs(mapped, "ext4")
            filesystems.mount(mapped, str(mountpoint), "ext4")
            cleanup.callback(filesystems.unmount, str(mountpoint))

        with steps.step("write a marker file"):
            (mountpoint / "marker.txt").write_bytes(marker)
            os.sync()

        with steps.step("unmount and close the volume"):
            filesystems.unmount(str(mountpoint))
            cryptsetup.close(name)

        with steps.step("prove the backing file is LUKS2 and holds no plaintext") as note:
            header = cryptsetup.dump(str(image))
            check(header.version == 2, f"expected a LUKS2 header, found version {header.version}")
            data = image.read_bytes()
            check(marker not in data, "the marker is readable in the backing file!")
            check(b"marker.txt" not in data, "a file name is readable in the backing file!")
            note(f"LUKS{header.version} {header.cipher} {header.key_size_bits}-bit key; "
                 f"{len(data) // MiB} MiB scanned, marker not found")  # fmt: skip

        with steps.step("reopen, mount and read the marker back") as note:
            cryptsetup.open(device, name, passphrase)
            filesystems.mount(mapped, str(mountpoint), "ext4")
            read = (mountpoint / "marker.txt").read_bytes()
            check(read == marker, "the marker read back differs from what was written")
            note(f"read back: {read.decode()}")

        with steps.step(f"grow the volume to {2 * size_mib} MiB online (loop, dm-crypt, ext4)") as note:
            before = os.statvfs(mountpoint)
            with image.open("r+b") as f:
                f.truncate(2 * size_mib * MiB)
            loops.refresh_size(device)
            cryptsetup.resize(name)  # no passphrase: the key lives in dm-crypt, not the keyring
            filesystems.grow(mapped, str(mountpoint), "ext4")
            after = os.statvfs(mountpoint)
            check(after.f_blocks > before.f_blocks, "the filesystem did not grow")
            note(f"{_mib(before.f_blocks * before.f_frsize)} -> {_mib(after.f_blocks * after.f_frsize)}")

        with steps.step("report usage") as note:
            stats = os.statvfs(mountpoint)
            note(f"bytes: {(stats.f_blocks - stats.f_bfree) * stats.f_frsize} used of "
                 f"{_mib(stats.f_blocks * stats.f_frsize)}; inodes: {stats.f_files - stats.f_ffree} used "
                 f"of {stats.f_files}")  # fmt: skip

        with steps.step("unmount, close, detach, stop the plugin"):
            cleanup.close()


def _mib(n: int) -> str:
    return f"{n / MiB:.1f} MiB"

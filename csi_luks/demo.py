"""`csi-luks demo`: a full encrypted-volume lifecycle on this machine, each step timed.

It serves the plugin (controller and node, standalone backend, local KMS) on a scratch socket and drives
it over gRPC like a CO would: CreateVolume, NodeStage, NodePublish, write, unpublish, unstage, inspect
the backing file (LUKS2, no plaintext), stage again and read back, expand, stats, delete. Where this
kernel has no device-mapper, the demo runs itself inside a virtme-ng guest (Debian's kernel) and says so.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import TextIO

import grpc

from csi_luks.csi import csi_pb2, csi_pb2_grpc
from csi_luks.luks import Cryptsetup
from csi_luks.server import PluginServer
from csi_luks.settings import Mode, Settings
from csi_luks.system import vm
from csi_luks.system.kernel import device_mapper_missing_reason
from csi_luks.volumes.standalone import StandaloneBackend

MiB = 1024 * 1024
IN_GUEST_ENV = "CSI_LUKS_DEMO_IN_GUEST"


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
    cryptsetup = Cryptsetup()
    with ExitStack() as cleanup:
        scratch = Path(tempfile.mkdtemp(prefix="csi-luks-demo-"))
        cleanup.callback(shutil.rmtree, scratch, ignore_errors=True)
        state_dir, staging, target = scratch / "state", scratch / "staging", scratch / "target"
        kms_config = scratch / "kms-config.json"
        kms_config.write_text(
            json.dumps({"local-demo": {"encryptionKMSType": "local", "keyFile": str(scratch / "kek")}})
        )
        marker = f"csi-luks demo marker {secrets.token_hex(8)}".encode()
        capability = csi_pb2.VolumeCapability(
            mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4"),
            access_mode=csi_pb2.VolumeCapability.AccessMode(
                mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
            ),
        )

        with steps.step("start the plugin (controller + node, standalone backend, local KMS)") as note:
            settings = Settings(
                endpoint=str(scratch / "csi.sock"),
                mode=Mode.ALL,
                state_dir=str(state_dir),
                kms_config=str(kms_config),
            )
            server = PluginServer(settings)
            server.start()
            cleanup.callback(server.stop, 5)
            channel = grpc.insecure_channel(f"unix://{settings.socket_path}")
            cleanup.callback(channel.close)
            identity = csi_pb2_grpc.IdentityStub(channel)
            controller = csi_pb2_grpc.ControllerStub(channel)
            node = csi_pb2_grpc.NodeStub(channel)
            info = identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
            ready = identity.Probe(csi_pb2.ProbeRequest()).ready.value
            check(ready, "the plugin is not ready (see its log)")
            note(f"{info.name} {info.vendor_version} on {settings.socket_path}, ready={ready}")

        with steps.step(f"CreateVolume: {size_mib} MiB, encrypted, KMS local-demo") as note:
            volume = controller.CreateVolume(
                csi_pb2.CreateVolumeRequest(
                    name="pvc-demo",
                    capacity_range=csi_pb2.CapacityRange(required_bytes=size_mib * MiB),
                    volume_capabilities=[capability],
                    parameters={"encrypted": "true", "encryptionKMSID": "local-demo"},
                )
            ).volume
            volume_id = volume.volume_id
            image = StandaloneBackend(state_dir).image_path(volume_id)
            note(f"{volume_id}: {volume.capacity_bytes // MiB} MiB; DEK wrapped by the local KEK")

        def stage_and_publish() -> None:
            node.NodeStageVolume(
                csi_pb2.NodeStageVolumeRequest(
                    volume_id=volume_id, staging_target_path=str(staging), volume_capability=capability
                )
            )
            node.NodePublishVolume(
                csi_pb2.NodePublishVolumeRequest(
                    volume_id=volume_id,
                    staging_target_path=str(staging),
                    target_path=str(target),
                    volume_capability=capability,
                )
            )

        def unpublish_and_unstage() -> None:
            node.NodeUnpublishVolume(
                csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(target))
            )
            node.NodeUnstageVolume(
                csi_pb2.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=str(staging))
            )

        with steps.step("NodeStage (attach, LUKS format once, open, mkfs.ext4, mount) + NodePublish") as note:
            stage_and_publish()
            cleanup.callback(_quietly, unpublish_and_unstage)
            note(f"the empty device was formatted: {cryptsetup.dump(str(image)).cipher} under ext4")

        with steps.step("write a marker file through the published path"):
            (target / "marker.txt").write_bytes(marker)
            os.sync()

        with steps.step("NodeUnpublish + NodeUnstage (unmount, luksClose, detach)"):
            unpublish_and_unstage()

        with steps.step("prove the backing file is LUKS2 and holds no plaintext") as note:
            header = cryptsetup.dump(str(image))
            check(header.version == 2, f"expected a LUKS2 header, found version {header.version}")
            data = image.read_bytes()
            check(marker not in data, "the marker is readable in the backing file!")
            check(b"marker.txt" not in data, "a file name is readable in the backing file!")
            note(f"LUKS{header.version} {header.cipher} {header.key_size_bits}-bit key; "
                 f"{len(data) // MiB} MiB scanned, marker not found")  # fmt: skip

        with steps.step("stage and publish again (no format: the header is there), read the marker") as note:
            stage_and_publish()
            read = (target / "marker.txt").read_bytes()
            check(read == marker, "the marker read back differs from what was written")
            note(f"read back: {read.decode()}")

        with steps.step(f"ControllerExpand + NodeExpand online to {2 * size_mib} MiB") as note:
            before = os.statvfs(target)
            expanded = controller.ControllerExpandVolume(
                csi_pb2.ControllerExpandVolumeRequest(
                    volume_id=volume_id,
                    capacity_range=csi_pb2.CapacityRange(required_bytes=2 * size_mib * MiB),
                )
            )
            check(expanded.node_expansion_required, "the controller did not ask for node expansion")
            node.NodeExpandVolume(
                csi_pb2.NodeExpandVolumeRequest(
                    volume_id=volume_id, volume_path=str(target), staging_target_path=str(staging)
                )
            )
            after = os.statvfs(target)
            check(after.f_blocks > before.f_blocks, "the filesystem did not grow")
            note(f"{_mib(before.f_blocks * before.f_frsize)} -> {_mib(after.f_blocks * after.f_frsize)}")

        with steps.step("NodeGetVolumeStats") as note:
            stats = node.NodeGetVolumeStats(
                csi_pb2.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=str(target))
            )
            check(not stats.volume_condition.abnormal, f"volume abnormal: {stats.volume_condition.message}")
            for usage in stats.usage:
                unit = csi_pb2.VolumeUsage.Unit.Name(usage.unit).lower()
                note(f"{unit}: {usage.used} used of {usage.total}")

        with steps.step("unpublish, unstage, DeleteVolume (the DEK goes with it)") as note:
            unpublish_and_unstage()
            controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id))
            check(not image.exists(), "the backing file is still there")
            note("nothing left behind")

        with steps.step("stop the plugin"):
            cleanup.close()


def _quietly(action: Callable[[], None]) -> None:
    """Best-effort cleanup after a failed step: the failure is what the user needs to see."""
    with suppress(grpc.RpcError):
        action()


def _mib(n: int) -> str:
    return f"{n / MiB:.1f} MiB"

"""An in-process plugin on a unix socket with gRPC stubs, for service tests on the host and in the VM."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from csi_luks.csi import csi_pb2, csi_pb2_grpc
from csi_luks.server import PluginServer
from csi_luks.settings import Mode, Settings
from csi_luks.volumes.standalone import StandaloneBackend

MiB = 1024 * 1024
Mode_ = csi_pb2.VolumeCapability.AccessMode.Mode


def mount_capability(fs_type: str = "ext4", mode: int = Mode_.SINGLE_NODE_WRITER) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type),
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode),  # type: ignore[arg-type]
    )


def block_capability() -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        block=csi_pb2.VolumeCapability.BlockVolume(),
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=Mode_.SINGLE_NODE_WRITER),
    )


@dataclass
class RunningPlugin:
    server: PluginServer
    channel: grpc.Channel
    state_dir: Path
    kms_config: Path

    @property
    def controller(self) -> csi_pb2_grpc.ControllerStub:
        return csi_pb2_grpc.ControllerStub(self.channel)

    @property
    def node(self) -> csi_pb2_grpc.NodeStub:
        return csi_pb2_grpc.NodeStub(self.channel)

    @property
    def identity(self) -> csi_pb2_grpc.IdentityStub:
        return csi_pb2_grpc.IdentityStub(self.channel)

    @property
    def backend(self) -> StandaloneBackend:
        return StandaloneBackend(self.state_dir)

    def create(
        self,
        name: str,
        size: int = 64 * MiB,
        parameters: dict[str, str] | None = None,
        capability: csi_pb2.VolumeCapability | None = None,
    ) -> csi_pb2.Volume:
        response = self.controller.CreateVolume(
            csi_pb2.CreateVolumeRequest(
                name=name,
                capacity_range=csi_pb2.CapacityRange(required_bytes=size),
                volume_capabilities=[capability or mount_capability()],
                parameters={"encrypted": "true", "encryptionKMSID": "local-1"}
                if parameters is None
                else parameters,
            )
        )
        volume: csi_pb2.Volume = response.volume
        return volume


def kms_entries(root: Path) -> dict[str, dict[str, str]]:
    return {
        "local-1": {"encryptionKMSType": "local", "keyFile": str(root / "kek-1")},
        "local-2": {"encryptionKMSType": "local", "keyFile": str(root / "kek-2")},
    }


@contextmanager
def running_plugin(
    root: Path, mode: Mode = Mode.ALL, state_dir: Path | None = None, kms_config_map: str | None = None
) -> Iterator[RunningPlugin]:
    """Serve the plugin from root (socket, state dir, KMS config); stop it afterwards.

    With kms_config_map ("namespace/name") no KMS configuration file is written: the plugin reads the
    ConfigMap instead.
    """
    root.mkdir(parents=True, exist_ok=True)
    kms_config = root / "kms-config.json"
    if not kms_config.exists() and kms_config_map is None:
        kms_config.write_text(json.dumps(kms_entries(root)))
    state = state_dir or root / "state"
    settings = Settings(
        endpoint=str(root / "csi.sock"),
        mode=mode,
        state_dir=str(state),
        kms_config=str(kms_config),
        kms_config_map=kms_config_map,
        node_id="test-node",
        grace_period=5,
    )
    server = PluginServer(settings)
    server.start()
    channel = grpc.insecure_channel(f"unix://{settings.socket_path}")
    try:
        yield RunningPlugin(server, channel, state, kms_config)
    finally:
        channel.close()
        server.stop(5)

"""An in-process plugin on a unix socket with gRPC stubs, for service tests on the host and in the VM."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from csi_luks.csi import csi_pb2, csi_pb2_grpc
from csi_luks.server import PluginServer
from csi_luks.settings import DEFAULT_CEPH_CONFIG, Backend, Mode, Settings
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
        secrets: dict[str, str] | None = None,
    ) -> csi_pb2.Volume:
        response = self.controller.CreateVolume(
            csi_pb2.CreateVolumeRequest(
                name=name,
                capacity_range=csi_pb2.CapacityRange(required_bytes=size),
                volume_capabilities=[capability or mount_capability()],
                parameters={"encrypted": "true", "encryptionKMSID": "local-1"}
                if parameters is None
                else parameters,
                secrets=secrets or {},
            )
        )
        volume: csi_pb2.Volume = response.volume
        return volume

    def controller_capabilities(self) -> set[int]:
        """The RPC types ControllerGetCapabilities advertises."""
        response = self.controller.ControllerGetCapabilities(csi_pb2.ControllerGetCapabilitiesRequest())
        return {c.rpc.type for c in response.capabilities}

    def snapshot(
        self, name: str, source_volume_id: str, secrets: dict[str, str] | None = None
    ) -> csi_pb2.Snapshot:
        response = self.controller.CreateSnapshot(
            csi_pb2.CreateSnapshotRequest(name=name, source_volume_id=source_volume_id, secrets=secrets or {})
        )
        snapshot: csi_pb2.Snapshot = response.snapshot
        return snapshot

    def copy(
        self,
        name: str,
        size: int | None,
        parameters: dict[str, str],
        snapshot_id: str | None = None,
        volume_id: str | None = None,
        secrets: dict[str, str] | None = None,
        capability: csi_pb2.VolumeCapability | None = None,
    ) -> csi_pb2.Volume:
        """CreateVolume from a snapshot or a volume; size None leaves the capacity range out."""
        source = (
            csi_pb2.VolumeContentSource(
                snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snapshot_id)
            )
            if snapshot_id is not None
            else csi_pb2.VolumeContentSource(
                volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=volume_id)
            )
        )
        request = csi_pb2.CreateVolumeRequest(
            name=name,
            volume_capabilities=[capability or mount_capability()],
            parameters=parameters,
            volume_content_source=source,
            secrets=secrets or {},
        )
        if size is not None:
            request.capacity_range.required_bytes = size
        volume: csi_pb2.Volume = self.controller.CreateVolume(request).volume
        return volume


def stage_and_publish(
    node: csi_pb2_grpc.NodeStub,
    volume_id: str,
    staging: str,
    target: str,
    capability: csi_pb2.VolumeCapability,
    readonly: bool = False,
) -> None:
    """What the kubelet asks for a pod's volume: NodeStage, then NodePublish of the staged volume."""
    node.NodeStageVolume(
        csi_pb2.NodeStageVolumeRequest(
            volume_id=volume_id, staging_target_path=staging, volume_capability=capability
        )
    )
    node.NodePublishVolume(
        csi_pb2.NodePublishVolumeRequest(
            volume_id=volume_id,
            staging_target_path=staging,
            target_path=target,
            volume_capability=capability,
            readonly=readonly,
        )
    )


def unpublish_and_unstage(node: csi_pb2_grpc.NodeStub, volume_id: str, staging: str, target: str) -> None:
    node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target))
    node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=staging))


def code_of(call: object, *args: object, **kwargs: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)  # type: ignore[operator]
    return info.value.code()


def details_of(call: object, *args: object, **kwargs: object) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)  # type: ignore[operator]
    return info.value.details()  # type: ignore[no-any-return]


def kms_entries(root: Path) -> dict[str, dict[str, str]]:
    return {
        "local-1": {"encryptionKMSType": "local", "keyFile": str(root / "kek-1")},
        "local-2": {"encryptionKMSType": "local", "keyFile": str(root / "kek-2")},
    }


@contextmanager
def running_plugin(
    root: Path,
    mode: Mode = Mode.ALL,
    state_dir: Path | None = None,
    kms_config_map: str | None = None,
    ceph_config: Path | None = None,
    metrics_address: str | None = None,
    ceph_secrets: Path | None = None,
) -> Iterator[RunningPlugin]:
    """Serve the plugin from root (socket, state dir, KMS config); stop it afterwards.

    With kms_config_map ("namespace/name") no KMS configuration file is written: the plugin reads the
    ConfigMap instead. With ceph_config (a ceph-csi cluster list) volumes are RBD images. With
    metrics_address ("host:port") it serves its Prometheus metrics there. ceph_secrets: the RBD controller's
    own cephx user (--ceph-secrets), for the owed flattens it resumes at start-up.
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
        backend=Backend.RBD if ceph_config is not None else Backend.STANDALONE,
        ceph_config=str(ceph_config or DEFAULT_CEPH_CONFIG),
        ceph_secrets=None if ceph_secrets is None else str(ceph_secrets),
        node_id="test-node",
        grace_period=5,
        metrics_address=metrics_address,
    )
    server = PluginServer(settings)
    server.start()
    channel = grpc.insecure_channel(f"unix://{settings.socket_path}")
    try:
        yield RunningPlugin(server, channel, state, kms_config)
    finally:
        channel.close()
        server.stop(5)

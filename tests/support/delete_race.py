"""DeleteVolume against NodeStageVolume of the same volume (issue 19, item 3), shared by the host tier
(standalone on loop devices, where a stage can only get as far as its attach: no device-mapper) and the
VM tier (both backends, real stages).

The interleavings are made deterministic by holding a call of the in-process plugin at one of its crash
points (`Pauses`): the delete after its in-use check (before it shreds the DEK), or the stage after its
attach and its look at the intent.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from csi_luks import crash
from csi_luks.csi import csi_pb2
from csi_luks.encryption import volume_encryption
from csi_luks.kms.base import KMSContext
from csi_luks.kms.config import KMSConfig
from csi_luks.services import node
from csi_luks.settings import Mode
from csi_luks.volume_metadata import DELETING
from csi_luks.volumes.base import VolumeBackend, VolumeNotFound
from tests.support.plugin import MiB, RunningPlugin, kms_entries, mount_capability, running_plugin

WAIT = 600.0  # seconds a paused call may take to reach its point (rbd calls take seconds in the guest)
AFTER_DELETE_CHECK = "delete.before-remove-dek"  # the delete has decided: nobody uses the volume
AFTER_STAGE_CHECK = "node-stage.after-attach"  # the stage has attached (and looked for the intent)


class Pauses:
    """Holds the plugin's threads at chosen crash points (the plugin runs in this process)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reached: dict[str, threading.Event] = {}
        self.go: dict[str, threading.Event] = {}
        monkeypatch.setattr(crash, "_CRASH_POINT", "pause")  # Step calls crash_point only when set
        monkeypatch.setattr(crash, "crash_point", self._point)
        monkeypatch.setattr(node, "crash_point", self._point)

    def hold(self, point: str) -> None:
        self.reached[point] = threading.Event()
        self.go[point] = threading.Event()

    def _point(self, name: str) -> None:
        if name in self.go:
            self.reached[name].set()
            assert self.go[name].wait(WAIT), f"nobody released {name}"

    def release(self, point: str) -> None:
        self.go[point].set()


@contextmanager
def two_plugins(root: Path, ceph_config: Path | None = None) -> Iterator[tuple[RunningPlugin, RunningPlugin]]:
    """A controller and a node plugin, as deployed (each its own locks), on one state directory and KEK."""
    node_root = root / "node"
    node_root.mkdir(parents=True)
    (node_root / "kms-config.json").write_text(json.dumps(kms_entries(root)))
    with (
        running_plugin(root, Mode.CONTROLLER, ceph_config=ceph_config) as controller,
        running_plugin(node_root, Mode.NODE, state_dir=root / "state", ceph_config=ceph_config) as node,
    ):
        yield controller, node


@dataclass
class Race:
    """A controller and a node plugin, and what a case needs to make, stage and inspect volumes."""

    plugin: RunningPlugin  # the controller
    node: RunningPlugin
    backend: VolumeBackend  # with the request's credentials, made with one_request=False: reads afresh
    staging: Path
    parameters: dict[str, str]
    secrets: dict[str, str] = field(default_factory=dict)
    stages: bool = True  # a stage can succeed here (device-mapper); on the host it fails after its attach
    attached: Callable[[str], bool] = lambda volume_id: False  # anything of the volume on this node

    def create(self, name: str) -> str:
        volume = self.plugin.create(name, 64 * MiB, self.parameters, secrets=self.secrets)
        return str(volume.volume_id)

    def stage(self, volume_id: str) -> None:
        self.node.node.NodeStageVolume(
            csi_pb2.NodeStageVolumeRequest(
                volume_id=volume_id, staging_target_path=str(self.staging),
                volume_capability=mount_capability(), secrets=self.secrets,
            )
        )  # fmt: skip

    def unstage(self, volume_id: str) -> None:
        self.node.node.NodeUnstageVolume(
            csi_pb2.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=str(self.staging))
        )

    def delete(self, volume_id: str) -> None:
        self.plugin.controller.DeleteVolume(
            csi_pb2.DeleteVolumeRequest(volume_id=volume_id, secrets=self.secrets)
        )

    def dek(self, volume_id: str) -> str:
        """The volume's DEK, unwrapped by its KMS (fails if it was shredded)."""
        config = KMSConfig.from_file(str(self.plugin.kms_config))
        context = KMSContext(secrets=self.secrets, pvc_namespace=None)
        kms_id = self.parameters["encryptionKMSID"]
        return volume_encryption(config, kms_id, context, self.backend).get_passphrase(volume_id)

    def metadata(self, volume_id: str) -> dict[str, str]:
        return dict(self.backend.get(volume_id).metadata)  # the backend is not one request's: no cache

    def gone(self, volume_id: str) -> bool:
        try:
            self.backend.get(volume_id)
        except VolumeNotFound:
            return True
        return False


@contextmanager
def _in_thread(call: Callable[[], object]) -> Iterator[Future[object]]:
    with ThreadPoolExecutor(1) as pool:
        yield pool.submit(call)


def _code(future: Future[object]) -> tuple[grpc.StatusCode, str]:
    exc = future.exception(WAIT)
    if exc is None:
        return grpc.StatusCode.OK, ""
    assert isinstance(exc, grpc.RpcError), exc
    return exc.code(), exc.details()


def a_recorded_intent_refuses_the_stage(race: Race, name: str) -> None:
    """A DeleteVolume that recorded its intent and died (the crash harness kills one there): a stage is
    refused and leaves nothing attached; the retried delete finishes."""
    volume_id = race.create(name)
    race.backend.set_metadata(volume_id, DELETING, "2026-01-01T00:00:00+00:00")
    with pytest.raises(grpc.RpcError) as info:
        race.stage(volume_id)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value.details()
    assert "is being deleted" in info.value.details() and "retries DeleteVolume" in info.value.details()
    assert not race.attached(volume_id)
    race.dek(volume_id)  # nothing shredded by the refusal
    race.delete(volume_id)
    assert race.gone(volume_id)


def a_stage_after_the_delete_decided_is_refused(race: Race, pauses: Pauses, name: str) -> None:
    """The delete has recorded its intent and found no user; a stage attaches before it shreds. The
    stage sees the intent, detaches and refuses; the delete completes. (Before: the stage went on, the
    delete shredded the DEK, then found the attachment and refused, leaving a volume without a DEK.)"""
    volume_id = race.create(name)
    pauses.hold(AFTER_DELETE_CHECK)
    pauses.hold(AFTER_STAGE_CHECK)
    with _in_thread(lambda: race.delete(volume_id)) as deleting:
        assert pauses.reached[AFTER_DELETE_CHECK].wait(WAIT)
        with _in_thread(lambda: race.stage(volume_id)) as staging:
            # The stage either ends (refused) or is held after its attach.
            while not (staging.done() or pauses.reached[AFTER_STAGE_CHECK].wait(0.1)):
                pass
            pauses.release(AFTER_DELETE_CHECK)
            deleted = _code(deleting)
            pauses.release(AFTER_STAGE_CHECK)
            staged = _code(staging)
    assert deleted == (grpc.StatusCode.OK, ""), deleted
    assert staged[0] == grpc.StatusCode.FAILED_PRECONDITION and "is being deleted" in staged[1], staged
    assert not race.attached(volume_id)
    assert race.gone(volume_id)


def a_delete_during_a_stage_is_refused(race: Race, pauses: Pauses, name: str) -> None:
    """A stage has attached and looked for the intent (none); a delete comes: it sees the attachment,
    takes its intent back and refuses, with the DEK intact; the stage goes on (and succeeds where a
    stage can), and the volume is deleted once unstaged."""
    volume_id = race.create(name)
    dek = race.dek(volume_id)
    pauses.hold(AFTER_STAGE_CHECK)
    with _in_thread(lambda: race.stage(volume_id)) as staging:
        assert pauses.reached[AFTER_STAGE_CHECK].wait(WAIT)
        with pytest.raises(grpc.RpcError) as info:
            race.delete(volume_id)
        pauses.release(AFTER_STAGE_CHECK)
        staged = _code(staging)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value.details()
    assert "is in use" in info.value.details() and "nothing was deleted" in info.value.details()
    assert race.dek(volume_id) == dek
    assert DELETING not in race.metadata(volume_id)
    if race.stages:
        assert staged == (grpc.StatusCode.OK, ""), staged
        # In use until unstaged: refused again, DEK kept.
        with pytest.raises(grpc.RpcError) as again:
            race.delete(volume_id)
        assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert race.dek(volume_id) == dek and DELETING not in race.metadata(volume_id)
        race.unstage(volume_id)
    else:
        assert staged[0] != grpc.StatusCode.OK, staged  # no device-mapper: it fails after its attach
    assert not race.attached(volume_id)
    race.delete(volume_id)
    assert race.gone(volume_id)

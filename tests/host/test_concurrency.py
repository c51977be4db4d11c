"""Identical calls at once (issue 13 §3): one effect, every other call ABORTED or given the same answer.

Through the real gRPC server (16 workers), released together by a barrier, with an encrypted `local`
KMS class and the `vault` KMS on the session's OpenBao. "One effect" is counted where it happens: the
volume directories under the state dir, the DEKs the plugin generates (VolumeEncryption.new_passphrase
and copy_to, counted in this process, which is the server's), and the KV versions in OpenBao.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import hvac
import pytest
from google.protobuf.message import Message

from csi_luks.csi import csi_pb2
from csi_luks.encryption import VolumeEncryption
from csi_luks.settings import Mode
from csi_luks.system.loop import LoopDevices
from tests.support.openbao import OpenBao
from tests.support.operations import vault_login
from tests.support.plugin import MiB, RunningPlugin, mount_capability, running_plugin

CALLS = 10
LOCAL = {"encrypted": "true", "encryptionKMSID": "local-1"}
VAULT = {"encrypted": "true", "encryptionKMSID": "vault-kv"}
Outcome = tuple[grpc.StatusCode, bytes]  # the code, and the serialized answer when OK


@pytest.fixture
def dek_events(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """How many DEKs the in-process plugin generated or copied, per volume id."""
    events: Counter[str] = Counter()
    new, copy = VolumeEncryption.new_passphrase, VolumeEncryption.copy_to

    def counted_new(self: VolumeEncryption, volume_id: str) -> None:
        events[volume_id] += 1
        new(self, volume_id)

    def counted_copy(
        self: VolumeEncryption, volume_id: str, target: VolumeEncryption, target_id: str
    ) -> None:
        events[target_id] += 1
        copy(self, volume_id, target, target_id)

    monkeypatch.setattr(VolumeEncryption, "new_passphrase", counted_new)
    monkeypatch.setattr(VolumeEncryption, "copy_to", counted_copy)
    return events


@pytest.fixture
def prefix() -> str:
    return f"concurrency-{uuid.uuid4().hex[:8]}/"


@pytest.fixture
def plugin(tmp_path: Path, session_bao: OpenBao, prefix: str) -> Iterator[RunningPlugin]:
    root = tmp_path / "plugin"
    root.mkdir()
    entries = {
        "local-1": {"encryptionKMSType": "local", "keyFile": str(root / "kek-1")},
        "vault-kv": {
            "encryptionKMSType": "vault", "vaultPassphrasePath": prefix,
            **vault_login(root, session_bao.address, "5"),
        },
    }  # fmt: skip
    (root / "kms-config.json").write_text(json.dumps(entries))
    with running_plugin(root, mode=Mode.ALL) as running:
        yield running


def at_once(call: Callable[[Message], Message], request: Message, calls: int = CALLS) -> list[Outcome]:
    """The same request `calls` times, released together; each call's code and answer."""
    barrier = threading.Barrier(calls)

    def one(_: int) -> Outcome:
        barrier.wait()
        try:
            return grpc.StatusCode.OK, call(request).SerializeToString(deterministic=True)
        except grpc.RpcError as exc:
            return exc.code(), b""

    with ThreadPoolExecutor(calls) as pool:
        return list(pool.map(one, range(calls)))


def assert_one_answer(outcomes: list[Outcome], *also: grpc.StatusCode) -> None:
    """At least one OK, every OK the same answer, and anything else ABORTED (or one of `also`)."""
    codes = Counter(code for code, _ in outcomes)
    assert codes[grpc.StatusCode.OK] >= 1, codes
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.ABORTED, *also}, codes
    assert len({answer for code, answer in outcomes if code == grpc.StatusCode.OK}) == 1


def volume_dirs(plugin: RunningPlugin) -> list[str]:
    """Everything under volumes/, stray temporary files and trash included."""
    volumes = plugin.state_dir / "volumes"
    return sorted(p.name for p in volumes.iterdir()) if volumes.exists() else []


def stray_files(plugin: RunningPlugin) -> list[str]:
    """Temporary files a finished call must not leave (.meta.json.*, .volume.img.*, .header.backup.*)."""
    return sorted(
        str(p.relative_to(plugin.state_dir))
        for p in (plugin.state_dir / "volumes").rglob(".*")
        if p.name != ".lock"
    )


def kv_versions(bao: OpenBao, path: str) -> int | None:
    """How many versions of the KV v2 secret exist; None when there is none."""
    try:
        meta = bao.client().secrets.kv.v2.read_secret_metadata(path=path, mount_point="secret")
    except hvac.exceptions.InvalidPath:
        return None
    return len(meta["data"]["versions"])


def kv_list(bao: OpenBao, prefix: str) -> list[str]:
    try:
        listed = bao.client().secrets.kv.v2.list_secrets(path=prefix, mount_point="secret")
    except hvac.exceptions.InvalidPath:
        return []
    return sorted(listed["data"]["keys"])


def create_request(
    name: str, parameters: dict[str, str], size: int = 16 * MiB
) -> csi_pb2.CreateVolumeRequest:
    return csi_pb2.CreateVolumeRequest(
        name=name,
        capacity_range=csi_pb2.CapacityRange(required_bytes=size),
        volume_capabilities=[mount_capability()],
        parameters=parameters,
    )


@pytest.mark.parametrize("parameters", [LOCAL, VAULT], ids=["local", "vault"])
def test_identical_controller_calls_have_one_effect(
    plugin: RunningPlugin,
    session_bao: OpenBao,
    prefix: str,
    dek_events: Counter[str],
    parameters: dict[str, str],
) -> None:
    controller = plugin.controller
    # CreateVolume: one directory, one DEK generated (and in Vault: one version of one secret).
    outcomes = at_once(controller.CreateVolume, create_request("pvc-race", parameters))
    assert_one_answer(outcomes)
    volume_id = csi_pb2.CreateVolumeResponse.FromString(
        next(answer for code, answer in outcomes if code == grpc.StatusCode.OK)
    ).volume.volume_id
    assert volume_dirs(plugin) == [volume_id] and stray_files(plugin) == []
    assert dek_events == {volume_id: 1}
    if parameters is VAULT:
        assert kv_list(session_bao, prefix) == [volume_id]
        assert kv_versions(session_bao, prefix + volume_id) == 1
    else:
        assert "csi-luks/dek" in plugin.backend.get(volume_id).metadata

    # ControllerExpandVolume: the same size for all; the image grown once to it.
    expand = csi_pb2.ControllerExpandVolumeRequest(
        volume_id=volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=48 * MiB)
    )
    assert_one_answer(at_once(controller.ControllerExpandVolume, expand))
    assert plugin.backend.get(volume_id).metadata["csi-luks/capacity"] == str(48 * MiB)

    # CreateSnapshot: one snapshot, with one copy of the DEK.
    snapshot_request = csi_pb2.CreateSnapshotRequest(name="snap-race", source_volume_id=volume_id)
    outcomes = at_once(controller.CreateSnapshot, snapshot_request)
    assert_one_answer(outcomes)
    snapshot_id = csi_pb2.CreateSnapshotResponse.FromString(
        next(answer for code, answer in outcomes if code == grpc.StatusCode.OK)
    ).snapshot.snapshot_id
    assert volume_dirs(plugin) == sorted([volume_id, snapshot_id]) and stray_files(plugin) == []
    assert dek_events == {volume_id: 1, snapshot_id: 1}
    if parameters is VAULT:
        assert kv_versions(session_bao, prefix + snapshot_id) == 1

    # DeleteSnapshot and DeleteVolume: gone, with their DEKs, and every call OK or ABORTED.
    delete_snapshot = csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot_id)
    assert_one_answer(at_once(controller.DeleteSnapshot, delete_snapshot))
    assert_one_answer(at_once(controller.DeleteVolume, csi_pb2.DeleteVolumeRequest(volume_id=volume_id)))
    assert volume_dirs(plugin) == []
    assert kv_list(session_bao, prefix) == []


@pytest.mark.parametrize("parameters", [LOCAL, VAULT], ids=["local", "vault"])
def test_sixteen_different_volumes_at_once_all_succeed(
    plugin: RunningPlugin,
    session_bao: OpenBao,
    prefix: str,
    dek_events: Counter[str],
    parameters: dict[str, str],
) -> None:
    count = 16
    barrier = threading.Barrier(count)

    def create(index: int) -> str:
        barrier.wait()
        volume_id: str = plugin.controller.CreateVolume(
            create_request(f"pvc-many-{index}", parameters)
        ).volume.volume_id
        return volume_id

    with ThreadPoolExecutor(count) as pool:
        ids = sorted(pool.map(create, range(count)))
    assert len(set(ids)) == count and volume_dirs(plugin) == ids and stray_files(plugin) == []
    assert dek_events == dict.fromkeys(ids, 1)
    if parameters is VAULT:
        assert kv_list(session_bao, prefix) == ids
        assert all(kv_versions(session_bao, prefix + volume_id) == 1 for volume_id in ids)
        deks = {
            session_bao.client().secrets.kv.v2.read_secret_version(
                path=prefix + volume_id, mount_point="secret", raise_on_deleted_version=True
            )["data"]["data"]["passphrase"]
            for volume_id in ids
        }
    else:
        deks = {plugin.backend.get(volume_id).metadata["csi-luks/dek"] for volume_id in ids}
    assert len(deks) == count  # sixteen different keys

    def delete(volume_id: str) -> None:
        barrier.wait()
        plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id))

    with ThreadPoolExecutor(count) as pool:
        list(pool.map(delete, ids))
    assert volume_dirs(plugin) == [] and kv_list(session_bao, prefix) == []


def test_identical_node_calls_that_fail_before_dm_crypt_leave_nothing(
    plugin: RunningPlugin, tmp_path: Path
) -> None:
    """What the host can run of the node: NodeStage gets as far as attaching (a loop device) and NodeExpand
    as far as asking device-mapper, and fail there; NodeUnstage finds nothing staged; NodeUnpublish
    removes a target; NodeGetVolumeStats only reads."""
    volume = plugin.create("pvc-node-race", 16 * MiB, LOCAL)
    before = plugin.backend.get(volume.volume_id).metadata
    image = str(plugin.backend.image_path(volume.volume_id))
    stage = csi_pb2.NodeStageVolumeRequest(
        volume_id=volume.volume_id, staging_target_path=str(tmp_path / "staging"),
        volume_capability=mount_capability(),
    )  # fmt: skip
    unstage = csi_pb2.NodeUnstageVolumeRequest(
        volume_id=volume.volume_id, staging_target_path=str(tmp_path / "staging")
    )
    expand = csi_pb2.NodeExpandVolumeRequest(volume_id=volume.volume_id, volume_path=str(tmp_path))
    refused = {grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ABORTED}
    for call, request, allowed in (
        (plugin.node.NodeStageVolume, stage, refused),
        # Nothing can be staged without device-mapper, so an unstage finds nothing to undo: OK (the CO's
        # cleanup of a volume it never staged must succeed), or ABORTED while another is in flight.
        (plugin.node.NodeUnstageVolume, unstage, {grpc.StatusCode.OK, grpc.StatusCode.ABORTED}),
        (plugin.node.NodeExpandVolume, expand, refused),
    ):
        outcomes = at_once(call, request)
        codes = {code for code, _ in outcomes}
        assert codes <= allowed, codes
    assert LoopDevices().find(image) is None  # every attach was undone
    assert plugin.backend.get(volume.volume_id).metadata == before  # the state machine did not move

    target = tmp_path / "target"
    target.mkdir()
    unpublish = csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume.volume_id, target_path=str(target))
    assert_one_answer(at_once(plugin.node.NodeUnpublishVolume, unpublish))
    assert not target.exists()

    stats = csi_pb2.NodeGetVolumeStatsRequest(volume_id=volume.volume_id, volume_path=str(tmp_path))
    codes = {code for code, _ in at_once(plugin.node.NodeGetVolumeStats, stats)}
    assert codes == {grpc.StatusCode.FAILED_PRECONDITION}  # the same answer for all: no device-mapper

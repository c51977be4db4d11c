"""StorageClass LUKS parameters at the controller (host, standalone backend, over gRPC): checked at
CreateVolume, recorded in the volume's metadata and reported in its volume context; copies keep their
source's; ControllerReclaimSpace on the standalone backend has nothing to do and says what it measured."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_luks.csiaddons import reclaimspace_pb2 as reclaim_pb
from csi_luks.csiaddons import reclaimspace_pb2_grpc as reclaim_grpc
from csi_luks.settings import Mode
from csi_luks.volume_metadata import VolumeRecord
from tests.support.plugin import MiB, RunningPlugin, code_of, details_of, running_plugin

CLASS = {
    "encrypted": "true", "encryptionKMSID": "local-1",
    "encryptionCipher": "aes-cbc-essiv:sha256", "encryptionKeySize": "128", "encryptionSectorSize": "4096",
    "encryptionDiscard": "true", "encryptionPerfFlags": "no_write_workqueue,no_read_workqueue",
}  # fmt: skip
LUKS_CONTEXT = {
    "encryptionCipher": "aes-cbc-essiv:sha256", "encryptionKeySize": "128", "encryptionSectorSize": "4096",
    "encryptionDiscard": "true", "encryptionPerfFlags": "no_read_workqueue,no_write_workqueue",
}  # fmt: skip


@pytest.fixture
def plugin(tmp_path: Path) -> Iterator[RunningPlugin]:
    with running_plugin(tmp_path, mode=Mode.CONTROLLER) as running:
        yield running


def test_class_parameters_are_recorded_and_reported(plugin: RunningPlugin) -> None:
    volume = plugin.create("pvc-luks", 64 * MiB, CLASS)
    assert dict(volume.volume_context) == {"encrypted": "true", "encryptionKMSID": "local-1", **LUKS_CONTEXT}
    luks = VolumeRecord.parse(plugin.backend.get(volume.volume_id).metadata).luks
    options = luks.format_options(None)
    assert (options.cipher, options.key_size, options.sector_size) == ("aes-cbc-essiv:sha256", 128, 4096)
    assert luks.flags.discard and luks.flags.perf_flags == ("no_read_workqueue", "no_write_workqueue")
    # A repeat is answered from the volume; the same name with other LUKS parameters already exists.
    assert plugin.create("pvc-luks", 64 * MiB, CLASS) == volume
    other = {**CLASS, "encryptionDiscard": "false"}
    message = details_of(plugin.create, "pvc-luks", 64 * MiB, other)
    assert code_of(plugin.create, "pvc-luks", 64 * MiB, other) == grpc.StatusCode.ALREADY_EXISTS
    assert "LUKS parameters" in message


@pytest.mark.parametrize(
    ("parameters", "words"),
    [
        ({"encryptionCipher": "aes-ecb"}, ["encryptionCipher", "allowed:", "aes-xts-plain64"]),
        ({"encryptionKeySize": "128"}, ["encryptionKeySize", "allowed: 256, 512"]),
        ({"encryptionSectorSize": "3000"}, ["allowed: 512, 1024, 2048, 4096"]),
        ({"encryptionPerfFlags": "turbo"}, ["turbo", "no_read_workqueue"]),
        ({"encryptionDiscard": "on"}, ["encryptionDiscard"]),
    ],
)
def test_impossible_parameters_are_invalid_arguments_and_make_nothing(
    plugin: RunningPlugin, parameters: dict[str, str], words: list[str]
) -> None:
    request = {"encrypted": "true", "encryptionKMSID": "local-1", **parameters}
    assert code_of(plugin.create, "pvc-bad", 64 * MiB, request) == grpc.StatusCode.INVALID_ARGUMENT
    message = details_of(plugin.create, "pvc-bad", 64 * MiB, request)
    assert all(word in message for word in words), message
    assert plugin.backend.list() == []


def test_luks_parameters_need_an_encrypted_class(plugin: RunningPlugin) -> None:
    request = {"encrypted": "false", "encryptionDiscard": "true"}
    assert code_of(plugin.create, "pvc-plain", 64 * MiB, request) == grpc.StatusCode.INVALID_ARGUMENT
    assert "encrypted" in details_of(plugin.create, "pvc-plain", 64 * MiB, request)


def test_copies_keep_their_sources_parameters_whatever_their_class(plugin: RunningPlugin) -> None:
    source = plugin.create("pvc-src", 64 * MiB, CLASS)
    snapshot = plugin.snapshot("snap-src", source.volume_id)
    plain_class = {"encrypted": "true", "encryptionKMSID": "local-2", "encryptionCipher": "aes-xts-plain64"}
    restored = plugin.copy("pvc-restored", None, plain_class, snapshot_id=snapshot.snapshot_id)
    clone = plugin.copy("pvc-clone", None, plain_class, volume_id=source.volume_id)
    for copy in (restored, clone):
        assert {k: v for k, v in copy.volume_context.items() if k in LUKS_CONTEXT} == LUKS_CONTEXT
        record = VolumeRecord.parse(plugin.backend.get(copy.volume_id).metadata)
        assert record.luks == VolumeRecord.parse(plugin.backend.get(source.volume_id).metadata).luks
    # A retried copy is answered, not refused for the class's other parameters.
    assert plugin.copy("pvc-clone", None, plain_class, volume_id=source.volume_id) == clone


def test_controller_reclaim_space_on_the_standalone_backend_has_nothing_to_do(plugin: RunningPlugin) -> None:
    volume = plugin.create("pvc-reclaim", 64 * MiB, CLASS)
    image = plugin.backend.image_path(volume.volume_id)
    with image.open("r+b") as f:  # some allocated blocks, as a workload's writes would leave
        f.seek(20 * MiB)
        f.write(b"x" * MiB)
    stub = reclaim_grpc.ReclaimSpaceControllerStub(plugin.channel)
    response = stub.ControllerReclaimSpace(
        reclaim_pb.ControllerReclaimSpaceRequest(volume_id=volume.volume_id)
    )
    allocated = image.stat().st_blocks * 512
    assert response.pre_usage.usage_bytes == response.post_usage.usage_bytes == allocated >= MiB
    missing = reclaim_pb.ControllerReclaimSpaceRequest(volume_id="sa-00000000-0000-0000-0000-000000000000")
    assert code_of(stub.ControllerReclaimSpace, missing) == grpc.StatusCode.NOT_FOUND

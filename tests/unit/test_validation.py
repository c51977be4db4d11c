from __future__ import annotations

import threading

import grpc
import pytest

from csi_luks.csi import csi_pb2
from csi_luks.errors import CsiError
from csi_luks.locks import OperationLocks
from csi_luks.quoting import quoted
from csi_luks.services.validation import (
    capability_problem,
    capacity_from_range,
    parse_bool,
    require_path,
    unknown_keys,
)

MiB = 1024 * 1024
Mode = csi_pb2.VolumeCapability.AccessMode.Mode


def _range(required: int = 0, limit: int = 0) -> csi_pb2.CapacityRange:
    return csi_pb2.CapacityRange(required_bytes=required, limit_bytes=limit)


def test_capacity_rounds_up_to_mebibytes_and_defaults_to_one_gibibyte() -> None:
    assert capacity_from_range(_range(), present=False) == 1024 * MiB
    assert capacity_from_range(_range(1), present=True) == MiB
    assert capacity_from_range(_range(0, 100 * MiB), present=True) == 100 * MiB  # default capped by limit
    assert capacity_from_range(_range(5 * MiB + 1, 6 * MiB), present=True) == 6 * MiB


@pytest.mark.parametrize(("required", "limit"), [(10 * MiB, 5 * MiB), (MiB + 1, MiB + 2)])
def test_impossible_ranges_are_out_of_range(required: int, limit: int) -> None:
    with pytest.raises(CsiError) as info:
        capacity_from_range(_range(required, limit), present=True)
    assert info.value.code == grpc.StatusCode.OUT_OF_RANGE


def test_capability_rules() -> None:
    def cap(mode: int, **kwargs: object) -> csi_pb2.VolumeCapability:
        return csi_pb2.VolumeCapability(access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode), **kwargs)  # type: ignore[arg-type]

    mount = {"mount": csi_pb2.VolumeCapability.MountVolume()}
    assert capability_problem(cap(Mode.SINGLE_NODE_WRITER, **mount)) is None
    assert (
        capability_problem(cap(Mode.SINGLE_NODE_WRITER, block=csi_pb2.VolumeCapability.BlockVolume())) is None
    )
    assert "access type" in (capability_problem(cap(Mode.SINGLE_NODE_WRITER)) or "")
    assert "one node" in (capability_problem(cap(Mode.MULTI_NODE_READER_ONLY, **mount)) or "")
    xfs = {"mount": csi_pb2.VolumeCapability.MountVolume(fs_type="xfs")}
    assert capability_problem(cap(Mode.SINGLE_NODE_WRITER, **xfs)) is None
    assert "access mode" in (capability_problem(csi_pb2.VolumeCapability(**mount)) or "")  # type: ignore[arg-type]


def test_parse_bool_is_strict() -> None:
    assert parse_bool({"encrypted": "true"}, "encrypted", False) is True
    assert parse_bool({}, "encrypted", False) is False
    with pytest.raises(CsiError):
        parse_bool({"encrypted": "True"}, "encrypted", False)


def test_unknown_keys_ignores_the_cos_own() -> None:
    assert unknown_keys({"encrypted": "", "csi.storage.k8s.io/pvc/name": "", "typo": ""}, ["encrypted"]) == [
        "typo"
    ]


def test_a_held_lock_refuses_a_second_operation_then_frees() -> None:
    locks = OperationLocks()
    with locks.hold("vol-1", "NodeStageVolume"):
        with pytest.raises(CsiError) as info, locks.hold("vol-1", "NodeUnstageVolume"):
            pass
        assert info.value.code == grpc.StatusCode.ABORTED and "NodeStageVolume" in str(info.value)
        with locks.hold("vol-2", "NodeStageVolume"):  # other volumes are independent
            pass
    with locks.hold("vol-1", "NodeUnstageVolume"):  # released, even after the refusal
        pass


def test_locks_under_contention_admit_one_at_a_time() -> None:
    locks = OperationLocks()
    admitted: list[int] = []
    barrier = threading.Barrier(8)

    def worker(i: int) -> None:
        barrier.wait()
        try:
            with locks.hold("vol", f"op{i}"):
                admitted.append(i)
                threading.Event().wait(0.2)
        except CsiError:
            pass

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == 1


def test_an_access_mode_csi_does_not_define_is_a_problem_not_a_crash() -> None:
    capability = csi_pb2.VolumeCapability(
        block=csi_pb2.VolumeCapability.BlockVolume(),
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=99),  # type: ignore[arg-type]
    )
    assert capability_problem(capability) == "access mode 99 is not one that CSI defines"


def test_mount_flags_with_nul_bytes_are_a_problem() -> None:
    capability = csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(mount_flags=["ro\0x"]),
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=Mode.SINGLE_NODE_WRITER),
    )
    assert capability_problem(capability) == "mount_flags must not hold NUL bytes"


@pytest.mark.parametrize("path", ["/a\0b", "/" + "x" * 5000])
def test_paths_the_system_cannot_take_are_invalid_arguments(path: str) -> None:
    with pytest.raises(CsiError) as info:
        require_path(path, "target_path")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and len(str(info.value)) < 300


def test_quoted_fields_are_short_and_say_their_length() -> None:
    assert quoted("vol-1") == "'vol-1'"
    assert quoted("x" * 10_000) == repr("x" * 120) + "... (10000 characters)"

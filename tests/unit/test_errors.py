from __future__ import annotations

import grpc
import pytest

from csi_luks import luks
from csi_luks.errors import MAX_STATUS_MESSAGE_BYTES, CsiError, capped, invalid_argument, status_for
from csi_luks.kms.base import KMSRequestRefused, KMSTLSError, KMSUnavailable
from csi_luks.system.device_io import DeviceIOError
from csi_luks.volumes.base import (
    BackendPermissionDenied,
    BackendRequestError,
    BackendUnavailable,
    CapacityOutOfRange,
    MalformedId,
    VolumeInUse,
)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (luks.WrongPassphrase("open"), grpc.StatusCode.FAILED_PRECONDITION),
        (luks.NotLuksDevice("open"), grpc.StatusCode.FAILED_PRECONDITION),
        (luks.DeviceNotFound("open"), grpc.StatusCode.NOT_FOUND),
        (luks.DeviceBusy("close"), grpc.StatusCode.FAILED_PRECONDITION),
        (luks.CryptsetupMissing("open"), grpc.StatusCode.FAILED_PRECONDITION),
        (luks.DeviceMapperUnavailable("open"), grpc.StatusCode.FAILED_PRECONDITION),
        (luks.CryptsetupTimeout("open"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (luks.LuksDeviceIOError("luksFormat"), grpc.StatusCode.UNAVAILABLE),
        (DeviceIOError("mkfs.ext4 /dev/mapper/x"), grpc.StatusCode.UNAVAILABLE),
        (KMSUnavailable("down"), grpc.StatusCode.UNAVAILABLE),
        (KMSTLSError("certificate verify failed"), grpc.StatusCode.FAILED_PRECONDITION),
        (KMSRequestRefused('invalid role name "x"'), grpc.StatusCode.FAILED_PRECONDITION),
        (invalid_argument("volume_id missing"), grpc.StatusCode.INVALID_ARGUMENT),
        (CsiError(grpc.StatusCode.ABORTED, "in flight"), grpc.StatusCode.ABORTED),
        (BackendRequestError("no such pool"), grpc.StatusCode.INVALID_ARGUMENT),
        (BackendPermissionDenied("cephx refused"), grpc.StatusCode.PERMISSION_DENIED),
        (BackendUnavailable("cluster down"), grpc.StatusCode.UNAVAILABLE),
        (VolumeInUse("owned by another id"), grpc.StatusCode.FAILED_PRECONDITION),
        (MalformedId("'../x' is not an id"), grpc.StatusCode.NOT_FOUND),
        (CapacityOutOfRange("1 PiB"), grpc.StatusCode.OUT_OF_RANGE),
        (KeyError("bug"), grpc.StatusCode.INTERNAL),
    ],
)
def test_every_failure_has_its_code(error: Exception, code: grpc.StatusCode) -> None:
    assert status_for(error)[0] == code


def test_internal_errors_say_where_to_look() -> None:
    assert "plugin log" in status_for(RuntimeError("boom"))[1]


def test_status_messages_are_capped_below_grpcs_metadata_limit() -> None:
    assert capped("short") == "short"
    long = capped("é" * 10_000)  # two bytes each in UTF-8
    assert len(long.encode()) <= MAX_STATUS_MESSAGE_BYTES and long.endswith("(message cut: 20000 bytes)")

"""Domain errors and the one table that maps every failure to a gRPC status code."""

from __future__ import annotations

import grpc

from csi_luks import luks
from csi_luks.key_lock import KeyOperationBusy
from csi_luks.kms import base as kms
from csi_luks.refusal import OperationRefused
from csi_luks.system.device_io import DeviceIOError
from csi_luks.system.fs_limits import FilesystemTooSmall
from csi_luks.volumes import base as volumes


class CsiError(Exception):
    """A failure a service reports with an explicit gRPC code and an operator-facing message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def invalid_argument(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.NOT_FOUND, message)


def failed_precondition(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.FAILED_PRECONDITION, message)


# Most specific first: the first isinstance match wins.
_CODES: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (luks.CryptsetupTimeout, grpc.StatusCode.DEADLINE_EXCEEDED),
    # The storage under the volume failed I/O (luksFormat, open, mkfs, resize): nothing in the request is
    # wrong and the step did not advance the volume's state, so the CO's retry passes once the device is
    # back, as for a backing store that cannot be reached. The message names the step and the device.
    (DeviceIOError, grpc.StatusCode.UNAVAILABLE),
    # An operator's `csi-luks rotate` (or another key change) holds the volume's key lock on this node.
    (KeyOperationBusy, grpc.StatusCode.ABORTED),
    (luks.DeviceNotFound, grpc.StatusCode.NOT_FOUND),
    # The KMS's key does not open this volume, the device holds no LUKS header, the node lacks
    # cryptsetup or device-mapper, or the device is held by someone else: an operator must act.
    (luks.WrongPassphrase, grpc.StatusCode.FAILED_PRECONDITION),
    (luks.NotLuksDevice, grpc.StatusCode.FAILED_PRECONDITION),
    (luks.CryptsetupMissing, grpc.StatusCode.FAILED_PRECONDITION),
    (luks.DeviceMapperUnavailable, grpc.StatusCode.FAILED_PRECONDITION),
    (luks.DeviceBusy, grpc.StatusCode.FAILED_PRECONDITION),
    (luks.KeySlotError, grpc.StatusCode.FAILED_PRECONDITION),
    # The node's kernel cannot run the volume's cipher: a module to load, or another class.
    (luks.CipherUnavailable, grpc.StatusCode.FAILED_PRECONDITION),
    (OperationRefused, grpc.StatusCode.FAILED_PRECONDITION),
    (volumes.VolumeNotFound, grpc.StatusCode.NOT_FOUND),  # a malformed id too: nothing of it can exist
    # The size itself is the problem (CSI: OUT_OF_RANGE), not a shortage that a retry could outwait.
    (volumes.CapacityOutOfRange, grpc.StatusCode.OUT_OF_RANGE),
    # mkfs refused the device as smaller than the filesystem's minimum (mkfs.xfs: 300 MiB).
    (FilesystemTooSmall, grpc.StatusCode.OUT_OF_RANGE),
    (volumes.VolumeInUse, grpc.StatusCode.FAILED_PRECONDITION),
    (volumes.BackendUnavailable, grpc.StatusCode.UNAVAILABLE),
    (volumes.BackendPermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (volumes.BackendRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (kms.KMSUnavailable, grpc.StatusCode.UNAVAILABLE),
    (kms.KMSPermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    # The secrets type: one shared passphrase per StorageClass, no per-volume key to rotate.
    (kms.KeyRotationUnsupported, grpc.StatusCode.FAILED_PRECONDITION),
    # Vault's certificate does not verify. Not UNAVAILABLE (what ceph-csi ends up reporting): that says
    # "retry, it will pass", and no retry fixes a wrong CA or server name; an operator must change the
    # KMS configuration, the CA Secret or Vault's certificate.
    (kms.KMSTLSError, grpc.StatusCode.FAILED_PRECONDITION),
    # A Secret, ServiceAccount or key file the KMS configuration names is missing: the cluster or the
    # node, not the call, is wrong.
    (kms.KMSObjectNotFound, grpc.StatusCode.FAILED_PRECONDITION),
    # The plugin's image lacks the KMS type's client library: the deployment's to fix, not the request's.
    (kms.KMSBackendMissing, grpc.StatusCode.FAILED_PRECONDITION),
    # Vault answered the request with an error of its own (e.g. 400 "invalid role name"): the KMS's
    # setup or configuration is wrong, not the plugin; INTERNAL would send the operator to our logs.
    (kms.KMSRequestRefused, grpc.StatusCode.FAILED_PRECONDITION),
    (kms.KMSConfigError, grpc.StatusCode.INVALID_ARGUMENT),
    (kms.MissingSecret, grpc.StatusCode.INVALID_ARGUMENT),
    (kms.DEKNotFound, grpc.StatusCode.FAILED_PRECONDITION),
    (kms.DEKDecryptError, grpc.StatusCode.FAILED_PRECONDITION),
)


# gRPC carries the status message in a trailer; past 8 KiB of metadata the client sees RESOURCE_EXHAUSTED
# "Stream removed" instead of the answer. Messages quote fields with quoting.quoted; this is the backstop.
MAX_STATUS_MESSAGE_BYTES = 2048


def capped(message: str) -> str:
    """The message cut to MAX_STATUS_MESSAGE_BYTES of UTF-8, saying so."""
    encoded = message.encode("utf-8", "replace")
    if len(encoded) <= MAX_STATUS_MESSAGE_BYTES:
        return message
    head = encoded[: MAX_STATUS_MESSAGE_BYTES - 100].decode("utf-8", "ignore")
    return f"{head}... (message cut: {len(encoded)} bytes)"


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC code and message for an exception; INTERNAL only for what we did not foresee."""
    if isinstance(exc, CsiError):
        return exc.code, str(exc)
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}): {exc}; see the plugin log"

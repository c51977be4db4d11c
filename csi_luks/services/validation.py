"""Request checks shared by the Controller and Node services (CSI argument rules)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import grpc

from csi_luks.csi import csi_pb2
from csi_luks.errors import CsiError, invalid_argument
from csi_luks.quoting import quoted
from csi_luks.system.filesystem import SUPPORTED_FILESYSTEMS
from csi_luks.volumes.base import VolumeBackend

MiB = 1024 * 1024
GiB = 1024 * MiB
DEFAULT_CAPACITY = 1 * GiB
_PATH_MAX = 4096  # Linux's, including the terminating NUL

Mode = csi_pb2.VolumeCapability.AccessMode.Mode
# One node at a time: a LUKS mapping cannot be shared safely between nodes.
SUPPORTED_MODES = frozenset(
    {
        Mode.SINGLE_NODE_WRITER,
        Mode.SINGLE_NODE_READER_ONLY,
        Mode.SINGLE_NODE_SINGLE_WRITER,
        Mode.SINGLE_NODE_MULTI_WRITER,
    }
)


def require(value: str, field: str) -> str:
    if not value:
        raise invalid_argument(f"{field} is required")
    return value


def checked_id(backend: VolumeBackend, value: str, field: str) -> str:
    """A required volume or snapshot id, of the backend's form; every RPC's ids pass here first.

    A malformed id raises MalformedId (NOT_FOUND: nothing of it can exist); callers for which an
    unknown id is success (DeleteVolume, DeleteSnapshot, ListSnapshots filters) catch it.
    """
    backend.check_id(require(value, field))
    return value


def require_path(value: str, field: str) -> str:
    """A required path that the system can take: no NUL (no system call accepts one), at most PATH_MAX."""
    require(value, field)
    if "\0" in value or len(value.encode("utf-8", "replace")) >= _PATH_MAX:
        raise invalid_argument(f"{field} {quoted(value)} is not a usable path (a NUL byte, or too long)")
    return value


def require_plain_text(value: str, field: str) -> str:
    """A field that may reach a command's argv (a name, a parameter): no NUL, which argv cannot carry."""
    if "\0" in value:
        raise invalid_argument(f"{field} {quoted(value)} holds a NUL byte")
    return value


def capability_problem(capability: csi_pb2.VolumeCapability) -> str | None:
    """Why this plugin cannot serve a capability, or None if it can."""
    kind = capability.WhichOneof("access_type")
    if kind is None:
        return "a volume capability must set an access type (mount or block)"
    if not capability.HasField("access_mode"):
        return "a volume capability must set an access mode"
    mode = capability.access_mode.mode
    if mode not in Mode.values():
        return f"access mode {mode} is not one that CSI defines"
    if mode not in SUPPORTED_MODES:
        return (
            f"access mode {Mode.Name(mode)} is not supported: an encrypted volume is opened on one node "
            "at a time (use ReadWriteOnce or ReadWriteOncePod)"
        )
    if kind == "mount":
        if any("\0" in flag for flag in capability.mount.mount_flags):
            return "mount_flags must not hold NUL bytes"
        fs_type = capability.mount.fs_type or "ext4"
        if fs_type not in SUPPORTED_FILESYSTEMS:
            return f"fsType {quoted(fs_type)} is not supported; use one of {', '.join(SUPPORTED_FILESYSTEMS)}"
    return None


def validate_capabilities(capabilities: Sequence[csi_pb2.VolumeCapability]) -> None:
    if not capabilities:
        raise invalid_argument("volume_capabilities is required")
    for capability in capabilities:
        problem = capability_problem(capability)
        if problem:
            raise invalid_argument(problem)


def validate_capability(capability: csi_pb2.VolumeCapability, present: bool) -> None:
    if not present:
        raise invalid_argument("volume_capability is required")
    validate_capabilities([capability])


def capacity_from_range(capacity_range: csi_pb2.CapacityRange, present: bool, current: int = 0) -> int:
    """The capacity to provide: at least required_bytes (rounded up to MiB), at most limit_bytes."""
    required = capacity_range.required_bytes if present else 0
    limit = capacity_range.limit_bytes if present else 0
    if required < 0 or limit < 0:
        raise invalid_argument("capacity_range bytes must not be negative")
    if limit and required > limit:
        raise CsiError(
            grpc.StatusCode.OUT_OF_RANGE, f"required_bytes {required} is larger than limit_bytes {limit}"
        )
    wanted = required or current or min(DEFAULT_CAPACITY, limit or DEFAULT_CAPACITY)
    size = -(-wanted // MiB) * MiB
    if limit and size > limit:
        size = limit - limit % MiB
        if size < wanted:
            raise CsiError(
                grpc.StatusCode.OUT_OF_RANGE,
                f"no MiB-aligned size between required_bytes {required} and limit_bytes {limit}",
            )
    return size


def parse_bool(parameters: dict[str, str], key: str, default: bool) -> bool:
    value = parameters.get(key)
    if value is None or value == "":
        return default
    if value not in ("true", "false"):
        raise invalid_argument(f'parameter {key} must be "true" or "false", not {quoted(value)}')
    return value == "true"


def unknown_keys(parameters: Iterable[str], known: Iterable[str]) -> list[str]:
    """Parameters we do not know, ignoring the CO's own csi.storage.k8s.io/ keys."""
    allowed = set(known)
    return sorted(k for k in parameters if k not in allowed and not k.startswith("csi.storage.k8s.io/"))

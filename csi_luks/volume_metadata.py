"""What csi-luks keeps in each volume's metadata, and the encryption state machine.

none -> prepared (DEK generated and stored, by CreateVolume) -> encrypted (LUKS header and filesystem
made, by the first NodeStage) <-> rotating (a DEK rotation is under way: operations/rotation.py). The
node formats only a `prepared` volume; a `prepared` volume was never handed to a workload, so nothing of
the user's can be on it. Once a NodeStage made a filesystem (or handed out the raw device), FILESYSTEM
records it and no mkfs ever runs on the volume again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from csi_luks.luks.parameters import PARAMETER_KEYS, ActivationFlags, LuksParameters, parse_perf_flags

PREFIX = "csi-luks/"
NAME = PREFIX + "name"
CAPACITY = PREFIX + "capacity"  # bytes promised to the user (the backing store adds the LUKS header)
ENCRYPTED = PREFIX + "encrypted"
KMS_ID = PREFIX + "kms-id"
STATE = PREFIX + "encryption-state"
# The PVC's namespace at creation: tenant-aware KMS types need it again at NodeStage and DeleteVolume,
# whose requests do not carry it.
PVC_NAMESPACE = PREFIX + "pvc-namespace"
# Snapshots are kept by the backend like volumes (a point-in-time copy with its own DEK), marked by KIND,
# so that they outlive their source volume and restore like a clone.
KIND = PREFIX + "kind"
KIND_SNAPSHOT = "snapshot"
SOURCE = PREFIX + "source"  # the volume or snapshot a copy was made from
# The source's encryption state read before its content was copied: a copy of a `prepared` (empty)
# volume is prepared too; one of an `encrypted` volume carries its LUKS header.
SOURCE_STATE = PREFIX + "source-state"
CREATED = PREFIX + "created"  # snapshots: creation time, nanoseconds since the epoch
# What the first NodeStage made on the volume (FilesystemRecord): "<type> <uuid>", or "block" for a volume
# handed out as a raw device. Copies carry their source's.
FILESYSTEM = PREFIX + "filesystem"
# The LUKS parameters of the volume's header (luks/parameters.py): the class's at creation, a copy's
# source's (a copy carries its source's header). Absent: csi-luks's defaults. The flags are those the
# header stores (changed by `csi-luks luks-flags`, which updates these too).
LUKS_CIPHER = PREFIX + "luks-cipher"
LUKS_KEY_SIZE = PREFIX + "luks-key-size"
LUKS_SECTOR_SIZE = PREFIX + "luks-sector-size"
LUKS_DISCARD = PREFIX + "luks-discard"
LUKS_PERF_FLAGS = PREFIX + "luks-perf-flags"
_LUKS_KEYS = dict(
    zip(
        PARAMETER_KEYS,
        (LUKS_CIPHER, LUKS_KEY_SIZE, LUKS_SECTOR_SIZE, LUKS_DISCARD, LUKS_PERF_FLAGS),
        strict=True,
    )
)
# DeleteVolume's intent, written durably before it looks for users of the volume (value: when, UTC). A
# NodeStage that finds it after attaching detaches and refuses: of two calls that each publish (intent,
# attachment) before they look at the other's, at least one sees the other. A crash leaves it: the CO
# retries DeleteVolume until it answers, and the retry finishes the delete or removes it.
DELETING = PREFIX + "deleting"

# LUKS2 header and key-slot area as luksFormat lays them out by default; added to the backing store so
# the user gets the capacity they asked for.
LUKS_HEADER_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class FilesystemRecord:
    """What the volume holds above its encryption: a filesystem csi-luks made, or a raw device's data."""

    type: str  # "ext4", "xfs", or BLOCK
    uuid: str = ""

    BLOCK = "block"

    @property
    def is_block(self) -> bool:
        return self.type == self.BLOCK

    def value(self) -> str:
        return self.type if self.is_block else f"{self.type} {self.uuid}"

    @classmethod
    def parse(cls, value: str | None) -> FilesystemRecord | None:
        if not value:
            return None
        fs_type, _, uuid = value.partition(" ")
        return cls(fs_type, uuid)

    def describe(self) -> str:
        return "raw block data" if self.is_block else f"its {self.type} filesystem (UUID {self.uuid})"


class EncryptionState(Enum):
    PREPARED = "prepared"
    ENCRYPTED = "encrypted"
    ROTATING = "rotating"  # encrypted, with a pending DEK that may be in a key slot already


@dataclass(frozen=True)
class VolumeRecord:
    """The parsed metadata of one volume."""

    capacity: int
    encrypted: bool
    kms_id: str
    state: EncryptionState | None
    pvc_namespace: str | None = None
    name: str = ""
    is_snapshot: bool = False
    source: str | None = None
    source_state: EncryptionState | None = None
    created_ns: int = 0
    filesystem: FilesystemRecord | None = None
    luks: LuksParameters = field(default_factory=LuksParameters)

    @classmethod
    def parse(cls, metadata: dict[str, str]) -> VolumeRecord:
        state = metadata.get(STATE)
        return cls(
            capacity=int(metadata.get(CAPACITY, "0")),
            encrypted=metadata.get(ENCRYPTED) == "true",
            kms_id=metadata.get(KMS_ID, ""),
            state=EncryptionState(state) if state else None,
            pvc_namespace=metadata.get(PVC_NAMESPACE) or None,
            name=metadata.get(NAME, ""),
            is_snapshot=metadata.get(KIND) == KIND_SNAPSHOT,
            source=metadata.get(SOURCE) or None,
            source_state=EncryptionState(metadata[SOURCE_STATE]) if metadata.get(SOURCE_STATE) else None,
            created_ns=int(metadata.get(CREATED, "0")),
            filesystem=FilesystemRecord.parse(metadata.get(FILESYSTEM)),
            luks=luks_parameters(metadata),
        )

    @property
    def may_hold_data(self) -> bool:
        """Whether a workload may have written to the volume, so that nothing may ever format it.

        Recorded (FILESYSTEM) since the first stage that made a filesystem or handed out the raw device.
        A volume staged before that record existed has none: an encrypted one is known to have been
        staged from its state, since only a NodeStage moves it past `prepared`, and that NodeStage made
        its filesystem in the same call. An unencrypted one without a record cannot be told apart from
        a new one.
        """
        if self.filesystem is not None:
            return True
        return self.encrypted and self.state in (EncryptionState.ENCRYPTED, EncryptionState.ROTATING)

    @property
    def backing_bytes(self) -> int:
        return backing_bytes(self.capacity, self.encrypted)


def luks_parameters(metadata: dict[str, str]) -> LuksParameters:
    """The recorded LUKS parameters, as recorded: the node applies them, and the node's kernel judges the
    cipher (a record from another version of the controller's list is not refused here)."""
    key_size, sector_size = metadata.get(LUKS_KEY_SIZE), metadata.get(LUKS_SECTOR_SIZE)
    return LuksParameters(
        cipher=metadata.get(LUKS_CIPHER) or None,
        key_size=int(key_size) if key_size else None,
        sector_size=int(sector_size) if sector_size else None,
        flags=ActivationFlags(
            discard=metadata.get(LUKS_DISCARD) == "true",
            perf_flags=parse_perf_flags(metadata.get(LUKS_PERF_FLAGS, "")),
        ),
    )


def luks_metadata(parameters: LuksParameters) -> dict[str, str]:
    """The metadata recording parameters (only what differs from the defaults)."""
    return {_LUKS_KEYS[key]: value for key, value in parameters.class_values().items()}


def backing_bytes(capacity: int, encrypted: bool) -> int:
    return capacity + (LUKS_HEADER_BYTES if encrypted else 0)

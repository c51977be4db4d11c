"""What csi-luks keeps in each volume's metadata, and the encryption state machine.

none -> prepared (DEK generated and stored, by CreateVolume) -> encrypted (LUKS header written, by the
first NodeStage) <-> rotating (a DEK rotation is under way: operations/rotation.py). The node formats
only a `prepared` volume whose device is empty; it never formats anything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

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
# DeleteVolume's intent, written durably before it looks for users of the volume (value: when, UTC). A
# NodeStage that finds it after attaching detaches and refuses: of two calls that each publish (intent,
# attachment) before they look at the other's, at least one sees the other. A crash leaves it: the CO
# retries DeleteVolume until it answers, and the retry finishes the delete or removes it.
DELETING = PREFIX + "deleting"

# LUKS2 header and key-slot area as luksFormat lays them out by default; added to the backing store so
# the user gets the capacity they asked for.
LUKS_HEADER_BYTES = 16 * 1024 * 1024


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
        )

    @property
    def backing_bytes(self) -> int:
        return backing_bytes(self.capacity, self.encrypted)


def backing_bytes(capacity: int, encrypted: bool) -> int:
    return capacity + (LUKS_HEADER_BYTES if encrypted else 0)

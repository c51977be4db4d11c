"""DEK rotation, crash safe: a volume's LUKS key slot moves to a new DEK without ever losing access.

The protocol, each step one durable write, in this order:

 1. store-pending    a new random DEK is stored in the KMS as the volume's *pending* DEK (beside the
                     current one: `csi-luks/dek-pending` in metadata, `<path><volume id>-pending` in
                     Vault KV)
 2. mark-rotating    the volume's metadata state becomes `rotating`
 3. add-key          `luksAddKey` puts the pending DEK into a free key slot (authorised by the current DEK)
 4. test-key         `cryptsetup open --test-passphrase` with the pending DEK must unlock a slot
 5. promote          the pending DEK becomes the current DEK in the KMS (Vault KV v2 with
                     vaultDestroyKeys: the older versions are destroyed)
 6. kill-old-slots   every key slot the current DEK does not open is wiped (`luksKillSlot`), and the
                     header backup is refreshed
 7. remove-pending   the pending DEK is removed
 8. mark-encrypted   the state becomes `encrypted` again

Why a kill at any point converges: the current DEK opens a key slot before step 5 (its slot is only
wiped in step 6, after the pending DEK became current and was tested in step 4) and after it; the only
key slot the KMS ever lacks a key for is the old one between steps 5 and 6, which the next attempt
wipes. Every later call finishes what was begun: `csi-luks rotate` and EncryptionKeyRotate resume a
`rotating` volume (`finish`), and so does NodeStage. A pending DEK under state `encrypted` (a kill
between steps 1 and 2) is in no key slot: the next rotation uses it.

Test-only crash points (crash.py): CSI_LUKS_CRASH_POINT=rotation.before-<step> or
rotation.after-<step> SIGKILLs the process there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from csi_luks.crash import CRASH_POINT_ENV, Step, crash_points
from csi_luks.encryption import VolumeEncryption
from csi_luks.luks import Cryptsetup
from csi_luks.operations import OperationRefused
from csi_luks.operations.header_backup import refresh_header_backup
from csi_luks.volume_metadata import STATE, EncryptionState, VolumeRecord
from csi_luks.volumes.base import VolumeBackend

log = logging.getLogger(__name__)

STEPS = (
    "store-pending",
    "mark-rotating",
    "add-key",
    "test-key",
    "promote",
    "kill-old-slots",
    "remove-pending",
    "mark-encrypted",
)
CRASH_POINTS = crash_points("rotation", STEPS)
__all__ = ["CRASH_POINTS", "CRASH_POINT_ENV", "STEPS", "KeyRotation", "RotationResult"]
MAX_SLOTS = 32  # LUKS2


@dataclass
class RotationResult:
    volume_id: str
    slot: int  # the key slot the (new) current DEK opens
    resumed: bool  # an interrupted rotation was finished
    killed: list[int] = field(default_factory=list)  # the key slots wiped


class KeyRotation:
    """Rotates one volume's DEK on a device that holds its LUKS header (attached or a plain image file)."""

    def __init__(self, cryptsetup: Cryptsetup, backend: VolumeBackend, encryption: VolumeEncryption) -> None:
        self.cryptsetup = cryptsetup
        self.backend = backend
        self.encryption = encryption

    def _record(self, volume_id: str) -> VolumeRecord:
        return VolumeRecord.parse(self.backend.get(volume_id).metadata)

    def rotate(self, volume_id: str, device: str) -> RotationResult:
        """Give the volume a new DEK; a rotation that was interrupted is finished instead."""
        with self.backend.key_operation(volume_id, "a key rotation"):
            return self._rotate(volume_id, device)

    def _rotate(self, volume_id: str, device: str) -> RotationResult:
        record = self._record(volume_id)
        if not record.encrypted:
            raise OperationRefused(f"volume {volume_id} is not encrypted: it has no key to rotate")
        if record.state is EncryptionState.ROTATING:
            return self._finish(volume_id, device)
        if record.state is not EncryptionState.ENCRYPTED:
            state = record.state.value if record.state else "none"
            raise OperationRefused(
                f"volume {volume_id} has no LUKS header yet (state {state}):"
                " it is formatted with its DEK at its first NodeStage, and there is no key slot to rotate"
            )
        if self.encryption.get_pending_passphrase(volume_id) is None:
            with Step("rotation", "store-pending"):
                self.encryption.new_pending_passphrase(volume_id)
        with Step("rotation", "mark-rotating"):
            self.backend.set_metadata(volume_id, STATE, EncryptionState.ROTATING.value)
        result = self._finish(volume_id, device)
        result.resumed = False
        return result

    def finish(self, volume_id: str, device: str) -> RotationResult:
        """Complete the rotation of a volume in state `rotating` (idempotent)."""
        with self.backend.key_operation(volume_id, "a key rotation"):
            record = self._record(volume_id)
            if record.state is not EncryptionState.ROTATING:
                raise OperationRefused(f"volume {volume_id} has no rotation under way")
            return self._finish(volume_id, device)

    def _finish(self, volume_id: str, device: str) -> RotationResult:
        current = self.encryption.get_passphrase(volume_id)
        pending = self.encryption.get_pending_passphrase(volume_id)
        current_slot = self.cryptsetup.slot_of(device, current)
        if pending is not None and pending != current:
            pending_slot = self.cryptsetup.slot_of(device, pending)
            if pending_slot is None:
                if current_slot is None:
                    raise OperationRefused(
                        f"volume {volume_id}: neither its current nor its pending DEK opens the LUKS header "
                        f"on {device}; restore the header from its backup (csi-luks header restore)"
                    )
                with Step("rotation", "add-key"):
                    used = set(self.cryptsetup.active_slots(device))
                    free = next((s for s in range(MAX_SLOTS) if s not in used), None)
                    if free is None:
                        raise OperationRefused(f"volume {volume_id}: every key slot of {device} is in use")
                    self.cryptsetup.add_key(device, current, pending, free)
                    refresh_header_backup(self.cryptsetup, self.backend, volume_id, device)
            with Step("rotation", "test-key"):
                pending_slot = self.cryptsetup.slot_of(device, pending)
                if pending_slot is None:
                    raise OperationRefused(
                        f"volume {volume_id}: the new DEK was added but does not open {device}; the "
                        "current DEK still does, and the rotation can be retried"
                    )
            with Step("rotation", "promote"):
                self.encryption.make_current(volume_id, pending)
            current, current_slot = pending, pending_slot
        if current_slot is None:
            raise OperationRefused(
                f"volume {volume_id}: its current DEK does not open the LUKS header on {device}; restore "
                "the header from its backup (csi-luks header restore)"
            )
        # Idempotent: also after a kill between a promotion and this (the old versions are gone or not).
        self.encryption.forget_previous_versions(volume_id)
        killed = []
        with Step("rotation", "kill-old-slots"):
            for slot in self.cryptsetup.active_slots(device):
                if slot != current_slot:
                    self.cryptsetup.kill_slot(device, slot, current)
                    killed.append(slot)
            refresh_header_backup(self.cryptsetup, self.backend, volume_id, device)
        with Step("rotation", "remove-pending"):
            self.encryption.remove_pending(volume_id)
        with Step("rotation", "mark-encrypted"):
            self.backend.set_metadata(volume_id, STATE, EncryptionState.ENCRYPTED.value)
        log.info(
            "volume %s: DEK rotated (key slot %d; wiped %s)", volume_id, current_slot, killed or "nothing"
        )
        return RotationResult(volume_id, current_slot, resumed=True, killed=killed)

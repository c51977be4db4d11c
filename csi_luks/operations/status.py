"""`csi-luks status`: whether each encrypted volume's KMS entry, DEK, LUKS header and header backup agree.

Read-only: the header is read (luksDump, `open --test-passphrase`, luksHeaderBackup into a private
temporary file), nothing is written. A volume is consistent when its DEK is retrievable and opens its
header, no key slot is one the DEK does not open, no rotation is pending, and its header backup (where
the backend keeps them) matches the header.

What the backend still does to a volume on its own (an RBD clone's background flatten: "flattening (chain
depth N)") is shown beside it; it is no inconsistency and changes no exit code.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from csi_luks.encryption import VolumeEncryption
from csi_luks.kms.base import (
    DEKDecryptError,
    DEKNotFound,
    KeyRotationUnsupported,
    KMSError,
    KMSUnavailable,
)
from csi_luks.luks import NotLuksDevice, WrongPassphrase
from csi_luks.luks.errors import LuksError
from csi_luks.operations.header_backup import header_backup_matches
from csi_luks.operations.tool import EXIT_INCONSISTENT, EXIT_OK, EXIT_UNAVAILABLE, Tool
from csi_luks.volume_metadata import EncryptionState
from csi_luks.volumes.base import BackendUnavailable, VolumeBackendError


@dataclass
class VolumeStatus:
    volume_id: str
    kind: str = "volume"
    encrypted: bool = True
    kms_id: str = ""
    kms_type: str = ""
    state: str = ""
    key_slots: list[int] = field(default_factory=list)
    dek_retrievable: bool | None = None  # None: not checked (the KMS could not be asked)
    dek_slot: int | None = None  # the key slot the DEK opens
    rotation_pending: bool = False
    header_backup: str = "n/a"  # matches, differs, missing, n/a (the backend keeps none, or no header yet)
    background_work: str | None = None  # e.g. "flattening (chain depth 4)" (RBD); None: nothing
    unreachable: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def consistent(self) -> bool:
        return not self.problems and not self.unreachable


def volume_status(tool: Tool, volume_id: str) -> VolumeStatus:
    try:
        record = tool.record(volume_id)
    except VolumeBackendError as exc:
        status = VolumeStatus(volume_id, unreachable=isinstance(exc, BackendUnavailable))
        status.problems.append(str(exc))
        return status
    status = VolumeStatus(
        volume_id,
        kind="snapshot" if record.is_snapshot else "volume",
        encrypted=record.encrypted,
        kms_id=record.kms_id,
        state=record.state.value if record.state else "none",
    )
    try:
        status.background_work = tool.backend.background_work(volume_id)
    except VolumeBackendError as exc:
        status.unreachable = status.unreachable or isinstance(exc, BackendUnavailable)
        status.problems.append(f"background work cannot be checked: {exc}")
    if not record.encrypted:
        return status
    try:
        status.kms_type = tool.kms_config.entry(record.kms_id).get("encryptionKMSType", "")
        encryption = tool.encryption(volume_id, record)
    except KMSError as exc:
        status.problems.append(f"KMS {record.kms_id!r}: {exc}")
        return status
    try:
        _check(tool, volume_id, status, encryption)
    except (KMSUnavailable, BackendUnavailable) as exc:
        status.unreachable = True
        status.problems.append(str(exc))
    finally:
        encryption.close()
    return status


def _check(tool: Tool, volume_id: str, status: VolumeStatus, encryption: VolumeEncryption) -> None:
    dek = None
    try:
        dek = encryption.get_passphrase(volume_id)
        status.dek_retrievable = True
    except (DEKNotFound, DEKDecryptError) as exc:
        status.dek_retrievable = False
        status.problems.append(f"DEK not retrievable: {exc}")
    except KMSUnavailable:
        raise
    except KMSError as exc:
        status.problems.append(f"DEK cannot be checked: {exc}")
    pending = None
    try:
        pending = encryption.get_pending_passphrase(volume_id)
    except KeyRotationUnsupported:
        pass
    except (DEKDecryptError, DEKNotFound) as exc:
        status.problems.append(f"pending DEK: {exc}")
    status.rotation_pending = pending is not None or status.state == EncryptionState.ROTATING.value
    if status.rotation_pending:
        status.problems.append(
            "a DEK rotation is pending: `csi-luks rotate` (or the next NodeStage) finishes it"
        )
    if status.state == EncryptionState.PREPARED.value:
        return  # no header yet: the first NodeStage formats it
    if status.state not in (EncryptionState.ENCRYPTED.value, EncryptionState.ROTATING.value):
        status.problems.append("its key was never prepared (CreateVolume did not finish)")
        return
    with tool.backend.key_device(volume_id) as device:
        try:
            status.key_slots = tool.cryptsetup.active_slots(device)
        except NotLuksDevice:
            status.problems.append(f"{device} holds no LUKS header: `csi-luks header restore` brings it back")
        except LuksError as exc:
            status.problems.append(f"header unreadable: {exc}")
        if status.key_slots and dek is not None:
            try:
                status.dek_slot = tool.cryptsetup.verify_passphrase(device, dek)
            except WrongPassphrase:
                status.problems.append("the DEK does not open the LUKS header")
        opened = {status.dek_slot, tool.cryptsetup.slot_of(device, pending)} - {None}
        stray = [slot for slot in status.key_slots if slot not in opened]
        if stray and status.dek_slot is not None:
            status.problems.append(f"key slots {stray} are opened by no DEK the KMS holds")
        if tool.backend.keeps_header_backups:
            matches = header_backup_matches(tool.cryptsetup, tool.backend, volume_id, device)
            status.header_backup = {None: "missing", True: "matches", False: "differs"}[matches]
            if matches is not True:
                status.problems.append(f"header backup {status.header_backup}")


def report(tool: Tool, volume_ids: list[str], output: str) -> int:
    """Print the status of the named volumes (every volume and snapshot when none is named)."""
    ids = volume_ids or [info.volume_id for info in tool.backend.list()]
    statuses = [volume_status(tool, volume_id) for volume_id in ids]
    if output == "json":
        print(json.dumps([{**asdict(s), "consistent": s.consistent} for s in statuses], indent=1))
    else:
        print(_table(statuses))
    if any(s.unreachable for s in statuses):
        return EXIT_UNAVAILABLE
    return EXIT_OK if all(s.consistent for s in statuses) else EXIT_INCONSISTENT


def _table(statuses: list[VolumeStatus]) -> str:
    header = (
        "VOLUME",
        "KIND",
        "KMS",
        "TYPE",
        "STATE",
        "SLOTS",
        "DEK",
        "OPENS",
        "PENDING",
        "BACKUP",
        "BACKGROUND",
        "RESULT",
    )
    rows = [header]
    for s in statuses:
        yes_no = {None: "-", True: "yes", False: "no"}
        rows.append((
            s.volume_id, s.kind, s.kms_id or ("-" if not s.encrypted else "(secrets)"), s.kms_type or "-",
            s.state, ",".join(map(str, s.key_slots)) or "-", yes_no[s.dek_retrievable],
            f"slot {s.dek_slot}" if s.dek_slot is not None else "-", "yes" if s.rotation_pending else "no",
            s.header_backup, s.background_work or "-",
            "ok" if s.consistent else "unreachable" if s.unreachable else "INCONSISTENT",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    for s in statuses:
        lines.extend(f"{s.volume_id}: {problem}" for problem in s.problems)
    return "\n".join(lines)

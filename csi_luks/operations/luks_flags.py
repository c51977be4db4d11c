"""`csi-luks luks-flags`: change an existing volume's persistent dm-crypt flags (discard, perf flags).

A StorageClass's `encryptionDiscard` and `encryptionPerfFlags` are stored in each volume's LUKS2 header
at its first stage; editing the class changes no existing volume. This command does, for one volume:
it reads the flags its header holds, changes those asked for, and stores the result in the header
(the passphrase reaches cryptsetup on stdin):

- staged on this node (its mapping is open): `cryptsetup refresh --persistent`, which also reloads the
  live mapping, so the change applies at once;
- not staged: the volume is attached for the call, opened under a temporary name with `--persistent`,
  and closed again; the next stage applies the flags.

A volume not staged yet (`prepared`: no header) gets the change in its metadata only: its first stage
stores what the metadata says. The metadata records the header's flags afterwards, in every case.
"""

from __future__ import annotations

import logging

from csi_luks.luks import mapper_name
from csi_luks.luks.parameters import ActivationFlags
from csi_luks.operations import OperationRefused
from csi_luks.operations.tool import Tool, for_each
from csi_luks.volume_metadata import LUKS_DISCARD, LUKS_PERF_FLAGS, EncryptionState

log = logging.getLogger(__name__)

TEMPORARY_PREFIX = "luks-flags-"  # the mapping of an unstaged volume while its flags are stored


def _record_flags(tool: Tool, volume_id: str, flags: ActivationFlags) -> None:
    tool.backend.set_metadata(volume_id, LUKS_DISCARD, "true" if flags.discard else "")
    tool.backend.set_metadata(volume_id, LUKS_PERF_FLAGS, ",".join(flags.perf_flags))


def _changed(
    current: ActivationFlags, discard: bool | None, perf_flags: tuple[str, ...] | None
) -> ActivationFlags:
    return ActivationFlags(
        discard=current.discard if discard is None else discard,
        perf_flags=current.perf_flags if perf_flags is None else perf_flags,
    )


def luks_flags(
    tool: Tool, volume_ids: list[str], discard: bool | None, perf_flags: tuple[str, ...] | None
) -> int:
    """Set discard (None: keep) and the perf flags (None: keep; () clears them) of each volume."""

    def one(volume_id: str) -> str:
        record = tool.record(volume_id)
        if record.is_snapshot or not record.encrypted:
            raise OperationRefused(f"{volume_id} is not an encrypted volume: it has no dm-crypt flags")
        if record.state is None:
            raise OperationRefused(f"volume {volume_id} was never prepared (CreateVolume did not finish)")
        if record.state is EncryptionState.ROTATING:
            raise OperationRefused(
                f"volume {volume_id} has an unfinished DEK rotation: finish it first "
                f"(csi-luks rotate {volume_id})"
            )
        if record.state is EncryptionState.PREPARED:
            wanted = _changed(record.luks.flags, discard, perf_flags)
            with tool.backend.key_operation(volume_id, "a change of its dm-crypt flags"):
                _record_flags(tool, volume_id, wanted)
            return f"flags {wanted.describe()}: recorded; its first stage stores them in its LUKS header"
        encryption = tool.encryption(volume_id, record)
        try:
            with (
                tool.backend.key_operation(volume_id, "a change of its dm-crypt flags"),
                tool.backend.key_device(volume_id) as device,
            ):
                current = ActivationFlags.from_header(tool.cryptsetup.dump(device).flags)
                wanted = _changed(current, discard, perf_flags)
                options = wanted.open_options(persistent=True)
                passphrase = encryption.get_passphrase(volume_id)
                staged = tool.cryptsetup.open_mapping_of(device, mapper_name(volume_id)) is not None
                if staged:
                    tool.cryptsetup.refresh(mapper_name(volume_id), passphrase, options)
                else:
                    temporary = mapper_name(volume_id, prefix=TEMPORARY_PREFIX)
                    tool.cryptsetup.open(device, temporary, passphrase, options)
                    tool.cryptsetup.close(temporary)
                stored = ActivationFlags.from_header(tool.cryptsetup.dump(device).flags)
                if stored != wanted:
                    raise OperationRefused(
                        f"volume {volume_id}: cryptsetup left the header's flags at {stored.describe()}, "
                        f"not {wanted.describe()}"
                    )
                _record_flags(tool, volume_id, stored)
        finally:
            encryption.close()
        log.info("volume %s: persistent flags %s -> %s", volume_id, current.describe(), stored.describe())
        when = "applied to the staged mapping now" if staged else "applied at its next stage"
        return f"flags {current.describe()} -> {stored.describe()}: stored in the LUKS header, {when}"

    return for_each(volume_ids, one)

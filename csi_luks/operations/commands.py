"""The operator commands behind `csi-luks rotate`, `csi-luks header ...` and `csi-luks rewrap`."""

from __future__ import annotations

import logging

from csi_luks.kms.dek_store import DEK_KEY, DEK_PENDING_KEY
from csi_luks.kms.vault import VaultTransitKMS
from csi_luks.operations import OperationRefused
from csi_luks.operations.header_backup import refresh_header_backup, restore_header
from csi_luks.operations.rotation import KeyRotation
from csi_luks.operations.tool import Tool, for_each

log = logging.getLogger(__name__)


def rotate(tool: Tool, volume_ids: list[str]) -> int:
    """Rotate each volume's DEK, attached (staged) or not."""

    def one(volume_id: str) -> str:
        encryption = tool.encryption(volume_id)
        try:
            with tool.backend.key_device(volume_id) as device:
                result = KeyRotation(tool.cryptsetup, tool.backend, encryption).rotate(volume_id, device)
        finally:
            encryption.close()
        done = "an interrupted rotation finished" if result.resumed else "DEK rotated"
        wiped = f"; key slots wiped: {', '.join(map(str, result.killed))}" if result.killed else ""
        return f"{done}; key slot {result.slot}{wiped}"

    return for_each(volume_ids, one)


def header_backup(tool: Tool, volume_ids: list[str]) -> int:
    """Take (or refresh) each volume's header backup now."""

    def one(volume_id: str) -> str:
        if not tool.record(volume_id).encrypted:
            raise OperationRefused(f"volume {volume_id} is not encrypted")
        with (
            tool.backend.key_operation(volume_id, "a header backup"),
            tool.backend.key_device(volume_id) as device,
        ):
            if not refresh_header_backup(tool.cryptsetup, tool.backend, volume_id, device):
                raise OperationRefused(f"the {type(tool.backend).__name__} keeps no header backups")
        return "header backed up"

    return for_each(volume_ids, one)


def header_restore(tool: Tool, volume_id: str, force: bool) -> int:
    """Write a volume's kept header backup back onto it."""

    def one(volume_id: str) -> str:
        encryption = tool.encryption(volume_id)
        try:
            with (
                tool.backend.key_operation(volume_id, "a header restore"),
                tool.backend.key_device(volume_id) as device,
            ):
                restore_header(tool.cryptsetup, tool.backend, encryption, volume_id, device, force=force)
        finally:
            encryption.close()
        return "header restored from its backup"

    return for_each([volume_id], one)


def rewrap(tool: Tool, kms_ids: list[str]) -> int:
    """Re-wrap the DEKs of every volume whose KMS is of type vault-transit (or one of kms_ids) under the
    Transit key's newest version. Vault re-wraps: no DEK leaves it in plain text."""
    chosen = [
        info.volume_id
        for info in tool.backend.list()
        if (record := tool.record(info.volume_id)).encrypted
        and (not kms_ids or record.kms_id in kms_ids)
        and tool.kms_config.entry(record.kms_id).get("encryptionKMSType") == "vault-transit"
    ]

    def one(volume_id: str) -> str:
        encryption = tool.encryption(volume_id)
        kms = encryption.kms
        assert isinstance(kms, VaultTransitKMS)  # noqa: S101 - chosen by type above
        changed = 0
        metadata = tool.backend.get(volume_id).metadata
        for key in (DEK_KEY, DEK_PENDING_KEY):
            wrapped = metadata.get(key)
            if wrapped:
                rewrapped = kms.rewrap_dek(volume_id, wrapped)
                # Each wrap has its own nonce: only a newer key version ("vault:vN:") is a change.
                if _key_version(rewrapped) != _key_version(wrapped):
                    tool.backend.set_metadata(volume_id, key, rewrapped)
                    changed += 1
        return f"{changed} wrapped DEK(s) re-wrapped" if changed else "already under the newest key version"

    if not chosen:
        print("no volume uses a vault-transit KMS" + (f" among {', '.join(kms_ids)}" if kms_ids else ""))
    return for_each(chosen, one)


def _key_version(wrapped: str) -> str:
    return wrapped.split(":", 2)[1] if wrapped.count(":") >= 2 else ""

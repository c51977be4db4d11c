"""The operator commands behind `csi-luks header ...`."""

from __future__ import annotations

import logging

from csi_luks.operations import OperationRefused
from csi_luks.operations.header_backup import refresh_header_backup, restore_header
from csi_luks.operations.tool import Tool, for_each

log = logging.getLogger(__name__)


def header_backup(tool: Tool, volume_ids: list[str]) -> int:
    """Take (or refresh) each volume's header backup now."""

    def one(volume_id: str) -> str:
        if not tool.record(volume_id).encrypted:
            raise OperationRefused(f"volume {volume_id} is not encrypted")
        with tool.backend.key_device(volume_id) as device:
            if not refresh_header_backup(tool.cryptsetup, tool.backend, volume_id, device):
                raise OperationRefused(f"the {type(tool.backend).__name__} keeps no header backups")
        return "header backed up"

    return for_each(volume_ids, one)


def header_restore(tool: Tool, volume_id: str, force: bool) -> int:
    """Write a volume's kept header backup back onto it."""

    def one(volume_id: str) -> str:
        encryption = tool.encryption(volume_id)
        try:
            with tool.backend.key_device(volume_id) as device:
                restore_header(tool.cryptsetup, tool.backend, encryption, volume_id, device, force=force)
        finally:
            encryption.close()
        return "header restored from its backup"

    return for_each([volume_id], one)

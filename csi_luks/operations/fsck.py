"""`csi-luks fsck`: a read-only check of an unstaged volume's filesystem, what NodeStage's refusal of a
filesystem it cannot find or mount asks an operator to run. Nothing is written: an encrypted volume is
opened read-only under a mapping name of its own (a NodeStage meanwhile is refused, not handed a
read-only mapping), the checker runs with -n, and everything is closed and detached again."""

from __future__ import annotations

from csi_luks.luks import mapper_name
from csi_luks.luks.options import OpenOptions
from csi_luks.operations import OperationRefused
from csi_luks.operations.tool import Tool, for_each
from csi_luks.system.filesystem import Filesystems

_CHECK_PREFIX = "luks-fsck-"


def fsck(tool: Tool, volume_ids: list[str], filesystems: Filesystems | None = None) -> int:
    """Check each volume's filesystem; exit 1 if any is not clean or cannot be checked."""
    fs = filesystems or Filesystems()

    def one(volume_id: str) -> str:
        record = tool.record(volume_id)
        if record.is_snapshot:
            raise OperationRefused(f"{volume_id} is a snapshot: restore it into a volume to check it")
        if record.filesystem is not None and record.filesystem.is_block:
            raise OperationRefused(
                f"volume {volume_id} is a raw block volume: it holds no filesystem of ours"
            )
        if tool.backend.find_attachment(volume_id) is not None:
            raise OperationRefused(
                f"volume {volume_id} is attached on this node (staged?): unstage it first; a check of a "
                "filesystem in use means nothing"
            )
        with tool.backend.key_device(volume_id) as device:
            if not record.encrypted:
                return _checked(fs, volume_id, device, record.filesystem.type if record.filesystem else None)
            name = mapper_name(volume_id, prefix=_CHECK_PREFIX)
            encryption = tool.encryption(volume_id, record)
            try:
                mapped = tool.cryptsetup.open(
                    device, name, encryption.get_passphrase(volume_id), OpenOptions(readonly=True)
                )
            finally:
                encryption.close()
            try:
                return _checked(fs, volume_id, mapped, record.filesystem.type if record.filesystem else None)
            finally:
                tool.cryptsetup.close(name)

    return for_each(volume_ids, one)


def _checked(fs: Filesystems, volume_id: str, device: str, recorded: str | None) -> str:
    found = fs.probe(device)
    fstype = recorded or found.type or "ext4"
    if fstype not in ("ext4", "xfs"):
        raise OperationRefused(f"volume {volume_id} holds {fstype}, not a filesystem csi-luks makes")
    check = fs.check(device, fstype)
    verdict = f"{fstype}: {check.summary}"
    if not check.clean:
        last = "\n".join(check.output.strip().splitlines()[-15:])
        raise OperationRefused(f"{verdict}\n{last}")
    return verdict

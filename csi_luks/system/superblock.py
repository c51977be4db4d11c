"""A filesystem's UUID as its own superblock gives it, read in this process.

For a restage: the filesystem recorded at the first stage is known by type and UUID, and one 4 KiB read
tells whether it is still the one on the device, where a blkid process costs ~120 ms under TCG. Anything
else (another UUID, no superblock, an unreadable device) is left to blkid, which says what is there.
"""

from __future__ import annotations

import uuid

# ext2/3/4: the superblock at 1024, s_magic (le16) at 0x38 in it, s_uuid at 0x68.
_EXT_SUPERBLOCK, _EXT_MAGIC_AT, _EXT_MAGIC, _EXT_UUID_AT = 1024, 0x38, 0xEF53, 0x68
# XFS: the superblock at 0, "XFSB", sb_uuid at 32.
_XFS_MAGIC, _XFS_UUID_AT = b"XFSB", 32
_UUID_SIZE = 16


def superblock_uuid(first_block: bytes, fs_type: str) -> str | None:
    """The UUID of the fs_type superblock at the start of a device (its first 4 KiB), if there is one."""
    if fs_type == "ext4":
        superblock = first_block[_EXT_SUPERBLOCK : _EXT_SUPERBLOCK + 1024]
        magic = superblock[_EXT_MAGIC_AT : _EXT_MAGIC_AT + 2]
        if len(superblock) < 1024 or int.from_bytes(magic, "little") != _EXT_MAGIC:
            return None
        return str(uuid.UUID(bytes=superblock[_EXT_UUID_AT : _EXT_UUID_AT + _UUID_SIZE]))
    if fs_type == "xfs" and first_block[:4] == _XFS_MAGIC and len(first_block) >= _XFS_UUID_AT + _UUID_SIZE:
        return str(uuid.UUID(bytes=first_block[_XFS_UUID_AT : _XFS_UUID_AT + _UUID_SIZE]))
    return None

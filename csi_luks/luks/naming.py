"""Device-mapper names for volumes: deterministic, so a restarted plugin finds its own mappings."""

from __future__ import annotations

import hashlib
import re

MAPPER_PREFIX = "luks-"
_SAFE = re.compile(r"[A-Za-z0-9_.+-]")
# Kernel DM_NAME_LEN is 128 including the NUL; stay well clear for udev's /dev/disk/by-id links.
_MAX_NAME = 100


def mapper_name(volume_id: str, prefix: str = MAPPER_PREFIX) -> str:
    """The mapper name of a volume: prefix + the id if it is made of safe characters and short enough.

    Otherwise unsafe characters become '_' and a digest of the full id is appended, so two ids that
    sanitize alike still get different names.
    """
    if not volume_id:
        raise ValueError("volume id must not be empty")
    safe = "".join(c if _SAFE.fullmatch(c) else "_" for c in volume_id)
    name = prefix + safe
    if safe == volume_id and len(name) <= _MAX_NAME and safe not in (".", ".."):
        return name
    digest = hashlib.sha256(volume_id.encode()).hexdigest()[:16]
    return f"{name[: _MAX_NAME - len(digest) - 1]}-{digest}"


def mapper_path(name: str) -> str:
    return f"/dev/mapper/{name}"

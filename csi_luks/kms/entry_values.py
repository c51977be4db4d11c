"""Typed values of a KMS entry (flags, seconds), checked; messages name the id and key, never the value."""

from __future__ import annotations

import math
from collections.abc import Mapping

from csi_luks.kms.base import KMSConfigError


def flag(kms_id: str, entry: Mapping[str, str], key: str, default: bool) -> bool:
    """ "true" or "false"; unset or empty is the default."""
    value = entry.get(key)
    if not value:
        return default
    if value not in ("true", "false"):
        raise KMSConfigError(f'KMS {kms_id!r}, key {key!r}: must be "true" or "false"')
    return value == "true"


def seconds(kms_id: str, entry: Mapping[str, str], key: str, default: float, maximum: float = 3600) -> float:
    """A positive, finite number of seconds up to maximum; unset or empty is the default."""
    value = entry.get(key)
    if not value:
        return default
    try:
        number = float(value)
    except ValueError:
        raise KMSConfigError(f"KMS {kms_id!r}, key {key!r}: must be a number of seconds") from None
    if not (math.isfinite(number) and 0 < number <= maximum):
        raise KMSConfigError(
            f"KMS {kms_id!r}, key {key!r}: must be a positive number of seconds, at most {maximum:g}"
        )
    return number

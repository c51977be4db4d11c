"""Quoting request fields in messages: bounded, so a hostile field cannot blow up a gRPC status."""

from __future__ import annotations

# A status message travels in a gRPC trailer, which the client drops past 8 KiB ("Stream removed"):
# a quoted field is shortened far below that, so several fit in one message with room for the rest.
QUOTE_LIMIT = 120


def quoted(value: str, limit: int = QUOTE_LIMIT) -> str:
    """repr() of a request field, cut to `limit` characters with the full length said."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def quoted_list(values: list[str], most: int = 5) -> str:
    """Like repr() of the list, of its first `most` values quoted, saying how many more there are."""
    more = [f"... {len(values) - most} more"] if len(values) > most else []
    return "[" + ", ".join([quoted(v) for v in values[:most]] + more) + "]"

"""OperationRefused: the volume is not in a state an operation can act on. Below every layer that refuses
(the key lock, the operator commands, the services), so none of them imports upward for it."""

from __future__ import annotations


class OperationRefused(Exception):
    """The volume is not in a state the operation can act on; an operator must look (FAILED_PRECONDITION)."""

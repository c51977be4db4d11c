"""Operator lifecycle work on encrypted volumes: key rotation, header backups, crypto-shredding.

Each module takes the same pieces the services use (a VolumeBackend, a VolumeEncryption, Cryptsetup), so
the gRPC services and the `csi-luks` commands share one implementation.
"""

from __future__ import annotations


class OperationRefused(Exception):
    """The volume is not in a state the operation can act on; an operator must look (FAILED_PRECONDITION)."""

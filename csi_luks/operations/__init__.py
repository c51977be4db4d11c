"""Operator lifecycle work on encrypted volumes: key rotation, header backups, crypto-shredding.

Each module takes the same pieces the services use (a VolumeBackend, a VolumeEncryption, Cryptsetup), so
the gRPC services and the `csi-luks` commands share one implementation.
"""

from __future__ import annotations

from csi_luks.refusal import OperationRefused

__all__ = ["OperationRefused"]

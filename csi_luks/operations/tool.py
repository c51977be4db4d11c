"""What the operator commands (`csi-luks rotate`, `header restore`, `rewrap`) share: the backend and KMS
configuration as `serve` builds them, one volume's encryption, and the exit codes.

Exit codes of every operator command:

  0  done (for `status`: every volume is consistent)
  1  refused or failed for a volume (the message says why; nothing was lost)
  2  bad arguments or configuration
  3  the KMS (or the backend) cannot be reached now: retry later
  4  `status` only: a volume is inconsistent
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from csi_luks.encryption import VolumeEncryption, volume_encryption
from csi_luks.kms.base import KMSContext, KMSError, KMSUnavailable
from csi_luks.kms.config import KMSConfig
from csi_luks.luks import Cryptsetup
from csi_luks.luks.errors import LuksError
from csi_luks.operations import OperationRefused
from csi_luks.settings import Backend
from csi_luks.volume_metadata import VolumeRecord
from csi_luks.volumes.base import BackendUnavailable, VolumeBackend, VolumeBackendError
from csi_luks.volumes.ceph_clusters import CephClusters
from csi_luks.volumes.rbd import RbdBackend
from csi_luks.volumes.standalone import StandaloneBackend

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_INCONSISTENT = 4


@dataclass
class Tool:
    """The pieces an operator command works with."""

    backend: VolumeBackend
    kms_config: KMSConfig
    cryptsetup: Cryptsetup = field(default_factory=Cryptsetup)
    secrets: Mapping[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_arguments(
        cls,
        backend: str,
        state_dir: str,
        ceph_config: str,
        kms_config: str,
        kms_config_map: str | None,
        secrets_file: str | None,
    ) -> Tool:
        secrets: dict[str, str] = {}
        if secrets_file:
            raw = json.loads(Path(secrets_file).read_text())
            if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
                raise ValueError(f"{secrets_file}: must hold a JSON object of strings")
            secrets = raw
        config_map = None
        if kms_config_map:
            namespace, _, name = kms_config_map.partition("/")
            config_map = (namespace, name)
        kind = Backend(backend)
        volumes: VolumeBackend = (
            # A flatten an image owes is the plugin's to run: this process may end before it would finish.
            RbdBackend(CephClusters(ceph_config), state_dir, resume_flattens=False)
            if kind is Backend.RBD
            else StandaloneBackend(state_dir)
        )
        return cls(
            volumes.for_request(secrets, one_request=False),
            KMSConfig.from_file(kms_config, config_map),
            secrets=secrets,
        )

    def record(self, volume_id: str) -> VolumeRecord:
        return VolumeRecord.parse(self.backend.get(volume_id).metadata)

    def encryption(self, volume_id: str, record: VolumeRecord | None = None) -> VolumeEncryption:
        record = record or self.record(volume_id)
        context = KMSContext(secrets=dict(self.secrets), pvc_namespace=record.pvc_namespace)
        return volume_encryption(self.kms_config, record.kms_id, context, self.backend)


def exit_code(exc: Exception) -> int:
    """The exit code of a failure of one volume."""
    if isinstance(exc, KMSUnavailable | BackendUnavailable):
        return EXIT_UNAVAILABLE
    return EXIT_FAILED


def for_each(volume_ids: list[str], action: Callable[[str], str]) -> int:
    """Run action on each volume, printing its outcome; the worst exit code (unreachable over failed)."""
    worst = EXIT_OK
    for volume_id in volume_ids:
        try:
            print(f"{volume_id}: {action(volume_id)}")
        except (OperationRefused, KMSError, LuksError, VolumeBackendError) as exc:
            print(f"{volume_id}: {exc}", file=sys.stderr)
            code = exit_code(exc)
            worst = code if worst == EXIT_OK or code == EXIT_UNAVAILABLE else worst
    return worst

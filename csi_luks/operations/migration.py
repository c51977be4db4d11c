"""`csi-luks migrate --from KMS_ID --to KMS_ID`: move every DEK of one KMS id under another, online.

Per volume (and snapshot) whose kms-id is FROM, each step one durable write:

 1. mark      metadata `csi-luks/migrating-to` = TO (what a resumed run looks for)
 2. write     the DEK, wrapped or stored by TO; read back through TO, it must unwrap to the same DEK
 3. switch    metadata `csi-luks/kms-id` = TO: from here on every call uses TO
 4. remove    FROM's entry is removed (its Vault secret, or nothing more when both keep the wrapped DEK
              in the volume's metadata: step 2 replaced it), then the mark

When FROM and TO both keep the wrapped DEK in the volume's metadata (`csi-luks/dek`), step 2 writes TO's
copy to `csi-luks/dek-migrating` first and step 3 puts it in place just before switching the kms-id; a
NodeStage in the instant between those two writes fails with FAILED_PRECONDITION and is retried by the
CO, and a kill there is repaired by running migrate again. Volumes with a pending key rotation are
skipped until the rotation is finished. Any kill leaves a volume whose DEK some KMS id returns, and a
second run finishes what the first began.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from csi_luks.crash import Step, crash_points
from csi_luks.encryption import VolumeEncryption
from csi_luks.kms.base import KMSError
from csi_luks.kms.dek_store import DEK_KEY, MetadataDEKStore
from csi_luks.kms.vault import VaultKVKMS
from csi_luks.luks.errors import LuksError
from csi_luks.operations import OperationRefused
from csi_luks.operations.tool import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Tool, exit_code
from csi_luks.volume_metadata import KMS_ID, PREFIX, EncryptionState, VolumeRecord
from csi_luks.volumes.base import VolumeBackendError

log = logging.getLogger(__name__)

MIGRATING_TO = PREFIX + "migrating-to"
STAGED_DEK = PREFIX + "dek-migrating"
_NO_PER_VOLUME_DEK = ("secrets", "default")
CRASH_POINTS = crash_points("migration", ("mark", "write", "switch", "remove"))


@dataclass
class Summary:
    migrated: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def _in_metadata(encryption: VolumeEncryption) -> bool:
    return isinstance(encryption.store, MetadataDEKStore) and encryption.store.key == DEK_KEY


def _same_place(source: VolumeEncryption, target: VolumeEncryption, volume_id: str) -> bool:
    """Whether both KMS ids store the DEK in one and the same Vault KV secret (removing FROM's would
    remove TO's)."""
    a, b = source.store, target.store
    if not (isinstance(a, VaultKVKMS) and isinstance(b, VaultKVKMS)):
        return False
    where = [(s.connection.settings.address, s.connection.settings.namespace, s.mount, s.path(volume_id))
             for s in (a, b)]  # fmt: skip
    return where[0] == where[1]


class Migration:
    def __init__(self, tool: Tool, source: str, target: str) -> None:
        for kms_id in (source, target):
            kind = tool.kms_config.entry(kms_id).get("encryptionKMSType", "")
            if kind in _NO_PER_VOLUME_DEK:
                raise OperationRefused(f"KMS {kms_id!r} is of type {kind}: it keeps no per-volume DEK")
        if source == target:
            raise OperationRefused("--from and --to name the same KMS id")
        self.tool, self.source, self.target = tool, source, target

    def _candidate(self, metadata: Mapping[str, str]) -> bool:
        return metadata.get(KMS_ID) == self.source or (
            metadata.get(KMS_ID) == self.target and metadata.get(MIGRATING_TO) == self.target
        )

    def candidates(self, volume_ids: Sequence[str] = ()) -> list[str]:
        """The volumes and snapshots of FROM, and those a killed run left half-way to TO: among
        volume_ids when named (the RBD backend cannot list its volumes), else among all volumes."""
        if volume_ids:
            return [v for v in volume_ids if self._candidate(self.tool.backend.get(v).metadata)]
        return [info.volume_id for info in self.tool.backend.list() if self._candidate(info.metadata)]

    def _encryption(self, volume_id: str, record: VolumeRecord, kms_id: str) -> VolumeEncryption:
        return self.tool.encryption(volume_id, dataclasses.replace(record, kms_id=kms_id))

    def _write(
        self, volume_id: str, source: VolumeEncryption, target: VolumeEncryption, in_metadata: bool
    ) -> None:
        """TO's copy of the DEK, read back through TO to the same DEK; in place when both keep it in
        the volume's metadata (staged under STAGED_DEK first, so a kill leaves a copy to finish with)."""
        dek = source.get_passphrase(volume_id)
        wrapped = target.kms.encrypt_dek(volume_id, dek)
        store = MetadataDEKStore(self.tool.backend, STAGED_DEK) if in_metadata else target.store
        store.store_dek(volume_id, wrapped)
        if target.kms.decrypt_dek(volume_id, store.fetch_dek(volume_id)) != dek:
            raise OperationRefused(f"KMS {self.target!r} does not give the DEK back unchanged")
        if in_metadata:
            self.tool.backend.set_metadata(volume_id, DEK_KEY, wrapped)

    def migrate(self, volume_id: str) -> str:
        with self.tool.backend.key_operation(volume_id, "a KMS migration"):
            return self._migrate(volume_id)

    def _migrate(self, volume_id: str) -> str:
        backend = self.tool.backend
        metadata = backend.get(volume_id).metadata
        record = VolumeRecord.parse(metadata)
        if not record.encrypted:
            raise OperationRefused("not encrypted")
        if record.state is EncryptionState.ROTATING:
            raise OperationRefused("a key rotation is pending: finish it first (csi-luks rotate)")
        source = self._encryption(volume_id, record, self.source)
        target = self._encryption(volume_id, record, self.target)
        in_metadata = _in_metadata(source) and _in_metadata(target)
        if not in_metadata and _same_place(source, target, volume_id):
            raise OperationRefused(
                f"KMS ids {self.source!r} and {self.target!r} keep this volume's DEK at the same Vault path"
            )
        if record.kms_id == self.source:
            with Step("migration", "mark"):
                backend.set_metadata(volume_id, MIGRATING_TO, self.target)
            staged = metadata.get(STAGED_DEK)
            # A killed run may have put TO's copy in place already (metadata to metadata): FROM cannot
            # unwrap it any more, and it needs only the switch.
            if not (in_metadata and staged and metadata.get(DEK_KEY) == staged):
                with Step("migration", "write"):
                    self._write(volume_id, source, target, in_metadata)
            with Step("migration", "switch"):
                backend.set_metadata(volume_id, KMS_ID, self.target)
        with Step("migration", "remove"):
            if in_metadata:
                backend.remove_metadata(volume_id, STAGED_DEK)
            else:
                source.remove(volume_id)
            backend.remove_metadata(volume_id, MIGRATING_TO)
        log.info("volume %s: DEK moved from KMS %r to %r", volume_id, self.source, self.target)
        return f"DEK moved from {self.source} to {self.target}"


def migrate(tool: Tool, source: str, target: str, dry_run: bool, volume_ids: Sequence[str] = ()) -> int:
    """Migrate every candidate (of volume_ids when named); print one line per volume and a summary.
    Exit 0 when all moved, 1 when one was skipped or failed, 3 when a KMS or the backend could not be
    reached."""
    try:
        migration = Migration(tool, source, target)
    except (OperationRefused, KMSError) as exc:
        print(f"csi-luks migrate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    summary = Summary()
    worst = EXIT_OK
    for volume_id in migration.candidates(volume_ids):
        if dry_run:
            print(f"{volume_id}: would move its DEK from {source} to {target}")
            summary.migrated.append(volume_id)
            continue
        try:
            print(f"{volume_id}: {migration.migrate(volume_id)}")
            summary.migrated.append(volume_id)
        except OperationRefused as exc:
            summary.skipped[volume_id] = str(exc)
            print(f"{volume_id}: skipped: {exc}", file=sys.stderr)
            worst = max(worst, EXIT_FAILED)
        except (KMSError, LuksError, VolumeBackendError) as exc:
            summary.failed[volume_id] = str(exc)
            print(f"{volume_id}: failed: {exc}", file=sys.stderr)
            worst = max(worst, exit_code(exc))
    verb = "would be migrated" if dry_run else "migrated"
    print(
        f"{len(summary.migrated)} {verb}, {len(summary.skipped)} skipped, {len(summary.failed)} failed "
        f"(from {source} to {target})"
    )
    return worst

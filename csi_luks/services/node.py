"""CSI Node service: attach, format once, open, mkfs, mount, publish, expand, report, and undo it all.

Nothing is kept in memory between calls: the mapping name follows from the volume id, the attachment
is found from the system, and the encryption state lives in the volume's metadata. A restarted plugin
unstages what its predecessor staged.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from dataclasses import dataclass

import grpc

from csi_luks.crash import crash_point
from csi_luks.csi import csi_pb2, csi_pb2_grpc
from csi_luks.encryption import VolumeEncryption, volume_encryption
from csi_luks.errors import failed_precondition, invalid_argument, not_found
from csi_luks.kms.base import KMSContext
from csi_luks.kms.config import KMSConfig
from csi_luks.locks import OperationLocks
from csi_luks.luks import (
    CipherUnavailable,
    Cryptsetup,
    LuksError,
    NotLuksDevice,
    WrongPassphrase,
    mapper_name,
    mapper_path,
)
from csi_luks.luks.stale import StaleMapping, StaleMappings
from csi_luks.luks.status import luks2_label
from csi_luks.operations.header_backup import refresh_header_backup
from csi_luks.operations.rotation import KeyRotation
from csi_luks.quoting import quoted, quoted_list
from csi_luks.services.validation import checked_id, require_path, validate_capability
from csi_luks.system.device_io import DeviceIOError, read_error, read_first_block
from csi_luks.system.filesystem import Filesystems, Probe
from csi_luks.system.runner import CommandError
from csi_luks.system.superblock import superblock_uuid
from csi_luks.timing import step
from csi_luks.volume_metadata import (
    DELETING,
    FILESYSTEM,
    STATE,
    EncryptionState,
    FilesystemRecord,
    VolumeRecord,
)
from csi_luks.volumes.base import BackendRequestError, VolumeBackend, VolumeInfo, VolumeNotFound

log = logging.getLogger(__name__)

NodeRPC = csi_pb2.NodeServiceCapability.RPC.Type
CAPABILITIES = (
    NodeRPC.STAGE_UNSTAGE_VOLUME,
    NodeRPC.EXPAND_VOLUME,
    NodeRPC.GET_VOLUME_STATS,
    NodeRPC.VOLUME_CONDITION,
    NodeRPC.SINGLE_NODE_MULTI_WRITER,
)
_LUKS_LABEL_MAX = 47
_REPAIR_HINT = (
    "Unstage it, then check a copy of the mapping read-only: ext4 `e2fsck -n` (with a backup superblock if "
    "the primary is damaged: `-b 8193` for 1 KiB blocks, `-b 32768` for 4 KiB), xfs `xfs_repair -n`, or "
    "`csi-luks fsck VOLUME`; if the LUKS header is what is damaged, `csi-luks header restore VOLUME`"
)


@dataclass(frozen=True)
class _Layout:
    """Where a volume's layers are on this node."""

    record: VolumeRecord
    mapper: str  # the dm-crypt mapping name (encrypted volumes)

    @property
    def mapped_device(self) -> str:
        return mapper_path(self.mapper)


class NodeService(csi_pb2_grpc.NodeServicer):  # type: ignore[misc]
    def __init__(
        self,
        node_id: str,
        backend: VolumeBackend,
        kms_config: KMSConfig,
        locks: OperationLocks,
        cryptsetup: Cryptsetup,
        filesystems: Filesystems,
        stale_mappings: StaleMappings | None = None,
    ) -> None:
        self.node_id = node_id
        self.backend = backend
        self.kms_config = kms_config
        self.locks = locks
        self.cryptsetup = cryptsetup
        self.filesystems = filesystems
        self.stale_mappings = stale_mappings or StaleMappings()

    def _volume(self, backend: VolumeBackend, volume_id: str) -> tuple[VolumeInfo, _Layout]:
        try:
            info = backend.get(volume_id)
        except VolumeNotFound:
            raise not_found(f"volume {volume_id} does not exist") from None
        record = VolumeRecord.parse(info.metadata)
        if record.is_snapshot:
            raise not_found(f"{volume_id} is a snapshot, not a volume; restore it into a new volume")
        return info, _Layout(record, mapper_name(volume_id))

    def _encryption(
        self, backend: VolumeBackend, volume_id: str, record: VolumeRecord, secrets: dict[str, str]
    ) -> VolumeEncryption:
        context = KMSContext(secrets=secrets, pvc_namespace=record.pvc_namespace)
        return volume_encryption(self.kms_config, record.kms_id, context, backend)

    def _device(self, backend: VolumeBackend, volume_id: str, layout: _Layout) -> str | None:
        """The block device the workload sees (the mapping for encrypted volumes), if it exists."""
        if layout.record.encrypted:
            return layout.mapped_device if self.cryptsetup.is_open(layout.mapper) else None
        return backend.find_attachment(volume_id)

    # --- stage ---------------------------------------------------------------------------------------

    def NodeStageVolume(
        self, request: csi_pb2.NodeStageVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeStageVolumeResponse:
        backend = self.backend.for_request(request.secrets)
        staging = require_path(request.staging_target_path, "staging_target_path")
        validate_capability(request.volume_capability, request.HasField("volume_capability"))
        # Every field is checked for presence and form first (INVALID_ARGUMENT), then the id's grammar.
        volume_id = checked_id(backend, request.volume_id, "volume_id")
        capability = request.volume_capability
        with self.locks.hold(volume_id, "NodeStageVolume"):
            # A mapping left on a dead device must not be taken for the open one: a new device may even
            # have the old one's name. Known from the name alone, before any call to the backend.
            with step("stale-check"):
                stale = self.stale_mappings.check(mapper_name(volume_id))
            if stale is not None:
                raise failed_precondition(f"volume {volume_id} cannot be staged: {stale.message}")
            with step("lookup"):
                _, layout = self._volume(backend, volume_id)
            with step("attach"):
                was_attached = backend.find_attachment(volume_id) is not None
                device = backend.attach(volume_id)
            with step("deleting-check"):
                self._refuse_if_deleting(backend, volume_id, layout, was_attached)
            # Node crash points are single (after each step): a plugin start in the VM tier costs a minute.
            crash_point("node-stage.after-attach")
            opened = formatted = False
            with step("is-mounted"):
                was_mounted = self.filesystems.is_mounted(staging)
            try:
                if layout.record.encrypted:
                    device, opened, formatted = self._open_encrypted(
                        backend, volume_id, device, layout, dict(request.secrets)
                    )
                mount = capability.mount if capability.WhichOneof("access_type") == "mount" else None
                self._stage_contents(
                    backend, volume_id, device, staging, mount, layout.record, formatted, was_mounted
                )
                if layout.record.encrypted and layout.record.state is EncryptionState.PREPARED:
                    # Only now, with the filesystem (or the raw device) recorded: a `prepared` volume is
                    # one that nothing of the user's can be on.
                    with step("mark-encrypted"):
                        backend.set_metadata(volume_id, STATE, EncryptionState.ENCRYPTED.value)
                    crash_point("node-stage.after-mark-encrypted")
            except Exception:
                unmount = None if was_mounted else staging
                self._undo_stage(backend, volume_id, layout, opened, was_attached, unmount)
                raise
            if capability.WhichOneof("access_type") == "mount" and layout.record.source is not None:
                # A restore or clone into a larger volume: the mapping spans the grown device already,
                # the filesystem still has the source's size (a no-op once grown).
                with step("grow"):
                    self.filesystems.grow(device, staging, capability.mount.fs_type or "ext4")
            log.info("volume %s staged at %s (%s)", volume_id, staging, device)
            return csi_pb2.NodeStageVolumeResponse()

    def _refuse_if_deleting(
        self, backend: VolumeBackend, volume_id: str, layout: _Layout, was_attached: bool
    ) -> None:
        """After the attach (which DeleteVolume sees), read the volume's metadata afresh: a DeleteVolume
        that recorded its intent may have found no user before the attach, and is shredding the DEK.
        Then detach what this call attached, and refuse."""
        try:
            deleting = backend.fresh_metadata(volume_id).get(DELETING)
        except Exception as exc:
            self._undo_stage(backend, volume_id, layout, False, was_attached)
            if isinstance(exc, VolumeNotFound):
                raise not_found(f"volume {volume_id} was deleted while it was being staged") from None
            raise
        if deleting is not None:
            self._undo_stage(backend, volume_id, layout, False, was_attached)
            raise failed_precondition(
                f"volume {volume_id} is being deleted (DeleteVolume started at {deleting} and has not "
                "finished); it cannot be staged: the CO retries DeleteVolume until it completes"
            )

    def _undo_stage(
        self,
        backend: VolumeBackend,
        volume_id: str,
        layout: _Layout,
        opened: bool,
        was_attached: bool,
        unmount: str | None = None,
    ) -> None:
        """Leave the node as a failed stage found it: the mapping it opened closed, the loop device it
        attached detached. A device that failed I/O (a mkfs that did not reach the disk) may have left its
        writes in the page cache; only closing the last holder of the device drops them, so that the
        retry probes what is really on the disk. Failures here are logged: the stage's own error is
        what the caller must see."""
        try:
            if unmount is not None and self.filesystems.is_mounted(unmount):  # mounted by this call
                self.filesystems.unmount(unmount)
            if opened:
                self.cryptsetup.close(layout.mapper)
            if not was_attached:
                backend.detach(volume_id)
        except Exception as exc:  # best effort: the stage's own error is raised
            log.warning("volume %s: undoing the failed stage left something behind: %s", volume_id, exc)

    def _open_encrypted(
        self, backend: VolumeBackend, volume_id: str, device: str, layout: _Layout, secrets: dict[str, str]
    ) -> tuple[str, bool, bool]:
        """The mapping's path, whether this call opened it, and whether it wrote the LUKS header."""
        with step("find-mapping"):
            already_open = self.cryptsetup.open_mapping_of(device, layout.mapper)
        if already_open:
            return already_open, False, False
        record = layout.record
        with step("kms"):
            encryption = self._encryption(backend, volume_id, record, secrets)
        formatted = False
        if record.state is EncryptionState.PREPARED and record.filesystem is None:
            with step("probe-device"):  # never format a device that holds data
                # Nothing to find on a volume the backend proves was never written (a sparse image).
                never_written = backend.never_written(volume_id, device)
                found = Probe(type=None) if never_written else self.filesystems.probe(device)
            if found.empty:
                self._format(backend, volume_id, device, encryption, record)
                formatted = True
            elif found.is_luks:
                # A crash after luksFormat: the header is ours. One that the DEK cannot open is a format
                # killed inside cryptsetup's own writes (the magic on the disk, no key slot complete).
                try:
                    mapped = self._open(device, layout, encryption, volume_id, record)
                    with step("header-backup"):
                        refresh_header_backup(self.cryptsetup, backend, volume_id, device)
                    return mapped, True, False
                except (WrongPassphrase, NotLuksDevice):  # no key slot complete, or a torn header
                    self._refuse_unless_half_made_format(device, volume_id)
                log.warning(
                    "volume %s: its LUKS header on %s opens with no key slot of its DEK: a luksFormat "
                    "interrupted before its key slot was written; the volume is still prepared (it never "
                    "held data), so it is formatted again",
                    volume_id,
                    device,
                )
                self._format(backend, volume_id, device, encryption, record)
                formatted = True
            else:
                raise failed_precondition(
                    f"volume {volume_id} should be empty before its first use, but {device} holds "
                    f"{found.type or found.partition_table}; refusing to format it (no data was touched)"
                )
        elif record.state is None:
            raise failed_precondition(
                f"volume {volume_id} is marked encrypted but its key was never prepared (CreateVolume did "
                "not finish); delete and recreate it"
            )
        elif record.state is EncryptionState.ROTATING:  # an interrupted key rotation: finish it first
            self._refuse_without_header(volume_id, device)
            with step("finish-rotation"):
                KeyRotation(self.cryptsetup, backend, encryption).finish(volume_id, device)
        # A volume in use is only opened, never formatted: no probe first (a blkid, ~300 ms under TCG);
        # an open that finds no LUKS header probes then, to say what the device holds (_open).
        return self._open(device, layout, encryption, volume_id, record), True, formatted

    def _refuse_without_header(self, volume_id: str, device: str) -> None:
        """FAILED_PRECONDITION, saying what the device holds, unless it has a LUKS header."""
        with step("probe-device"):
            found = self.filesystems.probe(device)
        if not found.is_luks:
            raise failed_precondition(
                f"volume {volume_id} is recorded as encrypted but {device} has no LUKS header "
                f"(found {found.type or found.partition_table or 'nothing'}); refusing to use or format "
                f"it: restore the header from a backup (csi-luks header restore {volume_id})"
            )

    def _format(
        self,
        backend: VolumeBackend,
        volume_id: str,
        device: str,
        encryption: VolumeEncryption,
        record: VolumeRecord,
    ) -> None:
        label = volume_id if len(volume_id) <= _LUKS_LABEL_MAX else None
        options = record.luks.format_options(label)  # the class's cipher, key size and sector size
        with step("unwrap-dek"):
            passphrase = encryption.get_passphrase(volume_id)
        try:
            if record.luks.chooses_cipher:  # the default cipher runs wherever dm-crypt does
                with step("check-cipher"):
                    self.cryptsetup.check_cipher(device, options)
            with step("luks-format"):
                self.cryptsetup.format(device, passphrase, options)
        except CipherUnavailable as exc:  # luksFormat checks the cipher before it writes anything
            raise failed_precondition(
                f"volume {volume_id}: this node's kernel cannot run cipher {options.cipher} with a "
                f"{options.key_size}-bit key, so the volume was not formatted (nothing was written to "
                f"{device}); load the kernel's module for it (see /proc/crypto) or use a StorageClass "
                f"with another encryptionCipher: {exc}"
            ) from None
        crash_point("node-stage.after-luks-format")
        with step("header-backup"):
            refresh_header_backup(self.cryptsetup, backend, volume_id, device)
        crash_point("node-stage.after-header-backup")
        log.info("volume %s: formatted LUKS2 on %s", volume_id, device)

    def _refuse_unless_half_made_format(self, device: str, volume_id: str) -> None:
        """FAILED_PRECONDITION unless the LUKS header on a `prepared` volume's device is one our own
        luksFormat began: LUKS2, labelled with the volume's id (ids too long for a label are not
        labelled). Read raw, since a format killed while writing it leaves a header no tool accepts."""
        label = luks2_label(read_first_block(device))
        expected = volume_id if len(volume_id) <= _LUKS_LABEL_MAX else ""
        if label != expected:
            found = (
                "a LUKS1 or unreadable LUKS header"
                if label is None
                else f"a LUKS2 header labelled {quoted(label)}"
            )
            raise failed_precondition(
                f"volume {volume_id} was never staged, but {device} holds {found} that its DEK does not "
                "open; it is not one csi-luks began, so it is left untouched (find out whose it is before "
                "deleting the volume)"
            )

    def _open(
        self, device: str, layout: _Layout, encryption: VolumeEncryption, volume_id: str, record: VolumeRecord
    ) -> str:
        # The first open after the format stores the class's dm-crypt flags in the header (persistent):
        # every later open applies the header's flags, whatever the class says by then.
        flags = record.luks.flags
        first = record.state is EncryptionState.PREPARED and flags.any
        with step("unwrap-dek"):
            passphrase = encryption.get_passphrase(volume_id)
        try:
            with step("open"):
                mapped = self.cryptsetup.open(
                    device, layout.mapper, passphrase, flags.open_options(persistent=True) if first else None
                )
        except (WrongPassphrase, NotLuksDevice) as exc:
            if record.state is EncryptionState.PREPARED and record.filesystem is None:
                raise  # the caller tells a half-made format of ours from anything else
            if isinstance(exc, NotLuksDevice):
                self._refuse_without_header(volume_id, device)
            raise failed_precondition(
                f"the key of KMS {record.kms_id or 'secrets'!r} does not open volume {volume_id}; "
                "the device was left untouched (check the KMS configuration and the volume's DEK)"
            ) from None
        crash_point("node-stage.after-open")
        return mapped

    # --- the filesystem above the mapping ------------------------------------------------------------

    def _stage_contents(
        self,
        backend: VolumeBackend,
        volume_id: str,
        device: str,
        staging: str,
        mount: csi_pb2.VolumeCapability.MountVolume | None,
        record: VolumeRecord,
        new_header: bool,
        mounted: bool,
    ) -> None:
        """Mount the volume's filesystem at staging (made once, on a volume that never held data), or for
        a raw block volume nothing; then record what the volume holds, before anything is handed out.
        new_header: this call wrote the device's LUKS header, so the mapping holds nothing (see below).
        mounted: staging was already mounted when the call began (a retried stage)."""
        if mount is None:
            if record.filesystem is None and (
                record.state is EncryptionState.PREPARED or not record.encrypted
            ):
                made = FilesystemRecord(FilesystemRecord.BLOCK)  # the workload's own bytes from now on
            else:
                return
        else:
            made = self._mount_filesystem(volume_id, device, staging, mount, record, new_header, mounted)
            if record.filesystem is not None and (record.filesystem.is_block or made == record.filesystem):
                return
            if record.filesystem is not None:
                log.warning(
                    "volume %s: its %s filesystem now has UUID %s, not %s as recorded; recording the new one",
                    volume_id, made.type, made.uuid, record.filesystem.uuid,
                )  # fmt: skip
        with step("record-filesystem"):
            backend.set_metadata(volume_id, FILESYSTEM, made.value())
        crash_point("node-stage.after-record-filesystem")

    def _mount_filesystem(
        self,
        volume_id: str,
        device: str,
        staging: str,
        mount: csi_pb2.VolumeCapability.MountVolume,
        record: VolumeRecord,
        new_header: bool,
        mounted: bool,
    ) -> FilesystemRecord:
        """The filesystem mounted at staging: found on the device, or made where nothing can be lost.

        new_header: the mapping is over a LUKS header this call wrote (after the probe of the device found
        nothing on it): under a volume key made moments ago, what the mapping reads is the decryption of
        whatever bytes the device held, noise that no one wrote, so it is not probed (a second blkid)."""
        fs_type = mount.fs_type or "ext4"
        if new_header:
            found = Probe(type=None)
        else:
            with step("probe-filesystem"):
                found = self._recorded_filesystem(device, record) or self.filesystems.probe(device)
        if mounted:
            return FilesystemRecord(found.type or fs_type, found.uuid or "")
        if found.empty:
            if record.may_hold_data:
                raise failed_precondition(self._filesystem_missing(volume_id, device, fs_type, record))
            found = self._mkfs(volume_id, device, fs_type)
        elif found.type != fs_type:
            raise failed_precondition(
                f"volume {volume_id} holds {found.type or found.partition_table}, not {fs_type}; "
                "refusing to reformat it"
            )
        flags = list(mount.mount_flags)
        try:
            with step("mount"):
                self.filesystems.mount(device, staging, fs_type, flags)
        except CommandError as exc:
            self._explain_mount_failure(volume_id, device, staging, fs_type, flags, exc)
            if record.may_hold_data or not record.encrypted:
                raise failed_precondition(
                    f"volume {volume_id}: its {fs_type} filesystem (UUID {found.uuid or 'unknown'}) on "
                    f"{device} cannot be mounted: {exc}. Nothing was formatted. {_REPAIR_HINT}"
                ) from None
            # Encrypted and never handed out: a mkfs of ours was interrupted inside its own writes.
            log.warning(
                "volume %s: the %s filesystem on %s does not mount (%s); the volume never held data, "
                "so it is made again",
                volume_id, fs_type, device, exc,
            )  # fmt: skip
            found = self._mkfs(volume_id, device, fs_type)
            self.filesystems.mount(device, staging, fs_type, flags)
        return FilesystemRecord(fs_type, found.uuid or "")

    @staticmethod
    def _recorded_filesystem(device: str, record: VolumeRecord) -> Probe | None:
        """The filesystem the volume's record names, when its superblock on the device still carries the
        recorded UUID (one read, no blkid); None when that is not certain, and blkid must say."""
        made = record.filesystem
        if made is None or made.is_block or not made.uuid:
            return None
        try:
            first_block = read_first_block(device)
        except OSError:
            return None  # blkid's probe reports the device's I/O error
        if superblock_uuid(first_block, made.type) != made.uuid:
            return None
        return Probe(type=made.type, uuid=made.uuid)

    def _mkfs(self, volume_id: str, device: str, fs_type: str) -> Probe:
        with step("mkfs"):
            filesystem_uuid = self.filesystems.mkfs(device, fs_type)
        crash_point("node-stage.after-mkfs")
        log.info("volume %s: made %s (UUID %s) on %s", volume_id, fs_type, filesystem_uuid, device)
        return Probe(type=fs_type, uuid=filesystem_uuid)

    def _explain_mount_failure(
        self, volume_id: str, device: str, staging: str, fs_type: str, flags: list[str], error: CommandError
    ) -> None:
        """Raise what a failed mount really was: the device's I/O (UNAVAILABLE) or the request's mount
        flags (INVALID_ARGUMENT, naming them: the filesystem mounts without them). Returns when neither."""
        problem = read_error(device)
        if problem is not None:
            raise DeviceIOError(f"mounting {device}: I/O error from the device: {problem}")
        if not flags or not self._mounts_with(device, staging, fs_type, []):
            return
        rejected = [flag for flag in flags if not self._mounts_with(device, staging, fs_type, [flag])]
        raise invalid_argument(
            f"volume {volume_id}: mount refused the mount flags {quoted_list(rejected or flags)} for "
            f"{fs_type} (the filesystem mounts without them): {error}"
        )

    def _mounts_with(self, device: str, staging: str, fs_type: str, flags: list[str]) -> bool:
        """Whether device mounts at staging with these flags (unmounted again at once)."""
        try:
            self.filesystems.mount(device, staging, fs_type, flags)
        except CommandError:
            return False
        self.filesystems.unmount(staging)
        return True

    @staticmethod
    def _filesystem_missing(volume_id: str, device: str, fs_type: str, record: VolumeRecord) -> str:
        made = (
            record.filesystem.describe()
            if record.filesystem is not None
            else f"the {fs_type} filesystem made at its first stage (before csi-luks recorded filesystems)"
        )
        return (
            f"volume {volume_id} held {made}, but no filesystem is found on {device}; refusing to make a new "
            f"one over the user's data (nothing was formatted). {_REPAIR_HINT}"
        )

    def NodeUnstageVolume(
        self, request: csi_pb2.NodeUnstageVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeUnstageVolumeResponse:
        backend = self.backend.for_request({})
        staging = require_path(request.staging_target_path, "staging_target_path")
        volume_id = checked_id(backend, request.volume_id, "volume_id")
        with self.locks.hold(volume_id, "NodeUnstageVolume"):
            # Closing by the deterministic name works after a plugin restart, and for a volume whose
            # metadata is already gone.
            mapper = mapper_name(volume_id)
            with step("stale-check"):
                stale = self.stale_mappings.check(mapper)
            if stale is not None:
                log.warning("volume %s: %s; tearing it down", volume_id, stale.message)
            with step("unmount"):
                self._unmount_staging(staging, stale)
            crash_point("node-unstage.after-unmount")
            with step("close"):
                self._close(mapper, stale)
            crash_point("node-unstage.after-close")
            with step("detach"), contextlib.suppress(VolumeNotFound):
                backend.detach(volume_id)
            log.info("volume %s unstaged from %s", volume_id, staging)
            return csi_pb2.NodeUnstageVolumeResponse()

    def _unmount_staging(self, staging: str, stale: StaleMapping | None) -> None:
        """Unmount the staging path; over a stale mapping, lazily if a plain unmount fails (the filesystem
        cannot reach its device, so nothing more is lost by letting go of it)."""
        try:
            self.filesystems.unmount(staging)
        except (CommandError, OSError) as exc:
            if stale is None:
                raise
            log.warning(
                "unmount of %s failed over a stale mapping (%s); unmounting lazily", quoted(staging), exc
            )
            self.filesystems.unmount(staging, lazy=True)

    def _close(self, mapper: str, stale: StaleMapping | None) -> None:
        """Close the mapping; a stale one that is still held (a lazily unmounted filesystem) is closed
        deferred: device-mapper removes it when the last holder lets go. No data is touched either way."""
        try:
            self.cryptsetup.close(mapper)
        except LuksError as exc:
            if stale is None:
                raise
            log.warning("close of stale mapping %s failed (%s); closing it deferred", mapper, exc)
            self.cryptsetup.close(mapper, deferred=True)

    # --- publish -------------------------------------------------------------------------------------

    def NodePublishVolume(
        self, request: csi_pb2.NodePublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodePublishVolumeResponse:
        backend = self.backend.for_request(request.secrets)
        target = require_path(request.target_path, "target_path")
        staging = require_path(request.staging_target_path, "staging_target_path")
        validate_capability(request.volume_capability, request.HasField("volume_capability"))
        volume_id = checked_id(backend, request.volume_id, "volume_id")
        with self.locks.hold(volume_id, "NodePublishVolume"):
            with step("lookup"):
                try:
                    # A staged volume is known from what this node recorded at its stage (RBD: no cluster
                    # call; kubelet publishes once per pod, and each rbd call takes a process and a trip).
                    _, layout = self._volume(self.backend.for_request({}), volume_id)
                except BackendRequestError:  # no record here, so never staged: ask with the credentials
                    _, layout = self._volume(backend, volume_id)
            with step("stale-check"):
                stale = self.stale_mappings.check(layout.mapper) if layout.record.encrypted else None
            if stale is not None:  # a new pod would get a filesystem or device that can no longer do I/O
                raise failed_precondition(f"volume {volume_id} cannot be published: {stale.message}")
            if request.volume_capability.WhichOneof("access_type") == "block":
                with step("find-device"):
                    device = self._device(backend, volume_id, layout)
                if device is None:
                    raise failed_precondition(f"volume {volume_id} is not staged on this node")
                with step("bind-mount"):
                    self.filesystems.bind_mount(device, target, request.readonly, target_is_file=True)
            else:
                with step("is-mounted"):
                    staged = self.filesystems.is_mounted(staging)
                if not staged:
                    raise failed_precondition(f"volume {volume_id} is not staged at {quoted(staging)}")
                with step("bind-mount"):
                    self.filesystems.bind_mount(staging, target, request.readonly)
            return csi_pb2.NodePublishVolumeResponse()

    def NodeUnpublishVolume(
        self, request: csi_pb2.NodeUnpublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeUnpublishVolumeResponse:
        target = require_path(request.target_path, "target_path")
        volume_id = checked_id(self.backend, request.volume_id, "volume_id")
        with self.locks.hold(volume_id, "NodeUnpublishVolume"):
            with step("unmount"):
                self.filesystems.unmount(target)
            with step("remove-target"):
                _remove_publish_target(target)
            return csi_pb2.NodeUnpublishVolumeResponse()

    # --- expand and stats ----------------------------------------------------------------------------

    def NodeExpandVolume(
        self, request: csi_pb2.NodeExpandVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeExpandVolumeResponse:
        backend = self.backend.for_request(request.secrets)
        path = require_path(request.volume_path, "volume_path")
        volume_id = checked_id(backend, request.volume_id, "volume_id")
        with self.locks.hold(volume_id, "NodeExpandVolume"):
            _, layout = self._volume(backend, volume_id)
            if not os.path.exists(path):
                raise not_found(f"volume path {quoted(path)} does not exist")
            backend.refresh_attachment_size(volume_id)
            crash_point("node-expand.after-refresh-attachment")
            device = self._device(backend, volume_id, layout)
            if device is None:
                raise failed_precondition(f"volume {volume_id} is not staged on this node")
            if layout.record.encrypted:
                self.cryptsetup.resize(layout.mapper)  # no passphrase: the key is in dm-crypt
                crash_point("node-expand.after-resize-mapping")
            if self.filesystems.is_mounted(path) and os.path.isdir(path):
                fs_type = self.filesystems.probe(device).type or "ext4"
                self.filesystems.grow(device, path, fs_type)
            size = self.filesystems.device_size(device)
            log.info("volume %s expanded to %d bytes", volume_id, size)
            return csi_pb2.NodeExpandVolumeResponse(capacity_bytes=size)

    def NodeGetVolumeStats(
        self, request: csi_pb2.NodeGetVolumeStatsRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetVolumeStatsResponse:
        backend = self.backend.for_request({})
        path = require_path(request.volume_path, "volume_path")
        volume_id = checked_id(backend, request.volume_id, "volume_id")
        _, layout = self._volume(backend, volume_id)
        if not os.path.exists(path):
            raise not_found(f"volume path {quoted(path)} does not exist")
        problems = []
        # From sysfs, no process: the mapping's backing device may be gone while the mapping stays.
        stale = self.stale_mappings.check(layout.mapper) if layout.record.encrypted else None
        if stale is not None:
            problems.append(stale.message)
        elif self._device(backend, volume_id, layout) is None:
            problems.append("the encrypted mapping is gone" if layout.record.encrypted else "not attached")
        if not self.filesystems.is_mounted(path):
            problems.append(f"{quoted(path)} is not mounted")
        condition = csi_pb2.VolumeCondition(
            abnormal=bool(problems), message="; ".join(problems) or "volume is healthy"
        )
        Unit = csi_pb2.VolumeUsage.Unit
        if stat.S_ISBLK(os.stat(path).st_mode):
            usage = [csi_pb2.VolumeUsage(unit=Unit.BYTES, total=self.filesystems.device_size(path))]
        else:
            fs = os.statvfs(path)
            usage = [
                csi_pb2.VolumeUsage(
                    unit=Unit.BYTES,
                    total=fs.f_blocks * fs.f_frsize,
                    available=fs.f_bavail * fs.f_frsize,
                    used=(fs.f_blocks - fs.f_bfree) * fs.f_frsize,
                ),
                csi_pb2.VolumeUsage(
                    unit=Unit.INODES, total=fs.f_files, available=fs.f_favail, used=fs.f_files - fs.f_ffree
                ),
            ]
        return csi_pb2.NodeGetVolumeStatsResponse(usage=usage, volume_condition=condition)

    def NodeGetCapabilities(
        self, request: csi_pb2.NodeGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetCapabilitiesResponse:
        return csi_pb2.NodeGetCapabilitiesResponse(
            capabilities=[
                csi_pb2.NodeServiceCapability(rpc=csi_pb2.NodeServiceCapability.RPC(type=kind))
                for kind in CAPABILITIES
            ]
        )

    def NodeGetInfo(
        self, request: csi_pb2.NodeGetInfoRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetInfoResponse:
        return csi_pb2.NodeGetInfoResponse(node_id=self.node_id)


def _remove_publish_target(target: str) -> None:
    """Remove what NodePublish makes at a target: a directory (empty once unmounted), or the empty file a
    block device is bound onto. Anything else there is somebody's data, never ours to delete."""
    try:
        found = os.lstat(target)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(found.st_mode):
        try:
            os.rmdir(target)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            log.warning("NodeUnpublish: %s is a directory with content that we did not publish; left as is",
                        quoted(target))  # fmt: skip
    elif stat.S_ISREG(found.st_mode) and found.st_size == 0:
        os.unlink(target)
    else:
        log.warning("NodeUnpublish: %s is not what a publish makes; left as is", quoted(target))

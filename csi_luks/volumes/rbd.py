"""The RBD backend: each volume an RBD image, its metadata image-meta keys, attached with krbd or rbd-nbd.

The controller's calls go through librbd and librados (Ceph's Python bindings) over one cached connection
per cluster and user (ceph_session); none of them starts a process. The node's attachments stay `rbd
device map/unmap` and rbd-nbd processes (rbd_node). Ids: rbd_ids.

Crash safety: the image is complete (content cloned, metadata written) only once its last metadata key,
`csi-luks/volume-id`, names it. An image without it was never handed out; create() replaces it and
get() does not see it, so a crash at any step is repaired by a retry and swept by a delete.

A copy (snapshot, clone, restore) is copy-on-write: a temporary snapshot of the source, a clone (v2) of
it, and the snapshot's removal (it waits in the source's snapshot trash while the clone needs it). The
copy costs the same whatever the source holds. Deleting an image that clones still need moves it to the
RBD trash; it is purged when the last of them is gone (rbd_images.Images.purge_trash, run by every
delete in the pool). The chain of clones is bounded (rbd_chain). A source without the layering feature
(an imageFeatures class without it) is deep-copied as before; images made by deep copy are plain images.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import rbd

from csi_luks.crash import Step
from csi_luks.system.runner import Runner
from csi_luks.volume_metadata import NAME, PREFIX
from csi_luks.volumes import ceph_csi
from csi_luks.volumes.base import (
    BackendRequestError,
    CapacityOutOfRange,
    HeaderImage,
    VolumeBackend,
    VolumeBackendError,
    VolumeInfo,
    VolumeInUse,
    VolumeNotFound,
    header_chunks,
)
from csi_luks.volumes.ceph_clusters import (
    CONNECT_TIMEOUT,
    USER_ID,
    USER_KEY,
    CephClusters,
    Credentials,
    check_plain,
)
from csi_luks.volumes.ceph_session import Connections
from csi_luks.volumes.rbd_chain import FLATTEN, FLATTENS, HARD_DEPTH, PENDING, SOFT_DEPTH
from csi_luks.volumes.rbd_ids import (
    ImageRef,
    check_volume_id,
    decode_volume_id,
    encode_volume_id,
    header_object,
    image_name,
)
from csi_luks.volumes.rbd_images import FEATURES, Images, feature_bits
from csi_luks.volumes.rbd_node import DEK, MOUNTER, MOUNTER_KRBD, MOUNTER_NBD, RbdAttachments

__all__ = ["ImageRef", "RbdBackend", "decode_volume_id", "encode_volume_id"]

log = logging.getLogger(__name__)

PARAM_CLUSTER_ID, PARAM_POOL = "clusterID", "pool"
PARAM_DATA_POOL, PARAM_IMAGE_FEATURES = "dataPool", "imageFeatures"
# "rbd" (krbd, the default) or "rbd-nbd" (userspace librbd behind /dev/nbdN: newer image features than the
# node's kernel knows, at the cost of a daemon per volume that must outlive plugin restarts).
PARAM_MOUNTER = "mounter"
# Image-meta a copy never inherits from its source: csi-luks's keys are set anew, and Ceph-CSI's (a
# Ceph-CSI source's state and wrapped DEK, salted with the source's handle) do not describe the copy.
_NOT_INHERITED = (PREFIX, ceph_csi.ENCRYPTED_META, ceph_csi.OLD_ENCRYPTED_META, ceph_csi.DEK_META,
                  ceph_csi.OLD_DEK_META)  # fmt: skip
_OWNER = PREFIX + "volume-id"  # written last: the image is complete
# What rbd accepts: an image with the object-map feature (on by default) tracks at most 256 Mi objects,
# 4 MiB each by default, so 1 PiB. Checked before any call, whatever the features.
MAX_IMAGE_BYTES = 256 * 1024 * 1024 * 4 * 1024 * 1024
_COPY_SNAPSHOT_PREFIX = "csi-copy-"
_MiB = 1024 * 1024
# ControllerReclaimSpace's sparse size: runs of zeros this long and aligned are freed (`rbd sparsify`'s
# default; librbd accepts a power of two from 4 KiB to the object size).
SPARSE_SIZE = 4096


class RbdBackend(RbdAttachments, VolumeBackend):
    """Volumes as RBD images; see the module docstring."""

    parameter_keys = (PARAM_CLUSTER_ID, PARAM_POOL, PARAM_DATA_POOL, PARAM_IMAGE_FEATURES, PARAM_MOUNTER)
    can_list = False  # ListVolumes and GetCapacity carry no credentials

    def __init__(
        self,
        clusters: CephClusters,
        state_dir: str | os.PathLike[str],
        runner: Runner | None = None,
        credentials: Credentials | None = None,
        timeout: float = 60.0,
        map_timeout: float = 60.0,
        connect_timeout: float = CONNECT_TIMEOUT,
        one_request: bool = False,
        connections: Connections | None = None,
        resume_flattens: bool = True,
        ceph_csi_instance: str = ceph_csi.DEFAULT_INSTANCE_ID,
    ) -> None:
        self.clusters = clusters
        self.state_dir = Path(state_dir)
        self.runner = runner or Runner()
        self.credentials = credentials
        self.timeout = timeout
        self.map_timeout = map_timeout
        self.connect_timeout = connect_timeout
        # Shared by every request of this backend (for_request hands it on).
        self.connections = connections or Connections(connect_timeout=connect_timeout, op_timeout=timeout)
        # Whether reading an image that owes a flatten starts it here (not in a short-lived operator command,
        # whose exit would cut it short: the plugin takes it up).
        self.resume_flattens = resume_flattens
        # Ceph-CSI's --instanceid, whose journal directory (csi.volumes.<id>) its volumes are named in.
        self.ceph_csi_instance = ceph_csi_instance
        # With one_request (see VolumeBackend.for_request), what this request read of its volumes.
        self.one_request = one_request
        self._fetched: dict[str, VolumeInfo] = {}  # complete volumes, as get() found them
        self._absent: set[str] = set()  # ids whose image get() found missing
        self._mapped: builtins.list[dict[str, Any]] | None = None  # this machine's mappings, until it maps

    def for_request(self, secrets: Mapping[str, str], *, one_request: bool = True) -> RbdBackend:
        credentials = Credentials.from_secrets(secrets)
        if credentials is None:
            return self
        return RbdBackend(
            self.clusters, self.state_dir, self.runner, credentials, self.timeout, self.map_timeout,
            self.connect_timeout, one_request, self.connections, self.resume_flattens,
            self.ceph_csi_instance,
        )  # fmt: skip

    # --- placement -----------------------------------------------------------------------------------

    def volume_id_for(
        self, name: str, parameters: Mapping[str, str], like: str | None = None, snapshot: bool = False
    ) -> str:
        image = image_name(name, snapshot)
        if like is not None:
            return encode_volume_id(replace(self._ref(like), image=image))
        cluster_id = parameters.get(PARAM_CLUSTER_ID, "")
        pool = parameters.get(PARAM_POOL, "")
        if not cluster_id or not pool:
            raise BackendRequestError(
                f"the RBD backend needs the StorageClass parameters {PARAM_CLUSTER_ID} and {PARAM_POOL}"
            )
        cluster = self.clusters.get(cluster_id)
        return encode_volume_id(
            ImageRef(cluster.cluster_id, check_plain(PARAM_POOL, pool), cluster.rados_namespace, image)
        )

    def check_id(self, object_id: str) -> None:
        check_volume_id(object_id)

    # --- Ceph-CSI's volumes (ceph_csi) -------------------------------------------------------------

    def _ref(self, volume_id: str) -> ImageRef:
        """The image of a csi-luks id or of a Ceph-CSI handle (whose pool and image need a lookup: kept
        for the process once found, as neither changes for a volume's life)."""
        if not ceph_csi.is_handle(volume_id):
            return decode_volume_id(volume_id)
        known = _CEPH_CSI_REFS.get(volume_id) or self._recorded_ref(volume_id)
        if known is not None:
            return known
        return self._ceph_csi_volume(volume_id)[0]

    def _ceph_csi_journal(self, volume_id: str) -> ceph_csi.Journal:
        return _CEPH_CSI_JOURNALS.get(volume_id) or self._ceph_csi_volume(volume_id)[2]

    def _ceph_csi_volume(self, volume_id: str) -> tuple[ImageRef, dict[str, str], ceph_csi.Journal]:
        """A Ceph-CSI volume's or snapshot's image, journal attributes and journal, read now; VolumeNotFound
        without a journal entry (Ceph-CSI removes it last but one when it deletes the volume). A handle
        names a volume or a snapshot alike: the volumes' journal is asked first."""
        handle = ceph_csi.parse_handle(volume_id)
        cluster = self.clusters.get(handle.cluster_id)
        where = ImageRef(cluster.cluster_id, "", cluster.rados_namespace, "")
        with self._images(where) as images:
            pool = images.pool_name(handle.pool_id)
            where = replace(where, pool=pool)
            for journal in (ceph_csi.VOLUMES, ceph_csi.SNAPSHOTS):
                attributes = images.omap(where, journal.uuid_object(handle))
                if attributes is not None:
                    break
        if attributes is None:
            raise VolumeNotFound(
                f"{volume_id}: Ceph-CSI's journal has no volume or snapshot {handle.uuid} in pool {pool}"
            )
        ref = replace(where, image=ceph_csi.check_image_name(attributes, handle))
        _CEPH_CSI_REFS[volume_id] = ref
        _CEPH_CSI_JOURNALS[volume_id] = journal
        return ref, attributes, journal

    def _get_ceph_csi(self, volume_id: str) -> VolumeInfo:
        ref, attributes, journal = self._ceph_csi_volume(volume_id)
        with self._images(ref) as images:
            found = images.stat(ref)
        if found is None:
            raise VolumeNotFound(f"{journal.kind} {volume_id} (Ceph-CSI's image {ref.spec}) does not exist")
        metadata = ceph_csi.view(found[1], attributes, found[0], journal)
        return VolumeInfo(volume_id, metadata.get(NAME, ""), found[0], metadata)

    def _delete_ceph_csi(self, volume_id: str) -> None:
        """Delete a Ceph-CSI volume or snapshot as Ceph-CSI does: the image (to the trash while clones need
        it), then its journal entries. The caller removed the DEK; a wrapped one in image-meta goes with the
        image."""
        try:
            ref, attributes, journal = self._ceph_csi_volume(volume_id)
        except VolumeNotFound:
            return  # no journal entry: deleted (by Ceph-CSI or an earlier call)
        if self.find_attachment(volume_id) is not None:
            raise VolumeInUse(f"volume {volume_id} is mapped on this machine")
        handle = ceph_csi.parse_handle(volume_id)
        directory_pool_id = ceph_csi.journal_pool_id(attributes)
        with self._images(ref) as images:
            directory = ref
            if directory_pool_id is not None:
                directory = replace(ref, pool=images.pool_name(directory_pool_id))
            with Step("rbd-delete", "remove-image"):
                images.remove_image(ref)
            self._purge(images, ref)
            # A crash before this leaves the entries: the retry finds them, the image gone, and ends here.
            images.undo_ceph_csi_reservation(
                ref, directory, journal, handle, attributes.get(journal.name_key, ""), self.ceph_csi_instance
            )
        log.info(
            "%s %s: Ceph-CSI's image %s and its journal entries removed", journal.kind, volume_id, ref.spec
        )
        self._fetched.pop(volume_id, None)
        _CEPH_CSI_REFS.pop(volume_id, None)
        _CEPH_CSI_JOURNALS.pop(volume_id, None)

    def check_capacity(self, size_bytes: int) -> None:
        super().check_capacity(size_bytes)
        if size_bytes > MAX_IMAGE_BYTES:
            raise CapacityOutOfRange(
                f"{size_bytes} bytes is more than an RBD image can hold here ({MAX_IMAGE_BYTES}: 256 Mi "
                "objects of 4 MiB, the object map's limit)"
            )

    @contextlib.contextmanager
    def _images(self, ref: ImageRef) -> Iterator[Images]:
        if self.credentials is None:
            raise BackendRequestError(
                f"this call on {encode_volume_id(ref)} needs the cephx user in the request's secrets "
                f"({USER_ID}, {USER_KEY}): set the StorageClass's csi.storage.k8s.io/*-secret-name"
            )
        cluster = self.clusters.get(ref.cluster_id)
        with self.connections.session(cluster, self.credentials) as handle:
            yield Images(handle)

    # --- volumes -------------------------------------------------------------------------------------

    def create(
        self,
        volume_id: str,
        name: str,
        size_bytes: int,
        metadata: Mapping[str, str],
        source_id: str | None = None,
        parameters: Mapping[str, str] | None = None,
    ) -> VolumeInfo:
        ref = decode_volume_id(volume_id)
        features, data_pool = _image_options(parameters or {})
        mounter = (parameters or {}).get(PARAM_MOUNTER) or MOUNTER_KRBD
        if mounter not in (MOUNTER_KRBD, MOUNTER_NBD):
            raise BackendRequestError(
                f"{PARAM_MOUNTER} {mounter!r}: expected {MOUNTER_KRBD} or {MOUNTER_NBD}"
            )
        if mounter == MOUNTER_NBD:
            metadata = {**metadata, MOUNTER: MOUNTER_NBD}  # the node maps it so at every stage
        with self._images(ref) as images:
            existing = None if volume_id in self._absent else images.stat(ref)
            if existing is not None and existing[1].get(_OWNER) == volume_id:
                self._resume_flatten(ref, existing[1])
                return self._info(volume_id, existing[0], existing[1])
            if existing is not None:
                _refuse_if_owned_by_another(ref, volume_id, existing[1])
                # A create that stopped before its last step: never handed out, so nobody's data.
                log.warning("volume %s: replacing the incomplete image %s left by an interrupted create",
                            volume_id, ref.spec)  # fmt: skip
                images.remove_image(ref)
            size_mib = max(1, math.ceil(size_bytes / _MiB))
            size = size_mib * _MiB
            present: dict[str, str] = {}
            depth = 0
            if source_id is None:
                try:
                    with Step("rbd-create", "image"):
                        images.create(ref, size, features, data_pool)
                except VolumeNotFound as exc:  # not the volume: where it was to go
                    raise BackendRequestError(
                        f"cannot create {ref.spec}: its pool, RADOS namespace or data pool does not exist "
                        f"({exc})"
                    ) from None
            else:
                source = self._ref(source_id)
                depth = self._copy(images, source, ref, features, data_pool)
                header = images.get_object(source, header_object(source))
                if header is not None:  # the copy's LUKS header is the source's: so is its backup
                    with Step("rbd-create", "header-backup"):
                        images.put_object(ref, header_object(ref), header)
                if depth >= SOFT_DEPTH:
                    metadata = {**metadata, FLATTEN: PENDING}  # before the owner: a crash keeps it owed
            # One open of the new image per step, and none across a crash point: a process killed with an
            # image open leaves its watch on it for 30 s, and an image with a watch cannot be removed.
            if source_id is not None:
                with Step("rbd-create", "grow"), images.edit(ref) as image:
                    size = image.grow_to(size_bytes)
                # A clone brings the source's metadata (its DEK among it): only ours may stay.
                with Step("rbd-create", "drop-source-metadata"), images.edit(ref) as image:
                    present = image.metadata()
                    for key in present:
                        if key.startswith(_NOT_INHERITED) and key not in metadata:
                            image.remove_meta(key)
            # Each key is one request: skip what is already so.
            with Step("rbd-create", "metadata"), images.edit(ref) as image:
                for key, value in metadata.items():
                    if present.get(key, "") != value:
                        image.set_meta(key, value)
            with Step("rbd-create", "owner"):
                images.set_meta(ref, _OWNER, volume_id)
            self._absent.discard(volume_id)
            log.info("volume %s: image %s created (%d MiB%s)", volume_id, ref.spec, size_mib,
                     f", a clone of {source_id} at depth {depth}" if source_id else "")  # fmt: skip
            full = {**metadata, _OWNER: volume_id}
            self._resume_flatten(ref, full)
            return self._info(volume_id, size, full)

    def _copy(
        self, images: Images, source: ImageRef, target: ImageRef, features: int | None, data_pool: str | None
    ) -> int:
        """Make target a copy-on-write clone of source (a deep copy if source cannot be cloned), flattened
        now when the chain would be too deep. Returns its depth."""
        if source.cluster_id != target.cluster_id:
            raise BackendRequestError(
                f"cannot copy {source.spec} of cluster {source.cluster_id} into cluster {target.cluster_id}"
            )
        snapshot = _COPY_SNAPSHOT_PREFIX + target.image
        # No image is held open across a crash point (see create).
        images.remove_snapshot(source, snapshot)  # left by an interrupted copy: the time is now
        with Step("rbd-clone", "snapshot"), images.edit(source) as parent:
            parent.create_snapshot(snapshot)
            cloned = parent.features() & rbd.RBD_FEATURE_LAYERING
        try:
            with Step("rbd-clone", "clone"):
                if cloned:
                    layered = None if features is None else features | rbd.RBD_FEATURE_LAYERING
                    images.clone(source, snapshot, target, layered, data_pool)
                else:
                    images.deep_copy(source, snapshot, target, features, data_pool)
        finally:
            # Clone v2: the snapshot waits in the source's snapshot trash while the clone needs it.
            with Step("rbd-clone", "remove-snapshot"):
                images.remove_snapshot(source, snapshot)
        if not cloned:
            for name in images.user_snapshots(target):  # a deep copy brings the source's snapshots
                images.remove_snapshot(target, name)
            return 0
        depth = images.depth(target)
        if depth >= HARD_DEPTH:
            log.info("image %s: a clone at depth %d (hard limit %d): flattening it now",
                     target.spec, depth, HARD_DEPTH)  # fmt: skip
            images.flatten(target)  # the image is not complete yet: a crash here is an interrupted create
            return 0
        return depth

    def _resume_flatten(self, ref: ImageRef, metadata: Mapping[str, str]) -> None:
        """Start the background flatten the image is owed (see rbd_chain), unless it runs already."""
        if metadata.get(FLATTEN) != PENDING or self.credentials is None or not self.resume_flattens:
            return
        connections, credentials = self.connections, self.credentials
        cluster = self.clusters.get(ref.cluster_id)

        def flatten() -> None:
            with connections.session(cluster, credentials) as handle:
                images = Images(handle)
                images.flatten(ref)
                images.remove_meta(ref, FLATTEN)
                images.purge_trash(ref)
            log.info("image %s: flattened in the background (it depends on no other image now)", ref.spec)

        if FLATTENS.start(ref.spec, flatten):
            log.info("image %s: a clone at depth %d or more: flattening it in the background",
                     ref.spec, SOFT_DEPTH)  # fmt: skip

    def resume_owed_flattens(self) -> builtins.list[str]:
        """Start every flatten that a stopped plugin left owed (the images of every configured cluster's
        pools that carry the marker, complete ones only), as this backend's cephx user; their specs. A
        cluster that cannot be reached, or a pool the user may not read, is logged and passed over."""
        if self.credentials is None:
            return []
        owed: builtins.list[ImageRef] = []
        for cluster in self.clusters.all():
            try:
                with self.connections.session(cluster, self.credentials) as handle:
                    images = Images(handle)
                    for pool in images.pools():
                        where = ImageRef(cluster.cluster_id, pool, cluster.rados_namespace, "")
                        try:
                            marked = images.marked(where, FLATTEN, PENDING)
                        except VolumeBackendError as exc:
                            log.debug("owed flattens: pool %s of cluster %s passed over: %s",
                                      pool, cluster.cluster_id, exc)  # fmt: skip
                            continue
                        owed += [ref for ref, metadata in marked if metadata.get(_OWNER)]
            except VolumeBackendError as exc:
                log.warning("owed flattens of cluster %s not looked for: %s (each resumes when its image "
                            "is next read)", cluster.cluster_id, exc)  # fmt: skip
        for ref in owed:
            self._resume_flatten(ref, {FLATTEN: PENDING})
        return [ref.spec for ref in owed]

    def background_work(self, volume_id: str) -> str | None:
        """Says "flattening (chain depth N)" while the image carries the marker of an owed flatten
        (rbd_chain): running in a plugin, or owed by one that stopped (the next call reading it resumes)."""
        ref = self._ref(volume_id)
        with self._images(ref) as images:
            metadata = images.metadata(ref)
            if metadata is None or metadata.get(FLATTEN) != PENDING:
                return None
            return f"flattening (chain depth {images.depth(ref)})"

    def used_bytes(self, volume_id: str) -> int | None:
        """`rbd du`'s used bytes of the image itself (not its snapshots, nor its parent's), through librbd;
        None without credentials."""
        if self.credentials is None:
            return None
        ref = self._ref(volume_id)
        with self._images(ref) as images:
            return images.used_bytes(ref)

    def sparsify(self, volume_id: str) -> bool:
        """librbd's sparsify (`rbd sparsify`'s): free the image's objects, or their ends, that hold only
        zeros. Of an encrypted volume only what dm-crypt discarded can be zeros (ciphertext never is)."""
        ref = self._ref(volume_id)
        with self._images(ref) as images:
            images.sparsify(ref, SPARSE_SIZE)
        return True

    def get(self, volume_id: str) -> VolumeInfo:
        check_volume_id(volume_id)
        if self.credentials is None:
            # Node calls without credentials: what this node recorded when it attached the image.
            record = self._attachment_record(volume_id)
            if record is not None:
                return record
        if volume_id in self._fetched:  # read in this request already (its own changes kept since)
            return self._fetched[volume_id]
        if ceph_csi.is_handle(volume_id):
            info = self._get_ceph_csi(volume_id)
            if self.one_request:
                self._fetched[volume_id] = info
            return info
        ref = decode_volume_id(volume_id)
        with self._images(ref) as images:
            found = images.stat(ref)
            if found is None and self.one_request:
                self._absent.add(volume_id)
            if found is None or found[1].get(_OWNER) != volume_id:
                raise VolumeNotFound(f"volume {volume_id} (image {ref.spec}) does not exist")
            info = self._info(volume_id, found[0], found[1])
        self._resume_flatten(ref, found[1])
        if self.one_request:
            self._fetched[volume_id] = info
        return info

    @staticmethod
    def _info(volume_id: str, size: int, metadata: Mapping[str, str]) -> VolumeInfo:
        visible = {k: v for k, v in metadata.items() if k not in (_OWNER, FLATTEN)}
        return VolumeInfo(volume_id, visible.get(NAME, ""), size, visible)

    def list(self) -> builtins.list[VolumeInfo]:
        raise BackendRequestError("the RBD backend cannot list volumes: listing calls carry no credentials")

    def delete(self, volume_id: str) -> None:
        try:
            check_volume_id(volume_id)
        except VolumeNotFound:
            return  # not an id of ours: nothing of it exists
        if ceph_csi.is_handle(volume_id):
            self._delete_ceph_csi(volume_id)
            return
        ref = decode_volume_id(volume_id)
        if self.find_attachment(volume_id) is not None:
            raise VolumeInUse(f"volume {volume_id} is mapped on this machine")
        with self._images(ref) as images:
            # get() in this request found the image complete and owned by this id: no need to ask again.
            if volume_id not in self._fetched:
                metadata = images.metadata(ref)
                if metadata is None:
                    self._purge(images, ref)  # what a crash after the remove left owed
                    return
                try:
                    _refuse_if_owned_by_another(ref, volume_id, metadata)
                except VolumeInUse as exc:
                    log.warning("DeleteVolume %s: nothing deleted: %s", volume_id, exc)
                    return  # this id names no volume of its own: it is deleted
                if metadata.get(_OWNER) != volume_id:
                    # An unfinished copy may have its header backup already (the controller removes only a
                    # complete volume's). Before the image: a crash between leaves an image a retry finds.
                    images.remove_object(ref, header_object(ref))
            with Step("rbd-delete", "remove-image"):
                images.remove_image(ref)
            self._purge(images, ref)
        self._fetched.pop(volume_id, None)
        if self.one_request:
            self._absent.add(volume_id)

    @staticmethod
    def _purge(images: Images, ref: ImageRef) -> None:
        """Remove the trashed images of ref's pool that nothing depends on any more."""
        with Step("rbd-delete", "purge-trash"):
            images.purge_trash(ref)

    # A LUKS header backup is a RADOS object beside the image (16 MiB does not fit image metadata).
    keeps_header_backups = True

    def store_header_backup(self, volume_id: str, data: HeaderImage) -> None:
        ref = self._ref(volume_id)
        whole = b"".join(bytes(chunk) for chunk in header_chunks(data))  # one write_full: no rename in RADOS
        with self._images(ref) as images:
            images.put_object(ref, header_object(ref), whole)

    def fetch_header_backup(self, volume_id: str) -> bytes | None:
        ref = self._ref(volume_id)
        with self._images(ref) as images:
            return images.get_object(ref, header_object(ref))

    def remove_header_backup(self, volume_id: str) -> None:
        try:
            ref = self._ref(volume_id)
        except VolumeNotFound:
            return
        with self._images(ref) as images:
            images.remove_object(ref, header_object(ref))

    def resize(self, volume_id: str, size_bytes: int) -> int:
        ref = self._ref(volume_id)
        self._fetched.pop(volume_id, None)  # its size changes
        with self._images(ref) as images:
            return images.grow_to(ref, size_bytes)

    def set_metadata(self, volume_id: str, key: str, value: str) -> None:
        ref = self._ref(volume_id)
        native = ceph_csi.native_writes(key, value) if ceph_csi.is_handle(volume_id) else {}
        attribute = ceph_csi.journal_writes(key) if ceph_csi.is_handle(volume_id) else None
        with self._images(ref) as images:
            with images.edit(ref) as image:
                for name, text in {key: value, **native}.items():
                    image.set_meta(name, text)
            if attribute is not None and value:
                journal = self._ceph_csi_journal(volume_id)
                images.set_ceph_csi_attribute(
                    ref, journal, ceph_csi.parse_handle(volume_id), attribute, value
                )
        self._remember(volume_id, key, value)
        record = self._attachment_record(volume_id)
        if record is not None and key != DEK:
            self._write_record(
                VolumeInfo(volume_id, record.name, record.size_bytes, {**record.metadata, key: value})
            )

    def remove_metadata(self, volume_id: str, key: str) -> None:
        ref = self._ref(volume_id)
        fetched = self._fetched.get(volume_id)
        if fetched is not None and key not in fetched.metadata:
            return  # the volume exists without the key, as this request read it
        with self._images(ref) as images:
            if fetched is None and images.metadata(ref) is None:
                raise VolumeNotFound(f"volume {volume_id} (image {ref.spec}) does not exist")
            images.remove_meta(ref, key)
            if ceph_csi.is_handle(volume_id):
                for name in ceph_csi.native_writes(key, ""):
                    images.remove_meta(ref, name)
        self._remember(volume_id, key, "")

    def _remember(self, volume_id: str, key: str, value: str) -> None:
        """Keep what this request read of a volume true after it set (or, with "", removed) a key."""
        fetched = self._fetched.get(volume_id)
        if fetched is not None:
            metadata = {k: v for k, v in fetched.metadata.items() if k != key}
            self._fetched[volume_id] = replace(
                fetched, metadata={**metadata, key: value} if value else metadata
            )

    # --- DeleteVolume against NodeStage ----------------------------------------------------------------

    def in_use(self, volume_id: str) -> str | None:
        """Mapped here, or watched by any client of the cluster: krbd and rbd-nbd hold a watch on the
        image's header while mapped, on whichever node (as Ceph-CSI's isInUse lists the watchers)."""
        self._mapped = None  # never this request's earlier listing
        device = self.find_attachment(volume_id)
        if device is not None:
            return f"mapped at {device} on this machine"
        ref = self._ref(volume_id)
        with self._images(ref) as images:
            watchers = images.watchers(ref)
        if not watchers:
            return None
        return f"image {ref.spec} has watchers (mapped on a node, or open by a client): {', '.join(watchers)}"

    def fresh_metadata(self, volume_id: str) -> dict[str, str]:
        """The image's metadata from the cluster, whatever this request or the node's record hold."""
        if ceph_csi.is_handle(volume_id):
            return dict(self._get_ceph_csi(volume_id).metadata)
        ref = decode_volume_id(volume_id)
        with self._images(ref) as images:
            metadata = images.metadata(ref)
        if metadata is None or metadata.get(_OWNER) != volume_id:
            raise VolumeNotFound(f"volume {volume_id} (image {ref.spec}) does not exist")
        return {k: v for k, v in metadata.items() if k != _OWNER}

    def free_bytes(self) -> int | None:
        return None


# Ceph-CSI handles resolved in this process (pool id to name, the journal's image name): fixed for life.
_CEPH_CSI_REFS: dict[str, ImageRef] = {}
_CEPH_CSI_JOURNALS: dict[str, ceph_csi.Journal] = {}


def _refuse_if_owned_by_another(ref: ImageRef, volume_id: str, metadata: Mapping[str, str]) -> None:
    """VolumeInUse if a complete volume with another id owns this very image.

    An image whose owner key is missing, or names another image (the source's, brought by a deep copy),
    is an unfinished create of this id. One owned by another id naming the same image (two clusterIDs for
    one Ceph cluster) is somebody's volume: it is never replaced or deleted in this id's name.
    """
    owner = metadata.get(_OWNER)
    if not owner or owner == volume_id:
        return
    try:
        foreign = decode_volume_id(owner).image == ref.image
    except VolumeNotFound:
        foreign = True
    if foreign:
        raise VolumeInUse(
            f"image {ref.spec} belongs to volume {owner}, not {volume_id} (two clusterIDs for one Ceph "
            "cluster?)"
        )


def _image_options(parameters: Mapping[str, str]) -> tuple[int | None, str | None]:
    """The librbd feature mask (None: the cluster's default) and data pool a StorageClass asks for."""
    features = parameters.get(PARAM_IMAGE_FEATURES, "")
    mask = None
    if features:
        unknown = sorted(set(features.split(",")) - FEATURES)
        if unknown:
            raise BackendRequestError(
                f"{PARAM_IMAGE_FEATURES} {features!r}: unknown {unknown}; "
                f"known: {', '.join(sorted(FEATURES))}"
            )
        mask = feature_bits(features)
    data_pool = parameters.get(PARAM_DATA_POOL, "")
    return mask, check_plain(PARAM_DATA_POOL, data_pool) if data_pool else None

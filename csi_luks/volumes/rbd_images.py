"""The controller's RBD and RADOS operations, through librbd and librados on one cached connection.

`Images` works on the images of one cluster as one user. Every librbd or librados error becomes the
backend error an operator acts on (volumes/base.py), and every call is counted in `calls` (tests check
that a request asks the cluster nothing twice).

Copy-on-write (Ceph's clone v2): a copy of an image is a snapshot of it, a clone of that snapshot, and the
snapshot's removal, which with clone v2 moves it to the image's snapshot trash until no clone needs it.
An image that clones still need is moved to the RBD trash instead of removed (`remove_image`), and
`purge_trash` removes every csi-luks image in the trash that nothing needs any more.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import rados
import rbd

from csi_luks.volumes import ceph_csi
from csi_luks.volumes.base import (
    BackendPermissionDenied,
    BackendRequestError,
    BackendUnavailable,
    VolumeBackendError,
    VolumeInUse,
    VolumeNotFound,
)
from csi_luks.volumes.rbd_ids import ImageRef, is_csi_image

log = logging.getLogger(__name__)

_FEATURE_BITS = {
    "layering": rbd.RBD_FEATURE_LAYERING,
    "exclusive-lock": rbd.RBD_FEATURE_EXCLUSIVE_LOCK,
    "object-map": rbd.RBD_FEATURE_OBJECT_MAP,
    "fast-diff": rbd.RBD_FEATURE_FAST_DIFF,
    "deep-flatten": rbd.RBD_FEATURE_DEEP_FLATTEN,
    "journaling": rbd.RBD_FEATURE_JOURNALING,
}
FEATURES = frozenset(_FEATURE_BITS)
_MiB = 1024 * 1024
_OBJECT_CHUNK = 4 * _MiB  # a RADOS object is read and written in pieces of this size
# Every call made through Images, by name, in this process (tests: "nothing asked twice").
CALLS: Counter[str] = Counter()
_CALLS_LOCK = threading.Lock()


# After these the connection is not trusted again (ceph_session drops it).
_BROKEN = (rados.ConnectionShutdown, rados.TimedOut, rbd.ConnectionShutdown, rbd.Timeout)


class VolumeHasSnapshots(VolumeBackendError):
    """librbd refused to remove an image that still has snapshots."""


def feature_bits(features: str) -> int:
    """The librbd feature mask of a StorageClass's imageFeatures (names checked by the caller)."""
    mask = 0
    for name in features.split(","):
        mask |= _FEATURE_BITS[name]
    return mask


def _count(what: str) -> None:
    with _CALLS_LOCK:
        CALLS[what] += 1


def translate(exc: Exception, what: str) -> VolumeBackendError:
    """The backend error of a librbd or librados failure."""
    code = getattr(exc, "errno", None)
    detail = f"{what}: {exc}"
    if isinstance(exc, rbd.ImageNotFound | rados.ObjectNotFound) or code == errno.ENOENT:
        return VolumeNotFound(detail)
    if isinstance(exc, rbd.ImageHasSnapshots) or code == errno.ENOTEMPTY:
        return VolumeHasSnapshots(detail)
    if isinstance(exc, rbd.ImageBusy) or code == errno.EBUSY:
        return VolumeInUse(f"{what}: the image is in use (mapped or open elsewhere): {exc}")
    if isinstance(exc, rbd.PermissionError | rados.PermissionError | rados.PermissionDeniedError) or code in (
        errno.EPERM,
        errno.EACCES,
    ):
        return BackendPermissionDenied(f"{what}: permission denied (the cephx user's caps): {exc}")
    if isinstance(exc, rbd.Timeout | rados.TimedOut | rbd.ConnectionShutdown | rados.ConnectionShutdown):
        return BackendUnavailable(f"{what}: the Ceph cluster did not answer: {exc}")
    if isinstance(exc, rbd.InvalidArgument | rbd.ArgumentOutOfRange):
        return BackendRequestError(detail)
    return VolumeBackendError(detail)


class Images:
    """RBD images and RADOS objects of one cluster, as one user, over a connected cluster handle."""

    def __init__(self, cluster: rados.Rados) -> None:
        self.cluster = cluster
        self.rbd = rbd.RBD()

    # --- plumbing ------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _call(self, what: str) -> Iterator[None]:
        _count(what)
        try:
            yield
        except (rbd.Error, rados.Error) as exc:
            error = translate(exc, what)
            if isinstance(exc, _BROKEN):
                raise error from exc  # the cached connection sees the cause and is dropped
            raise error from None

    @contextlib.contextmanager
    def ioctx(self, ref: ImageRef) -> Iterator[rados.Ioctx]:
        try:
            ioctx = self.cluster.open_ioctx(ref.pool)
        except rados.ObjectNotFound:
            raise VolumeNotFound(f"pool {ref.pool!r} does not exist") from None
        except rados.Error as exc:
            raise translate(exc, f"open pool {ref.pool}") from None
        try:
            if ref.namespace:
                ioctx.set_namespace(ref.namespace)
            yield ioctx
        finally:
            ioctx.close()

    @contextlib.contextmanager
    def image(self, ref: ImageRef, what: str, read_only: bool = False) -> Iterator[rbd.Image]:
        with self._call(what), self.ioctx(ref) as ioctx:
            image = rbd.Image(ioctx, ref.image, read_only=read_only)
            try:
                yield image
            finally:
                image.close()

    # --- images ----------------------------------------------------------------------------------------

    def create(self, ref: ImageRef, size: int, features: int | None, data_pool: str | None) -> None:
        with self._call("create"), self.ioctx(ref) as ioctx:
            self.rbd.create(ioctx, ref.image, size, old_format=False, features=features, data_pool=data_pool)

    @contextlib.contextmanager
    def edit(self, ref: ImageRef) -> Iterator[OpenImage]:
        """The image opened once for several changes (each open of a writable image costs round trips:
        its header, a watch, and with exclusive-lock the lock, taken at the first change)."""
        with self.image(ref, "open") as image:
            yield OpenImage(self, image)

    def metadata(self, ref: ImageRef) -> dict[str, str] | None:
        """The image's metadata; None if there is no such image."""
        try:
            with self.image(ref, "metadata-list", read_only=True) as image:
                return OpenImage(self, image).metadata()
        except VolumeNotFound:
            return None

    def watchers(self, ref: ImageRef) -> list[str]:
        """The clients watching the image's header (every mapping, on any node, and every writable open),
        as `client.N at ADDR`; a read-only open of ours adds none. Empty if there is no such image."""
        try:
            with self.image(ref, "watchers-list", read_only=True) as image:
                return [f"client.{w.get('id', '?')} at {w.get('addr', '?')}" for w in image.watchers_list()]
        except VolumeNotFound:
            return []

    def set_meta(self, ref: ImageRef, key: str, value: str) -> None:
        """Set a key; RBD refuses empty values, and an absent key reads as empty, so "" removes it."""
        with self.edit(ref) as image:
            image.set_meta(key, value)

    def remove_meta(self, ref: ImageRef, key: str) -> None:
        with contextlib.suppress(VolumeNotFound), self.edit(ref) as image:
            image.remove_meta(key)

    def stat(self, ref: ImageRef) -> tuple[int, dict[str, str]] | None:
        """(size, metadata) in one open; None if there is no such image."""
        try:
            with self.image(ref, "stat", read_only=True) as image:
                return int(image.size()), OpenImage(self, image).metadata()
        except VolumeNotFound:
            return None

    def grow_to(self, ref: ImageRef, size_bytes: int) -> int:
        """Grow the image to at least size_bytes (whole MiB); never shrink. Returns its size."""
        with self.edit(ref) as image:
            return image.grow_to(size_bytes)

    def remove_image(self, ref: ImageRef) -> bool:
        """Remove the image, or move it to the RBD trash while clones still need it.

        Its own snapshots are only what an interrupted copy left (csi-copy-*): removed first (with clone
        v2, one a clone needs goes to the image's snapshot trash). Returns whether it went to the trash.
        """
        if self._removed(ref):
            return False
        for name in self.user_snapshots(ref):
            self.remove_snapshot(ref, name)
        if not self._removed(ref):
            with self._call("trash-move"), self.ioctx(ref) as ioctx:
                self.rbd.trash_move(ioctx, ref.image, 0)
            log.info("image %s moved to the RBD trash: clones still depend on it", ref.spec)
            return True
        return False

    def _removed(self, ref: ImageRef) -> bool:
        """Remove the image; False (nothing done) while it has snapshots. A missing one is removed."""
        try:
            with self._call("remove"), self.ioctx(ref) as ioctx:
                self.rbd.remove(ioctx, ref.image)
        except VolumeNotFound:
            pass
        except VolumeHasSnapshots:
            return False
        return True

    # --- space (csi-addons ReclaimSpace) -----------------------------------------------------------------

    def used_bytes(self, ref: ImageRef) -> int:
        """What `rbd du` reports as the image's used bytes: the extents that exist in the image itself (not
        its parent), whole objects when the object map serves fast-diff (as `rbd du` counts them)."""
        used = 0

        def count(_offset: int, length: int, exists: bool) -> int:
            nonlocal used
            if exists:
                used += length
            return 0

        with self.image(ref, "du", read_only=True) as image:
            image.diff_iterate(0, int(image.size()), None, count, include_parent=False, whole_object=True)
        return used

    def sparsify(self, ref: ImageRef, sparse_size: int) -> None:
        """Free the image's aligned runs of sparse_size zero bytes (whole objects of zeros are removed)."""
        with self.image(ref, "sparsify") as image:
            image.sparsify(sparse_size)

    # --- snapshots and clones --------------------------------------------------------------------------

    def user_snapshots(self, ref: ImageRef) -> list[str]:
        """The names of the image's own snapshots (not those in its snapshot trash)."""
        with self.image(ref, "snap-list", read_only=True) as image:
            return [
                str(s["name"])
                for s in image.list_snaps()
                if s.get("namespace", rbd.RBD_SNAP_NAMESPACE_TYPE_USER) == rbd.RBD_SNAP_NAMESPACE_TYPE_USER
            ]

    def remove_snapshot(self, ref: ImageRef, name: str) -> None:
        with contextlib.suppress(VolumeNotFound), self.image(ref, "snap-remove") as image:
            image.remove_snap(name)

    def clone(
        self, source: ImageRef, snapshot: str, target: ImageRef, features: int | None, data_pool: str | None
    ) -> None:
        """A copy-on-write clone (v2) of source@snapshot."""
        with self._call("clone"), self.ioctx(source) as parent, self.ioctx(target) as child:
            self.rbd.clone(parent, source.image, snapshot, child, target.image, features=features,
                           data_pool=data_pool)  # fmt: skip

    def deep_copy(
        self, source: ImageRef, snapshot: str, target: ImageRef, features: int | None, data_pool: str | None
    ) -> None:
        """A full copy of source@snapshot (for an image without the layering feature)."""
        with self._call("deep-copy"), self.ioctx(source) as parent, self.ioctx(target) as child:
            image = rbd.Image(parent, source.image, snapshot=snapshot, read_only=True)
            try:
                image.deep_copy(child, target.image, features=features, data_pool=data_pool)
            finally:
                image.close()

    def parent(self, ref: ImageRef, image_id: str | None = None) -> tuple[ImageRef, str] | None:
        """The image's parent (its place, and its image id: it may be in the trash), if it is a clone."""
        with self._call("parent"), self.ioctx(ref) as ioctx:
            if image_id is None:
                image = rbd.Image(ioctx, ref.image, read_only=True)
            else:
                image = rbd.Image(ioctx, image_id=image_id, read_only=True)
            try:
                spec: dict[str, Any] = image.get_parent_image_spec()
                parent_id = str(image.parent_id())
            except rbd.ImageNotFound:
                return None
            finally:
                image.close()
        parent = ImageRef(ref.cluster_id, str(spec["pool_name"]), str(spec.get("pool_namespace", "")),
                          str(spec["image_name"]))  # fmt: skip
        return parent, parent_id

    def depth(self, ref: ImageRef) -> int:
        """How many parents the image has above it (0: not a clone)."""
        depth, found, image_id = 0, self.parent(ref), None
        while found is not None:
            depth += 1
            parent, image_id = found
            found = self.parent(parent, image_id)
        return depth

    def flatten(self, ref: ImageRef) -> None:
        """Copy what the image still reads from its parents into it, detaching it (O(bytes))."""
        with self.image(ref, "flatten") as image:
            image.flatten()

    def purge_trash(self, ref: ImageRef) -> list[str]:
        """Remove each csi-luks image in the trash of ref's pool and namespace that no clone needs any
        more (its snapshot trash is empty: librbd empties it as the last clone goes). Repeats while that
        frees a parent further up. Returns the names removed."""
        removed: list[str] = []
        while True:
            with self._call("trash-list"), self.ioctx(ref) as ioctx:
                entries = [(str(e["id"]), str(e["name"])) for e in self.rbd.trash_list(ioctx)]
            freed = []
            for image_id, name in entries:
                if not is_csi_image(name):
                    continue  # not ours
                with self._call("trash-snapshots"), self.ioctx(ref) as ioctx:
                    try:
                        image = rbd.Image(ioctx, image_id=image_id, read_only=True)
                    except rbd.ImageNotFound:
                        continue
                    try:
                        needed = any(True for _ in image.list_snaps())
                    finally:
                        image.close()
                if needed:
                    continue
                with contextlib.suppress(VolumeNotFound), self._call("trash-remove"), self.ioctx(ref) as io:
                    self.rbd.trash_remove(io, image_id, True)
                    freed.append(name)
            if not freed:
                return removed
            log.info("purged %s from the RBD trash of %s: nothing depends on them any more",
                     ", ".join(freed), ref.pool)  # fmt: skip
            removed += freed

    # --- the images of a pool ------------------------------------------------------------------------

    def pools(self) -> list[str]:
        with self._call("pool-list"):
            return [str(name) for name in self.cluster.list_pools()]

    def marked(self, where: ImageRef, key: str, value: str) -> list[tuple[ImageRef, dict[str, str]]]:
        """The csi-luks images of where's pool and namespace whose metadata has key set to value, with
        their metadata (one read-only open each: what a start-up scan costs)."""
        with self._call("image-list"), self.ioctx(where) as ioctx:
            names = [str(name) for name in self.rbd.list(ioctx)]
        found = []
        for name in filter(is_csi_image, names):
            ref = ImageRef(where.cluster_id, where.pool, where.namespace, name)
            metadata = self.metadata(ref)
            if metadata is not None and metadata.get(key) == value:
                found.append((ref, metadata))
        return found

    # --- Ceph-CSI's journal (ceph_csi) -------------------------------------------------------------------

    def pool_name(self, pool_id: int) -> str:
        """The name of the pool with this id (Ceph-CSI's handles name pools by id)."""
        with self._call("pool-lookup"):
            try:
                return str(self.cluster.pool_reverse_lookup(pool_id))
            except rados.ObjectNotFound:
                raise VolumeNotFound(f"the cluster has no pool with id {pool_id}") from None

    def omap(self, where: ImageRef, name: str) -> dict[str, str] | None:
        """The OMAP key/values of a RADOS object in where's pool and namespace; None if it does not exist."""
        with self._call("omap-get"), self.ioctx(where) as ioctx:
            return ceph_csi.read_omap(ioctx, name)

    def set_ceph_csi_attribute(
        self, where: ImageRef, journal: ceph_csi.Journal, handle: ceph_csi.Handle, key: str, value: str
    ) -> None:
        with self._call("omap-set"), self.ioctx(where) as ioctx:
            ceph_csi.set_attribute(ioctx, journal, handle, key, value)

    def undo_ceph_csi_reservation(
        self,
        volume: ImageRef,
        directory: ImageRef,
        journal: ceph_csi.Journal,
        handle: ceph_csi.Handle,
        request_name: str,
        instance: str,
    ) -> None:
        with (
            self._call("omap-remove"),
            self.ioctx(volume) as volume_ioctx,
            self.ioctx(directory) as dir_ioctx,
        ):
            ceph_csi.undo_reservation(volume_ioctx, dir_ioctx, journal, handle, request_name, instance)

    # --- RADOS objects -----------------------------------------------------------------------------------

    def get_object(self, ref: ImageRef, name: str) -> bytes | None:
        """A RADOS object's content; None if there is no such object."""
        with self._call("object-get"), self.ioctx(ref) as ioctx:
            try:
                size, _ = ioctx.stat(name)
            except rados.ObjectNotFound:
                return None
            chunks = []
            offset = 0
            while offset < size:
                chunk = ioctx.read(name, min(_OBJECT_CHUNK, size - offset), offset)
                if not chunk:
                    break
                chunks.append(chunk)
                offset += len(chunk)
            return b"".join(chunks)

    def put_object(self, ref: ImageRef, name: str, data: bytes) -> None:
        """Replace the object's content with data, in one atomic write (a reader sees old or new)."""
        with self._call("object-put"), self.ioctx(ref) as ioctx:
            ioctx.write_full(name, data)

    def remove_object(self, ref: ImageRef, name: str) -> None:
        """Remove a RADOS object; one that is not there is removed already."""
        with contextlib.suppress(VolumeNotFound), self._call("object-remove"), self.ioctx(ref) as ioctx:
            ioctx.remove_object(name)


class OpenImage:
    """An image Images opened: each call one librbd request on it, counted and translated."""

    def __init__(self, images: Images, image: rbd.Image) -> None:
        self._images = images
        self.image = image

    def metadata(self) -> dict[str, str]:
        with self._images._call("metadata-list"):
            return {str(k): str(v) for k, v in self.image.metadata_list()}

    def set_meta(self, key: str, value: str) -> None:
        """Set a key; RBD refuses empty values, and an absent key reads as empty, so "" removes it."""
        if not value:
            self.remove_meta(key)
            return
        with self._images._call("metadata-set"):
            self.image.metadata_set(key, value)

    def remove_meta(self, key: str) -> None:
        # KeyError: librbd's "no such key"
        with contextlib.suppress(VolumeNotFound, KeyError), self._images._call("metadata-remove"):
            self.image.metadata_remove(key)

    def grow_to(self, size_bytes: int) -> int:
        """Grow the image to at least size_bytes (whole MiB); never shrink. Returns its size."""
        with self._images._call("resize"):
            size = int(self.image.size())
            if size < size_bytes:
                size = -(-size_bytes // _MiB) * _MiB
                self.image.resize(size, allow_shrink=False)
            return size

    def features(self) -> int:
        return int(self.image.features())

    def create_snapshot(self, name: str) -> None:
        with self._images._call("snap-create"):
            self.image.create_snap(name)

    def remove_snapshot(self, name: str) -> None:
        """Remove a snapshot; a missing one is removed already. With clone v2, one that clones still
        need moves to the image's snapshot trash."""
        with contextlib.suppress(VolumeNotFound), self._images._call("snap-remove"):
            self.image.remove_snap(name)

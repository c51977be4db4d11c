"""The RBD backend: each volume an RBD image, its metadata image-meta keys, attached with krbd or rbd-nbd.

Everything goes through the `rbd` CLI with JSON output (the Python bindings only load in the system's own
interpreter). Each call runs as the request's cephx user (`userID`/`userKey` from its secrets), with the
key in a 0600 file that lives for the call (see ceph_clusters).

A volume id names everything a later call needs, without a lookup table:

    rbd-<len><clusterID>-<len><pool>-<len><radosNamespace>-<uuid>   (each <len> two hex digits)

and the image is `csi-vol-<uuid>` in that pool and namespace. The uuid comes from the volume's name, so a
retried CreateVolume finds its image.

Crash safety: the image is complete (content copied, metadata written) only once its last metadata key,
`csi-luks/volume-id`, names it. An image without it was never handed out; create() replaces it and
get() does not see it, so a crash at any step is repaired by a retry and swept by a delete.

A copy (snapshot, clone, restore) is a temporary snapshot of the source, `rbd deep cp` of it into the new
image, and the snapshot's removal: the copy depends on nothing of the source afterwards.

The node keeps a small record (the metadata minus the wrapped DEK) of each image it attached, under the
state directory: NodePublish, NodeGetVolumeStats and NodeUnstage carry no credentials, and need only that.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import math
import os
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from csi_luks.operations.crash import Step
from csi_luks.quoting import quoted
from csi_luks.system.programs import RADOS, RBD
from csi_luks.system.runner import CommandError, CommandResult, Runner
from csi_luks.system.udev import DeviceWaitTimeout, block_device_events
from csi_luks.volume_metadata import NAME, PREFIX
from csi_luks.volumes.base import (
    BackendPermissionDenied,
    BackendRequestError,
    BackendUnavailable,
    CapacityOutOfRange,
    MalformedId,
    VolumeBackend,
    VolumeBackendError,
    VolumeInfo,
    VolumeInUse,
    VolumeNotFound,
)
from csi_luks.volumes.ceph_clusters import (
    CONNECT_TIMEOUT,
    USER_ID,
    USER_KEY,
    CephCluster,
    CephClusters,
    Credentials,
    check_plain,
    client_config,
    is_plain,
)
from csi_luks.volumes.standalone import write_atomically

log = logging.getLogger(__name__)

PARAM_CLUSTER_ID, PARAM_POOL = "clusterID", "pool"
PARAM_DATA_POOL, PARAM_IMAGE_FEATURES = "dataPool", "imageFeatures"
# "rbd" (krbd, the default) or "rbd-nbd" (userspace librbd behind /dev/nbdN: newer image features than the
# node's kernel knows, at the cost of a daemon per volume that must outlive plugin restarts).
PARAM_MOUNTER, MOUNTER_KRBD, MOUNTER_NBD = "mounter", "rbd", "rbd-nbd"
MOUNTER = PREFIX + "mounter"
_KRBD, _NBD = "krbd", "nbd"  # rbd device --device-type
# Fixed forever: every existing volume id was derived from it.
_NAMESPACE = uuid.UUID("0b6f6f8e-8f55-4a0e-bd4a-7c0e4c6a9d21")
_OWNER = PREFIX + "volume-id"  # written last: the image is complete
_DEK = PREFIX + "dek"  # not kept in the node's record of an attachment
_IMAGE_PREFIX, _SNAPSHOT_IMAGE_PREFIX = "csi-vol-", "csi-snap-"
# (id prefix, image prefix) of each kind: a volume and a snapshot of one name never share an id or an
# image. Snapshots made before the split have volume-form ids and images, which stay valid.
_VOLUME_PREFIXES, _SNAPSHOT_PREFIXES = ("rbd-", _IMAGE_PREFIX), ("rbd-snap-", _SNAPSHOT_IMAGE_PREFIX)
# What rbd accepts: an image with the object-map feature (on by default) tracks at most 256 Mi objects,
# 4 MiB each by default, so 1 PiB. Checked before any call, whatever the features.
MAX_IMAGE_BYTES = 256 * 1024 * 1024 * 4 * 1024 * 1024
_COPY_SNAPSHOT_PREFIX = "csi-copy-"
# The image features a StorageClass may ask for (the rest are set by Ceph itself).
_FEATURES = frozenset({"layering", "exclusive-lock", "object-map", "fast-diff", "deep-flatten", "journaling"})
_MiB = 1024 * 1024
# Copying or removing a large image takes as long as its data: no short deadline may cut it off (a cut
# copy would be redone from scratch by every retry). The CO's retries meanwhile get ABORTED (in flight).
BULK_TIMEOUT = 24 * 3600.0
_SYSFS_RBD = "/sys/bus/rbd/devices"
# errno values the rbd CLI exits with.
_EPERM, _ENOENT, _EACCES, _EBUSY, _EEXIST, _ENOTEMPTY, _ETIMEDOUT = 1, 2, 13, 16, 17, 39, 110


class VolumeHasSnapshots(VolumeBackendError):
    """rbd rm refused an image that still has snapshots."""


@dataclass(frozen=True)
class ImageRef:
    """Where an image is: cluster, pool, RADOS namespace, name."""

    cluster_id: str
    pool: str
    namespace: str
    image: str

    @property
    def spec(self) -> str:
        return "/".join(p for p in (self.pool, self.namespace, self.image) if p)

    def snapshot(self, name: str) -> str:
        return f"{self.spec}@{name}"


def encode_volume_id(ref: ImageRef) -> str:
    fields = (ref.cluster_id, ref.pool, ref.namespace)
    id_prefix, image_prefix = (
        _SNAPSHOT_PREFIXES if ref.image.startswith(_SNAPSHOT_IMAGE_PREFIX) else _VOLUME_PREFIXES
    )
    uid = ref.image.removeprefix(image_prefix)
    return id_prefix + "-".join(f"{len(f):02x}{f}" for f in fields) + "-" + uid


def decode_volume_id(volume_id: str) -> ImageRef:
    """The image a volume or snapshot id names; MalformedId for an id this backend cannot have made."""
    # The snapshot prefix first: it starts with the volume one.
    id_prefix, image_prefix = next(
        (p for p in (_SNAPSHOT_PREFIXES, _VOLUME_PREFIXES) if volume_id.startswith(p[0])), ("", "")
    )
    rest = volume_id.removeprefix(id_prefix)
    fields = []
    try:
        if not id_prefix:
            raise ValueError
        for _ in range(3):
            length = int(rest[:2], 16)
            value, rest = rest[2 : 2 + length], rest[2 + length :]
            if len(value) != length or not rest.startswith("-"):
                raise ValueError
            fields.append(value)
            rest = rest[1:]
        uid = str(uuid.UUID(rest))
        if uid != rest or not all(is_plain(f) for f in fields[:2]) or (fields[2] and not is_plain(fields[2])):
            raise ValueError  # nothing but plain names reaches rbd's argv or a file path
    except ValueError:
        raise MalformedId(f"{quoted(volume_id)} is not an RBD volume or snapshot id of csi-luks") from None
    return ImageRef(fields[0], fields[1], fields[2], image_prefix + uid)


class _Rbd:
    """The rbd CLI for one cluster as one user."""

    def __init__(self, runner: Runner, connection: list[str], secret: str, timeout: float) -> None:
        self.runner = runner
        self.connection = connection
        self.secret = secret
        self.timeout = timeout

    def run(self, *argv: str, timeout: float | None = None, hide: str = "") -> CommandResult:
        """Run rbd as the user; `hide` (a wrapped DEK) is redacted from logs like the key."""
        try:
            return self.runner.run(
                [RBD, *self.connection, *argv], secrets=[self.secret, hide], timeout=timeout or self.timeout
            )
        except CommandError as exc:
            raise _translate(exc, argv) from None

    def json(self, *argv: str) -> Any:
        return json.loads(self.run(*argv, "--format", "json").stdout or "null")

    def metadata(self, ref: ImageRef) -> dict[str, str] | None:
        """The image's metadata; None if there is no such image."""
        try:
            raw = self.json("image-meta", "list", ref.spec)
        except VolumeNotFound:
            return None
        return {str(k): str(v) for k, v in (raw or {}).items()}

    def set_meta(self, ref: ImageRef, key: str, value: str) -> None:
        """Set a key; RBD refuses empty values, and an absent key reads as empty, so "" removes it."""
        if value:
            self.run("image-meta", "set", ref.spec, key, value, hide=value if key == _DEK else "")
        else:
            self.remove_meta(ref, key)

    def remove_meta(self, ref: ImageRef, key: str) -> None:
        with contextlib.suppress(VolumeNotFound):  # a missing key is already removed
            self.run("image-meta", "remove", ref.spec, key)

    def size(self, ref: ImageRef) -> int:
        return int(self.json("info", ref.spec)["size"])

    def grow_to(self, ref: ImageRef, size_bytes: int) -> int:
        """Grow the image to at least size_bytes (whole MiB); never shrink. Returns its size."""
        size = self.size(ref)
        if size < size_bytes:
            size_mib = math.ceil(size_bytes / _MiB)
            self.run("resize", "--no-progress", "--size", f"{size_mib}M", ref.spec)
            size = size_mib * _MiB
        return size

    def remove_image(self, ref: ImageRef) -> None:
        """Remove the image and its snapshots (only an interrupted copy leaves one: purged on demand)."""
        with contextlib.suppress(VolumeNotFound):
            try:
                self.run("rm", "--no-progress", ref.spec, timeout=BULK_TIMEOUT)
            except VolumeHasSnapshots:
                self.run("snap", "purge", "--no-progress", ref.spec, timeout=BULK_TIMEOUT)
                self.run("rm", "--no-progress", ref.spec, timeout=BULK_TIMEOUT)

    def rados(self, ref: ImageRef, *argv: str) -> CommandResult:
        """The rados CLI on the image's pool and RADOS namespace, as the user."""
        namespace = ["--namespace", ref.namespace] if ref.namespace else []
        try:
            return self.runner.run(
                [RADOS, *self.connection, "--pool", ref.pool, *namespace, *argv],
                secrets=[self.secret],
                timeout=self.timeout,
            )
        except CommandError as exc:
            raise _translate(exc, ("rados", *argv)) from None

    def get_object(self, ref: ImageRef, name: str) -> bytes | None:
        """A RADOS object's content; None if there is no such object."""
        with tempfile.TemporaryDirectory(prefix="csi-luks-object-") as directory:
            path = Path(directory) / "object"
            try:
                self.rados(ref, "get", name, str(path))
            except VolumeNotFound:
                return None
            return path.read_bytes()

    def put_object(self, ref: ImageRef, name: str, data: bytes) -> None:
        with tempfile.TemporaryDirectory(prefix="csi-luks-object-") as directory:
            path = Path(directory) / "object"
            path.write_bytes(data)
            self.rados(ref, "put", name, str(path))

    def remove_object(self, ref: ImageRef, name: str) -> None:
        """Remove a RADOS object; one that is not there is removed already."""
        with contextlib.suppress(VolumeNotFound):
            self.rados(ref, "rm", name)

    def remove_snapshot(self, ref: ImageRef, name: str) -> None:
        with contextlib.suppress(VolumeNotFound):
            self.run("snap", "rm", "--no-progress", ref.snapshot(name))


def _translate(exc: CommandError, argv: tuple[str, ...]) -> VolumeBackendError:
    what = f"rbd {' '.join(argv[:2])}"
    detail = exc.stderr.strip().splitlines()[-1] if exc.stderr.strip() else str(exc)
    code = exc.returncode
    if code == _ENOENT or "No such file or directory" in exc.stderr:
        return VolumeNotFound(f"{what}: {detail}")
    if code == _ENOTEMPTY or "image has snapshots" in exc.stderr:
        return VolumeHasSnapshots(f"{what}: {detail}")
    if code == _EBUSY or "still has watchers" in exc.stderr:
        return VolumeInUse(f"{what}: the image is in use (mapped or open elsewhere): {detail}")
    if "failed to decode key" in exc.stderr:
        return BackendRequestError(f"{what}: the request's {USER_KEY} is not a valid cephx key")
    # Exit 1 is also rbd's code for a command-line error: only the errno text means EPERM.
    if code == _EACCES or (code == _EPERM and "Operation not permitted" in exc.stderr):
        return BackendPermissionDenied(
            f"{what}: permission denied (the cephx user's key or caps, or for a map this process's "
            f"privileges): {detail}"
        )
    if code == _ETIMEDOUT or code < 0 or "timed out" in exc.stderr:
        return BackendUnavailable(f"{what}: the Ceph cluster did not answer: {detail}")
    return VolumeBackendError(f"{what} failed ({code}): {detail}")


class RbdBackend(VolumeBackend):
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
    ) -> None:
        self.clusters = clusters
        self.state_dir = Path(state_dir)
        self.runner = runner or Runner()
        self.credentials = credentials
        self.timeout = timeout
        self.map_timeout = map_timeout
        self.connect_timeout = connect_timeout
        # With one_request (see VolumeBackend.for_request), what this request read of its volumes: each rbd
        # call costs a process, a cephx handshake and a monitor round trip, seconds on a slow node.
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
            self.connect_timeout, one_request,
        )  # fmt: skip

    # --- placement -----------------------------------------------------------------------------------

    def volume_id_for(
        self, name: str, parameters: Mapping[str, str], like: str | None = None, snapshot: bool = False
    ) -> str:
        image = (_SNAPSHOT_IMAGE_PREFIX if snapshot else _IMAGE_PREFIX) + str(uuid.uuid5(_NAMESPACE, name))
        if like is not None:
            return encode_volume_id(replace(decode_volume_id(like), image=image))
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
        decode_volume_id(object_id)

    def check_capacity(self, size_bytes: int) -> None:
        super().check_capacity(size_bytes)
        if size_bytes > MAX_IMAGE_BYTES:
            raise CapacityOutOfRange(
                f"{size_bytes} bytes is more than an RBD image can hold here ({MAX_IMAGE_BYTES}: 256 Mi "
                "objects of 4 MiB, the object map's limit)"
            )

    @contextlib.contextmanager
    def _session(self, ref: ImageRef) -> Iterator[_Rbd]:
        if self.credentials is None:
            raise BackendRequestError(
                f"this call on {encode_volume_id(ref)} needs the cephx user in the request's secrets "
                f"({USER_ID}, {USER_KEY}): set the StorageClass's csi.storage.k8s.io/*-secret-name"
            )
        cluster: CephCluster = self.clusters.get(ref.cluster_id)
        with client_config(cluster, self.credentials, self.connect_timeout) as connection:
            yield _Rbd(self.runner, connection, self.credentials.key, self.timeout)

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
        options = _image_options(parameters or {})
        mounter = (parameters or {}).get(PARAM_MOUNTER) or MOUNTER_KRBD
        if mounter not in (MOUNTER_KRBD, MOUNTER_NBD):
            raise BackendRequestError(
                f"{PARAM_MOUNTER} {mounter!r}: expected {MOUNTER_KRBD} or {MOUNTER_NBD}"
            )
        if mounter == MOUNTER_NBD:
            metadata = {**metadata, MOUNTER: MOUNTER_NBD}  # the node maps it so at every stage
        with self._session(ref) as rbd:
            existing = None if volume_id in self._absent else rbd.metadata(ref)
            if existing is not None and existing.get(_OWNER) == volume_id:
                return self._info(volume_id, rbd.size(ref), existing)
            if existing is not None:
                _refuse_if_owned_by_another(ref, volume_id, existing)
                # A create that stopped before its last step: never handed out, so nobody's data.
                log.warning("volume %s: replacing the incomplete image %s left by an interrupted create",
                            volume_id, ref.spec)  # fmt: skip
                rbd.remove_image(ref)
            size_mib = max(1, math.ceil(size_bytes / _MiB))
            size = size_mib * _MiB
            present: dict[str, str] = {}
            if source_id is None:
                try:
                    with Step("rbd-create", "image"):
                        rbd.run("create", "--size", f"{size_mib}M", *options, ref.spec)
                except VolumeNotFound as exc:  # not the volume: where it was to go
                    raise BackendRequestError(
                        f"cannot create {ref.spec}: its pool, RADOS namespace or data pool does not exist "
                        f"({exc})"
                    ) from None
            else:
                source = decode_volume_id(source_id)
                self._copy(rbd, source, ref, options)
                header = rbd.get_object(source, _header_object(source))
                if header is not None:  # the copy's LUKS header is the source's: so is its backup
                    with Step("rbd-create", "header-backup"):
                        rbd.put_object(ref, _header_object(ref), header)
                with Step("rbd-create", "grow"):
                    size = rbd.grow_to(ref, size_bytes)
                # A deep copy brings the source's metadata (its DEK among it): only ours may stay.
                present = rbd.metadata(ref) or {}
                with Step("rbd-create", "drop-source-metadata"):
                    for key in present:
                        if key.startswith(PREFIX) and key not in metadata:
                            rbd.remove_meta(ref, key)
            # Each key is one rbd call (seconds under emulation): skip what is already so.
            with Step("rbd-create", "metadata"):
                for key, value in metadata.items():
                    if present.get(key, "") != value:
                        rbd.set_meta(ref, key, value)
            with Step("rbd-create", "owner"):
                rbd.set_meta(ref, _OWNER, volume_id)
            self._absent.discard(volume_id)
            log.info("volume %s: image %s created (%d MiB%s)", volume_id, ref.spec, size_mib,
                     f", a copy of {source_id}" if source_id else "")  # fmt: skip
            return self._info(volume_id, size, {**metadata, _OWNER: volume_id})

    @staticmethod
    def _copy(rbd: _Rbd, source: ImageRef, target: ImageRef, options: list[str]) -> None:
        if source.cluster_id != target.cluster_id:
            raise BackendRequestError(
                f"cannot copy {source.spec} of cluster {source.cluster_id} into cluster {target.cluster_id}"
            )
        snapshot = _COPY_SNAPSHOT_PREFIX + target.image
        rbd.remove_snapshot(source, snapshot)  # left by an interrupted copy
        with Step("rbd-copy", "snapshot"):
            rbd.run("snap", "create", "--no-progress", source.snapshot(snapshot))
        try:
            with Step("rbd-copy", "deep-copy"):
                rbd.run(
                    "deep", "copy", "--no-progress", *options, source.snapshot(snapshot), target.spec,
                    timeout=BULK_TIMEOUT,
                )  # fmt: skip
        finally:
            with Step("rbd-copy", "remove-snapshot"):
                rbd.remove_snapshot(source, snapshot)
        # The copy brings the source's snapshots along (other copies in flight): it keeps none.
        with Step("rbd-copy", "purge"):
            rbd.run("snap", "purge", "--no-progress", target.spec, timeout=BULK_TIMEOUT)

    def used_bytes(self, volume_id: str) -> int | None:
        """`rbd du`'s used bytes of the image itself (not its snapshots); None without credentials."""
        if self.credentials is None:
            return None
        ref = decode_volume_id(volume_id)
        with self._session(ref) as rbd:
            du = rbd.json("du", ref.spec)
        return sum(
            int(entry.get("used_size", 0))
            for entry in (du or {}).get("images", [])
            if entry.get("name") == ref.image and not entry.get("snapshot")
        )

    def sparsify(self, volume_id: str) -> bool:
        """`rbd sparsify`: free the image's objects (or their ends) that hold only zeros. Of an encrypted
        volume only what dm-crypt discarded can be zeros: ciphertext of zeros is not."""
        ref = decode_volume_id(volume_id)
        with self._session(ref) as rbd:
            rbd.run("sparsify", "--no-progress", ref.spec, timeout=BULK_TIMEOUT)
        return True

    def get(self, volume_id: str) -> VolumeInfo:
        ref = decode_volume_id(volume_id)
        if self.credentials is None:
            # Node calls without credentials: what this node recorded when it attached the image.
            record = self._attachment_record(volume_id)
            if record is not None:
                return record
        if volume_id in self._fetched:  # read in this request already (its own changes kept since)
            return self._fetched[volume_id]
        with self._session(ref) as rbd:
            metadata = rbd.metadata(ref)
            if metadata is None and self.one_request:
                self._absent.add(volume_id)
            if metadata is None or metadata.get(_OWNER) != volume_id:
                raise VolumeNotFound(f"volume {volume_id} (image {ref.spec}) does not exist")
            info = self._info(volume_id, rbd.size(ref), metadata)
        if self.one_request:
            self._fetched[volume_id] = info
        return info

    @staticmethod
    def _info(volume_id: str, size: int, metadata: Mapping[str, str]) -> VolumeInfo:
        visible = {k: v for k, v in metadata.items() if k != _OWNER}
        return VolumeInfo(volume_id, visible.get(NAME, ""), size, visible)

    def list(self) -> list[VolumeInfo]:
        raise BackendRequestError("the RBD backend cannot list volumes: listing calls carry no credentials")

    def delete(self, volume_id: str) -> None:
        try:
            ref = decode_volume_id(volume_id)
        except VolumeNotFound:
            return  # not an id of ours: nothing of it exists
        if self.find_attachment(volume_id) is not None:
            raise VolumeInUse(f"volume {volume_id} is mapped on this machine")
        with self._session(ref) as rbd:
            # get() in this request found the image complete and owned by this id: no need to ask again.
            if volume_id not in self._fetched:
                metadata = rbd.metadata(ref)
                if metadata is None:
                    return
                try:
                    _refuse_if_owned_by_another(ref, volume_id, metadata)
                except VolumeInUse as exc:
                    log.warning("DeleteVolume %s: nothing deleted: %s", volume_id, exc)
                    return  # this id names no volume of its own: it is deleted
                if metadata.get(_OWNER) != volume_id:
                    # An unfinished copy may have its header backup already (the controller removes only a
                    # complete volume's). Before the image: a crash between leaves an image a retry finds.
                    rbd.remove_object(ref, _header_object(ref))
            rbd.remove_image(ref)
        self._fetched.pop(volume_id, None)
        if self.one_request:
            self._absent.add(volume_id)

    # A LUKS header backup is a RADOS object beside the image (16 MiB does not fit image metadata).
    keeps_header_backups = True

    def store_header_backup(self, volume_id: str, data: bytes) -> None:
        ref = decode_volume_id(volume_id)
        with self._session(ref) as rbd:
            rbd.put_object(ref, _header_object(ref), data)

    def fetch_header_backup(self, volume_id: str) -> bytes | None:
        ref = decode_volume_id(volume_id)
        with self._session(ref) as rbd:
            return rbd.get_object(ref, _header_object(ref))

    def remove_header_backup(self, volume_id: str) -> None:
        try:
            ref = decode_volume_id(volume_id)
        except VolumeNotFound:
            return
        with self._session(ref) as rbd:
            rbd.remove_object(ref, _header_object(ref))

    def resize(self, volume_id: str, size_bytes: int) -> int:
        ref = decode_volume_id(volume_id)
        self._fetched.pop(volume_id, None)  # its size changes
        with self._session(ref) as rbd:
            return rbd.grow_to(ref, size_bytes)

    def set_metadata(self, volume_id: str, key: str, value: str) -> None:
        ref = decode_volume_id(volume_id)
        with self._session(ref) as rbd:
            rbd.set_meta(ref, key, value)
        self._remember(volume_id, key, value)
        record = self._attachment_record(volume_id)
        if record is not None and key != _DEK:
            self._write_record(
                VolumeInfo(volume_id, record.name, record.size_bytes, {**record.metadata, key: value})
            )

    def remove_metadata(self, volume_id: str, key: str) -> None:
        ref = decode_volume_id(volume_id)
        fetched = self._fetched.get(volume_id)
        if fetched is not None and key not in fetched.metadata:
            return  # the volume exists without the key, as this request read it
        with self._session(ref) as rbd:
            if fetched is None and rbd.metadata(ref) is None:
                raise VolumeNotFound(f"volume {volume_id} (image {ref.spec}) does not exist")
            rbd.remove_meta(ref, key)
        self._remember(volume_id, key, "")

    def _remember(self, volume_id: str, key: str, value: str) -> None:
        """Keep what this request read of a volume true after it set (or, with "", removed) a key."""
        fetched = self._fetched.get(volume_id)
        if fetched is not None:
            metadata = {k: v for k, v in fetched.metadata.items() if k != key}
            self._fetched[volume_id] = replace(
                fetched, metadata={**metadata, key: value} if value else metadata
            )

    # --- attachments ---------------------------------------------------------------------------------

    def attach(self, volume_id: str) -> str:
        ref = decode_volume_id(volume_id)
        # The record first (and on every stage, so a crash or a lost state dir is repaired by a retry):
        # the node's credential-less calls rely on it.
        info = self._fetched.get(volume_id) or self.get(volume_id)
        self._write_record(info)
        device = self.find_attachment(volume_id)
        if device is None:
            kind = _NBD if info.metadata.get(MOUNTER) == MOUNTER_NBD else _KRBD
            with self._session(ref) as rbd, block_device_events() as wait:
                self._mapped = None
                device = rbd.run("device", "map", "--device-type", kind, ref.spec).stdout.strip()
                try:
                    wait(device, self.map_timeout)
                except DeviceWaitTimeout as exc:
                    self.detach(volume_id)  # leave nothing half-attached behind
                    raise BackendUnavailable(
                        f"volume {volume_id}: rbd map gave {device}, but {exc}"
                    ) from None
            log.info("volume %s: image %s mapped at %s (%s)", volume_id, ref.spec, device, kind)
        return device

    def find_attachment(self, volume_id: str) -> str | None:
        mapping = self._mapping(volume_id)
        return None if mapping is None else str(mapping["device"])

    def _mapping(self, volume_id: str) -> dict[str, Any] | None:
        """The mapping of the volume's image on this machine (rbd device list), if any."""
        try:
            ref = decode_volume_id(volume_id)
        except VolumeNotFound:
            return None
        for mapping in self._mappings():
            if (mapping.get("pool"), mapping.get("namespace") or "", mapping.get("name")) == (
                ref.pool, ref.namespace, ref.image,
            ) and mapping.get("snap", "-") in ("-", ""):  # fmt: skip
                return mapping
        return None

    def _mappings(self) -> builtins.list[dict[str, Any]]:
        """krbd and (if the nbd module is loaded) rbd-nbd mappings, each tagged with its device type.

        With one_request, listed once until the request maps or unmaps (NodeStageVolume asks twice).
        """
        if self._mapped is not None:
            return self._mapped
        kinds = [_KRBD, _NBD] if os.path.isdir("/sys/module/nbd") else [_KRBD]
        found = []
        for kind in kinds:
            # krbd: sysfs; rbd-nbd: its daemons. Neither needs the cluster or credentials.
            argv = [RBD, "device", "list", "--device-type", kind, "--format", "json"]
            try:
                out = self.runner.run(argv, timeout=self.timeout).stdout
            except CommandError as exc:
                raise _translate(exc, ("device", "list")) from None
            for m in json.loads(out or "[]"):
                if isinstance(m, dict):
                    # The image is "name" in krbd's list and "image" in rbd-nbd's.
                    found.append({**m, "name": m.get("name", m.get("image")), "type": kind})
        if self.one_request:
            self._mapped = found
        return found

    def detach(self, volume_id: str) -> None:
        decode_volume_id(volume_id)
        mapping = self._mapping(volume_id)
        if mapping is not None:
            device = str(mapping["device"])
            self._mapped = None
            try:
                argv = [RBD, "device", "unmap", "--device-type", mapping["type"], device]
                self.runner.run(argv, timeout=self.timeout)
            except CommandError as exc:
                error = _translate(exc, ("device", "unmap"))
                if not isinstance(error, VolumeNotFound):  # gone meanwhile: detached all the same
                    raise error from None
            log.info("volume %s: %s unmapped", volume_id, device)
        with contextlib.suppress(FileNotFoundError):
            self._record_path(volume_id).unlink()

    def refresh_attachment_size(self, volume_id: str) -> None:
        """Make krbd re-read the image header now rather than on its (asynchronous) watch notification.

        rbd-nbd resizes its device itself when it sees the header change.
        """
        mapping = self._mapping(volume_id)
        if mapping is not None and mapping["type"] == _KRBD:
            Path(_SYSFS_RBD, str(mapping["id"]), "refresh").write_text("1")

    def free_bytes(self) -> int | None:
        return None

    # --- the node's record of its attachments --------------------------------------------------------

    def _record_path(self, volume_id: str) -> Path:
        decode_volume_id(volume_id)  # a path is built only from an id of ours: never "../x" or "/etc/x"
        return self.state_dir / "rbd-attachments" / f"{volume_id}.json"

    def _write_record(self, info: VolumeInfo) -> None:
        path = self._record_path(info.volume_id)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # private, not the umask's mode
        path.parent.mkdir(exist_ok=True, mode=0o700)
        kept = {k: v for k, v in info.metadata.items() if k != _DEK}
        write_atomically(
            path, json.dumps({"name": info.name, "size": info.size_bytes, "metadata": kept}).encode()
        )

    def _attachment_record(self, volume_id: str) -> VolumeInfo | None:
        try:
            raw = json.loads(self._record_path(volume_id).read_text())
        except (FileNotFoundError, ValueError):
            return None
        return VolumeInfo(volume_id, str(raw["name"]), int(raw["size"]), dict(raw["metadata"]))


def _header_object(ref: ImageRef) -> str:
    """The RADOS object that keeps the LUKS header backup of the image (beside it, in its pool)."""
    return f"csi-luks-header.{ref.image}"


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


def _image_options(parameters: Mapping[str, str]) -> list[str]:
    options = []
    features = parameters.get(PARAM_IMAGE_FEATURES, "")
    if features:
        unknown = sorted(set(features.split(",")) - _FEATURES)
        if unknown:
            raise BackendRequestError(
                f"{PARAM_IMAGE_FEATURES} {features!r}: unknown {unknown}; "
                f"known: {', '.join(sorted(_FEATURES))}"
            )
        options += ["--image-feature", features]
    data_pool = parameters.get(PARAM_DATA_POOL, "")
    if data_pool:
        options += ["--data-pool", check_plain(PARAM_DATA_POOL, data_pool)]
    return options

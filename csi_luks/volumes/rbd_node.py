"""The node's side of the RBD backend: an image attached with krbd or rbd-nbd, and a record of it.

`rbd device map/unmap/list` stay processes, as in Ceph-CSI: a mapping is the kernel's (krbd) or an
rbd-nbd daemon's, and must outlive the plugin. `map` runs as the request's cephx user with the key in a
0600 file that lives for the call (ceph_clusters.client_config); list and unmap need no cluster.

The node keeps a small record (the metadata minus the wrapped DEK) of each image it attached, under the
state directory: NodePublish, NodeGetVolumeStats and NodeUnstage carry no credentials, and need only that.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from csi_luks.system.programs import RBD
from csi_luks.system.runner import CommandError, CommandResult, Runner
from csi_luks.system.udev import DeviceWaitTimeout, block_device_events
from csi_luks.volume_metadata import PREFIX
from csi_luks.volumes import ceph_csi
from csi_luks.volumes.base import (
    BackendPermissionDenied,
    BackendRequestError,
    BackendUnavailable,
    VolumeBackendError,
    VolumeInfo,
    VolumeInUse,
    VolumeNotFound,
)
from csi_luks.volumes.ceph_clusters import USER_ID, USER_KEY, CephClusters, Credentials, client_config
from csi_luks.volumes.rbd_ids import ImageRef, check_volume_id, encode_volume_id
from csi_luks.volumes.standalone import write_atomically

log = logging.getLogger(__name__)

MOUNTER_KRBD, MOUNTER_NBD = "rbd", "rbd-nbd"
MOUNTER = PREFIX + "mounter"
DEK = PREFIX + "dek"  # not kept in the node's record of an attachment
_KRBD, _NBD = "krbd", "nbd"  # rbd device --device-type
_SYSFS_RBD = "/sys/bus/rbd/devices"
# krbd's map options. alloc_size: krbd's discard granularity, and what it rounds each discard in to. At
# its default (64 KiB) the block layer cuts a filesystem's long discards into 4 MiB pieces aligned only to
# 64 KiB, so unless a free extent starts on an object boundary each piece covers the ends of two objects
# and none is discarded whole: krbd zeroes or truncates them, they stay, and `rbd du` counts them. At the
# object size (krbd lowers it to a
# smaller image's object size) the pieces are whole objects, which krbd deletes (see the README, "Space
# reclaim"); the ends of a free extent short of a whole object are not discarded at all.
KRBD_MAP_OPTIONS: tuple[str, ...] = ("alloc_size=4194304",)
# errno values the rbd CLI exits with.
_EPERM, _ENOENT, _EACCES, _EBUSY, _ETIMEDOUT = 1, 2, 13, 16, 110


def _translate(exc: CommandError, argv: tuple[str, ...]) -> VolumeBackendError:
    what = f"rbd {' '.join(argv[:2])}"
    detail = exc.stderr.strip().splitlines()[-1] if exc.stderr.strip() else str(exc)
    code = exc.returncode
    if code == _ENOENT or "No such file or directory" in exc.stderr:
        return VolumeNotFound(f"{what}: {detail}")
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


class RbdAttachments:
    """The node's attachments of RBD images (a part of RbdBackend)."""

    clusters: CephClusters
    state_dir: Path
    runner: Runner
    credentials: Credentials | None
    timeout: float
    map_timeout: float
    connect_timeout: float
    one_request: bool
    _fetched: dict[str, VolumeInfo]
    _mapped: builtins.list[dict[str, Any]] | None

    def get(self, volume_id: str) -> VolumeInfo:
        raise NotImplementedError

    def _ref(self, volume_id: str) -> ImageRef:
        raise NotImplementedError

    @contextlib.contextmanager
    def _cli(self, ref: ImageRef) -> Iterator[list[str]]:
        """The rbd CLI's connection arguments for the request's user (its key in a file for the call)."""
        if self.credentials is None:
            raise BackendRequestError(
                f"this call on {encode_volume_id(ref)} needs the cephx user in the request's secrets "
                f"({USER_ID}, {USER_KEY}): set the StorageClass's csi.storage.k8s.io/*-secret-name"
            )
        with client_config(self.clusters.get(ref.cluster_id), self.credentials, self.connect_timeout) as args:
            yield args

    def _run_cli(self, argv: list[str], what: tuple[str, ...]) -> CommandResult:
        secrets = [self.credentials.key] if self.credentials is not None else []
        try:
            return self.runner.run(argv, secrets=secrets, timeout=self.timeout)
        except CommandError as exc:
            raise _translate(exc, what) from None

    def attach(self, volume_id: str) -> str:
        ref = self._ref(volume_id)
        # The record first (and on every stage, so a crash or a lost state dir is repaired by a retry):
        # the node's credential-less calls rely on it.
        info = self._fetched.get(volume_id) or self.get(volume_id)
        self._write_record(info)
        device = self.find_attachment(volume_id)
        if device is None:
            kind = _NBD if info.metadata.get(MOUNTER) == MOUNTER_NBD else _KRBD
            with self._cli(ref) as connection, block_device_events() as wait:
                self._mapped = None
                argv = [RBD, *connection, "device", "map", "--device-type", kind, ref.spec]
                if kind == _KRBD and KRBD_MAP_OPTIONS:
                    argv[-1:-1] = ["--options", ",".join(KRBD_MAP_OPTIONS)]
                device = self._run_cli(argv, ("device", "map")).stdout.strip()
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
            ref = self._ref(volume_id)
        except VolumeNotFound:
            return None
        except BackendRequestError:
            return None  # a Ceph-CSI volume this node never attached, asked without credentials
        for mapping in self._mappings():
            if (mapping.get("pool"), mapping.get("namespace") or "", mapping.get("name")) == (
                ref.pool, ref.namespace, ref.image,
            ) and mapping.get("snap", "-") in ("-", ""):  # fmt: skip
                return mapping
        return None

    def _mappings(self) -> builtins.list[dict[str, Any]]:
        """krbd and (if the nbd module is loaded) rbd-nbd mappings, each tagged with its device type.

        krbd's are read from sysfs, as `rbd device list` does (a controller's "mapped here?" check costs
        no process); rbd-nbd's from `rbd device list -t nbd`, which asks the daemons.

        With one_request, listed once until the request maps or unmaps (NodeStageVolume asks twice).
        """
        if self._mapped is not None:
            return self._mapped
        found = _krbd_mappings()  # sysfs: no process, no cluster
        if os.path.isdir("/sys/module/nbd"):
            # rbd-nbd: its daemons know their images. No cluster or credentials needed.
            argv = [RBD, "device", "list", "--device-type", _NBD, "--format", "json"]
            try:
                out = self.runner.run(argv, timeout=self.timeout).stdout
            except CommandError as exc:
                raise _translate(exc, ("device", "list")) from None
            for m in json.loads(out or "[]"):
                if isinstance(m, dict):
                    # The image is "name" in krbd's list and "image" in rbd-nbd's.
                    found.append({**m, "name": m.get("name", m.get("image")), "type": _NBD})
        if self.one_request:
            self._mapped = found
        return found

    def detach(self, volume_id: str) -> None:
        check_volume_id(volume_id)
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

    # --- the node's record of its attachments --------------------------------------------------------

    def _record_path(self, volume_id: str) -> Path:
        check_volume_id(volume_id)  # a path is built only from an id of ours: never "../x" or "/etc/x"
        return self.state_dir / "rbd-attachments" / f"{volume_id}.json"

    def _write_record(self, info: VolumeInfo) -> None:
        path = self._record_path(info.volume_id)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # private, not the umask's mode
        path.parent.mkdir(exist_ok=True, mode=0o700)
        kept = {k: v for k, v in info.metadata.items() if k != DEK}
        ref = self._ref(info.volume_id)
        record = {"name": info.name, "size": info.size_bytes, "metadata": kept,
                  "image": [ref.pool, ref.namespace, ref.image]}  # fmt: skip
        write_atomically(path, json.dumps(record).encode())

    def _attachment_record(self, volume_id: str) -> VolumeInfo | None:
        try:
            raw = json.loads(self._record_path(volume_id).read_text())
        except (FileNotFoundError, ValueError):
            return None
        return VolumeInfo(volume_id, str(raw["name"]), int(raw["size"]), dict(raw["metadata"]))

    def _recorded_ref(self, volume_id: str) -> ImageRef | None:
        """The image this node recorded for a Ceph-CSI volume when it attached it (found otherwise by a
        lookup in the cluster, which needs credentials that NodeUnstage does not carry)."""
        try:
            raw = json.loads(self._record_path(volume_id).read_text())
            pool, namespace, image = (str(part) for part in raw["image"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None
        return ImageRef(ceph_csi.parse_handle(volume_id).cluster_id, pool, namespace, image)


def _krbd_mappings(sysfs: str = _SYSFS_RBD) -> builtins.list[dict[str, Any]]:
    """This machine's krbd mappings, from /sys/bus/rbd/devices/<id>/{pool,pool_ns,name,current_snap}."""
    found: builtins.list[dict[str, Any]] = []
    try:
        entries = sorted(os.listdir(sysfs))
    except FileNotFoundError:
        return found  # the rbd module is not loaded: nothing is mapped
    for dev_id in entries:
        base = Path(sysfs, dev_id)

        def attribute(name: str, base: Path = base) -> str:
            try:
                return (base / name).read_text().strip()
            except OSError:
                return ""

        pool, image = attribute("pool"), attribute("name")
        if not dev_id.isdigit() or not pool or not image:
            continue  # going away meanwhile
        found.append({
            "id": dev_id, "pool": pool, "namespace": attribute("pool_ns"), "name": image,
            "snap": attribute("current_snap") or "-", "device": f"/dev/rbd{dev_id}", "type": _KRBD,
        })  # fmt: skip
    return found

"""Ceph-CSI's RBD volumes, as Ceph-CSI v3.x leaves them, so that csi-luks serves them in place.

What Ceph-CSI writes, and what is read and kept here (its source: internal/util/volid.go,
internal/journal/voljournal.go, internal/rbd/encryption.go):

- Volume handles `0001-<clusterID length, 4 hex>-<clusterID>-<pool id, 16 hex>-<uuid>`. The pool is
  named by its id; the image by the journal.
- The journal, OMAP in the image's pool and the cluster's RADOS namespace: `csi.volume.<uuid>` holds the
  volume's attributes (`csi.imagename`, `csi.volname` the request name, `csi.volume.encryptKMS`,
  `csi.volume.encryptionType`, `csi.volume.owner`, `csi.imageid`, and `csi.journalpool` when the request
  directory lives in another pool); `csi.volumes.<instance id>` maps `csi.volume.<request name>` to the
  uuid. Deleting the volume removes both, in that order (Ceph-CSI's UndoReservation).
- Image-meta `rbd.csi.ceph.com/encrypted` (`encryptionPrepared`, then `encrypted` once the node ran
  luksFormat; `requiresEncryption` from older versions; an older `.rbd.csi.ceph.com/` prefix) and, for
  KMS types that wrap the DEK, `rbd.csi.ceph.com/dek`.

csi-luks reads these as its own metadata (view) and writes back the ones Ceph-CSI reads (native_writes),
so that Ceph-CSI can take the volume back. Its own keys (csi-luks/...) are kept beside them; Ceph-CSI
ignores image-meta it does not know.
"""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

import rados

from csi_luks.volume_metadata import (
    CAPACITY,
    ENCRYPTED,
    KIND,
    KIND_SNAPSHOT,
    KMS_ID,
    LUKS_HEADER_BYTES,
    NAME,
    PREFIX,
    PVC_NAMESPACE,
    STATE,
    EncryptionState,
)
from csi_luks.volumes.base import BackendRequestError, MalformedId, VolumeNotFound
from csi_luks.volumes.ceph_clusters import is_plain

# csi-luks's key of the wrapped DEK (kms/dek_store.py's DEK_KEY; the volume layer does not import kms).
DEK_KEY = PREFIX + "dek"

DRIVER_NAME = "rbd.csi.ceph.com"
DEFAULT_INSTANCE_ID = "default"  # cephcsi --instanceid: the suffix of the request directory
_VERSION = "0001"
_HANDLE = re.compile(r"^0001-([0-9a-f]{4})-")
_MAX_HANDLE = 128

# The journal (voljournal.go's NewCSIVolumeJournal and NewCSISnapshotJournal).
IMAGE_NAME_KEY = "csi.imagename"
REQUEST_NAME_KEY = "csi.volname"
SNAPSHOT_NAME_KEY = "csi.snapname"
SOURCE_KEY = "csi.source"  # a snapshot's: its source image's name
KMS_ID_KEY = "csi.volume.encryptKMS"
ENCRYPTION_TYPE_KEY = "csi.volume.encryptionType"
OWNER_KEY = "csi.volume.owner"
JOURNAL_POOL_KEY = "csi.journalpool"  # hex of the big-endian pool id of the request directory

# Image-meta (encryption.go).
ENCRYPTED_META = "rbd.csi.ceph.com/encrypted"
OLD_ENCRYPTED_META = ".rbd.csi.ceph.com/encrypted"
DEK_META = "rbd.csi.ceph.com/dek"
OLD_DEK_META = ".rbd.csi.ceph.com/dek"
STATE_ENCRYPTED, STATE_PREPARED, STATE_REQUIRES = "encrypted", "encryptionPrepared", "requiresEncryption"
_NATIVE_STATES = {
    STATE_ENCRYPTED: EncryptionState.ENCRYPTED,
    STATE_PREPARED: EncryptionState.PREPARED,
    STATE_REQUIRES: EncryptionState.PREPARED,  # never staged: a new volume, Ceph-CSI formats it as one
}


@dataclass(frozen=True)
class Journal:
    """One of Ceph-CSI's two journals: volumes, or snapshots (whose handles have the same form)."""

    uuid_prefix: str  # the object of one volume's attributes: <prefix><uuid>
    directory_prefix: str  # the request directory: <prefix><instance id>
    request_prefix: str  # its key of one request: <prefix><request name>
    name_key: str  # the attribute naming the request
    kind: str  # for messages

    def uuid_object(self, handle: Handle) -> str:
        return self.uuid_prefix + handle.uuid


VOLUMES = Journal("csi.volume.", "csi.volumes.", "csi.volume.", REQUEST_NAME_KEY, "volume")
SNAPSHOTS = Journal("csi.snap.", "csi.snaps.", "csi.snap.", SNAPSHOT_NAME_KEY, "snapshot")


@dataclass(frozen=True)
class Handle:
    """A Ceph-CSI volume handle, decomposed."""

    cluster_id: str
    pool_id: int
    uuid: str

    @property
    def default_image(self) -> str:
        return "csi-vol-" + self.uuid


def is_handle(volume_id: str) -> bool:
    """Whether the id has the form of a Ceph-CSI handle (version 1), which no csi-luks id has."""
    return _HANDLE.match(volume_id) is not None


def parse_handle(volume_id: str) -> Handle:
    """Ceph-CSI's DecomposeCSIID, with every field checked; MalformedId otherwise."""
    problem = MalformedId(f"{volume_id!r} is not a Ceph-CSI RBD volume handle (0001-<len>-<clusterID>-...)")
    match = _HANDLE.match(volume_id)
    if match is None or len(volume_id) > _MAX_HANDLE:
        raise problem
    length = int(match.group(1), 16)
    rest = volume_id[match.end() :]
    cluster_id, rest = rest[:length], rest[length:]
    if len(cluster_id) != length or not rest.startswith("-"):
        raise problem
    pool_hex, rest = rest[1:17], rest[17:]
    if not re.fullmatch(r"[0-9a-f]{16}", pool_hex) or not rest.startswith("-"):
        raise problem
    uid = rest[1:]
    try:
        if str(uuid.UUID(uid)) != uid:
            raise ValueError
    except ValueError:
        raise problem from None
    if not is_plain(cluster_id):  # cluster ids go into paths and argv
        raise problem
    return Handle(cluster_id, int(pool_hex, 16), uid)


def compose_handle(cluster_id: str, pool_id: int, uid: str) -> str:
    """Ceph-CSI's ComposeCSIID (tests and the migration guide's examples)."""
    return f"{_VERSION}-{len(cluster_id):04x}-{cluster_id}-{pool_id:016x}-{uid}"


# --- the journal -----------------------------------------------------------------------------------


def read_omap(ioctx: rados.Ioctx, name: str) -> dict[str, str] | None:
    """All key/values of an OMAP object; None if there is no such object."""
    try:
        with rados.ReadOpCtx() as op:
            entries, _ = ioctx.get_omap_vals(op, "", "", -1)
            ioctx.operate_read_op(op, name)
            return {str(k): v.decode() for k, v in entries}
    except rados.ObjectNotFound:
        return None


def journal_pool_id(attributes: Mapping[str, str]) -> int | None:
    """The pool of the request directory when it is not the image's (topology-aware provisioning)."""
    value = attributes.get(JOURNAL_POOL_KEY)
    if not value:
        return None
    try:
        return int(value, 16)
    except ValueError:
        raise BackendRequestError(
            f"the journal's {JOURNAL_POOL_KEY} {value!r} is not a hex pool id"
        ) from None


def undo_reservation(
    volume_ioctx: rados.Ioctx,
    directory_ioctx: rados.Ioctx,
    journal: Journal,
    handle: Handle,
    request_name: str,
    instance_id: str,
) -> None:
    """Remove the volume's (or snapshot's) journal entries as Ceph-CSI's UndoReservation does: the uuid
    object first, then the request name's key (a crash between leaves a key pointing at nothing, which
    Ceph-CSI's own create of that name repairs)."""
    with contextlib.suppress(rados.ObjectNotFound):
        volume_ioctx.remove_object(journal.uuid_object(handle))
    if not request_name:
        return
    with contextlib.suppress(rados.ObjectNotFound), rados.WriteOpCtx() as op:
        directory_ioctx.remove_omap_keys(op, (journal.request_prefix + request_name,))
        directory_ioctx.operate_write_op(op, journal.directory_prefix + instance_id)


def set_attribute(ioctx: rados.Ioctx, journal: Journal, handle: Handle, key: str, value: str) -> None:
    """Set one attribute of the journal entry (its uuid object exists: the volume was read)."""
    with rados.WriteOpCtx() as op:
        ioctx.set_omap(op, (key,), (value.encode(),))
        ioctx.operate_write_op(op, journal.uuid_object(handle))


def journal_writes(key: str) -> str | None:
    """The journal attribute that must follow a csi-luks key: the KMS id (`csi-luks migrate`), so that
    Ceph-CSI, taking the volume back, asks the KMS that now holds the DEK."""
    return KMS_ID_KEY if key == KMS_ID else None


# --- image-meta, both ways ---------------------------------------------------------------------------


def native_state(metadata: Mapping[str, str]) -> str:
    return metadata.get(ENCRYPTED_META) or metadata.get(OLD_ENCRYPTED_META) or ""


def view(
    metadata: Mapping[str, str], attributes: Mapping[str, str], size: int, journal: Journal = VOLUMES
) -> dict[str, str]:
    """The volume's (or snapshot's) metadata as csi-luks keeps it: Ceph-CSI's keys read as csi-luks's, then
    the csi-luks keys written since (a rotation's state, a recorded capacity) over them."""
    found: dict[str, str] = {NAME: attributes.get(journal.name_key, "")}
    if journal is SNAPSHOTS:
        found[KIND] = KIND_SNAPSHOT
    if attributes.get(OWNER_KEY):  # the PVC's namespace: the tenant of Vault's tenant types
        found[PVC_NAMESPACE] = attributes[OWNER_KEY]
    state = native_state(metadata)
    encrypted = state in _NATIVE_STATES
    if attributes.get(ENCRYPTION_TYPE_KEY, "block") not in ("", "block") and encrypted:
        raise BackendRequestError(
            f"the volume uses Ceph-CSI's {attributes[ENCRYPTION_TYPE_KEY]!r} encryption (fscrypt); csi-luks "
            "serves only block (LUKS) encryption"
        )
    if encrypted:
        found[ENCRYPTED] = "true"
        found[STATE] = _NATIVE_STATES[state].value
        found[KMS_ID] = attributes.get(KMS_ID_KEY, "")
    # Ceph-CSI's image is the size asked for, the LUKS header inside it.
    found[CAPACITY] = str(max(0, size - (LUKS_HEADER_BYTES if encrypted else 0)))
    dek = metadata.get(DEK_META) or metadata.get(OLD_DEK_META)
    if dek:
        found[DEK_KEY] = dek
    found.update({k: v for k, v in metadata.items() if k.startswith(PREFIX)})
    return found


def native_writes(key: str, value: str) -> dict[str, str]:
    """What Ceph-CSI must also see when csi-luks sets (or, with "", removes) one of its keys: the DEK in
    Ceph-CSI's key, the encryption state in its words."""
    if key == DEK_KEY:
        return {DEK_META: value}
    if key == STATE and value:
        state = EncryptionState(value)
        return {ENCRYPTED_META: STATE_PREPARED if state is EncryptionState.PREPARED else STATE_ENCRYPTED}
    return {}


def check_image_name(attributes: Mapping[str, str], handle: Handle) -> str:
    """The image the journal names for the handle; VolumeNotFound without one."""
    image = attributes.get(IMAGE_NAME_KEY, "")
    if not image:
        raise VolumeNotFound(f"Ceph-CSI's journal entry for {handle.uuid} names no image")
    if not is_plain(image):
        raise BackendRequestError(f"Ceph-CSI's journal names the image {image!r}, which is not a plain name")
    return image

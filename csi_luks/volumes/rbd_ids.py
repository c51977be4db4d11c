"""RBD volume and snapshot ids: each names its cluster, pool, RADOS namespace and image, without a lookup.

    rbd-<len><clusterID>-<len><pool>-<len><radosNamespace>-<uuid>        a volume: image csi-vol-<uuid>
    rbd-snap-<len><clusterID>-<len><pool>-<len><radosNamespace>-<uuid>   a snapshot: image csi-snap-<uuid>

(each <len> two hex digits). The uuid comes from the CSI name, so a retried create finds its image.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from csi_luks.quoting import quoted
from csi_luks.volumes import ceph_csi
from csi_luks.volumes.base import MalformedId
from csi_luks.volumes.ceph_clusters import is_plain

# Fixed forever: every existing volume id was derived from it.
NAMESPACE = uuid.UUID("0b6f6f8e-8f55-4a0e-bd4a-7c0e4c6a9d21")
IMAGE_PREFIX, SNAPSHOT_IMAGE_PREFIX = "csi-vol-", "csi-snap-"
# (id prefix, image prefix) of each kind: a volume and a snapshot of one name never share an id or an
# image. Snapshots made before the split have volume-form ids and images, which stay valid.
_VOLUME_PREFIXES, _SNAPSHOT_PREFIXES = ("rbd-", IMAGE_PREFIX), ("rbd-snap-", SNAPSHOT_IMAGE_PREFIX)


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
        _SNAPSHOT_PREFIXES if ref.image.startswith(SNAPSHOT_IMAGE_PREFIX) else _VOLUME_PREFIXES
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


def check_volume_id(volume_id: str) -> None:
    """MalformedId unless the id is one of csi-luks's or a Ceph-CSI handle (served in place: ceph_csi)."""
    if ceph_csi.is_handle(volume_id):
        ceph_csi.parse_handle(volume_id)
    else:
        decode_volume_id(volume_id)


def image_name(name: str, snapshot: bool) -> str:
    """The image a CreateVolume (or CreateSnapshot) of this CSI name makes."""
    return (SNAPSHOT_IMAGE_PREFIX if snapshot else IMAGE_PREFIX) + str(uuid.uuid5(NAMESPACE, name))


def is_csi_image(name: str) -> bool:
    """Whether an image name is one csi-luks makes (volumes and snapshots)."""
    return name.startswith((IMAGE_PREFIX, SNAPSHOT_IMAGE_PREFIX))


def header_object(ref: ImageRef) -> str:
    """The RADOS object that keeps the LUKS header backup of the image (beside it, in its pool)."""
    return f"csi-luks-header.{ref.image}"

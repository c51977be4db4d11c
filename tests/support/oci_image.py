"""Container images built locally from Debian's busybox-static, for a cluster that reaches no registry.

`busybox_archive` writes an OCI image layout archive (layer tar + config + manifest + index.json with
the ref-name annotation) holding two images over the same one-layer root file system: the pods' image
(a shell and the usual tools) and the sandbox ("pause") image, whose process just sleeps. containerd
imports it with `ctr -n k8s.io images import`; pods use `imagePullPolicy: Never`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static: no shared libraries needed in the image
APPLETS = ("sh", "sleep", "cat", "echo", "df", "ls", "mkdir", "sync", "test", "true", "tail", "mv", "rm")


@dataclass(frozen=True)
class LocalImages:
    archive: Path
    pod_image: str  # what pods name in `image:`
    pause_image: str  # containerd's CRI sandbox_image


def _blob(layout: tarfile.TarFile, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    info = tarfile.TarInfo(f"blobs/sha256/{digest}")
    info.size = len(data)
    layout.addfile(info, io.BytesIO(data))
    return f"sha256:{digest}", len(data)


def _rootfs_layer(busybox: Path) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as layer:
        for name in ("bin", "tmp", "proc", "sys", "dev", "etc"):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if name == "tmp" else 0o755
            layer.addfile(info)
        data = busybox.read_bytes()
        info = tarfile.TarInfo("bin/busybox")
        info.size, info.mode = len(data), 0o755
        layer.addfile(info, io.BytesIO(data))
        for applet in APPLETS:
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            layer.addfile(link)
    return raw.getvalue()


def busybox_archive(path: Path, busybox: Path = BUSYBOX) -> LocalImages:
    """Write the archive; the refs are fully qualified so that kubelet and containerd agree on them."""
    pod_image, pause_image = "localhost/csi-luks-e2e/busybox:1", "localhost/csi-luks-e2e/pause:1"
    layer_tar = _rootfs_layer(busybox)
    diff_id = f"sha256:{hashlib.sha256(layer_tar).hexdigest()}"
    layer_gz = gzip.compress(layer_tar, mtime=0)
    with tarfile.open(path, mode="w") as layout:
        layer_digest, layer_size = _blob(layout, layer_gz)
        manifests = []
        for ref, cmd in ((pod_image, ["/bin/sh"]), (pause_image, ["/bin/sleep", "2147483647"])):
            config = {
                "architecture": "amd64",
                "os": "linux",
                "config": {"Cmd": cmd, "Env": ["PATH=/bin"], "WorkingDir": "/"},
                "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            }
            config_digest, config_size = _blob(layout, json.dumps(config).encode())
            manifest = {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": config_digest,
                    "size": config_size,
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": layer_digest,
                        "size": layer_size,
                    }
                ],
            }
            digest, size = _blob(layout, json.dumps(manifest).encode())
            manifests.append(
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": digest,
                    "size": size,
                    "annotations": {
                        "org.opencontainers.image.ref.name": ref,
                        "io.containerd.image.name": ref,
                    },
                }
            )
        for name, content in (
            ("oci-layout", {"imageLayoutVersion": "1.0.0"}),
            ("index.json", {"schemaVersion": 2, "manifests": manifests}),
        ):
            data = json.dumps(content).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            layout.addfile(info, io.BytesIO(data))
    return LocalImages(path, pod_image, pause_image)

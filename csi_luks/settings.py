"""The plugin's own settings (flags and environment), validated once at start-up."""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from enum import Enum

from csi_luks.kms.kdf import DEFAULT_MAX_KDFS
from csi_luks.volumes.ceph_clusters import is_plain

DEFAULT_DRIVER_NAME = "luks.csi-luks.io"
DEFAULT_STATE_DIR = "/var/lib/csi-luks"
DEFAULT_KMS_CONFIG = "/etc/csi-luks/kms-config.json"
DEFAULT_CEPH_CONFIG = "/etc/ceph-csi-config/config.json"  # where ceph-csi mounts its cluster list

# CSI spec: at most 63 characters, alphanumeric at both ends, dashes, dots and alphanumerics between.
_DRIVER_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,61}[A-Za-z0-9])?$")


class Backend(Enum):
    STANDALONE = "standalone"  # sparse files attached as loop devices (one machine, the demo)
    RBD = "rbd"  # Ceph RBD images mapped with krbd


class Mode(Enum):
    CONTROLLER = "controller"
    NODE = "node"
    ALL = "all"  # controller and node in one process (standalone machine, demo)

    @property
    def runs_controller(self) -> bool:
        return self in (Mode.CONTROLLER, Mode.ALL)

    @property
    def runs_node(self) -> bool:
        return self in (Mode.NODE, Mode.ALL)


def socket_path(endpoint: str) -> str:
    """The filesystem path of a CSI endpoint: unix:///abs/path, unix:/abs/path or a bare path."""
    if endpoint.startswith("unix://"):
        path = endpoint[len("unix://") :]
    elif endpoint.startswith("unix:"):
        path = endpoint[len("unix:") :]
    elif "://" in endpoint:
        raise ValueError(f"endpoint {endpoint!r}: only unix sockets are supported (unix:///path/csi.sock)")
    else:
        path = endpoint
    if not path:
        raise ValueError(f"endpoint {endpoint!r} names no socket path")
    return path


@dataclass(frozen=True)
class Settings:
    endpoint: str
    driver_name: str = DEFAULT_DRIVER_NAME
    node_id: str = ""
    mode: Mode = Mode.ALL
    socket_group: str | None = None  # group allowed on the socket (mode 0660); None: 0600, owner only
    grace_period: float = 30.0  # seconds in-flight calls get to finish on SIGTERM
    workers: int = 16
    max_copies: int = 4  # snapshots/clones/restores copying at once; more get RESOURCE_EXHAUSTED (retried)
    max_kdfs: int = DEFAULT_MAX_KDFS  # memory-hard key derivations at once (kms/kdf.py); more wait
    backend: Backend = Backend.STANDALONE
    state_dir: str = DEFAULT_STATE_DIR  # standalone: volumes and metadata; rbd: the node's attachment records
    ceph_config: str = DEFAULT_CEPH_CONFIG  # rbd: the Ceph clusters, ceph-csi's config.json format
    # rbd controller: a cephx user (a mounted Secret's directory, or a JSON file, with userID and userKey) to
    # find, at start-up, the background flattens a stopped plugin left owed; None: each resumes when read
    ceph_secrets: str | None = None
    # rbd: the --instanceid of the Ceph-CSI deployment whose volumes are served in place (volumes/ceph_csi.py)
    ceph_csi_instance_id: str = "default"
    kms_config: str = DEFAULT_KMS_CONFIG  # JSON object keyed by KMS id
    kms_config_map: str | None = None  # "namespace/name": read through the API while kms_config is absent
    metrics_address: str | None = None  # "host:port" of the Prometheus endpoint; None: no metrics

    def __post_init__(self) -> None:
        if not _DRIVER_NAME.match(self.driver_name):
            raise ValueError(
                f"driver name {self.driver_name!r} is not valid: at most 63 characters, alphanumeric at "
                "both ends, with dashes, dots and alphanumerics between (e.g. luks.csi.example.com)"
            )
        socket_path(self.endpoint)
        if not is_plain(self.ceph_csi_instance_id):
            raise ValueError(f"Ceph-CSI instance id {self.ceph_csi_instance_id!r}: expected a plain name")
        if not self.node_id:
            object.__setattr__(self, "node_id", socket.gethostname())
        if self.grace_period < 0:
            raise ValueError("grace period must not be negative")
        if self.workers < 1:
            raise ValueError("workers must be at least 1")
        if not 1 <= self.max_copies < self.workers:
            raise ValueError(f"max copies must be at least 1 and fewer than the {self.workers} workers")
        if self.max_kdfs < 1:
            raise ValueError("max concurrent key derivations must be at least 1")
        if self.kms_config_map is not None:
            self.kms_config_map_ref  # noqa: B018 - validates the form
        if self.metrics_address is not None:
            self.metrics_endpoint  # noqa: B018 - validates the form

    @property
    def kms_config_map_ref(self) -> tuple[str, str] | None:
        """(namespace, name) of the KMS configuration ConfigMap, if one is configured."""
        if not self.kms_config_map:
            return None
        namespace, _, name = self.kms_config_map.partition("/")
        if not namespace or not name or "/" in name:
            raise ValueError(f"KMS ConfigMap {self.kms_config_map!r} must be given as NAMESPACE/NAME")
        return namespace, name

    @property
    def metrics_endpoint(self) -> tuple[str, int]:
        """(host, port) of the metrics endpoint: HOST:PORT, [IPv6]:PORT, or :PORT for every interface."""
        address = self.metrics_address or ""
        if address.startswith("["):
            host, separator, port = address[1:].partition("]:")
        else:
            host, separator, port = address.rpartition(":")
            separator = "" if ":" in host else separator  # an IPv6 address goes in brackets
        if not separator or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f"metrics address {address!r} must be HOST:PORT (e.g. 127.0.0.1:9808, [::1]:9808, :9808)"
            )
        return host or "0.0.0.0", int(port)  # noqa: S104 - ":PORT" asks for every interface

    @property
    def socket_path(self) -> str:
        return socket_path(self.endpoint)

"""librados connections to the Ceph clusters, cached per (cluster, monitors, user, key digest).

The controller's RBD calls go through Ceph's own bindings (Debian's python3-rados and python3-rbd) over
one connection per cluster and user, as Ceph-CSI does with go-ceph (internal/util/conn_pool.go): no
process, no monitor handshake and no cephx authentication per call. librados is thread-safe, so
concurrent requests share a connection (each opens its own I/O context, a local object).

- The key is the cache entry's and is handed to librados in memory (`conf_set("key")`): it is never in a
  file, an argv or a log. The entry is found by the key's SHA-256, so a changed key gets a connection of
  its own (and the old one is closed once idle), and the key itself is kept nowhere else.
- A connection idle for IDLE_CLOSE seconds is closed (a daemon thread looks every IDLE_CLOSE / 4).
- A connection that broke (the cluster shut it, timed out or refused a call) is dropped: the next call
  connects afresh.
- Connecting is bounded by client_mount_timeout, and every monitor and OSD call by rados_mon_op_timeout
  and rados_osd_op_timeout: a cluster that does not answer is UNAVAILABLE, never a hung call.
- No ceph.conf is read (a node's /etc/ceph plays no part), no admin socket is made, nothing is logged to
  stderr by librados.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import rados
import rbd

from csi_luks.volumes.base import (
    BackendPermissionDenied,
    BackendRequestError,
    BackendUnavailable,
    VolumeBackendError,
)
from csi_luks.volumes.ceph_clusters import USER_KEY, CephCluster, Credentials

log = logging.getLogger(__name__)

IDLE_CLOSE = 300.0  # seconds without a call after which a connection is closed
CONNECT_TIMEOUT = 15.0
OP_TIMEOUT = 60.0  # one monitor or OSD request (not a whole flatten: each of its object copies)


@dataclass(frozen=True)
class _Key:
    cluster_id: str
    monitors: tuple[str, ...]
    user: str
    key_digest: str


@dataclass
class _Entry:
    cluster: rados.Rados
    last_used: float
    users: int = 0
    broken: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


# The errors after which a connection is not trusted again.
_BREAKING = (
    rados.ConnectionShutdown,
    rados.TimedOut,
    rados.PermissionDeniedError,
    rbd.ConnectionShutdown,
    rbd.Timeout,
)


class Connections:
    """The cache; one per plugin process (RbdBackend.for_request hands it on)."""

    def __init__(
        self,
        connect_timeout: float = CONNECT_TIMEOUT,
        op_timeout: float = OP_TIMEOUT,
        idle_close: float = IDLE_CLOSE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.op_timeout = op_timeout
        self.idle_close = idle_close
        self.clock = clock
        self._entries: dict[_Key, _Entry] = {}
        self._lock = threading.Lock()
        self._sweeper: threading.Thread | None = None
        self._stop = threading.Event()
        self.connects = 0  # connections made so far (tests and the bench read it)

    @contextlib.contextmanager
    def session(self, cluster: CephCluster, credentials: Credentials) -> Iterator[rados.Rados]:
        """A connected cluster handle as the user; shared, so never shut down by the caller."""
        key = _Key(
            cluster.cluster_id,
            cluster.monitors,
            credentials.user,
            hashlib.sha256(credentials.key.encode()).hexdigest(),
        )
        entry = self._acquire(key, cluster, credentials)
        try:
            yield entry.cluster
        except Exception as exc:
            # Images turns librados' errors into backend errors, keeping a breaking one as the cause.
            if isinstance(exc, _BREAKING) or isinstance(exc.__cause__, _BREAKING):
                entry.broken = True
            raise
        finally:
            with self._lock:
                entry.users -= 1
                entry.last_used = self.clock()
                if entry.broken and self._entries.get(key) is entry:
                    del self._entries[key]
                dead = entry.broken and entry.users == 0
            if dead:
                _shutdown(entry)

    def _acquire(self, key: _Key, cluster: CephCluster, credentials: Credentials) -> _Entry:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.broken:
                entry = _Entry(_new_handle(cluster, credentials, self.connect_timeout, self.op_timeout), 0.0)
                self._entries[key] = entry
            entry.users += 1
            entry.last_used = self.clock()
        # Connecting waits on the monitors: outside the cache's lock, under the entry's (one connect each).
        with entry.lock:
            if entry.cluster.state != "connected":
                try:
                    entry.cluster.connect()
                    self.connects += 1
                except rados.Error as exc:
                    with self._lock:
                        entry.users -= 1
                        entry.broken = True
                        if self._entries.get(key) is entry:
                            del self._entries[key]
                    _shutdown(entry)
                    raise connect_error(cluster, credentials.user, exc) from None
        self._start_sweeper()
        return entry

    def _start_sweeper(self) -> None:
        with self._lock:
            if self._sweeper is None:
                self._sweeper = threading.Thread(target=self._sweep_loop, name="ceph-idle-close", daemon=True)
                self._sweeper.start()

    def _sweep_loop(self) -> None:
        while not self._stop.wait(self.idle_close / 4):
            self.close_idle()

    def close_idle(self) -> int:
        """Close the connections idle for idle_close seconds; returns how many."""
        now = self.clock()
        with self._lock:
            idle = [
                (k, e)
                for k, e in self._entries.items()
                if e.users == 0 and now - e.last_used >= self.idle_close
            ]
            for k, _ in idle:
                del self._entries[k]
        for _, entry in idle:
            _shutdown(entry)
        if idle:
            log.debug("closed %d idle Ceph connections", len(idle))
        return len(idle)

    def open_count(self) -> int:
        with self._lock:
            return len(self._entries)

    def close(self) -> None:
        """Close every connection (plugin shutdown)."""
        self._stop.set()
        with self._lock:
            entries, self._entries = list(self._entries.values()), {}
        for entry in entries:
            _shutdown(entry)


def _new_handle(
    cluster: CephCluster, credentials: Credentials, connect_timeout: float, op_timeout: float
) -> rados.Rados:
    handle = rados.Rados(rados_id=credentials.user, conffile=None)  # None: no ceph.conf is read
    conf = {
        "mon_host": ",".join(cluster.monitors),
        "client_mount_timeout": f"{connect_timeout:g}",
        "rados_mon_op_timeout": f"{op_timeout:g}",
        "rados_osd_op_timeout": f"{op_timeout:g}",
        "admin_socket": "",
        "log_to_stderr": "false",
        "err_to_stderr": "false",
        "log_file": "",
        # Clone v2: a clone's parent snapshot may be removed (it waits in the snapshot trash) and no
        # protect step is needed; Ceph-CSI asks for it the same way.
        "rbd_default_clone_format": "2",
    }
    for name, value in conf.items():
        handle.conf_set(name, value)
    # librados prints a key it cannot decode to stderr: such a key never reaches it.
    if not is_cephx_key(credentials.key):
        raise BackendRequestError(f"the request's {USER_KEY} is not a valid cephx key")
    handle.conf_set("key", credentials.key)
    return handle


def is_cephx_key(key: str) -> bool:
    """Whether key has the form of a cephx secret: base64 of a type (u16), a creation time (8 bytes), a
    length (u16) and that many bytes of secret."""
    try:
        raw = base64.b64decode(key, validate=True)
    except (ValueError, binascii.Error):
        return False
    return len(raw) > 12 and int.from_bytes(raw[10:12], "little") == len(raw) - 12


def _shutdown(entry: _Entry) -> None:
    with contextlib.suppress(Exception):
        entry.cluster.shutdown()


def connect_error(cluster: CephCluster, user: str, exc: rados.Error) -> VolumeBackendError:
    """The backend error of a failed connect, for an operator to act on."""
    where = f"Ceph cluster {cluster.cluster_id} ({', '.join(cluster.monitors)}) as client.{user}"
    if isinstance(exc, rados.PermissionDeniedError):
        return BackendPermissionDenied(
            f"{where}: authentication refused: check the cephx key ({USER_KEY}) of the request's secrets "
            "and that the user exists"
        )
    if isinstance(exc, rados.InvalidArgumentError):
        return BackendRequestError(f"{where}: the request's {USER_KEY} is not a valid cephx key")
    if isinstance(exc, rados.TimedOut | rados.ConnectionShutdown):
        return BackendUnavailable(f"{where}: the monitors did not answer: {exc}")
    return BackendUnavailable(f"{where}: cannot connect: {exc}")

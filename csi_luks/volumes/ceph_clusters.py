"""The Ceph clusters the RBD backend can reach, and the cephx credentials of one request.

The cluster configuration is ceph-csi's config.json, a JSON list read afresh on every use (so a changed
ConfigMap applies without a restart):

    [{"clusterID": "ceph-1", "monitors": ["10.0.0.1:6789", "10.0.0.2:6789"],
      "rbd": {"radosNamespace": "optional"}}]

Credentials arrive in each request's secrets (`userID`, `userKey`). The key is written to a 0600 key file
in a private 0700 directory (on /dev/shm where there is one: RAM, not disk) for the length of one command
batch and never appears in argv. The directory's name carries the owner's PID namespace and PID, so a
plugin that starts after a SIGKILL removes what its dead predecessor left (sweep_stale_key_dirs).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from csi_luks.volumes.base import BackendRequestError

log = logging.getLogger(__name__)

USER_ID, USER_KEY = "userID", "userKey"
CONNECT_TIMEOUT = 15.0  # seconds
# Cluster ids, pools and RADOS namespaces go into volume ids and image specs: keep them plain.
_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_MONITOR = re.compile(r"[A-Za-z0-9.:\[\]_-]+")


def is_plain(value: str) -> bool:
    return _PLAIN.fullmatch(value) is not None


def check_plain(what: str, value: str) -> str:
    if not is_plain(value):
        raise BackendRequestError(
            f"{what} {value!r} is not supported: use letters, digits, '.', '_' and '-' (at most 63)"
        )
    return value


@dataclass(frozen=True)
class CephCluster:
    cluster_id: str
    monitors: tuple[str, ...]
    rados_namespace: str = ""


class CephClusters:
    """ceph-csi's cluster configuration file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def get(self, cluster_id: str) -> CephCluster:
        clusters = self._load()
        if cluster_id not in clusters:
            known = ", ".join(sorted(clusters)) or "none"
            raise BackendRequestError(
                f"clusterID {cluster_id!r} is not in the Ceph cluster configuration {self.path} "
                f"(known: {known})"
            )
        return clusters[cluster_id]

    def all(self) -> list[CephCluster]:
        """Every configured cluster."""
        return list(self._load().values())

    def _load(self) -> dict[str, CephCluster]:
        try:
            raw: Any = json.loads(self.path.read_text())
        except FileNotFoundError:
            raise BackendRequestError(f"the Ceph cluster configuration {self.path} does not exist") from None
        except (OSError, ValueError) as exc:
            raise BackendRequestError(
                f"the Ceph cluster configuration {self.path} is unreadable: {exc}"
            ) from None
        if not isinstance(raw, list):
            raise BackendRequestError(f"{self.path}: expected a JSON list of clusters")
        clusters = {}
        for index, entry in enumerate(raw):
            where = f"{self.path}, entry {index}"
            if not isinstance(entry, dict):
                raise BackendRequestError(f"{where}: expected a JSON object")
            cluster_id = entry.get("clusterID")
            monitors = entry.get("monitors")
            if not isinstance(cluster_id, str):
                raise BackendRequestError(f"{where}: 'clusterID' must be a string")
            check_plain("clusterID", cluster_id)
            if (
                not isinstance(monitors, list)
                or not monitors
                or not all(isinstance(m, str) and _MONITOR.fullmatch(m) for m in monitors)
            ):
                raise BackendRequestError(f"{where} ({cluster_id}): 'monitors' must be a list of host:port")
            rbd = entry.get("rbd") or {}
            namespace = rbd.get("radosNamespace", "") if isinstance(rbd, dict) else ""
            if namespace:
                check_plain("radosNamespace", namespace)
            clusters[cluster_id] = CephCluster(cluster_id, tuple(monitors), namespace)
        return clusters


@dataclass(frozen=True)
class Credentials:
    """A cephx user and key from a request's secrets; the key is never shown."""

    user: str
    key: str

    def __repr__(self) -> str:
        return f"Credentials(user={self.user!r}, key=<redacted>)"

    @classmethod
    def from_secrets(cls, secrets: Mapping[str, str]) -> Credentials | None:
        user, key = secrets.get(USER_ID, ""), secrets.get(USER_KEY, "")
        if not user and not key:
            return None
        if not user or not key:
            missing = USER_ID if not user else USER_KEY
            raise BackendRequestError(f"the request's secrets have {USER_ID} or {USER_KEY} but not {missing}")
        if not re.fullmatch(r"[A-Za-z0-9._-]+", user):
            raise BackendRequestError(f"{USER_ID} {user!r} is not a valid cephx user name")
        return cls(user.removeprefix("client."), key)


def read_secrets(path: str | os.PathLike[str]) -> dict[str, str]:
    """The cephx user of a mounted Secret (a directory with the files userID and userKey), or of a JSON
    object of the secrets a request would carry."""
    where = Path(path)
    try:
        if where.is_dir():
            return {name: (where / name).read_text().strip() for name in (USER_ID, USER_KEY)}
        raw: Any = json.loads(where.read_text())
    except (OSError, ValueError) as exc:
        raise BackendRequestError(f"the cephx credentials {where} are unreadable: {exc}") from None
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise BackendRequestError(f"{where}: must hold a JSON object of strings")
    return raw


def _key_dir_parent() -> str | None:
    """The shared-memory tmpfs if usable, else the default temporary directory."""
    shm = "/dev/shm"  # noqa: S108 - a private 0700 directory is made inside it
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) else None


_KEY_DIR_PREFIX = "csi-luks-ceph-"
# csi-luks-ceph-<pid namespace inode>-<pid>-<random>; older releases wrote csi-luks-ceph-<random>.
_KEY_DIR = re.compile(re.escape(_KEY_DIR_PREFIX) + r"(?:(\d+)-(\d+)-)?[A-Za-z0-9_]+")
# A key directory of an older release names no owner; one this old belongs to no command still running.
LEGACY_KEY_DIR_AGE = 24 * 3600.0


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid").removeprefix("pid:[").removesuffix("]")
    except OSError:
        return "0"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # somebody else's process: alive
    return True


def _stale(name: str, path: str, namespace: str) -> bool:
    match = _KEY_DIR.fullmatch(name)
    if match is None:
        return False
    owner_namespace, pid = match.groups()
    if owner_namespace is None:
        try:
            return time.time() - os.lstat(path).st_mtime > LEGACY_KEY_DIR_AGE
        except OSError:
            return False
    # Another PID namespace (a sibling container sharing /dev/shm) cannot be checked: never ours to remove.
    return owner_namespace == namespace and int(pid) != os.getpid() and not _alive(int(pid))


def sweep_stale_key_dirs() -> list[str]:
    """Remove the cephx key directories of plugin processes that died without cleaning up (a SIGKILL
    between writing a key file and removing it). Returns what was removed."""
    namespace = _pid_namespace()
    removed = []
    for parent in {_key_dir_parent() or tempfile.gettempdir(), tempfile.gettempdir()}:
        try:
            entries = list(os.scandir(parent))
        except OSError:
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False) and _stale(entry.name, entry.path, namespace):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(entry.path)
    if removed:
        log.warning("removed %d cephx key directories left by a plugin that was killed: %s",
                    len(removed), ", ".join(sorted(removed)))  # fmt: skip
    return removed


@contextlib.contextmanager
def client_config(
    cluster: CephCluster, credentials: Credentials, connect_timeout: float = CONNECT_TIMEOUT
) -> Iterator[list[str]]:
    """Arguments that make a ceph CLI talk to the cluster as the user; their files exist until exit.

    A ceph.conf of our own (only the monitors) keeps a node's /etc/ceph out of it; the key file is 0600
    inside a 0700 directory, and both are removed afterwards.
    """
    # 0700; in RAM where the machine has it, so the key is never written to a disk.
    owner = f"{_KEY_DIR_PREFIX}{_pid_namespace()}-{os.getpid()}-"
    directory = tempfile.mkdtemp(prefix=owner, dir=_key_dir_parent())
    try:
        conf, keyfile = os.path.join(directory, "ceph.conf"), os.path.join(directory, "key")
        with open(conf, "x") as f:
            # A bounded connect: an unreachable cluster fails the call (UNAVAILABLE) instead of hanging
            # it. No op timeouts: a slow OSD must not fail a day-long copy, nor give an rbd-nbd device EIO.
            monitors = ",".join(cluster.monitors)
            f.write(f"[global]\nmon host = {monitors}\nclient mount timeout = {connect_timeout:g}\n")
        fd = os.open(keyfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(credentials.key)
        yield ["--conf", conf, "--id", credentials.user, "--keyfile", keyfile]
    finally:
        shutil.rmtree(directory, ignore_errors=True)

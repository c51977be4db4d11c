"""A real single-node Ceph cluster (a mon, a memstore OSD, a mgr on demand) on 127.0.0.1, for the RBD tests.

Everything lives under one root directory: ceph.conf, keyrings, mon and OSD data, sockets, pid files
and logs. The daemons run in the foreground as our children (no systemd). cephx is on; every key is
generated with ceph-authtool and handed to the CLIs through keyrings or keyfiles, never through argv.

A stopped cluster can be copied elsewhere (`relocate`) and started there: the VM tier builds one on
the host, where the `ceph` CLI is fast, and starts the copy inside the guest. Memstore keeps its data
across a stop only because `osd fast shutdown = false` makes the OSD write it out on SIGTERM.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.audit import AUDIT

HOST = "127.0.0.1"
POOL = "rbd"
# The rbd user the plugin would get: the usual profile, restricted to the default pool.
CSI_USER = "client.csi"
CSI_CAPS = {"mon": "profile rbd", "osd": f"profile rbd pool={POOL}"}
_STATE = "cluster.json"
_ADMIN_CAPS = {"mon": "allow *", "osd": "allow *", "mds": "allow *", "mgr": "allow *"}


class CephError(RuntimeError):
    """A Ceph command failed or the cluster did not become ready; the text carries its stderr or log."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _keyring_key(keyring: Path) -> str:
    for line in keyring.read_text().splitlines():
        name, _, value = line.partition("=")
        if name.strip() == "key":
            return value.strip()
    raise CephError(f"no key in {keyring}")


def _new_keyring(path: Path, name: str, caps: Mapping[str, str]) -> str:
    """A keyring with one fresh key (ceph-authtool makes it: the key is never in an argv)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    argv = ["ceph-authtool", "--create-keyring", str(path), "--gen-key", "-n", name]
    for service, cap in caps.items():
        argv += ["--cap", service, cap]
    _check(argv)
    path.chmod(0o600)
    key = _keyring_key(path)
    AUDIT.register_ceph_key(key)
    return key


def _check(argv: list[str], env: Mapping[str, str] | None = None, timeout: float = 120) -> str:
    try:
        done = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as exc:
        raise CephError(f"`{' '.join(argv[:4])}` timed out after {timeout:g}s") from exc
    if done.returncode != 0:
        raise CephError(f"`{' '.join(argv[:4])}` exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    return done.stdout


@dataclass(frozen=True)
class CephUser:
    """A cephx client: its key, and a 0600 keyfile holding just that key for `--keyfile`."""

    name: str  # "client.csi"
    key: str
    keyfile: Path

    @property
    def id(self) -> str:
        return self.name.removeprefix("client.")

    def args(self) -> list[str]:
        """CLI options that authenticate as this user (`rbd map ... --id csi --keyfile F`)."""
        return ["--id", self.id, "--keyfile", str(self.keyfile)]


@dataclass
class CephCluster:
    root: Path
    fsid: str
    v1_port: int
    v2_port: int
    pool: str = POOL
    _daemons: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)

    @property
    def conf(self) -> Path:
        return self.root / "ceph.conf"

    @property
    def monitors(self) -> str:
        """The monitor address a client needs (v1, which the kernel client speaks by default)."""
        return f"{HOST}:{self.v1_port}"

    @property
    def mon_host(self) -> str:
        """Both monitor addresses, as `mon host` in a client ceph.conf."""
        return f"[v2:{HOST}:{self.v2_port},v1:{HOST}:{self.v1_port}]"

    @property
    def admin_keyring(self) -> Path:
        return self.root / "client.admin.keyring"

    @property
    def admin_key(self) -> str:
        return _keyring_key(self.admin_keyring)

    @property
    def csi(self) -> CephUser:
        """client.csi (rbd profile on the default pool), created with the cluster."""
        return self.user(CSI_USER)

    def user(self, name: str) -> CephUser:
        keyfile = self.root / "keys" / f"{name}.key"
        return CephUser(name, keyfile.read_text().strip(), keyfile)

    @property
    def running(self) -> bool:
        return any(p.poll() is None for p in self._daemons.values())

    def env(self) -> dict[str, str]:
        """The environment for ceph/rbd/rados as client.admin (its keyring is named in ceph.conf)."""
        return {**os.environ, "CEPH_CONF": str(self.conf)}

    def run(self, *argv: str, timeout: float = 120) -> str:
        """Run a Ceph CLI (ceph, rbd, rados, ...) as client.admin; its stdout, or CephError."""
        return _check(list(argv), self.env(), timeout)

    def create_user(self, name: str, caps: Mapping[str, str]) -> CephUser:
        """A new cephx client with these caps, e.g. {"mon": "profile rbd", "osd": "profile rbd pool=p"}."""
        keyring = self.root / "keys" / f"{name}.keyring"
        key = _new_keyring(keyring, name, caps)
        self.run("ceph", "auth", "import", "-i", str(keyring))
        _write_private(self.root / "keys" / f"{name}.key", key + "\n")
        return self.user(name)

    def create_pool(self, name: str, pg_num: int = 8) -> None:
        """A replicated pool of size 1, initialised for rbd, with every PG active."""
        self.run("ceph", "osd", "pool", "create", name, str(pg_num), str(pg_num))
        self.run("rbd", "pool", "init", name)
        self._wait_pool(name, time.monotonic() + 120)
        state = json.loads((self.root / _STATE).read_text())
        state["pools"].append(name)
        (self.root / _STATE).write_text(json.dumps(state))

    # Daemons -------------------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str]) -> None:
        out = (self.root / "log" / f"{name}.out").open("ab")
        with out:
            self._daemons[name] = subprocess.Popen(
                [*argv, "-f", "-c", str(self.conf)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in pytest must not reach the daemons before stop()
            )

    def _start_mon(self, timeout: float = 60) -> None:
        self._spawn("mon.a", ["ceph-mon", "-i", "a"])
        # A client that finds the port closed backs off for seconds: wait until the mon listens.
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection((HOST, self.v1_port), timeout=1).close()
                return
            except OSError:
                if self._daemons["mon.a"].poll() is not None or time.monotonic() > deadline:
                    raise CephError(f"mon.a is not listening; log tail:\n{self._log_tail('mon.a')}") from None
                time.sleep(0.05)

    def _start_osd(self) -> None:
        self._spawn("osd.0", ["ceph-osd", "-i", "0"])

    def start_mgr(self, timeout: float = 120) -> None:
        """A mgr (mgr.x), if none runs yet, once its rbd_support module answers `rbd task list`.

        The cluster has none by default: csi-luks needs none. Ceph-CSI's driver does (support/cephcsi.py): its
        DeleteVolume moves the image to the trash and has the mgr remove it from there (`rbd task add trash
        remove`), and without a mgr that command waits forever. It runs until the cluster stops."""
        proc = self._daemons.get("mgr.x")
        if proc is not None and proc.poll() is None:
            return
        keyring = self.root / "mgr" / "keyring"
        if not keyring.exists():
            _new_keyring(keyring, "mgr.x", {"mon": "allow profile mgr", "osd": "allow *", "mds": "allow *"})
            self.run("ceph", "auth", "import", "-i", str(keyring))
            # Else its devicehealth module creates a pool (device_health_metrics) that other tests would see.
            self.run("ceph", "config", "set", "mgr", "mgr/devicehealth/enable_monitoring", "false", "--force")
        self._spawn("mgr.x", ["ceph-mgr", "-i", "x"])
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            if self._daemons["mgr.x"].poll() is not None:
                raise CephError(f"mgr.x exited; log tail:\n{self._log_tail('mgr.x')}")
            try:
                self.run("ceph", "rbd", "task", "list", "--connect-timeout=10", timeout=30)
                return
            except CephError as exc:
                last = str(exc)
            if time.monotonic() > deadline:
                raise CephError(f"mgr.x's rbd_support did not answer: {last}\n{self._log_tail('mgr.x')}")
            time.sleep(0.5)

    def start(self, timeout: float = 180) -> None:
        """Start the daemons from this (built) root; wait until every PG of every pool is active."""
        if self.running:
            raise CephError("the cluster is already running")
        (self.root / "run").mkdir(exist_ok=True)
        self._start_mon()
        self._start_osd()
        deadline = time.monotonic() + timeout
        for pool in json.loads((self.root / _STATE).read_text())["pools"]:
            self._wait_pool(pool, deadline)
        if (self.root / "mgr" / "keyring").exists():  # it had a mgr (start_mgr): so it has again
            self.start_mgr(max(deadline - time.monotonic(), 30))

    def _wait_pool(self, pool: str, deadline: float) -> None:
        # Without a mgr no PG states are reported, so ask the OSD: listing a pool touches every PG,
        # which succeeds only once all of them are active.
        last = ""
        while True:
            for name, proc in self._daemons.items():
                if proc.poll() is not None:
                    raise CephError(f"{name} exited {proc.returncode}; log tail:\n{self._log_tail(name)}")
            try:
                listed = self.run(
                    "rados", "-p", pool, "ls", "--client_mount_timeout=10", "--rados_osd_op_timeout=10",
                    timeout=30,
                )  # fmt: skip
                if "rbd_info" in listed.split():  # written by `rbd pool init`
                    return
                last = f"pool {pool} has no rbd_info object"
            except CephError as exc:
                last = str(exc)
            if time.monotonic() > deadline:
                raise CephError(f"pool {pool} not ready: {last}\nosd.0 log tail:\n{self._log_tail('osd.0')}")
            time.sleep(0.2)

    def _log_tail(self, name: str) -> str:
        texts = []
        for log in (self.root / "log" / f"{name}.log", self.root / "log" / f"{name}.out"):
            if log.exists():
                texts.append(log.read_text(errors="replace")[-3000:])
        return "\n".join(texts)

    def stop(self, timeout: float = 60) -> None:
        """Clean shutdown: the OSD first (it writes memstore's data out), then the mon."""
        for name in ("mgr.x", "osd.0", "mon.a"):
            proc = self._daemons.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise CephError(
                    f"{name} did not stop within {timeout:g}s: killed, data may be lost"
                ) from None

    def kill(self) -> None:
        for proc in self._daemons.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        self._daemons.clear()

    def shutdown(self) -> None:
        """stop(), and whatever did not stop is killed all the same (for fixture teardown)."""
        try:
            self.stop()
        finally:
            self.kill()

    def relocate(self, root: Path) -> CephCluster:
        """Copy this stopped cluster to `root`, with ceph.conf's paths rewritten; the copy is not started."""
        if self.running:
            raise CephError("stop the cluster before copying it")
        shutil.copytree(self.root, root, symlinks=True, ignore=shutil.ignore_patterns("*.asok", "*.pid"))
        conf = root / "ceph.conf"
        conf.write_text(conf.read_text().replace(str(self.root), str(root)))
        return load_cluster(root)


def load_cluster(root: Path) -> CephCluster:
    """The cluster built earlier under `root` (not started); its keys are registered with the argv audit."""
    state = json.loads((root / _STATE).read_text())
    cluster = CephCluster(root, state["fsid"], state["v1_port"], state["v2_port"])
    for keyring in [*root.glob("*.keyring"), *root.glob("keys/*.keyring"), root / "osd" / "keyring"]:
        AUDIT.register_ceph_key(_keyring_key(keyring))
    return cluster


def _conf(root: Path, fsid: str, v1_port: int, v2_port: int) -> str:
    return f"""\
[global]
fsid = {fsid}
mon host = [v2:{HOST}:{v2_port},v1:{HOST}:{v1_port}]
public addr = {HOST}
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
run dir = {root}/run
# One OSD, so one copy of everything; the warnings about it are noise here.
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon warn on pool no redundancy = false
# A nearly full disk must not stop the mon mid-test (it shuts down below 5 % free by default).
mon data avail crit = 0
mon data avail warn = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
# No mgr: nothing would ever clear these health warnings.
mon warn on insecure global id reclaim allowed = false
# The guest is slow (TCG): no failure detection between mon and OSD when the CPU is starved.
mon osd report timeout = 3600
osd heartbeat grace = 600

[mon]
# Each map change waits this long to batch proposals (1 s by default): a pool init takes several.
paxos propose interval = 0.1
mon data = {root}/mon
keyring = {root}/mon/keyring
admin socket = {root}/run/$name.asok
pid file = {root}/run/$name.pid
log file = {root}/log/$name.log
mon cluster log file = {root}/log/cluster.log

[osd]
osd data = {root}/osd
keyring = {root}/osd/keyring
admin socket = {root}/run/$name.asok
pid file = {root}/run/$name.pid
log file = {root}/log/$name.log
osd objectstore = memstore
# Images are sparse: a small store is plenty, and CI has little memory to spare.
memstore device bytes = 2147483648
osd memory target = 939524096
osd op num shards = 1
osd op num threads per shard = 2
# Write memstore's data out on SIGTERM, so stop() + start() (and the copy into the guest) keep it.
osd fast shutdown = false
# Pinned so the OSD stays in the same CRUSH bucket when started on another host (the guest).
crush location = root=default host=csi-luks-ceph
osd crush update on start = true

[mgr]
# Started only for Ceph-CSI's driver (start_mgr).
mgr data = {root}/mgr
keyring = {root}/mgr/keyring
admin socket = {root}/run/$name.asok
pid file = {root}/run/$name.pid
log file = {root}/log/$name.log

[client]
# Retry a monitor quickly rather than after the default 3 s hunt interval.
mon client hunt interval = 0.5
# An op sent while its PG has no OSD yet waits for the objecter's next tick to ask for a newer map.
objecter tick interval = 1

[client.admin]
keyring = {root}/client.admin.keyring
"""


def build_cluster(root: Path) -> CephCluster:
    """Create a new cluster under `root` (an empty or missing directory) and start it, pool `rbd` ready."""
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("mon", "osd", "mgr", "run", "log", "keys"):
        (root / sub).mkdir()
    fsid = str(uuid.uuid4())
    v1_port = _free_port()
    v2_port = _free_port()
    while v2_port == v1_port:
        v2_port = _free_port()
    (root / "ceph.conf").write_text(_conf(root, fsid, v1_port, v2_port))
    state = {"fsid": fsid, "v1_port": v1_port, "v2_port": v2_port, "pools": [POOL]}
    (root / _STATE).write_text(json.dumps(state))
    cluster = CephCluster(root, fsid, v1_port, v2_port)

    # Every initial key goes into the mon keyring, so `ceph-mon --mkfs` seeds the auth database with
    # them and no `ceph auth` round trip is needed.
    mon_keyring = root / "mon.keyring"
    _new_keyring(mon_keyring, "mon.", {"mon": "allow *"})
    _new_keyring(cluster.admin_keyring, "client.admin", _ADMIN_CAPS)
    osd_caps = {"mon": "allow profile osd", "mgr": "allow profile osd", "osd": "allow *"}
    _new_keyring(root / "osd" / "keyring", "osd.0", osd_caps)
    csi_keyring = root / "keys" / f"{CSI_USER}.keyring"
    _write_private(root / "keys" / f"{CSI_USER}.key", _new_keyring(csi_keyring, CSI_USER, CSI_CAPS) + "\n")
    for keyring in (cluster.admin_keyring, root / "osd" / "keyring", csi_keyring):
        _check(["ceph-authtool", str(mon_keyring), "--import-keyring", str(keyring)])

    monmap = root / "monmap"
    _check(["monmaptool", "--create", "--fsid", fsid, "--addv", "a", cluster.mon_host, str(monmap)])
    _check(["ceph-mon", "-c", str(cluster.conf), "--mkfs", "-i", "a", "--monmap", str(monmap),
            "--keyring", str(mon_keyring)])  # fmt: skip
    osd_uuid = str(uuid.uuid4())
    _check(["ceph-osd", "-c", str(cluster.conf), "--mkfs", "-i", "0", "--osd-uuid", osd_uuid,
            "--no-mon-config"])  # fmt: skip

    cluster._start_mon()
    try:
        cluster.run("ceph", "osd", "new", osd_uuid, "0")
        cluster._start_osd()
        cluster.run("ceph", "osd", "pool", "create", POOL, "8", "8")
        cluster.run("rbd", "pool", "init", POOL)
        cluster._wait_pool(POOL, time.monotonic() + 120)
    except BaseException:
        cluster.kill()
        raise
    return cluster


@contextmanager
def ceph_cluster(root: Path) -> Iterator[CephCluster]:
    """A new cluster under `root`, started; stopped afterwards (killed if it does not stop cleanly)."""
    cluster = build_cluster(root)
    try:
        yield cluster
    finally:
        cluster.shutdown()

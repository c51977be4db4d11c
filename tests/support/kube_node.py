"""A one-node Kubernetes cluster that drives csi-luks through kubelet and the CSI sidecars, as processes.

etcd and kube-apiserver come from tests/support/kube.py; this adds kube-controller-manager,
kube-scheduler, containerd (Debian's, with runc) and a kubelet registered as node `NODE_NAME`, all on
127.0.0.1, then the plugin as two processes (`csi-luks serve --mode controller` and `--mode node`, as
controller.yaml and node-plugin.yaml in deploy/kustomize/base run them) with the sidecars of the
kubernetes-csi project as plain processes with --kubeconfig: csi-provisioner (--extra-create-metadata),
csi-attacher, csi-resizer, csi-snapshotter with snapshot-controller and the snapshot CRDs,
csi-node-driver-registrar (which registers the node plugin with kubelet) and livenessprobe.

No registry is reachable: the pod and sandbox images are built from busybox-static (oci_image.py).
Pods use hostNetwork (a loopback CNI configuration makes the node Ready).

Programs: the Kubernetes ones from scripts/build-kube-apiserver.sh, the sidecars from
../shared/tools/build-csi-tools.sh. The guest hides /var/cache (where both cache their builds) under a
tmpfs, so the host copies them into the guest's work directory before it boots (`stage_programs`) and
names it in $CSI_LUKS_E2E_PROGRAMS.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import kubernetes.client as k8s
import kubernetes.utils
import requests
import yaml

from tests.support import csi_tools
from tests.support.deployed_plugin import DEPLOY_BASE, deployed_argv
from tests.support.kube import BINARY_ENV, BUILD_SCRIPT, KubeCluster, free_ports, kube_cluster
from tests.support.oci_image import LocalImages, busybox_archive

NODE_NAME = "csi-luks-e2e-node"
GUEST_NODE_IP = "192.0.2.10"  # TEST-NET-1 (RFC 5737): never routed anywhere
DRIVER = "luks.csi-luks.io"
PROGRAMS_ENV = "CSI_LUKS_E2E_PROGRAMS"  # a directory holding every program below (set for the guest)
UNAVAILABLE_ENV = "CSI_LUKS_E2E_UNAVAILABLE"  # why the host could not provide them
PROGRESS_ENV = "CSI_LUKS_E2E_PROGRESS"  # a file that gets one line per bring-up step and wait
KUBE_PROGRAMS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kubectl")
CSI_TOOLS = (
    "csi-provisioner", "csi-attacher", "csi-resizer", "csi-snapshotter", "snapshot-controller",
    "csi-node-driver-registrar", "livenessprobe",
)  # fmt: skip
CRDS = "snapshot-crds"
HOW_TO_GET_SIDECARS = (
    "the Kubernetes CSI sidecars are missing: this tier needs ../shared/tools/build-csi-tools.sh beside "
    "the checkout, or the programs csi-provisioner, csi-attacher, csi-resizer, csi-snapshotter, "
    "snapshot-controller, csi-node-driver-registrar and livenessprobe (go install "
    "github.com/kubernetes-csi/external-provisioner/cmd/csi-provisioner@v3.4.1 and the like, or copied "
    "out of the registry.k8s.io/sig-storage/* container images) plus the snapshot CRDs in one directory "
    f"named by ${PROGRAMS_ENV}"
)
NODE_READY_TIMEOUT = float(os.environ.get("CSI_LUKS_E2E_NODE_TIMEOUT", "900"))
T = TypeVar("T")


class BringUpError(Exception):
    """The cluster did not come up; the text carries the log tails that say why."""


class ProgramsUnavailable(Exception):
    """The programs this tier runs are not here; the text says how to get them."""


# ---------------------------------------------------------------------------------------------------------
# Programs


def _host_programs() -> dict[str, Path]:
    """Every program by name (and the CRD directory), building what is missing; raise if impossible."""
    if not csi_tools.BUILD_SCRIPT.exists():
        raise ProgramsUnavailable(HOW_TO_GET_SIDECARS)
    try:
        found = {name: Path(path) for name, path in csi_tools.build(list(CSI_TOOLS)).items()}
    except csi_tools.CsiToolsUnavailable as exc:
        raise ProgramsUnavailable(str(exc)) from None
    crds = sorted(found["snapshot-controller"].parent.glob("snapshot-crds-*"))
    if not crds:
        raise ProgramsUnavailable(f"no snapshot CRDs beside {found['snapshot-controller']}")
    found[CRDS] = crds[-1]
    kube = subprocess.run(["bash", str(BUILD_SCRIPT)], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, check=False)  # fmt: skip
    if kube.returncode != 0:
        raise ProgramsUnavailable(f"{BUILD_SCRIPT} failed: {kube.stderr[-3000:]}")
    for name in KUBE_PROGRAMS:
        printed = subprocess.run(["bash", str(BUILD_SCRIPT), "--print-path", name], capture_output=True,
                                 text=True, check=True)  # fmt: skip
        found[name] = Path(printed.stdout.strip())
    missing = [name for name, path in found.items() if not path.exists()]
    if missing:
        raise ProgramsUnavailable(f"not built: {', '.join(missing)}")
    return found


def stage_programs(directory: Path) -> dict[str, str]:
    """On the host, before the guest boots: copy every program into directory; the guest's environment."""
    try:
        programs = _host_programs()
    except ProgramsUnavailable as exc:
        return {UNAVAILABLE_ENV: str(exc)}
    directory.mkdir(parents=True, exist_ok=True)
    for name, path in programs.items():
        if path.is_dir():
            shutil.copytree(path, directory / name, dirs_exist_ok=True)
        else:
            shutil.copy2(path, directory / name)
    return {PROGRAMS_ENV: str(directory), BINARY_ENV: str(directory / "kube-apiserver")}


def programs() -> dict[str, Path]:
    """The programs, in the guest from $CSI_LUKS_E2E_PROGRAMS, on a host from the build scripts."""
    unavailable = os.environ.get(UNAVAILABLE_ENV)
    if unavailable:
        raise ProgramsUnavailable(unavailable)
    staged = os.environ.get(PROGRAMS_ENV)
    if staged:
        return {name: Path(staged) / name for name in (*KUBE_PROGRAMS, *CSI_TOOLS, CRDS)}
    return _host_programs()


# ---------------------------------------------------------------------------------------------------------
# Processes


@dataclass
class Process:
    """One long-running program with its log file; restartable with the same arguments."""

    name: str
    argv: list[str]
    log: Path
    env: Mapping[str, str | None] | None = None  # over os.environ; None removes a variable
    restart: bool = False
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            out.write(f"\n===== {time.strftime('%H:%M:%S')} start: {' '.join(self.argv)}\n".encode())
            out.flush()
            self.popen = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={k: v for k, v in {**os.environ, **(self.env or {})}.items() if v is not None},
                start_new_session=True,
            )  # fmt: skip

    def stop(self, timeout: float = 20) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.popen = None

    def state(self) -> str:
        if self.popen is None:
            return "stopped"
        code = self.popen.poll()
        return "running" if code is None else f"EXITED {code}"

    def tail(self, chars: int = 3000) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else "(no log)"
        return f"--- {self.name} ({self.state()}; last {chars} chars of {self.log}) ---\n{text[-chars:]}"


@dataclass
class Processes:
    logs: Path
    all: dict[str, Process] = field(default_factory=dict)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _watcher: threading.Thread | None = None

    def start(self, name: str, argv: Sequence[str | Path], env: Mapping[str, str | None] | None = None,
              restart: bool = False) -> Process:  # fmt: skip
        """Start a program; with restart, start it again whenever it exits (as kubelet restarts a
        sidecar container: csi-attacher gives the plugin 1 s for its first calls, too little under TCG)."""
        process = Process(name, [str(a) for a in argv], self.logs / f"{name}.log", env, restart=restart)
        self.all[name] = process
        process.start()
        progress(f"started {name}")
        if restart and self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, daemon=True)
            self._watcher.start()
        return process

    def _watch(self) -> None:
        """Start again every restartable program that exited, until stop_all."""
        while not self._stopping.wait(2):
            for process in list(self.all.values()):
                if process.restart and process.state().startswith("EXITED"):
                    progress(f"restarting {process.name} ({process.state()})")
                    process.start()

    def stop_all(self) -> None:
        self._stopping.set()
        for process in reversed(list(self.all.values())):
            process.stop()

    def tails(self, names: Sequence[str] | None = None, chars: int = 3000) -> str:
        chosen = [self.all[n] for n in (names or self.all) if n in self.all]
        return "\n".join(p.tail(chars) for p in chosen)

    def dead(self) -> list[str]:
        return [p.name for p in self.all.values() if p.state().startswith("EXITED")]


def progress(message: str) -> None:
    """One line of progress into $CSI_LUKS_E2E_PROGRESS (in the guest, a host-visible file)."""
    path = os.environ.get(PROGRESS_ENV)
    if path:
        with open(path, "a") as out:
            out.write(f"{time.strftime('%H:%M:%S')} {message}\n")


def wait_for(what: str, check: Callable[[], T | None], timeout: float, diagnostics: Callable[[], str],
             interval: float = 1.0) -> T:  # fmt: skip
    """Poll check() until it returns something other than None/False; else raise with diagnostics."""
    started = time.monotonic()
    deadline = started + timeout
    last: BaseException | None = None
    progress(f"waiting for {what}")
    while True:
        try:
            result = check()
            if result is not None and result is not False:
                progress(f"... {what}: after {time.monotonic() - started:.0f}s")
                return result
        except Exception as exc:
            last = exc
        if time.monotonic() > deadline:
            text = f"{what}: not within {timeout:.0f}s" + (f" (last error: {last!r})" if last else "")
            text += "\n" + diagnostics()
            progress(f"... TIMED OUT: {text}")
            raise AssertionError(text)
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------------------
# Configuration files


def write_kubeconfig(path: Path, cluster: KubeCluster, token: str) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": {"server": cluster.url,
                                                  "certificate-authority": str(cluster.ca_file)}}],
        "users": [{"name": "e2e", "user": {"token": token}}],
        "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "e2e"}}],
        "current-context": "e2e",
    }  # fmt: skip
    path.write_text(json.dumps(config))
    path.chmod(0o600)
    return path


def _containerd_config(root: Path, images: LocalImages, cni_conf: Path) -> str:
    return f"""version = 2
root = "{root / "root"}"
state = "{root / "state"}"
[grpc]
  address = "{root / "containerd.sock"}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{images.pause_image}"
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "{root / "runc"}"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni_conf}"
"""


def node_ip() -> str:
    """The node's address: kubelet refuses a loopback one, and kube-apiserver reaches kubelet through it.

    In the guest (no network device) a TEST-NET-1 address on the loopback interface serves; elsewhere the
    host's first address.
    """
    if os.environ.get("CSI_LUKS_IN_GUEST") == "1":
        shown = subprocess.run(["ip", "-4", "addr", "show", "dev", "lo"], capture_output=True, text=True,
                               check=True).stdout  # fmt: skip
        if f"{GUEST_NODE_IP}/32" not in shown:
            subprocess.run(["ip", "addr", "add", f"{GUEST_NODE_IP}/32", "dev", "lo"], check=True)
        return GUEST_NODE_IP
    addresses = subprocess.run(["hostname", "-I"], capture_output=True, text=True, check=True).stdout.split()
    if not addresses:
        raise BringUpError("this host has no non-loopback address for the node")
    return addresses[0]


def _kubelet_config(ports: Sequence[int], ca_file: Path, address: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": address,
        "port": ports[0],
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": ports[1],
        # kube-apiserver (exec, logs) presents no client certificate: a test node answers anyone local.
        "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False},
                           "x509": {"clientCAFile": str(ca_file)}},
        "authorization": {"mode": "AlwaysAllow"},
        "cgroupDriver": "cgroupfs",
        "failSwapOn": False,
        "resolvConf": "",
        # A test node with little disk: never evict, never collect images (they are not pullable).
        "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%", "nodefs.inodesFree": "1%",
                         "imagefs.available": "1%"},
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "serializeImagePulls": False,
        "runtimeRequestTimeout": "10m",
        "nodeStatusUpdateFrequency": "10s",
        "volumeStatsAggPeriod": "0s",
    }  # fmt: skip


def _enable_cgroup_v2_controllers() -> None:
    """Under a bare cgroup2 mount (the guest), the pods' cgroups need controllers delegated from the root."""
    root = Path("/sys/fs/cgroup")
    controllers = root / "cgroup.controllers"
    if not controllers.exists():
        return  # cgroup v1 (or hybrid): kubelet uses the v1 hierarchies
    wanted = [c for c in controllers.read_text().split() if c in ("cpuset", "cpu", "io", "memory", "pids",
                                                                   "hugetlb")]  # fmt: skip
    (root / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in wanted))


# ---------------------------------------------------------------------------------------------------------
# The node


@dataclass
class KubeNode:
    api: KubeCluster
    workdir: Path
    programs: dict[str, Path]
    processes: Processes
    images: LocalImages
    admin_kubeconfig: Path
    kubelet_root: Path
    containerd_socket: Path
    bring_up_seconds: float = 0.0

    def client(self) -> k8s.ApiClient:
        return self.api.api_client()

    def create(self, manifest: Mapping[str, Any]) -> None:
        """Create an object of a built-in kind (kubectl would cost minutes of discovery under TCG)."""
        with self.client() as api:
            try:
                kubernetes.utils.create_from_dict(api, dict(manifest))
            except kubernetes.utils.FailToCreateError as exc:
                if not all(e.status == 409 for e in exc.api_exceptions):  # 409: it exists already
                    raise

    def events(self, namespace: str | None = None) -> str:
        with self.client() as api:
            core = k8s.CoreV1Api(api)
            items = (
                core.list_namespaced_event(namespace) if namespace else core.list_event_for_all_namespaces()
            ).items
        lines = [
            f"{e.last_timestamp or e.event_time} {e.involved_object.kind}/{e.involved_object.name} "
            f"{e.type} {e.reason}: {e.message}"
            for e in items
        ]
        return "--- events ---\n" + "\n".join(lines[-60:])

    def diagnostics(self, names: Sequence[str] | None = None, namespace: str | None = None,
                    chars: int = 3000) -> str:  # fmt: skip
        parts = []
        dead = self.processes.dead()
        if dead:
            parts.append(f"EXITED processes: {', '.join(dead)}")
        try:
            parts.append(self.events(namespace))
        except Exception as exc:
            parts.append(f"(events unavailable: {exc!r})")
        parts.append(self.processes.tails(names, chars))
        return "\n".join(parts)


def _node_ready(api: KubeCluster) -> bool:
    with api.api_client() as client:
        try:
            node = k8s.CoreV1Api(client).read_node(NODE_NAME)
        except k8s.ApiException:
            return False
    return any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])


def _apiserver_up(api: KubeCluster) -> bool:
    response = requests.get(f"{api.url}/readyz", headers={"Authorization": f"Bearer {api.admin_token}"},
                            verify=str(api.ca_file), timeout=5)  # fmt: skip
    return response.status_code == 200


@contextmanager
def kube_node(workdir: Path) -> Iterator[KubeNode]:
    """Bring the whole node up (about 7 minutes under TCG), yield it, and stop everything afterwards."""
    started = time.monotonic()
    progs = programs()
    workdir.mkdir(parents=True, exist_ok=True)
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    processes = Processes(logs)
    with ExitStack() as stack:
        api = stack.enter_context(kube_cluster(workdir / "api", ready_timeout=600))
        stack.callback(processes.stop_all)
        admin = write_kubeconfig(workdir / "admin.kubeconfig", api, api.admin_token)
        sa_key = api.sa_signing_key_file
        cm_port, sched_port, kubelet_port, healthz_port = free_ports(4)
        processes.start("kube-controller-manager", [
            progs["kube-controller-manager"], f"--kubeconfig={admin}", "--leader-elect=false",
            f"--service-account-private-key-file={sa_key}", f"--root-ca-file={api.ca_file}",
            "--use-service-account-credentials=false", "--bind-address=127.0.0.1", "--port=0",
            f"--secure-port={cm_port}", "--controllers=*,-nodeipam,-cloud-node-lifecycle,-service",
            "--node-monitor-grace-period=2m", "--pod-eviction-timeout=30m", "--v=2",
        ])  # fmt: skip
        processes.start("kube-scheduler", [
            progs["kube-scheduler"], f"--kubeconfig={admin}", "--leader-elect=false",
            "--bind-address=127.0.0.1", "--port=0", f"--secure-port={sched_port}", "--v=2",
        ])  # fmt: skip

        # containerd with the local images, then kubelet.
        _enable_cgroup_v2_controllers()
        runtime = Path(tempfile.mkdtemp(prefix="ctrd-", dir="/tmp"))  # short: socket paths are limited
        stack.callback(shutil.rmtree, runtime, ignore_errors=True)
        cni_conf = workdir / "cni"
        cni_conf.mkdir(exist_ok=True)
        (cni_conf / "10-loopback.conf").write_text(
            json.dumps({"cniVersion": "0.4.0", "name": "loopback", "type": "loopback"})
        )
        images = busybox_archive(workdir / "images.tar")
        config = workdir / "containerd.toml"
        config.write_text(_containerd_config(runtime, images, cni_conf))
        socket = runtime / "containerd.sock"
        processes.start("containerd", ["containerd", f"--config={config}", "--log-level=info"])
        wait_for("containerd socket", socket.exists, 120, lambda: processes.tails(["containerd"]))
        subprocess.run(["ctr", f"--address={socket}", "-n", "k8s.io", "images", "import",
                        str(images.archive)], check=True, capture_output=True, timeout=600)  # fmt: skip

        kubelet_root = runtime / "kubelet"
        kubelet_root.mkdir()
        kubelet_config = workdir / "kubelet.yaml"
        address = node_ip()
        kubelet_config.write_text(
            json.dumps(_kubelet_config([kubelet_port, healthz_port], api.ca_file, address))
        )
        processes.start("kubelet", [
            progs["kubelet"], f"--kubeconfig={admin}", f"--config={kubelet_config}",
            "--container-runtime=remote", f"--container-runtime-endpoint=unix://{socket}",
            f"--root-dir={kubelet_root}", f"--cert-dir={workdir / 'kubelet-pki'}",
            f"--hostname-override={NODE_NAME}", f"--node-ip={address}", "--v=2",
        ])  # fmt: skip
        node = KubeNode(api, workdir, progs, processes, images, admin, kubelet_root, socket)
        wait_for("node Ready", lambda: _node_ready(api), NODE_READY_TIMEOUT,
                 lambda: node.diagnostics(["kubelet", "containerd", "kube-controller-manager"]),
                 interval=3)  # fmt: skip

        if not progs[CRDS].exists():
            yield node
            return
        # Snapshots: the CRDs and the common controller.
        with node.client() as client:
            for crd in sorted(progs[CRDS].glob("snapshot.storage.k8s.io_*.yaml")):
                kubernetes.utils.create_from_yaml(client, str(crd))
        processes.start("snapshot-controller", [
            progs["snapshot-controller"], f"--kubeconfig={admin}", "--leader-election=false", "--v=4",
        ])  # fmt: skip
        node.bring_up_seconds = time.monotonic() - started
        progress(f"kube_node: control plane and a Ready node in {node.bring_up_seconds:.0f}s")
        yield node


# ---------------------------------------------------------------------------------------------------------
# The plugin and its sidecars


@dataclass
class CsiDriver:
    """One CSI driver on the node: the plugin's controller and node processes and their sidecars."""

    name: str
    backend: str
    node: KubeNode
    controller_socket: Path
    node_socket: Path
    state_dir: Path
    kms_config: Path
    process_names: list[str]

    @property
    def node_plugin(self) -> Process:
        return self.node.processes.all[f"{self.name.split('.')[0]}-node"]  # as start_driver names it

    def log_names(self) -> list[str]:
        return [*self.process_names, "kubelet"]

    def diagnostics(self, namespace: str | None = None, chars: int = 2500) -> str:
        return self.node.diagnostics(self.log_names(), namespace, chars)

    def restart_node_plugin(self) -> None:
        self.node_plugin.stop()
        self.node_plugin.start()


def _yaml_one(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(path.read_text())
    return loaded


def _socket_ready(path: Path) -> bool:
    return path.is_socket()


def start_driver(
    node: KubeNode,
    *,
    name: str = DRIVER,
    backend: str = "standalone",
    kms_config: Mapping[str, Mapping[str, str]] | None = None,
    ceph_config: Path | None = None,
    plugin_kubeconfig: Path | None = None,
) -> CsiDriver:
    """Start the plugin's two processes and every sidecar for driver `name`; wait until kubelet has it.

    The plugin's command line and environment are the csi-luks containers' of controller.yaml and
    node-plugin.yaml in deploy/kustomize/base; only what names a place or the backend is replaced (the
    endpoint, the state directory, the cluster list, the driver name and node id the Pod would get, and
    a KMS configuration file instead of the ConfigMap, which the scenarios edit)."""
    progs, processes, admin = node.programs, node.processes, node.admin_kubeconfig
    short = name.split(".")[0]
    root = node.workdir / f"driver-{short}"
    root.mkdir(parents=True, exist_ok=True)
    state = root / "state"
    config = root / "kms-config.json"
    config.write_text(json.dumps(kms_config or {}))
    sockets = Path(tempfile.mkdtemp(prefix=f"{short}-", dir="/tmp"))
    controller_socket = sockets / "controller.sock"
    node_dir = node.kubelet_root / "plugins" / name
    node_dir.mkdir(parents=True, exist_ok=True)
    node_socket = node_dir / "csi.sock"
    overrides = {
        "CSI_LUKS_KMS_CONFIG_MAP": None, "CSI_LUKS_KMS_CONFIG": str(config), "CSI_LUKS_BACKEND": backend,
        "CSI_LUKS_STATE_DIR": str(state), "CSI_LUKS_CEPH_CONFIG": str(ceph_config) if ceph_config else None,
        "CSI_DRIVER_NAME": name, "NODE_ID": NODE_NAME, "CSI_LUKS_LOG_LEVEL": "debug",
        "KUBECONFIG": str(plugin_kubeconfig or admin), "PYTHONUNBUFFERED": "1",
    }  # fmt: skip
    names = []

    def start(
        suffix: str, argv: Sequence[str | Path], extra_env: Mapping[str, str | None] | None = None
    ) -> None:
        names.append(f"{short}-{suffix}")
        sidecar = suffix not in ("controller", "node")  # the plugin is restarted by the tests only
        processes.start(f"{short}-{suffix}", [str(a) for a in argv], extra_env, restart=sidecar)

    for role, socket in (("controller", controller_socket), ("node", node_socket)):
        argv, env = deployed_argv(role, socket)
        start(role, argv, {**env, **overrides})
    driver = CsiDriver(name, backend, node, controller_socket, node_socket, state, config, names)
    csidriver = json.loads(json.dumps(_yaml_one(DEPLOY_BASE / "csidriver.yaml")))
    csidriver["metadata"]["name"] = name
    node.create(csidriver)
    for socket in (controller_socket, node_socket):
        wait_for(f"{socket} listening", lambda s=socket: _socket_ready(s), 300,  # type: ignore[misc]
                 lambda: driver.diagnostics())  # fmt: skip
    common = [f"--kubeconfig={admin}", f"--csi-address={controller_socket}", "--timeout=300s", "--v=5"]
    start("provisioner", [progs["csi-provisioner"], *common, "--extra-create-metadata",
                          "--leader-election=false", "--default-fstype=ext4"])  # fmt: skip
    start("attacher", [progs["csi-attacher"], *common, "--leader-election=false"])
    start("resizer", [progs["csi-resizer"], *common, "--leader-election=false"])
    start("snapshotter", [progs["csi-snapshotter"], *common, "--leader-election=false",
                          "--extra-create-metadata"])  # fmt: skip
    registry = node.kubelet_root / "plugins_registry"
    start("registrar", [progs["csi-node-driver-registrar"], f"--csi-address={node_socket}",
                        f"--kubelet-registration-path={node_socket}",
                        f"--plugin-registration-path={registry}", "--timeout=120s", "--v=5"])  # fmt: skip
    (liveness_port,) = free_ports(1)
    start("livenessprobe", [progs["livenessprobe"], f"--csi-address={node_socket}",
                            f"--http-endpoint=127.0.0.1:{liveness_port}", "--probe-timeout=60s"])  # fmt: skip

    def registered() -> bool:
        with node.client() as api:
            csinode = k8s.StorageV1Api(api).read_csi_node(NODE_NAME)
        return any(d.name == name for d in csinode.spec.drivers or [])

    wait_for(f"kubelet registered {name}", registered, 300, lambda: driver.diagnostics(), interval=2)
    return driver

"""The node lifecycle served from the plugin image's root file system (runs in the VM).

The host builds the root from the Dockerfile (tests/support/image_rootfs.py, cached and shared with
tests/host/test_image.py) and hands it to the guest. Here it is mounted read-only, with /dev, /proc,
/sys, /run (udev), a state dir, the socket dir and a kubelet dir bound in as node-plugin.yaml mounts
them, and `csi-luks serve` runs chrooted into it with deploy/'s command line: every program it runs
(cryptsetup, blkid, mkfs, resize2fs, xfs_growfs; losetup, mount and umount where their system calls fail)
can only be the image's. strace records what it ran, to show the lifecycle did run them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from csi_luks.csi import csi_pb2, csi_pb2_grpc
from csi_luks.luks import Cryptsetup, mapper_name
from csi_luks.system.filesystem import Filesystems
from csi_luks.system.programs import (
    BLKID,
    CRYPTSETUP,
    MKFS_EXT4,
    MKFS_XFS,
    RESIZE2FS,
    XFS_GROWFS,
)
from csi_luks.volumes.standalone import StandaloneBackend
from tests.support import serve_process
from tests.support.csi_sanity import keep_artifacts
from tests.support.csi_tools import STRICT
from tests.support.deployed_plugin import START_TIMEOUT, PluginProcess, deployed_command
from tests.support.image_rootfs import ROOTFS_ENV, ROOTFS_ERROR_ENV, image_config, wait_for_handover
from tests.support.plugin import MiB, mount_capability, stage_and_publish, unpublish_and_unstage

KUBELET = "/var/lib/kubelet"
# Where node-plugin.yaml mounts them in the container; the image has no such directories of its own.
MOUNT_POINTS = ("csi", "var/lib/csi-luks", "var/lib/kubelet", "etc/csi-luks", "tmp")
MARKER = b"CSI-LUKS-IMAGE-NODE-MARKER " * 1000
# What an ext4 and an xfs volume's stage, publish, expand, unpublish and unstage run between them. Not
# losetup, mount or umount: the node makes their system calls itself, and runs them only where those fail
# (tests/host/test_image.py finds them in the image all the same).
LIFECYCLE_PROGRAMS = {CRYPTSETUP, BLKID, MKFS_EXT4, RESIZE2FS, MKFS_XFS, XFS_GROWFS}
EXECVE = re.compile(r'execve\("([^"]+)"')


@pytest.fixture(scope="module")
def image_rootfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The image's root, handed over by the host as one ext4 file (tests/support/guest.py sees this
    fixture's name), mounted here: a private copy, so the test's mount points can be made in it."""
    staged = os.environ.get(ROOTFS_ENV)
    try:
        if not staged:
            raise RuntimeError(
                os.environ.get(ROOTFS_ERROR_ENV) or f"the host handed over no image root ({ROOTFS_ENV} unset)"
            )
        image = wait_for_handover(Path(staged))
    except RuntimeError as exc:
        if STRICT:
            pytest.fail(f"{exc} (CI=true: the image's node lifecycle must run)")
        pytest.skip(str(exc))
    mountpoint = tmp_path_factory.mktemp("image-rootfs")
    _mount("-o", "loop", str(image), str(mountpoint))
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False)


@dataclass
class ImageNode:
    root: Path  # the image's root as mounted here: a path inside it is root / path
    plugin: PluginProcess
    controller: csi_pb2_grpc.ControllerStub
    node: csi_pb2_grpc.NodeStub
    state_dir: Path
    trace: Path

    def outside(self, inside: str) -> Path:
        return self.root / inside.lstrip("/")

    def executed(self) -> list[str]:
        """The programs every process in the plugin's tree ran (as each saw its path), in order."""
        return EXECVE.findall(self.trace.read_text(errors="replace"))


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


@contextmanager
def _mounted_image(rootfs: Path, workdir: Path) -> Iterator[Path]:
    """rootfs read-only at workdir/root with what the DaemonSet binds into its container; all of it
    unmounted afterwards (and private, so nothing mounted in it reaches the guest's own mounts)."""
    for point in MOUNT_POINTS:
        (rootfs / point).mkdir(parents=True, exist_ok=True)  # in the guest's own copy of the image
    root = workdir / "root"
    root.mkdir()
    _mount("--bind", str(rootfs), str(root))
    try:
        # Read-only, as the image's layers are.
        _mount("-o", "remount,bind,ro", str(root))
        _mount("--make-rprivate", str(root))
        _mount("-t", "proc", "proc", str(root / "proc"))
        for host in ("/sys", "/dev", "/run"):
            _mount("--rbind", host, str(root / host.lstrip("/")))
        for inside in ("/csi", "/var/lib/csi-luks", KUBELET, "/etc/csi-luks"):
            outside = workdir / inside.strip("/").replace("/", "-")
            outside.mkdir()
            _mount("--bind", str(outside), str(root / inside.lstrip("/")))
        _mount("-t", "tmpfs", "tmpfs", str(root / "tmp"))
        yield root
    finally:
        subprocess.run(["umount", "--recursive", str(root)], check=False)


@contextmanager
def image_node(rootfs: Path, workdir: Path) -> Iterator[ImageNode]:
    """`csi-luks serve` chrooted into the image, with node-plugin.yaml's args and env but serving the
    controller too (the standalone backend's volumes are files in the node's state dir); a local KMS."""
    args, deployed_env = deployed_command("node")
    args[args.index("--mode") + 1] = "all"
    env = {
        **image_config().env,
        **{
            k: v
            for k, v in deployed_env.items()
            if k not in ("CSI_LUKS_KMS_CONFIG_MAP", "CSI_LUKS_CEPH_CONFIG")
        },
        "CSI_LUKS_BACKEND": "standalone",
        "NODE_ID": "image-node",
    }
    with ExitStack() as stack:
        root = stack.enter_context(_mounted_image(rootfs, workdir))
        kms = {"local-1": {"encryptionKMSType": "local", "keyFile": "/var/lib/csi-luks/local-kek"}}
        (workdir / "etc-csi-luks" / "kms-config.json").write_text(json.dumps(kms))
        trace, log = workdir / "execve.trace", workdir / "serve.log"
        argv = [
            *("strace", "--seccomp-bpf", "--follow-forks", "--quiet=all", "--signal=none"),
            *("--status=successful", "--trace=execve", "--output", str(trace)),
            *("chroot", str(root), "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in env.items())),
            *image_config().entrypoint,
            *args,
        ]
        stack.callback(keep_artifacts, workdir / "image-node", [log, trace])  # after the stop below
        socket_path = workdir / "csi" / "csi.sock"
        running = serve_process.start(
            argv, socket_path, dict(os.environ), log=log, ready_timeout=START_TIMEOUT
        )
        plugin = PluginProcess("node", socket_path, log, running)
        stack.callback(plugin.stop)  # strace: kills what it traces, if the plugin did not stop below
        channel = stack.enter_context(grpc.insecure_channel(f"unix://{plugin.socket}"))
        stubs = csi_pb2_grpc.ControllerStub(channel), csi_pb2_grpc.NodeStub(channel)
        yield ImageNode(root, plugin, *stubs, workdir / "var-lib-csi-luks", trace)
        channel.close()
        os.kill(_served_pid(plugin), signal.SIGTERM)  # as the kubelet stops a container
        assert plugin.process.wait(60) == 0, plugin.log_tail()  # strace exits with its tracee's status


def _served_pid(plugin: PluginProcess) -> int:
    """The serving process: strace's one child (chroot, then env, then csi-luks, in the same process)."""
    pid = plugin.process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def _mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as mountinfo:
        points = [line.split()[4] for line in mountinfo]
    return [p for p in points if p.startswith(f"{path}/")]


def _lifecycle(node: ImageNode, name: str, fs_type: str, size: int, grown: int, restage: bool) -> None:
    """Create, stage (luksFormat, open, mkfs), publish, write, expand, unpublish, unstage, restage and
    read back (if asked: each step takes seconds under TCG), delete; nothing left mapped, attached or
    mounted."""
    capability = mount_capability(fs_type)
    volume_id = node.controller.CreateVolume(
        csi_pb2.CreateVolumeRequest(
            name=name,
            capacity_range=csi_pb2.CapacityRange(required_bytes=size),
            volume_capabilities=[capability],
            parameters={"encrypted": "true", "encryptionKMSID": "local-1"},
        )
    ).volume.volume_id
    staging = f"{KUBELET}/plugins/kubernetes.io/csi/luks.csi-luks.io/{name}/globalmount"
    target = f"{KUBELET}/pods/{name}-pod/volumes/kubernetes.io~csi/{name}/mount"

    def stage() -> None:
        stage_and_publish(node.node, volume_id, staging, target, capability)

    def unstage() -> None:
        unpublish_and_unstage(node.node, volume_id, staging, target)

    mapper = mapper_name(volume_id)
    stage()
    assert Filesystems().probe(f"/dev/mapper/{mapper}").type == fs_type
    data = node.outside(target) / "data.bin"
    data.write_bytes(MARKER)
    os.sync()
    before = os.statvfs(node.outside(target))
    node.controller.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(
            volume_id=volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=grown)
        )
    )
    expanded = node.node.NodeExpandVolume(
        csi_pb2.NodeExpandVolumeRequest(volume_id=volume_id, volume_path=target)
    )
    assert expanded.capacity_bytes >= grown
    after = os.statvfs(node.outside(target))
    assert after.f_blocks * after.f_frsize > before.f_blocks * before.f_frsize + (grown - size) // 2
    unstage()
    backend = StandaloneBackend(node.state_dir)
    assert not Cryptsetup().status(mapper).active
    assert backend.find_attachment(volume_id) is None
    assert _mounts_under(node.outside(KUBELET)) == []
    assert backend.image_path(volume_id).read_bytes()[:6] == b"LUKS\xba\xbe"

    if restage:
        stage()
        assert data.read_bytes() == MARKER
        unstage()
    node.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id))
    assert backend.list() == []
    assert not Cryptsetup().status(mapper).active and _mounts_under(node.outside(KUBELET)) == []


def test_the_image_runs_the_node_lifecycle(image_rootfs: Path, tmp_path: Path) -> None:
    with image_node(image_rootfs, tmp_path) as node:
        assert os.readlink(f"/proc/{_served_pid(node.plugin)}/root") == str(node.root)
        _lifecycle(node, "pvc-image-ext4", "ext4", 64 * MiB, 128 * MiB, restage=True)
        _lifecycle(node, "pvc-image-xfs", "xfs", 320 * MiB, 400 * MiB, restage=False)
        executed = node.executed()
    chroot, inside = executed[0], executed[1:]
    assert os.path.basename(chroot) == "chroot"  # the last program run from the guest's own root
    assert {os.path.basename(path) for path in inside} >= LIFECYCLE_PROGRAMS, executed
    for path in inside:  # chrooted: each path is the image's; every one of them is there
        assert (image_rootfs / path.lstrip("/")).is_file(), path


@pytest.mark.parametrize("program", ["rbd", "rbd-nbd", "udevadm"])
def test_the_image_runs_the_rbd_and_udev_programs(image_rootfs: Path, program: str) -> None:
    """The RBD backend's programs (its lifecycle runs from the guest's own in test_rbd_node) and udevadm
    start inside the image: present, with their shared libraries."""
    env = [f"{k}={v}" for k, v in image_config().env.items()]
    result = subprocess.run(
        ["chroot", str(image_rootfs), "/usr/bin/env", "-i", *env, program, "--version"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"ceph version 1\d\.|^\d{3}$", result.stdout.strip()), result.stdout

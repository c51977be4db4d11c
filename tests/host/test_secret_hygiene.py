"""Secret hygiene end to end (issue 13 §4): no secret in clear anywhere the plugin leaves traces.

`csi-luks --log-level debug serve` runs as a real process (under a wrapper that records, through Python's
audit hook, the argv and environment of every command it spawns and every temporary directory it makes).
One lifecycle per KMS type (local, metadata, vault KV v2, vault-transit, secrets; vaulttokens,
vaulttenantsa, kmip (both modes), aws-metadata and aws-sts-metadata with their Secrets on the test
kube-apiserver; then RBD with a cephx key): create, first format (as NodeStage
does; the host has no device-mapper), a NodeStage that fails at device-mapper with its secrets, a DEK
rotation through EncryptionKeyRotate (cryptsetup with two DEKs), snapshot, expand, a few refused calls
carrying secrets, delete. Every DEK is read back through its KMS. Then the secrets (DEKs raw, hex and
base64; the local KEK; the metadata and secrets passphrases; a Vault token of its own; the KMIP client key
and wrapping key; the AWS secret access key; the cephx key) are
looked for in: every log line, every gRPC error message, the plugin's /proc/<pid>/cmdline and environ, its
children's argv and environment, every file under the state dir, and every file in /tmp and /dev/shm
written during the test. Modes: what the README documents.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_luks.csi import csi_pb2, csi_pb2_grpc
from csi_luks.csiaddons import encryptionkeyrotation_pb2 as rotation_pb2
from csi_luks.csiaddons import encryptionkeyrotation_pb2_grpc as rotation_grpc
from csi_luks.encryption import volume_encryption
from csi_luks.kms.base import KMSContext
from csi_luks.kms.config import KMSConfig
from csi_luks.luks import Cryptsetup, FormatOptions
from csi_luks.operations.header_backup import refresh_header_backup
from csi_luks.volume_metadata import STATE, EncryptionState, VolumeRecord
from csi_luks.volumes import ceph_clusters
from csi_luks.volumes.standalone import StandaloneBackend
from tests.support.audit import AUDIT
from tests.support.ceph import CephCluster
from tests.support.ceph_fixtures import CLUSTER_ID
from tests.support.kmip_server import KMIPServer
from tests.support.kms_env import KmsEnv
from tests.support.moto_server import AWSEmulator
from tests.support.openbao import OpenBao
from tests.support.operations import breadth_entries, write_kubeconfig
from tests.support.plugin import MiB, mount_capability

# Runs the CLI with an audit hook that appends each spawned command (argv, env) and each mkdtemp to a file.
WRAPPER = """
import json, os, sys
record = open(os.environ["CSI_LUKS_TEST_SPAWN_LOG"], "a")
def hook(event, args):
    if event == "subprocess.Popen":
        argv = args[1] if isinstance(args[1], (list, tuple)) else [args[1]]
        env = args[3]
        record.write(json.dumps({"argv": [os.fsdecode(a) for a in argv],
                                 "env": None if env is None else {os.fsdecode(k): os.fsdecode(v)
                                                                  for k, v in env.items()}}) + "\\n")
        record.flush()
    elif event == "tempfile.mkdtemp":
        record.write(json.dumps({"mkdtemp": os.fsdecode(args[0])}) + "\\n")
        record.flush()
sys.addaudithook(hook)
from csi_luks.cli import main
sys.exit(main(sys.argv[1:]))
"""
SCAN_LIMIT = 96 * MiB  # per file: a test volume's image (16 MiB + the 16 MiB header) and more
SKIPPED_TMP = ("/tmp/bash_jobs",)


@dataclass
class Secrets:
    """Every secret of the test, and where it may legitimately live on disk (its own file)."""

    values: dict[str, bytes] = field(default_factory=dict)
    homes: set[str] = field(default_factory=set)

    def add(self, name: str, value: str | bytes) -> None:
        self.values[name] = value.encode() if isinstance(value, str) else value
        if name.startswith("DEK") or "passphrase" in name:
            AUDIT.register(value)  # the session's argv audit checks this process's cryptsetup calls too

    def forms(self) -> dict[str, bytes]:
        """Each secret as raw bytes, hex (both cases) and base64 (standard and URL-safe, unpadded); a DEK
        (43 characters of base64url) also as its 32 decoded bytes in those forms."""
        found: dict[str, bytes] = {}
        for name, raw in self.values.items():
            variants = [raw]
            if name.startswith("DEK"):
                variants.append(base64.urlsafe_b64decode(raw + b"=" * (-len(raw) % 4)))
            for index, value in enumerate(variants):
                tag = f"{name}{' decoded' if index else ''}"
                found[f"{tag} raw"] = value
                found[f"{tag} hex"] = value.hex().encode()
                found[f"{tag} HEX"] = value.hex().upper().encode()
                found[f"{tag} base64"] = base64.b64encode(value).rstrip(b"=")
                found[f"{tag} base64url"] = base64.urlsafe_b64encode(value).rstrip(b"=")
        return found

    def find(self, data: bytes, where: str) -> list[str]:
        return [
            f"{form} in {where}" for form, value in self.forms().items() if len(value) >= 8 and value in data
        ]


class PluginProcess:
    def __init__(self, root: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.root = root
        self.sock = root / "csi.sock"
        self.log = root / "plugin.log"
        self.spawn_log = root / "spawns.jsonl"
        wrapper = root / "wrapper.py"
        wrapper.write_text(WRAPPER)
        self.log_file = self.log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(wrapper), "--log-level", "debug", "serve", "--endpoint", str(self.sock),
             "--node-id", "hygiene-node", *args],
            stdout=self.log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "CSI_LUKS_TEST_SPAWN_LOG": str(self.spawn_log), **(env or {})},
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while not _accepts(self.sock):
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "the plugin did not open its socket within 60 s"
            time.sleep(0.05)
        self.channel = grpc.insecure_channel(f"unix://{self.sock}")
        self.controller = csi_pb2_grpc.ControllerStub(self.channel)
        self.node = csi_pb2_grpc.NodeStub(self.channel)
        self.rotation = rotation_grpc.EncryptionKeyRotationControllerStub(self.channel)
        self.errors: list[str] = []  # every gRPC error message seen

    def call(self, method: object, request: object, *expected: grpc.StatusCode) -> object:
        """The answer; or, for a refusal with one of `expected`, None (its message kept for the scan)."""
        try:
            return method(request, timeout=60)  # type: ignore[operator]
        except grpc.RpcError as exc:
            self.errors.append(exc.details() or "")
            assert exc.code() in expected, (exc.code(), exc.details())
            return None

    def delete(self, volume_id: str, snapshot_id: str, request_secrets: dict[str, str]) -> None:
        self.call(
            self.controller.DeleteSnapshot,
            csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot_id, secrets=request_secrets),
        )
        self.call(
            self.controller.DeleteVolume,
            csi_pb2.DeleteVolumeRequest(volume_id=volume_id, secrets=request_secrets),
        )

    def proc_files(self) -> dict[str, bytes]:
        return {f"/proc/{self.proc.pid}/{name}": Path(f"/proc/{self.proc.pid}/{name}").read_bytes()
                for name in ("cmdline", "environ")}  # fmt: skip

    def spawns(self) -> list[dict[str, Any]]:
        if not self.spawn_log.exists():
            return []
        return [json.loads(line) for line in self.spawn_log.read_text().splitlines()]

    def stop(self) -> None:
        self.channel.close()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        self.log_file.close()


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def scan_files(paths: Iterable[Path], found: Secrets, since: float | None = None) -> list[str]:
    """Where a secret shows up in the files under paths (those modified since `since`, if given)."""
    leaks = []
    for top in paths:
        for directory, dirs, names in os.walk(top, onerror=lambda _: None):
            dirs[:] = [d for d in dirs if not os.path.join(directory, d).startswith(SKIPPED_TMP)]
            for name in names:
                path = os.path.join(directory, name)
                if any(path == home or path.startswith(home + os.sep) for home in found.homes):
                    continue
                try:
                    st_ = os.lstat(path)
                    if not stat.S_ISREG(st_.st_mode) or (since is not None and st_.st_mtime < since):
                        continue
                    with open(path, "rb") as f:
                        data = f.read(SCAN_LIMIT)
                except OSError:
                    continue  # gone meanwhile, or unreadable: not the plugin's
                leaks += found.find(data, path)
    return leaks


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def assert_private(state_dir: Path) -> None:
    """The README: key and state files 0600, their directories 0700 (the state dir itself included)."""
    assert mode(state_dir) == 0o700, f"{state_dir}: {mode(state_dir):o}"
    for path in state_dir.rglob("*"):
        expected = 0o700 if path.is_dir() else 0o600
        assert mode(path) == expected, f"{path}: {mode(path):o}"


@dataclass
class Lab:
    root: Path
    plugin: PluginProcess
    config: Path
    state_dir: Path
    found: Secrets

    def encryption(self, kms_id: str, volume_id: str, request_secrets: dict[str, str]) -> str:
        """The volume's DEK, read back through its KMS."""
        backend = StandaloneBackend(self.state_dir)
        namespace = VolumeRecord.parse(backend.get(volume_id).metadata).pvc_namespace
        context = KMSContext(secrets=request_secrets, pvc_namespace=namespace)
        config = KMSConfig.from_file(self.config)
        return volume_encryption(config, kms_id, context, backend).get_passphrase(volume_id)


def lifecycle(lab: Lab, kms_id: str, request_secrets: dict[str, str], namespace: str | None = None) -> None:
    plugin, found, label = lab.plugin, lab.found, kms_id or "secrets"
    parameters = {"encrypted": "true", "encryptionKMSID": kms_id}
    if namespace is not None:
        parameters["csi.storage.k8s.io/pvc/namespace"] = namespace
    create = csi_pb2.CreateVolumeRequest(
        name=f"pvc-{label}", capacity_range=csi_pb2.CapacityRange(required_bytes=16 * MiB),
        volume_capabilities=[mount_capability()], parameters=parameters, secrets=request_secrets,
    )  # fmt: skip
    volume_id = plugin.call(plugin.controller.CreateVolume, create).volume.volume_id  # type: ignore[attr-defined]
    dek = lab.encryption(kms_id, volume_id, request_secrets)
    found.add(f"DEK {label}", dek)

    # The first NodeStage's format (the host has no device-mapper), then a NodeStage that gets as far as it.
    image = str(StandaloneBackend(lab.state_dir).image_path(volume_id))
    cryptsetup = Cryptsetup()
    cryptsetup.format(image, dek, FormatOptions())
    backend = StandaloneBackend(lab.state_dir)
    refresh_header_backup(cryptsetup, backend, volume_id, image)
    backend.set_metadata(volume_id, STATE, EncryptionState.ENCRYPTED.value)
    stage = csi_pb2.NodeStageVolumeRequest(
        volume_id=volume_id, staging_target_path=str(lab.root / "staging"),
        volume_capability=mount_capability(), secrets=request_secrets,
    )  # fmt: skip
    plugin.call(plugin.node.NodeStageVolume, stage, grpc.StatusCode.FAILED_PRECONDITION)

    # A rotation: cryptsetup luksAddKey and luksKillSlot with the old and the new DEK, in the plugin.
    rotate = rotation_pb2.EncryptionKeyRotateRequest(
        volume_id=volume_id, volume_path="/unused", secrets=request_secrets
    )
    if kms_id:
        plugin.call(plugin.rotation.EncryptionKeyRotate, rotate)
        rotated = lab.encryption(kms_id, volume_id, request_secrets)
        assert rotated != dek
        found.add(f"DEK {label} rotated", rotated)
    else:
        plugin.call(plugin.rotation.EncryptionKeyRotate, rotate, grpc.StatusCode.FAILED_PRECONDITION)

    snapshot_request = csi_pb2.CreateSnapshotRequest(
        name=f"snap-{label}", source_volume_id=volume_id, secrets=request_secrets
    )
    snapshot = plugin.call(plugin.controller.CreateSnapshot, snapshot_request).snapshot  # type: ignore[attr-defined]
    found.add(f"DEK {label} snapshot", lab.encryption(kms_id, snapshot.snapshot_id, request_secrets))
    expand = csi_pb2.ControllerExpandVolumeRequest(
        volume_id=volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=32 * MiB),
        secrets=request_secrets,
    )  # fmt: skip
    plugin.call(plugin.controller.ControllerExpandVolume, expand)
    assert_private(lab.state_dir)

    # Refusals whose requests carry the secrets: their messages are scanned too.
    conflicting = csi_pb2.CreateVolumeRequest()
    conflicting.CopyFrom(create)
    conflicting.capacity_range.required_bytes = 64 * MiB
    plugin.call(plugin.controller.CreateVolume, conflicting, grpc.StatusCode.ALREADY_EXISTS)
    unknown = csi_pb2.CreateVolumeRequest()
    unknown.CopyFrom(create)
    unknown.parameters["bogus"] = "x"
    plugin.call(plugin.controller.CreateVolume, unknown, grpc.StatusCode.INVALID_ARGUMENT)
    if "encryptionPassphrase" in request_secrets:
        wrong = {"encryptionPassphrase": request_secrets["encryptionPassphrase"] + "-wrong"}
        restore = csi_pb2.CreateVolumeRequest(
            name=f"restore-{label}", volume_capabilities=[mount_capability()], parameters=parameters,
            secrets=wrong,
            volume_content_source=csi_pb2.VolumeContentSource(
                snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snapshot.snapshot_id)),
        )  # fmt: skip
        plugin.call(
            plugin.controller.CreateVolume, restore,
            grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OK,
        )  # fmt: skip

    plugin.delete(volume_id, snapshot.snapshot_id, request_secrets)


def rbd_lifecycle(lab: Lab, ceph: CephCluster, ceph_secrets: dict[str, str], state_dir: Path) -> None:
    from csi_luks.volumes.rbd import RbdBackend

    plugin = lab.plugin
    parameters = {
        "clusterID": CLUSTER_ID,
        "pool": ceph.pool,
        "encrypted": "true",
        "encryptionKMSID": "local-1",
    }
    create = csi_pb2.CreateVolumeRequest(
        name="pvc-rbd-hygiene", capacity_range=csi_pb2.CapacityRange(required_bytes=16 * MiB),
        volume_capabilities=[mount_capability()], parameters=parameters, secrets=ceph_secrets,
    )  # fmt: skip
    volume_id = plugin.call(plugin.controller.CreateVolume, create).volume.volume_id  # type: ignore[attr-defined]
    ceph_config = lab.root / "ceph-config.json"
    backend = RbdBackend(ceph_clusters.CephClusters(ceph_config), state_dir).for_request(ceph_secrets)
    config = KMSConfig.from_file(lab.config)
    dek = volume_encryption(config, "local-1", KMSContext(secrets=ceph_secrets), backend).get_passphrase(
        volume_id
    )
    lab.found.add("DEK rbd", dek)
    snapshot_request = csi_pb2.CreateSnapshotRequest(
        name="snap-rbd-hygiene", source_volume_id=volume_id, secrets=ceph_secrets
    )
    snapshot = plugin.call(plugin.controller.CreateSnapshot, snapshot_request).snapshot  # type: ignore[attr-defined]
    expand = csi_pb2.ControllerExpandVolumeRequest(
        volume_id=volume_id,
        capacity_range=csi_pb2.CapacityRange(required_bytes=32 * MiB),
        secrets=ceph_secrets,
    )
    plugin.call(plugin.controller.ControllerExpandVolume, expand)
    wrong_key = {**ceph_secrets, "userKey": base64.b64encode(secrets.token_bytes(28)).decode()}
    lab.found.add("a refused cephx key", wrong_key["userKey"])
    refused = csi_pb2.ControllerExpandVolumeRequest(
        volume_id=volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=48 * MiB), secrets=wrong_key
    )
    plugin.call(
        plugin.controller.ControllerExpandVolume, refused,
        grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INVALID_ARGUMENT,
    )  # fmt: skip
    plugin.delete(volume_id, snapshot.snapshot_id, ceph_secrets)


@pytest.fixture
def found(session_bao: OpenBao) -> Secrets:
    return Secrets(homes={str(session_bao.log.parent)})  # OpenBao's own files: where the KV DEKs live


def kms_entries(root: Path, bao: OpenBao, found: Secrets) -> dict[str, dict[str, str]]:
    token = bao.client().auth.token.create(policies=["root"], ttl="1h")["auth"]["client_token"]
    found.add("Vault token", token)
    token_file = root / "vault-token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    found.homes |= {str(token_file), str(root / "kek")}  # their own homes: read, never copied
    vault = {"vaultAddress": bao.address, "vaultTokenFile": str(token_file), "vaultRetryDeadline": "5"}
    return {
        "local-1": {"encryptionKMSType": "local", "keyFile": str(root / "kek")},
        "metadata": {"encryptionKMSType": "metadata"},
        "vault-kv": {
            "encryptionKMSType": "vault",
            "vaultPassphrasePath": f"hygiene-{uuid.uuid4().hex[:8]}/",
            **vault,
        },
        "vault-transit": {"encryptionKMSType": "vault-transit", "vaultTransitKey": "csi-kek", **vault},
    }


def assert_clean(lab: Lab, started: float, *plugins: PluginProcess) -> None:
    found = lab.found
    leaks: list[str] = []
    for plugin in plugins:
        for where, data in plugin.proc_files().items():
            leaks += found.find(data, where)
    for plugin in plugins:
        plugin.stop()
        leaks += found.find(plugin.log.read_bytes(), "the plugin's log")
        leaks += found.find("\n".join(plugin.errors).encode(), "a gRPC error message")
        for spawn in plugin.spawns():
            leaks += found.find(
                json.dumps(spawn).encode(), f"a child's argv or environment: {spawn.get('argv')}"
            )
    leaks += scan_files([lab.root], found)
    leaks += scan_files([Path("/tmp"), Path("/dev/shm")], found, since=started)
    assert leaks == []


def test_no_secret_in_clear_for_any_kms_type(tmp_path: Path, session_bao: OpenBao, found: Secrets) -> None:
    started = time.time() - 1
    root = tmp_path / "hygiene"
    root.mkdir()
    config = root / "kms-config.json"
    config.write_text(json.dumps(kms_entries(root, session_bao, found)))
    state_dir = root / "state"
    plugin = PluginProcess(root, "--state-dir", str(state_dir), "--kms-config", str(config))
    lab = Lab(root, plugin, config, state_dir, found)
    try:
        passphrase = secrets.token_urlsafe(24)
        found.add("the metadata passphrase", passphrase)
        for kms_id, request_secrets in (
            ("local-1", {}),
            ("metadata", {"encryptionPassphrase": passphrase}),
            ("vault-kv", {}),
            ("vault-transit", {}),
            ("", {"encryptionPassphrase": passphrase + "-shared"}),
        ):
            lifecycle(lab, kms_id, request_secrets)
        found.add("the secrets-type passphrase", passphrase + "-shared")
        found.add("the local KEK", (root / "kek").read_bytes())
        assert mode(root / "kek") == 0o600 and mode(plugin.sock) == 0o600
        assert len([name for name in found.values if name.startswith("DEK")]) == 14
        assert_clean(lab, started, plugin)
    finally:
        if plugin.proc.poll() is None:
            plugin.proc.kill()


def test_no_cephx_key_in_clear(
    tmp_path: Path, session_bao: OpenBao, found: Secrets, ceph: CephCluster, ceph_config: Path,
    ceph_secrets: dict[str, str],
) -> None:  # fmt: skip
    started = time.time() - 1
    root = tmp_path / "hygiene-rbd"
    root.mkdir()
    (root / "ceph-config.json").write_text(ceph_config.read_text())
    config = root / "kms-config.json"
    config.write_text(json.dumps(kms_entries(root, session_bao, found)))
    found.add("the cephx key", ceph_secrets["userKey"])
    found.homes.add(str(ceph.root))  # the cluster's own keyrings and monitor store
    state_dir = root / "state"
    plugin = PluginProcess(
        root, "--backend", "rbd", "--ceph-config", str(root / "ceph-config.json"),
        "--state-dir", str(state_dir), "--kms-config", str(config), "--mode", "controller",
    )  # fmt: skip
    lab = Lab(root, plugin, config, state_dir, found)
    try:
        rbd_lifecycle(lab, ceph, ceph_secrets, state_dir)
        # The controller talks to Ceph through librados, the key handed over in memory: no key file is
        # made and no rbd or rados process runs (the node's `rbd device map` still gets a key file: the VM
        # tier's RBD node tests audit those).
        spawns = plugin.spawns()
        assert [entry["mkdtemp"] for entry in spawns if "mkdtemp" in entry] == []
        assert [s["argv"] for s in spawns if Path(s.get("argv", [""])[0]).name in ("rbd", "rados")] == []
        assert_clean(lab, started, plugin)
    finally:
        if plugin.proc.poll() is None:
            plugin.proc.kill()


def test_no_secret_in_clear_for_the_tenant_vault_types(
    tmp_path: Path, session_bao: OpenBao, found: Secrets, kms_env: KmsEnv, plugin_kube_client: None
) -> None:
    """vaulttokens (the tenant's Vault token from a Secret) and vaulttenantsa (a TokenRequest JWT)."""
    started = time.time() - 1
    root = tmp_path / "hygiene-tenant"
    root.mkdir()
    kubeconfig = write_kubeconfig(root, kms_env.kube, kms_env.node_token_file)
    found.add("the tenant's Vault token", kms_env.tenant.vault_token)
    found.add("the plugin's Kubernetes token", kms_env.node_token_file.read_text().strip())
    # Their homes: the API server's store, the test's own token file, the plugin's kubeconfig.
    found.homes |= {str(kms_env.kube.workdir), str(kms_env.node_token_file), str(kubeconfig)}
    prefix = f"hygiene-{uuid.uuid4().hex[:8]}/"
    config = root / "kms-config.json"
    # The fixture's tenant policy (kms_env.DEK_POLICY) has no `secret/destroy/*`, which a rotation with
    # vaultDestroyKeys needs; what is destroyed in Vault is not this test's subject.
    tenant = {"vaultAddress": session_bao.address, "vaultPassphrasePath": prefix, "vaultDestroyKeys": "false"}
    config.write_text(json.dumps({
        "tokens": {"encryptionKMSType": "vaulttokens", **tenant},
        "tenant-sa": {"encryptionKMSType": "vaulttenantsa", "vaultRole": "tenant", **tenant},
    }))  # fmt: skip
    state_dir = root / "state"
    plugin = PluginProcess(
        root, "--state-dir", str(state_dir), "--kms-config", str(config), env={"KUBECONFIG": str(kubeconfig)}
    )
    lab = Lab(root, plugin, config, state_dir, found)
    try:
        for kms_id in ("tokens", "tenant-sa"):
            lifecycle(lab, kms_id, {}, namespace=kms_env.tenant.namespace)
        assert len([name for name in found.values if name.startswith("DEK")]) == 6
        assert_clean(lab, started, plugin)
    finally:
        if plugin.proc.poll() is None:
            plugin.proc.kill()


def test_no_secret_in_clear_for_the_kmip_and_aws_types(
    tmp_path: Path,
    found: Secrets,
    kms_env: KmsEnv,
    session_kmip: KMIPServer,
    session_aws: AWSEmulator,
    plugin_kube_client: None,
) -> None:
    """kmip (the client key reaches OpenSSL through a memfd; USE_CRYPTO_RPC false fetches the wrapping
    key itself), aws-metadata (a secret access key) and aws-sts-metadata (STS credentials)."""
    started = time.time() - 1
    root = tmp_path / "hygiene-breadth"
    root.mkdir()
    kubeconfig = write_kubeconfig(root, kms_env.kube, kms_env.node_token_file)
    client_key = session_kmip.secret_data()["CLIENT_KEY"]
    found.add("the KMIP client key", client_key)
    found.add("the KMIP client key's body", "".join(client_key.strip().splitlines()[1:-1]))
    client = session_kmip.client()
    client.open()
    try:
        found.add("the KMIP wrapping key", client.get(session_kmip.keys["csi-kek"]).value)
    finally:
        client.close()
    found.add("the AWS secret access key", session_aws.metadata_secret()["AWS_SECRET_ACCESS_KEY"])
    found.add("the plugin's Kubernetes token", kms_env.node_token_file.read_text().strip())
    # Their homes: the KMIP server's certificates and key store, the API server's store, the test's own
    # token file, the plugin's kubeconfig.
    found.homes |= {str(session_kmip.log.parent), str(kms_env.kube.workdir), str(kms_env.node_token_file),
                    str(kubeconfig)}  # fmt: skip
    config = root / "kms-config.json"
    entries = breadth_entries(kms_env, session_kmip, session_aws)
    config.write_text(json.dumps(entries))
    state_dir = root / "state"
    plugin = PluginProcess(
        root, "--state-dir", str(state_dir), "--kms-config", str(config), env={"KUBECONFIG": str(kubeconfig)}
    )
    lab = Lab(root, plugin, config, state_dir, found)
    try:
        for kms_id in entries:
            lifecycle(lab, kms_id, {}, namespace=kms_env.tenant.namespace)
        assert len([name for name in found.values if name.startswith("DEK")]) == 3 * len(entries) == 12
        assert_clean(lab, started, plugin)
    finally:
        if plugin.proc.poll() is None:
            plugin.proc.kill()


# --- cephx key files left by a SIGKILL ------------------------------------------------------------------


def test_key_directories_of_a_killed_plugin_are_swept_at_the_next_start(tmp_path: Path) -> None:
    parent = Path(ceph_clusters._key_dir_parent() or "/tmp")
    namespace = ceph_clusters._pid_namespace()
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = parent / f"csi-luks-ceph-{namespace}-{dead.pid}-{uuid.uuid4().hex[:8]}"
    alive = parent / f"csi-luks-ceph-{namespace}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    foreign = parent / f"csi-luks-ceph-1-{dead.pid}-{uuid.uuid4().hex[:8]}"  # another PID namespace
    legacy_old = parent / f"csi-luks-ceph-{uuid.uuid4().hex[:8]}"
    legacy_new = parent / f"csi-luks-ceph-{uuid.uuid4().hex[:8]}"
    for directory in (stale, alive, foreign, legacy_old, legacy_new):
        directory.mkdir(mode=0o700)
        (directory / "key").write_text("AQB-not-a-real-key==")
    old = time.time() - ceph_clusters.LEGACY_KEY_DIR_AGE - 60
    os.utime(legacy_old, (old, old))
    clusters = tmp_path / "ceph-config.json"
    clusters.write_text(json.dumps([{"clusterID": "c1", "monitors": ["127.0.0.1:6789"]}]))
    try:
        plugin = PluginProcess(
            tmp_path, "--backend", "rbd", "--ceph-config", str(clusters), "--state-dir", str(tmp_path / "s"),
            "--kms-config", str(tmp_path / "none.json"), "--mode", "controller",
        )  # fmt: skip
        plugin.stop()
        assert not stale.exists() and not legacy_old.exists()
        assert alive.exists() and foreign.exists() and legacy_new.exists()
        assert "removed 2 cephx key directories" in plugin.log.read_text()
    finally:
        for directory in (stale, alive, foreign, legacy_old, legacy_new):
            subprocess.run(["rm", "-rf", str(directory)], check=False)

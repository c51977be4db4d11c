"""Property-based requests (issue 13 §3): hostile fields in every RPC, over the real gRPC server.

Whatever the fields (ids and names with `/`, `..`, NUL, newlines, 10 kB, any Unicode; capacities 0, 1,
negative, int64 max, required > limit; malformed secrets, parameters and KMS entries), every answer is
one of DOCUMENTED_CODES, never INTERNAL or UNKNOWN, and no file outside the plugin's own directories is
created, changed or removed. Hand-picked hostile cases live in test_adversarial_inputs.py; here
hypothesis draws combinations of them. One plugin serves the whole module (a few examples per RPC keep
the file well under a minute).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from csi_luks.csi import csi_pb2
from csi_luks.kms.base import KMSConfigError
from csi_luks.kms.config import KMSConfig
from csi_luks.settings import Mode
from tests.support.ceph import CephCluster
from tests.support.ceph_fixtures import CLUSTER_ID
from tests.support.file_audit import FILE_AUDIT
from tests.support.openbao import OpenBao, free_port
from tests.support.operations import vault_login
from tests.support.plugin import MiB, RunningPlugin, mount_capability, running_plugin

# Every code the README documents for some failure; OK is success. INTERNAL and UNKNOWN are bugs.
DOCUMENTED_CODES = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.ABORTED,  # a call in flight on the volume; a starting_token we did not make
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)
FUZZ = settings(
    max_examples=int(os.environ.get("CSI_LUKS_FUZZ_EXAMPLES", "25")),
    deadline=None,
    database=None,  # no .hypothesis directory in the checkout
    # `untouched` is checked once per test, across all its examples, on purpose.
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
INT64_MAX = 2**63 - 1

# --- strategies -------------------------------------------------------------------------------------

HOSTILE = [
    "", " ", "/", "..", "../..", "../../precious", "/etc/passwd", "a/b", "a\x00b", "\x00", "a\nb", "\n",
    "x" * 10_000, "é😀\u202e", "sa-" + str(uuid.UUID(int=0)), "sa-snap-" + str(uuid.UUID(int=1)),
    "rbd-02c1-03rbd-00-" + str(uuid.UUID(int=2)), "%2e%2e%2f", "$(touch /tmp/pwned)", "-rf",
]  # fmt: skip
text = st.one_of(
    st.sampled_from(HOSTILE), st.text(max_size=40), st.text(st.characters(codec="utf-8"), min_size=1)
)
capacities = st.one_of(
    st.sampled_from([0, 1, -1, MiB - 1, MiB, 16 * MiB, 2**40, 2**62, INT64_MAX, -(2**63)]),
    st.integers(-(2**63), INT64_MAX),
)
secret_keys = st.one_of(st.sampled_from(["encryptionPassphrase", "userID", "userKey"]), text)
secrets = st.dictionaries(secret_keys, text, max_size=3)
parameter_keys = st.one_of(
    st.sampled_from(["encrypted", "encryptionKMSID", "csi.storage.k8s.io/pvc/namespace", "clusterID"]), text
)
parameter_values = st.one_of(st.sampled_from(["true", "false", "local-1", "fuzz", ""]), text)
parameters = st.dictionaries(parameter_keys, parameter_values, max_size=3)


@st.composite
def capacity_ranges(draw: st.DrawFn) -> csi_pb2.CapacityRange | None:
    if draw(st.booleans()):
        return None
    return csi_pb2.CapacityRange(required_bytes=draw(capacities), limit_bytes=draw(capacities))


@st.composite
def capabilities(draw: st.DrawFn) -> list[csi_pb2.VolumeCapability]:
    kind = draw(st.sampled_from(["mount", "block", "none"]))
    mode = draw(st.integers(-1, 12))
    capability = csi_pb2.VolumeCapability(
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode)  # type: ignore[arg-type]
    )
    if kind == "mount":
        capability.mount.fs_type = draw(st.one_of(st.sampled_from(["", "ext4", "xfs"]), text))
        capability.mount.mount_flags.extend(draw(st.lists(text, max_size=2)))
    elif kind == "block":
        capability.block.SetInParent()
    return draw(st.lists(st.just(capability), max_size=2))


# --- the plugin and what it may touch ---------------------------------------------------------------


@dataclass
class Sandbox:
    plugin: RunningPlugin
    root: Path  # everything of the test: the plugin's directory, the sentinels, the node's paths
    sentinel: Path  # files the plugin must never touch, where hostile ids and paths would reach
    volume_id: str  # an encrypted volume (local-1)
    snapshot_id: str
    bao: OpenBao

    def node_path(self, suffix: str) -> str:
        """A path under root/node from a fuzzed suffix (which may hold NUL or be very long)."""
        return str(self.root / "node") + "/" + suffix


def tree_state(root: Path) -> dict[str, str]:
    """Every file and directory under root with its kind, mode and content hash."""
    found = {}
    for path in [root, *root.rglob("*")]:
        st_ = path.lstat()
        content = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        found[str(path.relative_to(root))] = f"{st_.st_mode:o} {content}"
    return found


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory, session_bao: OpenBao) -> Iterator[Sandbox]:
    root = tmp_path_factory.mktemp("fuzz")
    sentinel = root / "sentinel"
    for relative in ("precious", "etc/passwd", "a/precious", "a/b/config.json"):
        (sentinel / relative).parent.mkdir(parents=True, exist_ok=True)
        (sentinel / relative).write_text(f"keep {relative}")
    (root / "node").mkdir()
    # The state dir sits deep in the sentinel tree: "../../precious" from volumes/ would land on a sentinel.
    plugin_root = sentinel / "a" / "b" / "plugin"
    plugin_root.mkdir()
    entries = {
        "local-1": {"encryptionKMSType": "local", "keyFile": str(plugin_root / "kek-1")},
        "vault-kv": {"encryptionKMSType": "vault", **vault_login(plugin_root, session_bao.address, "0.5")},
    }
    (plugin_root / "kms-config.json").write_text(json.dumps(entries))
    with running_plugin(plugin_root, mode=Mode.ALL) as plugin:
        volume = plugin.create("pvc-fuzz", 16 * MiB, {"encrypted": "true", "encryptionKMSID": "local-1"})
        snapshot = plugin.snapshot("snap-fuzz", volume.volume_id)
        yield Sandbox(plugin, root, sentinel, volume.volume_id, snapshot.snapshot_id, session_bao)


@pytest.fixture
def untouched(sandbox: Sandbox) -> Iterator[None]:
    """The plugin writes only under its own directory and the node's paths, and the sentinels stay."""
    plugin_dir = sandbox.plugin.kms_config.parent
    relative = str(plugin_dir.relative_to(sandbox.sentinel))
    before = {k: v for k, v in tree_state(sandbox.sentinel).items() if not k.startswith(relative)}
    FILE_AUDIT.install()
    FILE_AUDIT.writes.clear()
    FILE_AUDIT.recording = True
    try:
        yield
    finally:
        FILE_AUDIT.recording = False
    # The loop ioctls open /dev/loop-control and the volume's loop device read-write, as losetup did.
    loop_devices = Path("/dev").glob("loop*")
    assert FILE_AUDIT.outside(plugin_dir, sandbox.root / "node", *loop_devices) == []
    after = {k: v for k, v in tree_state(sandbox.sentinel).items() if not k.startswith(relative)}
    assert after == before


def test_the_file_audit_sees_the_plugins_writes(sandbox: Sandbox, untouched: None) -> None:
    """The check above is only as good as the audit: a volume's creation must show up in it."""
    volume = sandbox.plugin.create(f"pvc-audit-{uuid.uuid4().hex}", MiB, {"encrypted": "false"})
    written = {path for _, path in FILE_AUDIT.writes}
    directory = sandbox.plugin.state_dir / "volumes" / volume.volume_id
    assert str(directory) in written and any(p.startswith(str(directory) + "/.meta.json") for p in written)
    sandbox.plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))
    assert FILE_AUDIT.outside(Path("/nonexistent")), "every write counts as outside another directory"


def answer(sandbox: Sandbox, method: str, request: Message) -> grpc.StatusCode:
    plugin = sandbox.plugin
    service = plugin.node if method.startswith("Node") else plugin.controller
    try:
        getattr(service, method)(request)
    except grpc.RpcError as exc:
        assert exc.code() in DOCUMENTED_CODES, (method, exc.code(), exc.details())
        assert len(exc.details().encode()) <= 2048, (method, "status message not capped")
        return exc.code()
    return grpc.StatusCode.OK


def object_ids(sandbox: Sandbox) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from([sandbox.volume_id, sandbox.snapshot_id]), text)


# --- controller ---------------------------------------------------------------------------------------


@pytest.mark.usefixtures("untouched")
@FUZZ
@given(data=st.data())
def test_create_and_delete_volume(sandbox: Sandbox, data: st.DataObject) -> None:
    request = csi_pb2.CreateVolumeRequest(
        name=data.draw(text, "name"),
        volume_capabilities=data.draw(capabilities(), "capabilities"),
        parameters=data.draw(parameters, "parameters"),
        secrets=data.draw(secrets, "secrets"),
    )
    capacity = data.draw(capacity_ranges(), "capacity")
    if capacity is not None:
        request.capacity_range.CopyFrom(capacity)
    source = data.draw(st.sampled_from(["none", "snapshot", "volume"]), "source")
    if source == "snapshot":
        request.volume_content_source.snapshot.snapshot_id = data.draw(object_ids(sandbox), "source id")
    elif source == "volume":
        request.volume_content_source.volume.volume_id = data.draw(object_ids(sandbox), "source id")
    try:
        created = sandbox.plugin.controller.CreateVolume(request).volume.volume_id
    except grpc.RpcError as exc:
        assert exc.code() in DOCUMENTED_CODES, (exc.code(), exc.details())
        return
    delete = csi_pb2.DeleteVolumeRequest(volume_id=created, secrets=request.secrets)
    assert answer(sandbox, "DeleteVolume", delete) == grpc.StatusCode.OK


@pytest.mark.usefixtures("untouched")
@FUZZ
@given(data=st.data())
def test_other_controller_calls(sandbox: Sandbox, data: st.DataObject) -> None:
    ids = object_ids(sandbox)
    capacity = data.draw(capacity_ranges(), "capacity")
    requests: list[tuple[str, Message]] = [
        ("ControllerExpandVolume", csi_pb2.ControllerExpandVolumeRequest(
            volume_id=data.draw(ids), capacity_range=capacity, secrets=data.draw(secrets))),
        ("ValidateVolumeCapabilities", csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id=data.draw(ids), volume_capabilities=data.draw(capabilities()),
            parameters=data.draw(parameters), volume_context=data.draw(parameters))),
        ("ListVolumes", csi_pb2.ListVolumesRequest(
            max_entries=data.draw(st.integers(-(2**31), 2**31 - 1)), starting_token=data.draw(text))),
        ("ListSnapshots", csi_pb2.ListSnapshotsRequest(
            max_entries=data.draw(st.integers(-(2**31), 2**31 - 1)), starting_token=data.draw(text),
            snapshot_id=data.draw(ids), source_volume_id=data.draw(ids))),
        ("GetCapacity", csi_pb2.GetCapacityRequest(
            volume_capabilities=data.draw(capabilities()), parameters=data.draw(parameters))),
        ("CreateSnapshot", csi_pb2.CreateSnapshotRequest(
            name=data.draw(text), source_volume_id=data.draw(ids), parameters=data.draw(parameters),
            secrets=data.draw(secrets))),
    ]  # fmt: skip
    for method, request in requests:
        answer(sandbox, method, request)
    # A snapshot made of the volume is deleted again; DeleteSnapshot and DeleteVolume of a drawn id
    # must not delete the module's own volume or snapshot.
    for snapshot in sandbox.plugin.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest()).entries:
        if snapshot.snapshot.snapshot_id != sandbox.snapshot_id:
            request = csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot.snapshot.snapshot_id)
            assert answer(sandbox, "DeleteSnapshot", request) == grpc.StatusCode.OK
    drawn = data.draw(text, "id to delete")
    answer(
        sandbox,
        "DeleteSnapshot",
        csi_pb2.DeleteSnapshotRequest(snapshot_id=drawn, secrets=data.draw(secrets)),
    )
    answer(sandbox, "DeleteVolume", csi_pb2.DeleteVolumeRequest(volume_id=drawn, secrets=data.draw(secrets)))
    sandbox.plugin.backend.get(sandbox.volume_id)
    sandbox.plugin.backend.get(sandbox.snapshot_id)


# --- node ---------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("untouched")
@FUZZ
@given(data=st.data())
def test_node_calls(sandbox: Sandbox, data: st.DataObject) -> None:
    ids = object_ids(sandbox)
    # Paths stay under the sandbox's node directory (a hostile absolute path would make NodeUnpublish
    # unmount what the CO named, by design); the suffix may hold "..", NUL, newlines or 10 kB.
    suffix = data.draw(st.one_of(text, st.sampled_from(["", "a/../b", "x" * 5000, "t\x00"])), "suffix")
    if ".." in suffix.split("/"):
        suffix = suffix.replace("..", "dots")  # never climbs out of node/
    path = sandbox.node_path(suffix)
    capability = data.draw(capabilities(), "capability")
    requests: list[tuple[str, Message]] = [
        ("NodeStageVolume", csi_pb2.NodeStageVolumeRequest(
            volume_id=data.draw(ids), staging_target_path=path,
            volume_capability=capability[0] if capability else None,
            secrets=data.draw(secrets), volume_context=data.draw(parameters))),
        ("NodePublishVolume", csi_pb2.NodePublishVolumeRequest(
            volume_id=data.draw(ids), staging_target_path=path, target_path=path + "-target",
            volume_capability=capability[0] if capability else None, readonly=data.draw(st.booleans()),
            secrets=data.draw(secrets))),
        ("NodeGetVolumeStats", csi_pb2.NodeGetVolumeStatsRequest(volume_id=data.draw(ids), volume_path=path)),
        ("NodeExpandVolume", csi_pb2.NodeExpandVolumeRequest(
            volume_id=data.draw(ids), volume_path=path, capacity_range=data.draw(capacity_ranges()),
            secrets=data.draw(secrets))),
        ("NodeUnpublishVolume", csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=data.draw(ids), target_path=path + "-target")),
        ("NodeUnstageVolume", csi_pb2.NodeUnstageVolumeRequest(
            volume_id=data.draw(ids), staging_target_path=path)),
    ]  # fmt: skip
    for method, request in requests:
        answer(sandbox, method, request)


# --- KMS entries ----------------------------------------------------------------------------------------

TIMEOUTS = ["nan", "inf", "-inf", "1e400", "1e300", "-1", "0", "abc", "", " 1", "1e-9", "0.5", "1_0"]
DEADLINES = ["nan", "inf", "1e400", "-1", "0", "abc", "", "1e-9", "0.2"]  # valid ones stay short
FLAGS = ["true", "false", "", "yes", "TRUE", "\x00"]


@st.composite
def kms_entries(draw: st.DrawFn, bao: OpenBao, root: Path) -> dict[str, str]:
    kind = draw(st.sampled_from(["local", "metadata", "secrets", "vault", "vault-transit", "nope", ""]))
    entry: dict[str, str] = {"encryptionKMSType": kind}
    if kind == "local":
        entry["keyFile"] = draw(
            st.one_of(
                st.sampled_from(
                    ["relative/kek", str(root), str(root / "kek\x00"), str(root / "deep/er/kek")]
                ),
                text.map(lambda t: str(root / "keys") + "/" + t.replace("..", "dots")),
            )
        )
    elif kind.startswith("vault"):
        address = draw(
            st.sampled_from(
                [bao.address, "http://", "http://a b", f"http://127.0.0.1:{free_port()}", "https://[::1",
                 "http://127.0.0.1:99999", "ftp://x", "http://\u00e9.example", "http://u:p@h",
                 bao.address + "?q"]
            )
        )  # fmt: skip
        entry.update({"vaultAddress": address, "vaultTimeout": draw(st.sampled_from(TIMEOUTS))})
        entry["vaultRetryDeadline"] = draw(st.sampled_from(DEADLINES))
        login = draw(st.sampled_from(["token", "role", "none", "two"]))
        token_file = str(root / "token")
        if login in ("token", "two"):
            entry["vaultTokenFile"] = draw(
                st.sampled_from([token_file, token_file + "\x00", "/nonexistent", "rel"])
            )
        if login in ("role", "two"):
            entry["vaultRole"] = draw(text)
            entry["vaultServiceAccountTokenFile"] = str(root / "not-a-jwt")
        for key in (
            "vaultNamespace",
            "vaultBackendPath",
            "vaultPassphrasePath",
            "vaultTransitKey",
            "vaultBackend",
        ):
            if draw(st.booleans()):
                entry[key] = draw(text)
        for key in ("vaultCAVerify", "vaultDestroyKeys", "vaultTransitDerivedKey"):
            if draw(st.booleans()):
                entry[key] = draw(st.sampled_from(FLAGS))
    extra = draw(st.dictionaries(text, text, max_size=2))
    return {**extra, **entry}


@pytest.mark.usefixtures("untouched")
@FUZZ
@given(data=st.data())
def test_malformed_kms_entries(sandbox: Sandbox, data: st.DataObject) -> None:
    plugin = sandbox.plugin
    root = plugin.kms_config.parent
    (root / "not-a-jwt").write_text("not a JWT\n")
    entry = data.draw(kms_entries(sandbox.bao, root / "fuzz-kms"), "entry")
    config = json.loads(plugin.kms_config.read_text())
    config["fuzz"] = entry
    replacement = plugin.kms_config.with_suffix(".new")
    replacement.write_text(json.dumps(config))
    os.replace(replacement, plugin.kms_config)  # a new inode: the plugin notices at its next call
    request = csi_pb2.CreateVolumeRequest(
        name=f"pvc-kms-{uuid.uuid4().hex}",
        capacity_range=csi_pb2.CapacityRange(required_bytes=MiB),
        volume_capabilities=[mount_capability()],
        parameters={"encrypted": "true", "encryptionKMSID": "fuzz"},
        secrets=data.draw(secrets, "secrets"),
    )
    volumes_before = {v.volume_id for v in plugin.backend.list()}
    try:
        volume_id = plugin.controller.CreateVolume(request).volume.volume_id
    except grpc.RpcError as exc:
        assert exc.code() in DOCUMENTED_CODES, (exc.code(), exc.details())
        assert {v.volume_id for v in plugin.backend.list()} == volumes_before  # nothing half-made
        return
    answer(sandbox, "DeleteVolume", csi_pb2.DeleteVolumeRequest(volume_id=volume_id, secrets=request.secrets))


# Regression cases: each of these answered INTERNAL before (ValueError, OverflowError, InvalidURL and
# InvalidHeader from deep inside requests or the file system).
BROKEN_ENTRIES = {
    "Vault timeout NaN": {"vaultTimeout": "nan"},
    "Vault timeout infinite": {"vaultTimeout": "inf"},
    "Vault retry deadline 1e400": {"vaultRetryDeadline": "1e400"},
    "Vault address without a host": {"vaultAddress": "http://"},
    "Vault address with a bad port": {"vaultAddress": "http://127.0.0.1:99999"},
    "Vault address with a blank": {"vaultAddress": "http://a b"},
    "Vault namespace with a newline": {"vaultNamespace": "team\nX-Evil: 1"},
}
# A NUL byte in any value (a key file or token file path: ValueError from open()) is refused with the
# whole file, like any malformed entry: at start-up, or for an edit, keeping the last good configuration.
NUL_ENTRIES = {
    "local key file": {"encryptionKMSType": "local", "keyFile": "/x/kek\x00"},
    "Vault token file": {
        "encryptionKMSType": "vault",
        "vaultAddress": "http://v",
        "vaultTokenFile": "/x\x00",
    },
}


@pytest.mark.parametrize("broken", BROKEN_ENTRIES.values(), ids=BROKEN_ENTRIES.keys())
def test_broken_kms_entries_are_invalid_arguments(
    tmp_path: Path, session_bao: OpenBao, broken: dict[str, str]
) -> None:
    root = tmp_path / "plugin"
    root.mkdir()
    entry = {"encryptionKMSType": "vault", **vault_login(root, session_bao.address, "0.5"), **broken}
    (root / "kms-config.json").write_text(json.dumps({"broken": entry}))
    with running_plugin(root, mode=Mode.CONTROLLER) as plugin:
        with pytest.raises(grpc.RpcError) as info:
            plugin.create("pvc-broken", MiB, {"encrypted": "true", "encryptionKMSID": "broken"})
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert plugin.backend.list() == []


@pytest.mark.parametrize("broken", NUL_ENTRIES.values(), ids=NUL_ENTRIES.keys())
def test_a_nul_byte_in_a_kms_entry_is_a_configuration_error(tmp_path: Path, broken: dict[str, str]) -> None:
    config = tmp_path / "kms-config.json"
    config.write_text(json.dumps({"broken": broken}))
    with pytest.raises(KMSConfigError, match=r"'broken'.*NUL byte"):
        KMSConfig.from_file(config)


def test_a_token_that_is_no_header_is_refused_without_showing_it(
    tmp_path: Path, session_bao: OpenBao
) -> None:
    root = tmp_path / "plugin"
    root.mkdir()
    entry = {"encryptionKMSType": "vault", **vault_login(root, session_bao.address, "0.5")}
    secret_part = f"s.{uuid.uuid4().hex}"
    (root / "token").write_text(f"root\n{secret_part}\n")  # two lines: not a header value
    (root / "kms-config.json").write_text(json.dumps({"vault": entry}))
    with running_plugin(root, mode=Mode.CONTROLLER) as plugin, pytest.raises(grpc.RpcError) as info:
        plugin.create("pvc-token", MiB, {"encrypted": "true", "encryptionKMSID": "vault"})
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert secret_part not in info.value.details()


def test_a_target_path_with_blanks_and_stacked_mounts_is_unpublished(
    sandbox: Sandbox, untouched: None
) -> None:
    """mountinfo writes a blank as \\040: before, such a target never looked mounted, so NodeUnpublish left
    the mount (and NodeStage would have mounted a second time)."""
    target = sandbox.root / "node" / "a target\twith blanks"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "none", str(target)], check=True)
    # And a second mount on top: one umount left the path busy (rmdir: EBUSY, INTERNAL).
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "none", str(target)], check=True)
    try:
        request = csi_pb2.NodeUnpublishVolumeRequest(volume_id=sandbox.volume_id, target_path=str(target))
        assert answer(sandbox, "NodeUnpublishVolume", request) == grpc.StatusCode.OK
        assert not target.exists()  # unmounted, then the empty directory removed
    finally:
        for _ in range(2):
            subprocess.run(["umount", str(target)], check=False, capture_output=True)


def rbd_images(ceph: CephCluster) -> list[str]:
    return sorted(json.loads(ceph.run("rbd", "ls", "--format", "json", ceph.pool) or "[]"))


# --- RBD: the request's cephx credentials and the cluster parameters reach a key file and rbd's argv --------


@pytest.fixture(scope="module")
def rbd_sandbox(
    tmp_path_factory: pytest.TempPathFactory, ceph: CephCluster, ceph_config: Path
) -> Iterator[RunningPlugin]:
    with running_plugin(
        tmp_path_factory.mktemp("fuzz-rbd"), mode=Mode.CONTROLLER, ceph_config=ceph_config
    ) as plugin:
        yield plugin


@FUZZ
@given(data=st.data())
def test_rbd_requests_with_malformed_credentials_and_parameters(
    rbd_sandbox: RunningPlugin, ceph: CephCluster, ceph_secrets: dict[str, str], data: st.DataObject
) -> None:
    def mostly(valid: str, *others: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        return st.one_of(st.just(valid), st.just(valid), st.just(valid), text, *others)

    key = ceph_secrets["userKey"]
    wrong_key = base64.b64encode(bytes(range(40))).decode()  # well formed, refused by the cluster
    credentials = {
        "userID": data.draw(mostly(ceph_secrets["userID"], st.just("client.admin")), "userID"),
        "userKey": data.draw(mostly(key, st.just(wrong_key), st.just(key + "\n[x]\nkey = y")), "userKey"),
    }
    credentials = {k: v for k, v in credentials.items() if v or data.draw(st.booleans())}
    parameters = {
        "clusterID": data.draw(mostly(CLUSTER_ID), "clusterID"),
        "pool": data.draw(mostly(ceph.pool), "pool"),
        **data.draw(
            st.dictionaries(st.sampled_from(["dataPool", "imageFeatures", "mounter"]), text, max_size=1)
        ),
    }
    images_before = rbd_images(ceph)
    FILE_AUDIT.install()
    FILE_AUDIT.writes.clear()
    FILE_AUDIT.recording = True
    try:
        request = csi_pb2.CreateVolumeRequest(
            name=f"pvc-rbd-fuzz-{uuid.uuid4().hex}", capacity_range=csi_pb2.CapacityRange(required_bytes=MiB),
            volume_capabilities=[mount_capability()], parameters=parameters, secrets=credentials,
        )  # fmt: skip
        try:
            volume_id = rbd_sandbox.controller.CreateVolume(request, timeout=120).volume.volume_id
        except grpc.RpcError as exc:
            assert exc.code() in DOCUMENTED_CODES, (exc.code(), exc.details())
            assert rbd_images(ceph) == images_before
        else:
            delete = csi_pb2.DeleteVolumeRequest(volume_id=volume_id, secrets=ceph_secrets)
            rbd_sandbox.controller.DeleteVolume(delete, timeout=120)
    finally:
        FILE_AUDIT.recording = False
    # Every key directory made for the call is gone, and nothing was written outside the plugin's.
    key_dirs = {path for event, path in FILE_AUDIT.writes if event == "tempfile.mkdtemp"}
    assert [d for d in key_dirs if os.path.exists(d)] == []
    assert FILE_AUDIT.outside(rbd_sandbox.state_dir.parent, *(Path(d) for d in key_dirs)) == []

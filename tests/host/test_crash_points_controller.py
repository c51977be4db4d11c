"""The controller's crash points, each one: a `csi-luks serve` process with CSI_LUKS_CRASH_POINT set makes
the call and is SIGKILLed there; a plugin without it retries the same call, which must give the answer an
uninterrupted call gives, with the data intact, no DEK orphaned or missing, and nothing left of a deleted
volume. On the standalone backend with the `local`, `vault` (OpenBao) and `kmip` (PyKMIP) KMS, and on the
host's Ceph.

The cases come from tests/support/crash_harness.py, whose points tests/unit/test_crash_points.py checks
against the code.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest.mock import patch

import grpc
import hvac.exceptions
import pytest

from csi_luks import kube as plugin_kube
from csi_luks.csi import csi_pb2, csi_pb2_grpc
from csi_luks.encryption import volume_encryption
from csi_luks.kms.base import KMSContext
from csi_luks.kms.config import KMSConfig
from csi_luks.settings import Mode
from csi_luks.volume_metadata import CAPACITY, DELETING, STATE, backing_bytes
from csi_luks.volumes.base import VolumeBackend, VolumeNotFound
from csi_luks.volumes.ceph_clusters import CephClusters
from csi_luks.volumes.rbd import RbdBackend, decode_volume_id
from tests.support.crash_harness import CONFIGS, controller_cases, killed_at, serve_argv
from tests.support.openbao import OpenBao
from tests.support.operations import Volumes, breadth_entries, vault_login, write_kubeconfig
from tests.support.plugin import MiB, RunningPlugin, mount_capability, running_plugin

SIZE = 16 * MiB
KV_PATH = "crash-harness"
Request = Any  # a CSI request message
Call = Callable[[csi_pb2_grpc.ControllerStub], Any]


@dataclass
class Harness:
    """One backend and KMS: a retry plugin (in this process), a source volume and its snapshot."""

    name: str
    root: Path
    kms_id: str
    plugin: RunningPlugin
    backend: VolumeBackend
    volumes: Volumes  # the KMS configuration and, on the standalone backend, cryptsetup on image files
    argv: list[str]  # `csi-luks serve` for the process that is killed
    secrets: dict[str, str]
    parameters: dict[str, str]
    ceph: Any = None  # tests.support.ceph.CephCluster on rbd
    bao: OpenBao | None = None
    alive: set[str] = field(default_factory=set)  # the objects that must exist, complete
    made: set[str] = field(default_factory=set)  # every object id ever made here
    source_id: str = ""
    snapshot_id: str = ""
    sources: dict[str, tuple[int, str, bytes, str, str]] = field(default_factory=dict)
    covered: list[str] = field(default_factory=list)  # "scenario point", as they were run

    # --- what is stored ---

    def record(self, object_id: str) -> dict[str, str]:
        return dict(self.backend.get(object_id).metadata)

    def dek(self, object_id: str) -> str:
        context = KMSContext(secrets=self.secrets, pvc_namespace=None)
        config = KMSConfig.from_file(str(self.volumes.kms_config))
        return volume_encryption(config, self.kms_id, context, self.backend).get_passphrase(object_id)

    def content(self, object_id: str, length: int) -> str:
        if self.ceph is None:
            with open(self.backend.image_path(object_id), "rb") as image:  # type: ignore[attr-defined]
                return hashlib.sha256(image.read(length)).hexdigest()
        data = subprocess.run(
            ["rbd", "export", "--no-progress", decode_volume_id(object_id).spec, "-"],
            env=self.ceph.env(), capture_output=True, check=True, timeout=120,
        ).stdout  # fmt: skip
        return hashlib.sha256(data[:length]).hexdigest()

    def stored(self) -> set[str]:
        """The names the backend holds: standalone volume directories (trash too), or rbd images and
        RADOS objects of the pool."""
        if self.ceph is None:
            volumes = self.root / "state" / "volumes"
            return {p.name for p in volumes.iterdir()} if volumes.exists() else set()
        pool = self.ceph.pool
        images = json.loads(self.ceph.run("rbd", "ls", "--format", "json", pool) or "[]")
        return set(images) | set(self.ceph.run("rados", "--pool", pool, "ls").split())

    def traces(self, object_id: str, stored: set[str] | None = None) -> list[str]:
        """Whatever the backend holds of an object (complete or not): files, images, header objects."""
        stored = self.stored() if stored is None else stored
        if self.ceph is None:
            return sorted(name for name in stored if object_id in name)
        image = decode_volume_id(object_id).image
        return sorted(name for name in stored if name in (image, f"csi-luks-header.{image}"))

    def vault_deks(self) -> set[str]:
        assert self.bao is not None
        try:
            listed = self.bao.client().secrets.kv.v2.list_secrets(path=KV_PATH, mount_point="secret")
        except hvac.exceptions.InvalidPath:
            return set()
        return {str(key) for key in listed["data"]["keys"]}

    def assert_consistent(self, fixed_too: bool = False) -> None:
        """Exactly the live objects exist, complete, each with its DEK; no DEK without an object.
        (The source and its snapshot are checked at the start and the end.)"""
        stored = self.stored()
        for object_id in self.made - self.alive:
            left = self.traces(object_id, stored)
            assert left == [], f"{object_id} was deleted but left {left}"
        for object_id in self.alive - (set() if fixed_too else {self.source_id, self.snapshot_id}):
            assert self.record(object_id)[STATE] in ("prepared", "encrypted")
            self.dek(object_id)  # found, and unwraps
        if self.bao is not None:
            assert self.vault_deks() == self.alive, "Vault's DEKs and the volumes differ"
        if self.ceph is not None:  # no copy snapshot left on a source
            for object_id in {self.source_id, self.snapshot_id} & self.alive:
                snaps = self.ceph.run(
                    "rbd", "snap", "ls", "--format", "json", decode_volume_id(object_id).spec
                )
                assert json.loads(snaps or "[]") == [], snaps

    # --- calls ---

    def create_request(self, name: str, source: csi_pb2.VolumeContentSource | None = None) -> Request:
        request = csi_pb2.CreateVolumeRequest(
            name=name,
            volume_capabilities=[mount_capability()],
            parameters=self.parameters,
            secrets=self.secrets,
        )
        if source is None:
            request.capacity_range.required_bytes = SIZE
        else:
            request.volume_content_source.CopyFrom(source)
        return request

    def retry(self, call: Call) -> Any:
        return call(self.plugin.controller)

    def make_volume(self, name: str) -> str:
        volume_id: str = self.retry(lambda c: c.CreateVolume(self.create_request(name))).volume.volume_id
        self.alive.add(volume_id)
        self.made.add(volume_id)
        return volume_id

    def delete(self, object_id: str, snapshot: bool = False) -> None:
        if snapshot:
            self.retry(
                lambda c: c.DeleteSnapshot(
                    csi_pb2.DeleteSnapshotRequest(snapshot_id=object_id, secrets=self.secrets)
                )
            )
        else:
            self.retry(
                lambda c: c.DeleteVolume(
                    csi_pb2.DeleteVolumeRequest(volume_id=object_id, secrets=self.secrets)
                )
            )
        self.alive.discard(object_id)
        assert self.traces(object_id) == []

    def format_with_data(self, volume_id: str) -> None:
        """What a first NodeStage and a workload leave: a LUKS header, its backup, state `encrypted`,
        and bytes after the header (rbd: a pattern, and a header backup object)."""
        if self.ceph is None:
            self.volumes.format(volume_id)
            with open(self.backend.image_path(volume_id), "r+b") as image:  # type: ignore[attr-defined]
                image.seek(SIZE // 2 + 16 * MiB)
                image.write(os.urandom(MiB))
        else:
            spec = decode_volume_id(volume_id).spec
            self.ceph.run("rbd", "bench", "--io-type", "write", "--io-size", "64K", "--io-total", "1M",
                          "--io-pattern", "rand", spec)  # fmt: skip
            self.backend.store_header_backup(volume_id, os.urandom(4096))


@contextmanager
def _kube_secrets(request: pytest.FixtureRequest, root: Path) -> Iterator[dict[str, dict[str, str]]]:
    """The kmip entries, their Secret on the test API server, read with the plugin's ServiceAccount:
    through $KUBECONFIG in the plugin processes, through the plugin's client in this one."""
    env = request.getfixturevalue("kms_env")
    entries = breadth_entries(env, request.getfixturevalue("session_kmip"), None)
    kubeconfig = write_kubeconfig(root, env.kube, env.node_token_file)
    with patch.dict(os.environ, {"KUBECONFIG": str(kubeconfig)}):
        plugin_kube.set_api_client(env.kube.api_client(env.node_token_file.read_text()))
        try:
            yield entries
        finally:
            plugin_kube.set_api_client(None)


def _entries(root: Path, bao: OpenBao | None) -> dict[str, dict[str, str]]:
    entries = {"local-1": {"encryptionKMSType": "local", "keyFile": str(root / "kek-1")}}
    if bao is not None:
        entries["vault-kv"] = {
            "encryptionKMSType": "vault",
            "vaultPassphrasePath": f"{KV_PATH}/",
            **vault_login(root, bao.address),
        }
    return entries


@contextmanager
def _harness(name: str, request: pytest.FixtureRequest, root: Path) -> Iterator[Harness]:
    config = CONFIGS[name]
    bao = request.getfixturevalue("session_bao") if config.kms_id.startswith("vault") else None
    with ExitStack() as stack:
        entries = _entries(root, bao)
        if config.kms_id.startswith("kmip"):
            entries |= stack.enter_context(_kube_secrets(request, root))
        yield stack.enter_context(_harness_over(name, request, root, Volumes(root, entries), bao))


@contextmanager
def _harness_over(
    name: str, request: pytest.FixtureRequest, root: Path, volumes: Volumes, bao: OpenBao | None
) -> Iterator[Harness]:
    config = CONFIGS[name]
    parameters = {"encrypted": "true", "encryptionKMSID": config.kms_id}
    extra = ["--mode", "controller"]
    ceph, secrets, ceph_config = None, {}, None
    backend: VolumeBackend = volumes.backend
    if config.backend == "rbd":
        ceph = request.getfixturevalue("ceph")
        ceph_config = request.getfixturevalue("ceph_config")
        secrets = {"userID": ceph.csi.id, "userKey": ceph.csi.key}  # as the ceph_secrets fixture
        parameters.update(clusterID="test-cluster", pool=ceph.pool)
        extra += ["--backend", "rbd", "--ceph-config", str(ceph_config)]
        backend = RbdBackend(CephClusters(str(ceph_config)), root / "rbd-state").for_request(secrets)
    argv = serve_argv(root / "crash.sock", volumes.state_dir, volumes.kms_config, *extra)
    with running_plugin(
        root, Mode.CONTROLLER, state_dir=volumes.state_dir, ceph_config=ceph_config
    ) as plugin:
        h = Harness(name, root, config.kms_id, plugin, backend, volumes, argv, secrets, parameters, ceph, bao)
        h.source_id = h.make_volume(f"crash-{name}-source")
        h.format_with_data(h.source_id)
        snapshot = h.retry(
            lambda c: c.CreateSnapshot(
                csi_pb2.CreateSnapshotRequest(
                    name=f"crash-{name}-snap", source_volume_id=h.source_id, secrets=secrets
                )
            )
        ).snapshot
        h.snapshot_id = snapshot.snapshot_id
        h.alive.add(h.snapshot_id)
        h.made.add(h.snapshot_id)
        h.assert_consistent(fixed_too=True)
        yield h
        print(f"\n{name}: {len(h.covered)} kills at the crash points {', '.join(sorted(set(h.covered)))}")
        h.assert_consistent(fixed_too=True)
        h.delete(h.snapshot_id, snapshot=True)
        h.delete(h.source_id)
        h.assert_consistent()


@pytest.fixture(scope="module")
def harnesses(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[str], Harness]]:
    with ExitStack() as stack:
        made: dict[str, Harness] = {}

        def get(name: str) -> Harness:
            if name not in made:
                made[name] = stack.enter_context(_harness(name, request, tmp_path_factory.mktemp(name)))
            return made[name]

        yield get


# --- the scenarios: a call, and what its converged answer and state must be ------------------------------


def _copy_is_intact(h: Harness, copy_id: str, source_id: str) -> None:
    """The copy holds the source's bytes and header backup, and its own DEK is the source's, re-wrapped."""
    if source_id not in h.sources:  # the sources never change: read them once
        size = h.backend.get(source_id).size_bytes
        header = h.backend.fetch_header_backup(source_id)
        assert header is not None
        h.sources[source_id] = (
            size,
            h.content(source_id, size),
            header,
            h.dek(source_id),
            h.record(source_id)[STATE],
        )
    size, content, header, dek, state = h.sources[source_id]
    assert h.content(copy_id, size) == content
    assert h.backend.fetch_header_backup(copy_id) == header
    assert h.dek(copy_id) == dek
    assert h.record(copy_id)[STATE] == state
    if h.ceph is None:  # and that DEK opens the LUKS header the copy carries (real cryptsetup)
        assert h.volumes.opens(copy_id, h.dek(copy_id)) is not None


def _create(h: Harness, name: str, point: str, source: csi_pb2.VolumeContentSource | None) -> None:
    request = h.create_request(name, source)
    call: Call = lambda c: c.CreateVolume(request)  # noqa: E731
    crash(h, point, call)
    volume = h.retry(call).volume
    volume_id = h.backend.volume_id_for(name, h.parameters)
    h.made.add(volume_id)
    h.alive.add(volume_id)
    capacity = SIZE if source is None else int(h.record(h.source_id)[CAPACITY])
    assert volume == csi_pb2.Volume(
        volume_id=volume_id,
        capacity_bytes=capacity,
        volume_context={"encrypted": "true", "encryptionKMSID": h.kms_id},
        content_source=source,
    )
    assert h.backend.get(volume_id).size_bytes >= backing_bytes(capacity, True)
    if source is None:
        assert h.record(volume_id)[STATE] == "prepared"
    else:
        _copy_is_intact(h, volume_id, h.snapshot_id if source.HasField("snapshot") else h.source_id)
    h.assert_consistent()
    h.delete(volume_id)


def scenario_create(h: Harness, name: str, point: str) -> None:
    _create(h, name, point, None)


def scenario_restore(h: Harness, name: str, point: str) -> None:
    snapshot = csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=h.snapshot_id)
    _create(h, name, point, csi_pb2.VolumeContentSource(snapshot=snapshot))


def scenario_clone(h: Harness, name: str, point: str) -> None:
    volume = csi_pb2.VolumeContentSource.VolumeSource(volume_id=h.source_id)
    _create(h, name, point, csi_pb2.VolumeContentSource(volume=volume))


def scenario_snapshot(h: Harness, name: str, point: str) -> None:
    request = csi_pb2.CreateSnapshotRequest(name=name, source_volume_id=h.source_id, secrets=h.secrets)
    call: Call = lambda c: c.CreateSnapshot(request)  # noqa: E731
    crash(h, point, call)
    snapshot = h.retry(call).snapshot
    snapshot_id = h.backend.volume_id_for(name, {}, like=h.source_id, snapshot=True)
    h.made.add(snapshot_id)
    h.alive.add(snapshot_id)
    assert (snapshot.snapshot_id, snapshot.source_volume_id, snapshot.size_bytes, snapshot.ready_to_use) == (
        snapshot_id, h.source_id, int(h.record(h.source_id)[CAPACITY]), True
    )  # fmt: skip
    _copy_is_intact(h, snapshot_id, h.source_id)
    h.assert_consistent()
    h.delete(snapshot_id, snapshot=True)


def scenario_delete(h: Harness, name: str, point: str) -> None:
    volume_id = h.make_volume(name)
    h.format_with_data(volume_id)
    request = csi_pb2.DeleteVolumeRequest(volume_id=volume_id, secrets=h.secrets)
    call: Call = lambda c: c.DeleteVolume(request)  # noqa: E731
    crash(h, point, call)
    assert h.retry(call) == csi_pb2.DeleteVolumeResponse()
    h.alive.discard(volume_id)
    assert h.traces(volume_id) == []
    with pytest.raises(VolumeNotFound):
        h.backend.get(volume_id)
    h.assert_consistent()


def scenario_delete_in_use(h: Harness, name: str, point: str) -> None:
    """A delete of an attached volume, killed around its intent: the retry refuses, the DEK and the data
    stay, and no intent is left to refuse the volume's stages."""
    volume_id = h.make_volume(name)
    h.format_with_data(volume_id)
    content = h.content(volume_id, SIZE)
    dek = h.dek(volume_id)
    h.backend.attach(volume_id)
    try:
        request = csi_pb2.DeleteVolumeRequest(volume_id=volume_id, secrets=h.secrets)
        call: Call = lambda c: c.DeleteVolume(request)  # noqa: E731
        crash(h, point, call)
        with pytest.raises(grpc.RpcError) as info:
            h.retry(call)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value.details()
        assert "is in use" in info.value.details()
        assert DELETING not in h.record(volume_id)
        assert h.dek(volume_id) == dek and h.content(volume_id, SIZE) == content
        h.assert_consistent()
    finally:
        h.backend.detach(volume_id)
    h.delete(volume_id)


def scenario_expand(h: Harness, name: str, point: str) -> None:
    volume_id = h.make_volume(name)
    request = csi_pb2.ControllerExpandVolumeRequest(
        volume_id=volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=2 * SIZE), secrets=h.secrets
    )
    call: Call = lambda c: c.ControllerExpandVolume(request)  # noqa: E731
    crash(h, point, call)
    response = h.retry(call)
    assert response == csi_pb2.ControllerExpandVolumeResponse(
        capacity_bytes=2 * SIZE, node_expansion_required=True
    )
    assert h.record(volume_id)[CAPACITY] == str(2 * SIZE)
    assert h.backend.get(volume_id).size_bytes >= backing_bytes(2 * SIZE, True)
    h.assert_consistent()
    h.delete(volume_id)


SCENARIOS = {
    "create": scenario_create,
    "restore": scenario_restore,
    "clone": scenario_clone,
    "snapshot": scenario_snapshot,
    "delete": scenario_delete,
    "delete-in-use": scenario_delete_in_use,
    "expand": scenario_expand,
}


def crash(h: Harness, point: str, call: Call) -> None:
    h.covered.append(point)
    killed_at(
        point,
        h.argv,
        h.root / "crash.sock",
        {**os.environ},
        lambda channel: call(csi_pb2_grpc.ControllerStub(channel)),
    )


CASES = controller_cases()


@pytest.mark.parametrize(("config", "scenario", "point"), CASES, ids=["/".join(case) for case in CASES])
def test_a_controller_call_killed_at_a_crash_point_converges_on_retry(
    harnesses: Callable[[str], Harness], config: str, scenario: str, point: str
) -> None:
    h = harnesses(config)
    SCENARIOS[scenario](h, f"crash-{config}-{scenario}-{point}", point)


# A create the CO gives up on (it deletes the volume instead of retrying), killed where most is half-made.
ABANDONED = [
    ("standalone-local", "restore", "standalone-create.after-header-backup"),
    ("standalone-vault", "create", "prepare-key.after-new-dek"),  # a DEK in Vault, no state yet
    ("rbd-local", "restore", "rbd-create.after-header-backup"),
]


@pytest.mark.parametrize(
    ("config", "scenario", "point"), ABANDONED, ids=["/".join(case) for case in ABANDONED]
)
def test_a_create_given_up_after_a_crash_is_deleted_without_a_trace(
    harnesses: Callable[[str], Harness], config: str, scenario: str, point: str
) -> None:
    h = harnesses(config)
    name = f"crash-{config}-abandoned-{point}"
    snapshot = csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=h.snapshot_id)
    source = csi_pb2.VolumeContentSource(snapshot=snapshot) if scenario == "restore" else None
    request = h.create_request(name, source)
    crash(h, point, lambda c: c.CreateVolume(request))
    volume_id = h.backend.volume_id_for(name, h.parameters)
    h.made.add(volume_id)
    assert h.traces(volume_id) != []  # half a volume is there
    h.delete(volume_id)  # and DeleteVolume leaves nothing of it (and no DEK: assert_consistent)
    h.assert_consistent()

"""DeleteVolume never shreds the DEK of a volume that is attached or being staged (issue 19, item 3), on
the host: standalone volumes on real loop devices (a stage here fails after its attach, at the open: no
device-mapper; the VM tier runs the same cases with real stages on both backends), and an RBD image
watched by another client of the host's Ceph cluster (a mapping on another node).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_luks.settings import Mode
from csi_luks.volume_metadata import DELETING
from csi_luks.volumes.base import VolumeBackend
from csi_luks.volumes.ceph_clusters import CephClusters
from csi_luks.volumes.rbd import RbdBackend, decode_volume_id
from csi_luks.volumes.standalone import StandaloneBackend
from tests.support import delete_race
from tests.support.ceph import CephCluster
from tests.support.delete_race import Pauses, Race
from tests.support.plugin import running_plugin

LOCAL = {"encrypted": "true", "encryptionKMSID": "local-1"}


@pytest.fixture(scope="module")
def standalone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Race]:
    root = tmp_path_factory.mktemp("delete-race")
    with delete_race.two_plugins(root) as (controller, node):
        backend = controller.backend
        yield Race(
            controller, node, backend, root / "staging", LOCAL, stages=False,
            attached=lambda volume_id: backend.find_attachment(volume_id) is not None,
        )  # fmt: skip


@pytest.fixture
def intent_at_check(monkeypatch: pytest.MonkeyPatch) -> list[str | None]:
    """The intent each in-use check of the test found stored (spied on both backends)."""
    seen: list[str | None] = []
    for kind in (StandaloneBackend, RbdBackend):
        monkeypatch.setattr(kind, "in_use", _spy(kind.in_use, seen))
    return seen


def _spy(
    in_use: Callable[[Any, str], str | None], seen: list[str | None]
) -> Callable[[Any, str], str | None]:
    def spied(backend: VolumeBackend, volume_id: str) -> str | None:
        seen.append(backend.fresh_metadata(volume_id).get(DELETING))
        return in_use(backend, volume_id)

    return spied


def test_a_recorded_intent_refuses_the_stage(standalone: Race) -> None:
    delete_race.a_recorded_intent_refuses_the_stage(standalone, "race-intent")


def test_a_stage_after_the_delete_decided_is_refused(
    standalone: Race, monkeypatch: pytest.MonkeyPatch, intent_at_check: list[str | None]
) -> None:
    delete_race.a_stage_after_the_delete_decided_is_refused(
        standalone, Pauses(monkeypatch), "race-delete-first"
    )
    assert len(intent_at_check) == 1 and intent_at_check[0], "the intent was not stored before the check"


def test_a_delete_during_a_stage_is_refused_with_the_dek_intact(
    standalone: Race, monkeypatch: pytest.MonkeyPatch
) -> None:
    delete_race.a_delete_during_a_stage_is_refused(standalone, Pauses(monkeypatch), "race-stage-first")


def test_an_rbd_image_mapped_on_another_node_is_not_deleted(
    tmp_path: Path,
    ceph: CephCluster,
    ceph_config: Path,
    ceph_secrets: dict[str, str],
    intent_at_check: list[str | None],
) -> None:
    """A watcher on the image (what a krbd or rbd-nbd mapping on any node holds): the delete is refused
    naming it, the DEK and the data stay, the intent is taken back. (Before: only this machine's
    mappings were looked at; the DEK was shredded, then `rbd rm` refused the watched image.)"""
    with running_plugin(tmp_path, Mode.CONTROLLER, ceph_config=ceph_config) as plugin:
        backend = RbdBackend(CephClusters(str(ceph_config)), tmp_path / "view").for_request(
            ceph_secrets, one_request=False
        )
        parameters = {"clusterID": "test-cluster", "pool": ceph.pool, **LOCAL}
        race = Race(plugin, plugin, backend, tmp_path / "staging", parameters, ceph_secrets)
        volume_id = race.create("race-rbd-watched")
        dek = race.dek(volume_id)
        spec = decode_volume_id(volume_id).spec
        # `rbd watch` holds a watch on the image until a line on its stdin ends it.
        watcher = subprocess.Popen(
            ["rbd", "watch", spec], env=ceph.env(), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL
        )
        try:
            deadline = time.monotonic() + 60
            while '"watchers":[]' in ceph.run("rbd", "status", "--format", "json", spec).replace(" ", ""):
                assert time.monotonic() < deadline and watcher.poll() is None, "rbd watch did not watch"
                time.sleep(0.2)
            with pytest.raises(grpc.RpcError) as info:
                race.delete(volume_id)
            assert race.dek(volume_id) == dek and DELETING not in race.metadata(volume_id)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value.details()
            assert "has watchers" in info.value.details() and "nothing was deleted" in info.value.details()
            assert intent_at_check[-1], "the intent was not stored before the check"
        finally:
            watcher.communicate(b"\n", timeout=60)
        race.delete(volume_id)
        assert race.gone(volume_id)

"""DeleteVolume never shreds the DEK of a volume that is staged or being staged (issue 19, item 3), with
real stages (runs in the VM): standalone volumes on loop devices and RBD images mapped with krbd, each
with a controller and a node plugin as deployed (two servers, each its own locks).

The cases are in tests/support/delete_race.py (the host tier runs them on loop devices, where a stage
stops at the open); one pair of in-process plugins per backend serves them all.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from csi_luks.luks import Cryptsetup, mapper_name
from csi_luks.volumes.base import VolumeBackend
from csi_luks.volumes.ceph_clusters import CephClusters
from csi_luks.volumes.rbd import RbdBackend
from tests.support import delete_race
from tests.support.delete_race import Pauses, Race

pytestmark = pytest.mark.timeout(900)
LOCAL = {"encrypted": "true", "encryptionKMSID": "local-1"}


@pytest.fixture(scope="module")
def race(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Race]:
    root = tmp_path_factory.mktemp(f"delete-race-{request.param}")
    ceph_config, secrets, parameters = None, {}, dict(LOCAL)
    if request.param == "rbd":
        ceph = request.getfixturevalue("ceph")
        ceph_config = request.getfixturevalue("ceph_config")
        secrets = {"userID": ceph.csi.id, "userKey": ceph.csi.key}
        parameters.update(clusterID="test-cluster", pool=ceph.pool)
    with delete_race.two_plugins(root, ceph_config) as (controller, node):
        backend: VolumeBackend = controller.backend
        if ceph_config is not None:
            view = RbdBackend(CephClusters(str(ceph_config)), root / "view")
            backend = view.for_request(secrets, one_request=False)
        attachments = node.server.backend  # this machine's loop devices or rbd mappings

        def attached(volume_id: str) -> bool:
            mapped = Cryptsetup().status(mapper_name(volume_id)).active
            return mapped or attachments.find_attachment(volume_id) is not None

        yield Race(controller, node, backend, root / "staging", parameters, secrets, True, attached)


# Each rbd call takes seconds under TCG: on RBD only the race where the stage must see the intent (its
# fresh read after the map). The order "stage, then delete" on RBD is the host's watched-image test (a
# mapping on another node) and test_rbd_node.py's refused delete of an image mapped here.
STANDALONE = pytest.mark.parametrize("race", ["standalone"], indirect=True)
BOTH = pytest.mark.parametrize("race", ["standalone", "rbd"], indirect=True)


@STANDALONE
def test_a_recorded_intent_refuses_the_stage(race: Race) -> None:
    delete_race.a_recorded_intent_refuses_the_stage(race, "vm-race-intent")


@BOTH
def test_a_stage_after_the_delete_decided_is_refused(race: Race, monkeypatch: pytest.MonkeyPatch) -> None:
    delete_race.a_stage_after_the_delete_decided_is_refused(race, Pauses(monkeypatch), "vm-race-delete-first")


@STANDALONE
def test_a_delete_during_a_stage_is_refused_and_the_stage_succeeds(
    race: Race, monkeypatch: pytest.MonkeyPatch
) -> None:
    delete_race.a_delete_during_a_stage_is_refused(race, Pauses(monkeypatch), "vm-race-stage-first")

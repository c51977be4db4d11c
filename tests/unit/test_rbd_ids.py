"""RBD volume ids, the Ceph cluster configuration and cephx credentials (no cluster needed)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from csi_luks.volumes.base import BackendRequestError, VolumeNotFound
from csi_luks.volumes.ceph_clusters import CephClusters, Credentials, client_config
from csi_luks.volumes.rbd import ImageRef, RbdBackend, decode_volume_id, encode_volume_id


@pytest.fixture
def clusters(tmp_path: Path) -> CephClusters:
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps(
            [
                {"clusterID": "ceph-1", "monitors": ["127.0.0.1:6789"]},
                {
                    "clusterID": "tenant-cluster",
                    "monitors": ["10.0.0.1:6789"],
                    "rbd": {"radosNamespace": "ns-a"},
                },
            ]
        )
    )
    return CephClusters(path)


@pytest.mark.parametrize(
    "ref",
    [
        ImageRef("ceph-1", "rbd", "", "csi-vol-0b6f6f8e-8f55-4a0e-bd4a-7c0e4c6a9d21"),
        ImageRef("a-b-c", "pool-with-dashes", "ns-1", "csi-vol-00000000-0000-5000-8000-000000000000"),
        ImageRef("x" * 63, "p" * 63, "n" * 63, "csi-vol-00000000-0000-5000-8000-000000000000"),
        ImageRef("ceph-1", "rbd", "", "csi-snap-0b6f6f8e-8f55-4a0e-bd4a-7c0e4c6a9d21"),
    ],
)
def test_volume_ids_round_trip(ref: ImageRef) -> None:
    volume_id = encode_volume_id(ref)
    assert decode_volume_id(volume_id) == ref
    assert len(encode_volume_id(ImageRef("c" * 20, "rbd", "", ref.image))) <= 128  # the CSI limit, typically


@pytest.mark.parametrize(
    "volume_id",
    [
        "",
        "sa-0b6f6f8e-8f55-4a0e-bd4a-7c0e4c6a9d21",
        "rbd-06ceph-1-03rbd-00-not-a-uuid",
        "rbd-ffceph",
        "rbd-06ceph-1",
        # Well formed, but a field that would reach rbd's argv as an option, or a path as "..".
        "rbd-06ceph-1-06--conf-00-0b6f6f8e-8f55-4a0e-bd4a-7c0e4c6a9d21",
        "rbd-02..-03rbd-00-0b6f6f8e-8f55-4a0e-bd4a-7c0e4c6a9d21",
        "rbd-snap-",
        "../../precious",
        "rbd-06ceph-1-03rbd-00-0b6f6f8e-8f55-4a0e-bd4a-7c0e4c6a9d21\n",
    ],
)
def test_foreign_ids_are_not_found(volume_id: str) -> None:
    with pytest.raises(VolumeNotFound):
        decode_volume_id(volume_id)


def test_ids_are_deterministic_placed_by_parameters_and_snapshots_sit_beside_their_source(
    clusters: CephClusters, tmp_path: Path
) -> None:
    backend = RbdBackend(clusters, tmp_path)
    one = backend.volume_id_for("pvc-1", {"clusterID": "ceph-1", "pool": "rbd"})
    assert one == backend.volume_id_for("pvc-1", {"clusterID": "ceph-1", "pool": "rbd"})
    assert one != backend.volume_id_for("pvc-1", {"clusterID": "ceph-1", "pool": "other"})
    tenant = decode_volume_id(backend.volume_id_for("pvc-1", {"clusterID": "tenant-cluster", "pool": "rbd"}))
    assert tenant.namespace == "ns-a"  # from the cluster configuration
    snapshot_id = backend.volume_id_for("pvc-1", {}, like=one, snapshot=True)
    snapshot = decode_volume_id(snapshot_id)
    assert (snapshot.cluster_id, snapshot.pool) == ("ceph-1", "rbd")
    # Named alike, apart all the same: ids and images of the two kinds never coincide.
    assert snapshot_id.startswith("rbd-snap-") and snapshot.image.startswith("csi-snap-")
    assert snapshot.image.removeprefix("csi-snap-") == decode_volume_id(one).image.removeprefix("csi-vol-")


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"pool": "rbd"}, "clusterID and pool"),
        ({"clusterID": "ceph-1"}, "clusterID and pool"),
        ({"clusterID": "nowhere", "pool": "rbd"}, "known: ceph-1, tenant-cluster"),
        ({"clusterID": "ceph-1", "pool": "bad/pool"}, "pool 'bad/pool' is not supported"),
    ],
)
def test_bad_placement_is_refused_with_a_message(
    clusters: CephClusters, tmp_path: Path, parameters: dict[str, str], message: str
) -> None:
    with pytest.raises(BackendRequestError, match=message):
        RbdBackend(clusters, tmp_path).volume_id_for("pvc", parameters)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{}", "JSON list"),
        ('[{"clusterID": "c"}]', "monitors"),
        ('[{"clusterID": "c", "monitors": ["a b"]}]', "monitors"),
        ("not json", "unreadable"),
    ],
)
def test_broken_cluster_configurations_name_the_problem(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(BackendRequestError, match=message):
        CephClusters(path).get("c")


def test_credentials_come_from_the_secrets_and_never_show() -> None:
    assert Credentials.from_secrets({}) is None
    credentials = Credentials.from_secrets({"userID": "csi", "userKey": "AQBsecretkey=="})
    assert credentials is not None and credentials.user == "csi"
    assert "AQBsecretkey" not in repr(credentials)
    with pytest.raises(BackendRequestError, match="not userKey"):
        Credentials.from_secrets({"userID": "csi"})


def test_client_config_keeps_the_key_in_a_private_file_removed_afterwards(clusters: CephClusters) -> None:
    credentials = Credentials("csi", "AQBsecretkey==")
    with client_config(clusters.get("ceph-1"), credentials) as argv:
        assert "AQBsecretkey==" not in " ".join(argv)
        keyfile = Path(argv[argv.index("--keyfile") + 1])
        assert keyfile.read_text() == "AQBsecretkey=="
        assert stat.S_IMODE(keyfile.stat().st_mode) == 0o600
        assert stat.S_IMODE(keyfile.parent.stat().st_mode) == 0o700
        if os.path.isdir("/dev/shm"):
            assert keyfile.parent.parent == Path("/dev/shm")  # RAM: the key never reaches a disk
        conf = Path(argv[argv.index("--conf") + 1]).read_text()
        assert "mon host = 127.0.0.1:6789" in conf
    assert not os.path.exists(keyfile.parent)


def test_calls_without_credentials_say_which_secrets_are_missing(
    clusters: CephClusters, tmp_path: Path
) -> None:
    backend = RbdBackend(clusters, tmp_path)
    volume_id = backend.volume_id_for("pvc", {"clusterID": "ceph-1", "pool": "rbd"})
    with pytest.raises(BackendRequestError, match="userID, userKey"):
        backend.get(volume_id)


@pytest.mark.parametrize("foreign", ["../../precious", "/elsewhere/config"])
def test_detach_never_builds_a_path_from_a_foreign_id(
    clusters: CephClusters, tmp_path: Path, foreign: str
) -> None:
    state = tmp_path / "state"
    (state / "rbd-attachments").mkdir(parents=True)
    # Where "<state>/rbd-attachments/<id>.json" lands for these ids.
    precious = tmp_path / "precious.json"
    precious.write_text("keep me")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "config.json").write_text("keep me too")
    volume_id = foreign if foreign.startswith("..") else str(elsewhere / "config")
    with pytest.raises(VolumeNotFound):
        RbdBackend(clusters, state).detach(volume_id)
    assert precious.read_text() == "keep me" and (elsewhere / "config.json").read_text() == "keep me too"

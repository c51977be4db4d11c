"""The session's Ceph cluster does what the RBD backend needs, as a non-admin cephx user with a keyfile."""

from __future__ import annotations

import json
import os
import stat
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.support.audit import ArgvAudit
from tests.support.ceph import CephCluster, CephError, CephUser


def _rbd(ceph: CephCluster, user: CephUser, *argv: str) -> str:
    return ceph.run("rbd", *argv, *user.args())


def _info(ceph: CephCluster, user: CephUser, spec: str) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(_rbd(ceph, user, "info", "--format", "json", spec))
    return info


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_csi_user_keyfile_is_private_and_not_admin(ceph: CephCluster) -> None:
    user = ceph.csi
    assert user.name == "client.csi"
    assert stat.S_IMODE(os.stat(user.keyfile).st_mode) == 0o600
    assert user.key != ceph.admin_key
    caps = json.loads(ceph.run("ceph", "auth", "get", user.name, "--format", "json"))[0]["caps"]
    assert caps == {"mon": "profile rbd", "osd": "profile rbd pool=rbd"}
    # Without the key nothing is allowed: cephx is enforced.
    wrong = user.keyfile.with_name("wrong.key")
    wrong.write_text(ceph.admin_key)
    wrong.chmod(0o600)
    with pytest.raises(CephError):
        ceph.run("rbd", "ls", ceph.pool, "--id", user.id, "--keyfile", str(wrong), timeout=30)


def test_image_metadata_snapshot_clone_flatten_resize(ceph: CephCluster) -> None:
    user = ceph.csi
    image = f"{ceph.pool}/{_name('vol')}"
    _rbd(ceph, user, "create", "--size", "64M", image)
    assert image.split("/")[1] in _rbd(ceph, user, "ls", ceph.pool).split()

    _rbd(ceph, user, "image-meta", "set", image, "csi.luks/wrapped-dek", "abc+/=")
    _rbd(ceph, user, "image-meta", "set", image, "csi.luks/kms", "vault")
    assert _rbd(ceph, user, "image-meta", "get", image, "csi.luks/wrapped-dek").strip() == "abc+/="
    listed = json.loads(_rbd(ceph, user, "image-meta", "list", "--format", "json", image))
    assert listed == {"csi.luks/wrapped-dek": "abc+/=", "csi.luks/kms": "vault"}
    _rbd(ceph, user, "image-meta", "remove", image, "csi.luks/kms")
    assert json.loads(_rbd(ceph, user, "image-meta", "list", "--format", "json", image)) == {
        "csi.luks/wrapped-dek": "abc+/="
    }

    _rbd(ceph, user, "snap", "create", f"{image}@snap1")
    _rbd(ceph, user, "snap", "protect", f"{image}@snap1")
    snaps = json.loads(_rbd(ceph, user, "snap", "ls", "--format", "json", image))
    assert [s["name"] for s in snaps] == ["snap1"]
    clone = f"{ceph.pool}/{_name('clone')}"
    _rbd(ceph, user, "clone", f"{image}@snap1", clone)
    parent = _info(ceph, user, clone)["parent"]
    assert (parent["image"], parent["snapshot"]) == (image.split("/")[1], "snap1")
    # A clone inherits its parent's image metadata: a backend keeping per-volume keys there must
    # overwrite them on the clone.
    assert json.loads(_rbd(ceph, user, "image-meta", "list", "--format", "json", clone)) == {
        "csi.luks/wrapped-dek": "abc+/="
    }
    _rbd(ceph, user, "flatten", clone)
    assert "parent" not in _info(ceph, user, clone)
    _rbd(ceph, user, "snap", "unprotect", f"{image}@snap1")
    _rbd(ceph, user, "snap", "rm", f"{image}@snap1")

    _rbd(ceph, user, "resize", "--size", "128M", clone)
    info = _info(ceph, user, clone)
    assert info["size"] == 128 * 1024 * 1024
    assert "layering" in info["features"]
    _rbd(ceph, user, "rm", clone)
    _rbd(ceph, user, "rm", image)


def test_image_data_round_trip(ceph: CephCluster, tmp_path: Path) -> None:
    user = ceph.csi
    image = f"{ceph.pool}/{_name('data')}"
    source = tmp_path / "in"
    source.write_bytes(os.urandom(4096) * 256)  # 1 MiB
    _rbd(ceph, user, "import", str(source), image)
    _rbd(ceph, user, "export", image, str(tmp_path / "out"))
    assert (tmp_path / "out").read_bytes() == source.read_bytes()
    _rbd(ceph, user, "rm", image)


def test_csi_user_is_confined_to_its_pool(ceph: CephCluster) -> None:
    pool = _name("other")
    ceph.create_pool(pool)
    scoped = ceph.create_user(
        f"client.{_name('scoped')}", {"mon": "profile rbd", "osd": f"profile rbd pool={pool}"}
    )
    _rbd(ceph, scoped, "create", "--size", "8M", f"{pool}/img")
    assert _rbd(ceph, scoped, "ls", pool).split() == ["img"]
    with pytest.raises(CephError, match=r"Operation not permitted"):
        _rbd(ceph, ceph.csi, "create", "--size", "8M", f"{pool}/img2")


def test_stop_and_start_keep_images_and_metadata(ceph: CephCluster) -> None:
    user = ceph.csi
    image = f"{ceph.pool}/{_name('durable')}"
    _rbd(ceph, user, "create", "--size", "32M", image)
    _rbd(ceph, user, "image-meta", "set", image, "marker", "kept")
    _rbd(ceph, user, "snap", "create", f"{image}@s")
    before = _info(ceph, user, image)
    ceph.stop()
    assert not ceph.running
    ceph.start()
    assert _info(ceph, user, image)["id"] == before["id"]
    assert _rbd(ceph, user, "image-meta", "get", image, "marker").strip() == "kept"
    assert [s["name"] for s in json.loads(_rbd(ceph, user, "snap", "ls", "--format", "json", image))] == ["s"]
    _rbd(ceph, user, "snap", "purge", image)
    _rbd(ceph, user, "rm", image)


def test_cephx_keys_are_audited(ceph: CephCluster, argv_audit: ArgvAudit) -> None:
    assert {ceph.admin_key, ceph.csi.key} <= argv_audit.ceph_keys
    assert any(spawn.argv[0] == "rbd" for spawn in argv_audit.ceph_spawns)
    assert argv_audit.leaks() == []

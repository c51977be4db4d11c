"""`csi-luks migrate` on the RBD backend, against the session's real Ceph cluster (the plugin's cephx user).

The host has no device-mapper and maps no RBD image, so a volume is formatted as its first NodeStage
would format it on a file of the image's size, and that file is written into the image's RADOS data
objects (`rados put`, admin). Its header is read back from Ceph with `rbd export` and test-opened with
cryptsetup on the exported file: the DEK the KMS gives after the migration opens the header that is in
the image, and the header backup object beside it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from csi_luks.crash import CRASH_POINT_ENV
from csi_luks.csi import csi_pb2
from csi_luks.kms.config import KMSConfig
from csi_luks.kms.dek_store import DEK_KEY
from csi_luks.locks import OperationLocks
from csi_luks.luks import FormatOptions
from csi_luks.operations.header_backup import refresh_header_backup
from csi_luks.operations.migration import MIGRATING_TO
from csi_luks.operations.tool import EXIT_OK, EXIT_USAGE, Tool
from csi_luks.services.controller import ControllerService
from csi_luks.volume_metadata import KMS_ID, STATE, EncryptionState
from csi_luks.volumes.ceph_clusters import CephClusters
from csi_luks.volumes.rbd import RbdBackend, decode_volume_id
from tests.support.ceph import CephCluster
from tests.support.ceph_fixtures import CLUSTER_ID
from tests.support.openbao import OpenBao
from tests.support.operations import vault_kv_has, vault_login
from tests.support.plugin import MiB, mount_capability

SIZE = 32 * MiB
# KMS ids of this test only: the session cluster's pool holds other tests' volumes.
SOURCE, TARGET = "rbd-migrate-local", "rbd-migrate-vault"


def _write_into_image(ceph: CephCluster, volume_id: str, data: bytes) -> None:
    """data at offset 0 of the image, object by object (a format-2 image without striping)."""
    ref = decode_volume_id(volume_id)
    info = json.loads(ceph.run("rbd", "info", "--format", "json", ref.spec))
    object_size = 1 << int(info["order"])
    for index in range(0, len(data) // object_size):
        chunk = data[index * object_size : (index + 1) * object_size]
        if any(chunk):
            path = Path(ceph.conf).parent / f"chunk-{ref.image}-{index}"
            path.write_bytes(chunk)
            ceph.run(
                "rados", "--pool", ref.pool, "put", f"{info['block_name_prefix']}.{index:016x}", str(path)
            )
            path.unlink()


def _exported(ceph: CephCluster, volume_id: str, tmp_path: Path, tag: str) -> str:
    path = tmp_path / f"{decode_volume_id(volume_id).image}-{tag}.img"
    ceph.run("rbd", "export", decode_volume_id(volume_id).spec, str(path))
    return str(path)


def _vault_has(bao: OpenBao, volume_id: str) -> bool:
    return vault_kv_has(bao, f"migrate-rbd/{volume_id}")


def test_migrate_on_rbd_moves_every_dek_and_resumes_after_a_kill(
    tmp_path: Path,
    ceph: CephCluster,
    ceph_config: Path,
    ceph_secrets: dict[str, str],
    session_bao: OpenBao,
) -> None:
    kms_config = tmp_path / "kms-config.json"
    vault = vault_login(tmp_path, session_bao.address, "2")
    kms_config.write_text(
        json.dumps(
            {
                SOURCE: {"encryptionKMSType": "local", "keyFile": str(tmp_path / "kek")},
                TARGET: {"encryptionKMSType": "vault", "vaultPassphrasePath": "migrate-rbd/", **vault},
            }
        )
    )
    secrets_file = tmp_path / "secrets.json"
    secrets_file.write_text(json.dumps(ceph_secrets))
    node_dir = tmp_path / "node"
    backend = RbdBackend(CephClusters(str(ceph_config)), node_dir)
    config = KMSConfig.from_file(str(kms_config))
    controller = ControllerService(backend, config, OperationLocks())
    tool = Tool(backend.for_request(ceph_secrets, one_request=False), config, secrets=ceph_secrets)
    parameters = {"clusterID": CLUSTER_ID, "pool": ceph.pool, "encrypted": "true", "encryptionKMSID": SOURCE}

    ids, deks = [], {}
    for n in range(2):
        volume_id = controller.CreateVolume(
            csi_pb2.CreateVolumeRequest(
                name=f"pvc-migrate-rbd-{n}",
                capacity_range=csi_pb2.CapacityRange(required_bytes=SIZE),
                volume_capabilities=[mount_capability()],
                parameters=parameters,
                secrets=ceph_secrets,
            ),
            None,
        ).volume.volume_id
        dek = tool.encryption(volume_id).get_passphrase(volume_id)
        # What the first NodeStage does on the mapped image: luksFormat, header backup, state.
        formatted = tmp_path / f"format-{n}.img"
        with formatted.open("wb") as f:
            f.truncate(SIZE)
        tool.cryptsetup.format(str(formatted), dek, FormatOptions())
        _write_into_image(ceph, volume_id, formatted.read_bytes())
        refresh_header_backup(tool.cryptsetup, tool.backend, volume_id, str(formatted))
        tool.backend.set_metadata(volume_id, STATE, EncryptionState.ENCRYPTED.value)
        assert tool.cryptsetup.slot_of(_exported(ceph, volume_id, tmp_path, "before"), dek) == 0
        ids.append(volume_id)
        deks[volume_id] = dek

    def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        storage = ["--backend", "rbd", "--ceph-config", str(ceph_config), "--state-dir", str(node_dir)]
        files = ["--kms-config", str(kms_config), "--secrets-file", str(secrets_file)]
        argv = [
            sys.executable,
            "-m",
            "csi_luks.cli",
            "migrate",
            *storage,
            *files,
            "--from",
            SOURCE,
            "--to",
            TARGET,
        ]
        return subprocess.run(
            [*argv, *args], capture_output=True, text=True, env=env, timeout=600, check=False
        )

    every = cli()  # every volume: the RBD backend cannot list them
    assert every.returncode == EXIT_USAGE and "the RBD backend cannot list volumes" in every.stderr

    # Killed after the first volume's kms-id switch, before FROM's wrapped DEK is removed from its metadata.
    crashed = cli(*ids, env={**os.environ, CRASH_POINT_ENV: "migration.after-switch"})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert tool.backend.get(ids[0]).metadata[KMS_ID] == TARGET
    assert tool.backend.get(ids[1]).metadata[KMS_ID] == SOURCE
    assert all(tool.encryption(v).get_passphrase(v) == deks[v] for v in ids)

    done = cli(*ids)
    assert done.returncode == EXIT_OK, done.stderr
    assert "2 migrated, 0 skipped, 0 failed" in done.stdout
    for volume_id in ids:
        metadata = tool.backend.get(volume_id).metadata
        assert metadata[KMS_ID] == TARGET and MIGRATING_TO not in metadata and DEK_KEY not in metadata
        assert _vault_has(session_bao, volume_id)
        dek = tool.encryption(volume_id).get_passphrase(volume_id)
        assert dek == deks[volume_id]
        assert tool.cryptsetup.slot_of(_exported(ceph, volume_id, tmp_path, "after"), dek) == 0
        backup = tmp_path / f"{volume_id}-backup.img"
        backup.write_bytes(tool.backend.fetch_header_backup(volume_id) or b"")
        assert tool.cryptsetup.slot_of(str(backup), dek) == 0

    again = cli(*ids)
    assert again.returncode == EXIT_OK and "0 migrated" in again.stdout
    for volume_id in ids:
        controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id, secrets=ceph_secrets), None)
        assert not _vault_has(session_bao, volume_id)

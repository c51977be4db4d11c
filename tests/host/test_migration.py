"""`csi-luks migrate --from --to`: every DEK moved, the volume opening throughout, resumable after a kill;
into and out of a KMIP server too."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from csi_luks.crash import CRASH_POINT_ENV
from csi_luks.kms.dek_store import DEK_KEY
from csi_luks.operations.migration import CRASH_POINTS, MIGRATING_TO, STAGED_DEK
from csi_luks.operations.tool import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from csi_luks.volume_metadata import KMS_ID
from tests.support.kmip_server import KMIPServer
from tests.support.kms_env import KmsEnv
from tests.support.openbao import OpenBao
from tests.support.operations import Volumes, breadth_entries, vault_kv_has, vault_login, write_kubeconfig

PAIRS = (
    ("local-1", "local-2"),
    ("local-1", "vault-kv"),
    ("vault-kv", "local-1"),
    ("vault-kv", "vault-transit"),
    ("metadata", "vault-kv"),
    ("metadata", "kmip-rpc"),  # into an HSM: the KMIP server wraps
    ("kmip-local", "vault-transit"),  # out of one: the key fetched (KMIP Get), the DEK unwrapped here
)
# The KMS ids that keep the wrapped DEK in the volume's metadata (`csi-luks/dek`); vault-kv keeps it
# in OpenBao's KV engine.
IN_METADATA = ("local-1", "local-2", "vault-transit", "metadata", "kmip-rpc", "kmip-local")
# metadata to metadata: between TO's copy put in place and the kms-id switch, FROM's id is recorded
# but TO's wrapped DEK is stored (the window the migration module documents).
_WINDOW = ("migration.after-write", "migration.before-switch")


@pytest.fixture
def volumes(
    tmp_path: Path,
    session_bao: OpenBao,
    kms_env: KmsEnv,
    session_kmip: KMIPServer,
    plugin_kube_client: None,
    monkeypatch: pytest.MonkeyPatch,
) -> Volumes:
    vault = vault_login(tmp_path, session_bao.address, "2")
    # The metadata type's passphrase is a Secret on the test kube-apiserver, read with the plugin's
    # ServiceAccount token: in this process through plugin_kube_client, in the CLI's through $KUBECONFIG.
    kms_env.put_secret(
        kms_env.tenant.namespace, "migrate-kek", {"encryptionPassphrase": "the KEK passphrase"}
    )
    monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path, kms_env.kube, kms_env.node_token_file)))
    return Volumes(
        tmp_path,
        {
            "local-1": {"encryptionKMSType": "local", "keyFile": str(tmp_path / "kek-1")},
            "local-2": {"encryptionKMSType": "local", "keyFile": str(tmp_path / "kek-2")},
            "vault-kv": {"encryptionKMSType": "vault", "vaultPassphrasePath": "migrate/", **vault},
            "vault-transit": {"encryptionKMSType": "vault-transit", "vaultTransitKey": "csi-kek", **vault},
            "metadata": {
                "encryptionKMSType": "metadata",
                "secretName": "migrate-kek",
                "secretNamespace": kms_env.tenant.namespace,
            },
            "secrets": {"encryptionKMSType": "secrets"},
            **breadth_entries(kms_env, session_kmip, None),
        },
        secrets={"encryptionPassphrase": "the shared passphrase of a secrets-type class"},
    )


def _vault_has(bao: OpenBao, volume_id: str) -> bool:
    return vault_kv_has(bao, f"migrate/{volume_id}")


def _assert_moved(volumes: Volumes, bao: OpenBao, volume_id: str, dek: str, source: str, target: str) -> None:
    metadata = volumes.backend.get(volume_id).metadata
    assert metadata[KMS_ID] == target
    assert MIGRATING_TO not in metadata and STAGED_DEK not in metadata
    assert volumes.dek(volume_id) == dek and volumes.opens(volume_id, dek) == 0
    assert (DEK_KEY in metadata) == (target in IN_METADATA)
    assert _vault_has(bao, volume_id) == (target == "vault-kv")


@pytest.mark.parametrize(("source", "target"), PAIRS)
def test_migrate_moves_every_dek_and_reports(
    volumes: Volumes, session_bao: OpenBao, source: str, target: str
) -> None:
    ids = [volumes.create_formatted(f"pvc-migrate-{source}-{target}-{n}", source) for n in range(2)]
    other = volumes.create_formatted(f"pvc-stays-{source}-{target}", "secrets")
    deks = {volume_id: volumes.dek(volume_id) for volume_id in ids}
    dry = volumes.cli("migrate", "--from", source, "--to", target, "--dry-run")
    assert dry.returncode == EXIT_OK and "2 would be migrated, 0 skipped, 0 failed" in dry.stdout
    assert all(volumes.backend.get(v).metadata[KMS_ID] == source for v in ids)
    done = volumes.cli("migrate", "--from", source, "--to", target)
    assert done.returncode == EXIT_OK, done.stderr
    assert "2 migrated, 0 skipped, 0 failed" in done.stdout
    for volume_id in ids:
        _assert_moved(volumes, session_bao, volume_id, deks[volume_id], source, target)
    assert volumes.backend.get(other).metadata[KMS_ID] == "secrets"
    again = volumes.cli("migrate", "--from", source, "--to", target)
    assert again.returncode == EXIT_OK and "0 migrated" in again.stdout


# A kill at every step for the first five pairs. The migration's steps do not depend on the KMS type, only
# on where the DEK is kept (metadata or KV), which these cover both ways; the kmip pairs migrate once each,
# keeping the matrix's CLI starts (8 per pair) in the suite's time budget.
CRASH_PAIRS = PAIRS[:5]


@pytest.mark.parametrize("crash_point", CRASH_POINTS)
@pytest.mark.parametrize(("source", "target"), CRASH_PAIRS)
def test_a_migration_killed_at_any_step_resumes(
    volumes: Volumes, session_bao: OpenBao, source: str, target: str, crash_point: str
) -> None:
    volume_id = volumes.create_formatted(f"pvc-{source}-{target}-{crash_point}", source)
    dek = volumes.dek(volume_id)
    crashed = volumes.cli(
        "migrate", "--from", source, "--to", target, env={**os.environ, CRASH_POINT_ENV: crash_point}
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    if not (source in IN_METADATA and target in IN_METADATA and crash_point in _WINDOW):
        assert volumes.dek(volume_id) == dek  # whichever id is recorded gives the DEK back
    done = volumes.cli("migrate", "--from", source, "--to", target)
    assert done.returncode == EXIT_OK, done.stderr
    left = 0 if crash_point == "migration.after-remove" else 1  # killed when all was done
    assert f"{left} migrated, 0 skipped, 0 failed" in done.stdout
    _assert_moved(volumes, session_bao, volume_id, dek, source, target)


def test_the_secrets_type_is_refused(volumes: Volumes) -> None:
    refused = volumes.cli("migrate", "--from", "secrets", "--to", "local-1")
    assert refused.returncode == EXIT_USAGE and "keeps no per-volume DEK" in refused.stderr


def test_a_pending_rotation_is_skipped(volumes: Volumes) -> None:
    volume_id = volumes.create_formatted("pvc-migrate-rotating", "local-1")
    crashed = volumes.cli("rotate", volume_id, env={**os.environ, CRASH_POINT_ENV: "rotation.after-add-key"})
    assert crashed.returncode == -signal.SIGKILL
    skipped = volumes.cli("migrate", "--from", "local-1", "--to", "local-2")
    assert skipped.returncode == EXIT_FAILED
    assert "a key rotation is pending" in skipped.stderr and "0 migrated, 1 skipped" in skipped.stdout


def test_named_volumes_only(volumes: Volumes) -> None:
    named, other_kms, unnamed = (
        volumes.create_formatted(f"pvc-migrate-named-{n}", "local-1") for n in range(3)
    )
    volumes.backend.set_metadata(other_kms, KMS_ID, "local-2")  # named, but not of FROM: left alone
    done = volumes.cli("migrate", "--from", "local-1", "--to", "vault-kv", named, other_kms)
    assert done.returncode == EXIT_OK, done.stderr
    assert "1 migrated, 0 skipped, 0 failed" in done.stdout
    assert [volumes.backend.get(v).metadata[KMS_ID] for v in (named, other_kms, unnamed)] == [
        "vault-kv",
        "local-2",
        "local-1",
    ]

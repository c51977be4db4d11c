"""The `vault` (KV v1 and v2) and `vault-transit` KMS types against a real OpenBao server."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import pytest

from csi_luks.encryption import VolumeEncryption, volume_encryption
from csi_luks.kms.base import (
    DEKDecryptError,
    DEKNotFound,
    KMSContext,
    KMSPermissionDenied,
    KMSRequestRefused,
    KMSUnavailable,
)
from csi_luks.kms.config import KMSConfig
from csi_luks.kms.dek_store import MetadataDEKStore
from csi_luks.kms.vault import VaultTransitKMS
from csi_luks.volumes.base import VolumeInfo
from csi_luks.volumes.standalone import StandaloneBackend
from tests.support.openbao import OpenBao, free_port
from tests.support.operations import Volumes

MiB = 1024 * 1024
CONTEXT = KMSContext(secrets={})


@pytest.fixture(scope="module")
def bao(session_bao: OpenBao) -> OpenBao:
    """The session's OpenBao: KV v2 at secret/, KV v1 at kv1/, Transit keys csi-kek and other-kek."""
    return session_bao


@pytest.fixture(scope="module")
def tokens(bao: OpenBao, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Token files: the root token, and one whose policy grants nothing on our paths."""
    root = bao.client()
    root.sys.create_or_update_policy(
        name="nothing", policy='path "sys/internal/ui/*" { capabilities = ["read"] }'
    )
    denied = root.auth.token.create(policies=["nothing"], ttl="1h")["auth"]["client_token"]
    directory = tmp_path_factory.mktemp("tokens")
    files = {"root": directory / "root", "denied": directory / "denied"}
    files["root"].write_text("root\n")
    files["denied"].write_text(denied)
    return files


def entries(bao: OpenBao, tokens: dict[str, Path], dead: str) -> dict[str, dict[str, str]]:
    base = {"encryptionKMSType": "vault", "vaultAddress": bao.address, "vaultTokenFile": str(tokens["root"])}
    return {
        "kv2": {**base, "vaultBackend": "kv-v2", "vaultPassphrasePath": "csi/"},
        "kv2-auto": {**base, "vaultPassphrasePath": "auto/"},
        "kv2-keep": {**base, "vaultBackend": "kv-v2", "vaultPassphrasePath": "keep/",
                     "vaultDestroyKeys": "false"},
        "kv1": {**base, "vaultBackendPath": "kv1", "vaultPassphrasePath": "csi/"},
        "transit": {
            "encryptionKMSType": "vault-transit", "vaultAddress": bao.address,
            "vaultTokenFile": str(tokens["root"]), "vaultTransitKey": "csi-kek",
        },
        "transit-derived": {
            "encryptionKMSType": "vault-transit", "vaultAddress": bao.address,
            "vaultTokenFile": str(tokens["root"]), "vaultTransitKey": "derived-kek",
            "vaultTransitDerivedKey": "true",
        },
        "transit-other": {
            "encryptionKMSType": "vault-transit", "vaultAddress": bao.address,
            "vaultTokenFile": str(tokens["root"]), "vaultTransitKey": "other-kek",
        },
        "denied": {**base, "vaultBackend": "kv-v2", "vaultTokenFile": str(tokens["denied"])},
        "down": {**base, "vaultAddress": dead, "vaultRetryDeadline": "1.5", "vaultTimeout": "0.5"},
    }  # fmt: skip


@pytest.fixture(scope="module")
def config(bao: OpenBao, tokens: dict[str, Path]) -> KMSConfig:
    return KMSConfig(None, entries(bao, tokens, f"http://127.0.0.1:{free_port()}"))


@pytest.fixture
def backend(tmp_path: Path) -> StandaloneBackend:
    return StandaloneBackend(tmp_path / "state")


def make_volume(backend: StandaloneBackend, name: str) -> str:
    volume_id = backend.volume_id_for(name, {})
    backend.create(volume_id, name, MiB, {})
    return volume_id


ALL = ["kv2", "kv2-auto", "kv1", "transit"]


@pytest.mark.parametrize("kms_id", ALL)
def test_contract_store_fetch_remove(kms_id: str, config: KMSConfig, backend: StandaloneBackend) -> None:
    volume_id = make_volume(backend, f"pvc-{kms_id}")
    encryption = volume_encryption(config, kms_id, CONTEXT, backend)
    encryption.new_passphrase(volume_id)
    passphrase = encryption.get_passphrase(volume_id)
    assert len(passphrase) >= 43
    assert volume_encryption(config, kms_id, CONTEXT, backend).get_passphrase(volume_id) == passphrase
    encryption.remove(volume_id)
    encryption.remove(volume_id)  # idempotent
    with pytest.raises(DEKNotFound, match=volume_id):
        encryption.get_passphrase(volume_id)


def test_kv2_puts_the_dek_at_the_configured_path_and_destroys_it(
    bao: OpenBao, config: KMSConfig, backend: StandaloneBackend
) -> None:
    volume_id = make_volume(backend, "pvc-path")
    encryption = volume_encryption(config, "kv2", CONTEXT, backend)
    encryption.new_passphrase(volume_id)
    stored = bao.client().secrets.kv.v2.read_secret_version(
        path=f"csi/{volume_id}", mount_point="secret", raise_on_deleted_version=True
    )
    assert stored["data"]["data"]["passphrase"] == encryption.get_passphrase(volume_id)
    assert backend.get(volume_id).metadata == {}  # nothing in the volume's own metadata
    encryption.remove(volume_id)
    with pytest.raises(hvac.exceptions.InvalidPath):  # no versions, no metadata: nothing recoverable
        bao.client().secrets.kv.v2.read_secret_metadata(path=f"csi/{volume_id}", mount_point="secret")


def test_kv2_without_destroy_keeps_the_metadata(
    bao: OpenBao, config: KMSConfig, backend: StandaloneBackend
) -> None:
    volume_id = make_volume(backend, "pvc-keep")
    encryption = volume_encryption(config, "kv2-keep", CONTEXT, backend)
    encryption.new_passphrase(volume_id)
    encryption.remove(volume_id)
    meta = bao.client().secrets.kv.v2.read_secret_metadata(path=f"keep/{volume_id}", mount_point="secret")
    assert meta["data"]["versions"]["1"]["deletion_time"]
    with pytest.raises(DEKNotFound):
        encryption.get_passphrase(volume_id)


def test_kv1_puts_the_dek_in_the_v1_engine(
    bao: OpenBao, config: KMSConfig, backend: StandaloneBackend
) -> None:
    volume_id = make_volume(backend, "pvc-v1")
    encryption = volume_encryption(config, "kv1", CONTEXT, backend)
    encryption.new_passphrase(volume_id)
    stored = bao.client().secrets.kv.v1.read_secret(path=f"csi/{volume_id}", mount_point="kv1")
    assert stored["data"]["passphrase"] == encryption.get_passphrase(volume_id)


def test_transit_leaves_only_ciphertext_in_volume_metadata(
    config: KMSConfig, backend: StandaloneBackend
) -> None:
    volume_id = make_volume(backend, "pvc-transit")
    encryption = volume_encryption(config, "transit", CONTEXT, backend)
    assert isinstance(encryption.store, MetadataDEKStore)
    encryption.new_passphrase(volume_id)
    passphrase = encryption.get_passphrase(volume_id)
    stored = backend.get(volume_id).metadata["csi-luks/dek"]
    assert stored.startswith("vault:v1:") and passphrase not in stored


def rotate_and_rewrap(
    bao: OpenBao, encryption: VolumeEncryption, backend: StandaloneBackend, key: str, volume_id: str
) -> None:
    """Rotate the Transit key, then store the volume's DEK re-wrapped under the new version."""
    bao.client().secrets.transit.rotate_key(name=key)
    kms = encryption.kms
    assert isinstance(kms, VaultTransitKMS)
    rewrapped = kms.rewrap_dek(volume_id, backend.get(volume_id).metadata["csi-luks/dek"])
    assert rewrapped.startswith("vault:v2:")
    backend.set_metadata(volume_id, "csi-luks/dek", rewrapped)


def test_transit_rotation_rewraps_without_changing_the_dek(
    bao: OpenBao, config: KMSConfig, backend: StandaloneBackend
) -> None:
    volume_id = make_volume(backend, "pvc-rotate")
    encryption = volume_encryption(config, "transit", CONTEXT, backend)
    encryption.new_passphrase(volume_id)
    before = encryption.get_passphrase(volume_id)
    rotate_and_rewrap(bao, encryption, backend, "csi-kek", volume_id)
    assert encryption.get_passphrase(volume_id) == before


def test_a_derived_transit_key_binds_each_wrapped_dek_to_its_volume(
    bao: OpenBao, config: KMSConfig, backend: StandaloneBackend
) -> None:
    first, second = make_volume(backend, "pvc-derived-1"), make_volume(backend, "pvc-derived-2")
    encryption = volume_encryption(config, "transit-derived", CONTEXT, backend)
    encryption.new_passphrase(first)
    encryption.new_passphrase(second)
    passphrase = encryption.get_passphrase(first)
    # The first volume's wrapped DEK, copied into the second volume's metadata, does not unwrap there.
    backend.set_metadata(second, "csi-luks/dek", backend.get(first).metadata["csi-luks/dek"])
    with pytest.raises(DEKDecryptError, match="derived-kek"):
        encryption.get_passphrase(second)
    # Rotation and rewrap keep working under the volume's own context.
    rotate_and_rewrap(bao, encryption, backend, "derived-kek", first)
    assert encryption.get_passphrase(first) == passphrase
    # Without the flag the same key refuses to wrap at all: a derived key needs the context.
    plain = volume_encryption(
        KMSConfig(None, {"t": {**config.entry("transit-derived"), "vaultTransitDerivedKey": "false"}}),
        "t", CONTEXT, backend,
    )  # fmt: skip
    with pytest.raises(KMSRequestRefused, match="context"):
        plain.new_passphrase(make_volume(backend, "pvc-derived-3"))


def test_a_dek_wrapped_by_another_key_does_not_unwrap(config: KMSConfig, backend: StandaloneBackend) -> None:
    volume_id = make_volume(backend, "pvc-wrong-key")
    volume_encryption(config, "transit-other", CONTEXT, backend).new_passphrase(volume_id)
    with pytest.raises(DEKDecryptError, match="csi-kek"):
        volume_encryption(config, "transit", CONTEXT, backend).get_passphrase(volume_id)


def test_permission_denied(config: KMSConfig, backend: StandaloneBackend) -> None:
    volume_id = make_volume(backend, "pvc-denied")
    with pytest.raises(KMSPermissionDenied, match="denied"):
        volume_encryption(config, "denied", CONTEXT, backend).new_passphrase(volume_id)


def test_a_server_that_is_down_is_unavailable_after_the_retry_deadline(
    config: KMSConfig, backend: StandaloneBackend
) -> None:
    volume_id = make_volume(backend, "pvc-down")
    with pytest.raises(KMSUnavailable, match="unavailable after"):
        volume_encryption(config, "down", CONTEXT, backend).new_passphrase(volume_id)


def test_one_client_per_kms_id_is_reused(config: KMSConfig, backend: StandaloneBackend) -> None:
    a = volume_encryption(config, "kv2", CONTEXT, backend)
    b = volume_encryption(config, "kv2", CONTEXT, backend)
    assert a.kms.connection is b.kms.connection  # type: ignore[attr-defined]


def test_a_rotated_token_file_is_picked_up_after_a_refusal(
    bao: OpenBao, tmp_path: Path, backend: StandaloneBackend
) -> None:
    token_file = tmp_path / "token"
    first = bao.client().auth.token.create(policies=["root"], ttl="1h")["auth"]["client_token"]
    token_file.write_text(first)
    config = KMSConfig(
        None,
        {"rotating": {"encryptionKMSType": "vault", "vaultAddress": bao.address,
                      "vaultTokenFile": str(token_file), "vaultPassphrasePath": "rot/"}},
    )  # fmt: skip
    volume_id = make_volume(backend, "pvc-rot")
    encryption = volume_encryption(config, "rotating", CONTEXT, backend)
    encryption.new_passphrase(volume_id)
    bao.client().auth.token.revoke(first)
    token_file.write_text(bao.client().auth.token.create(policies=["root"], ttl="1h")["auth"]["client_token"])
    assert len(encryption.get_passphrase(volume_id)) >= 43  # logged in again with the new token


def test_concurrent_calls_share_one_connection(config: KMSConfig, backend: StandaloneBackend) -> None:
    ids = [make_volume(backend, f"pvc-par{i}") for i in range(8)]
    errors: list[BaseException] = []

    def work(volume_id: str) -> None:
        try:
            encryption = volume_encryption(config, "kv2", CONTEXT, backend)
            encryption.new_passphrase(volume_id)
            assert encryption.get_passphrase(volume_id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(v,)) for v in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_no_token_or_role_is_a_configuration_error(bao: OpenBao) -> None:
    from csi_luks.kms.base import KMSConfigError

    config = KMSConfig(None, {"x": {"encryptionKMSType": "vault", "vaultAddress": bao.address}})
    with pytest.raises(KMSConfigError, match="vaultRole"):
        config.build("x", CONTEXT)


@pytest.mark.parametrize(("source", "target"), [("kv2", "transit"), ("transit", "kv1"), ("kv1", "local")])
def test_copy_rewraps_the_dek_for_the_target_kms(
    source: str, target: str, config: KMSConfig, backend: StandaloneBackend, tmp_path: Path
) -> None:
    both = KMSConfig(
        None,
        {
            **{k: config.entry(k) for k in ("kv2", "kv1", "transit")},
            "local": {"encryptionKMSType": "local", "keyFile": str(tmp_path / "kek")},
        },
    )
    original, clone = make_volume(backend, f"src-{source}"), make_volume(backend, f"dst-{target}")
    source_encryption = volume_encryption(both, source, CONTEXT, backend)
    source_encryption.new_passphrase(original)
    target_encryption = volume_encryption(both, target, CONTEXT, backend)
    source_encryption.copy_to(original, target_encryption, clone)
    assert target_encryption.get_passphrase(clone) == source_encryption.get_passphrase(original)
    source_encryption.remove(original)  # the clone's key does not depend on the source's
    assert len(target_encryption.get_passphrase(clone)) >= 43


@pytest.mark.parametrize(
    ("kms_id", "error"),
    [("down", KMSUnavailable), ("no-login", KMSPermissionDenied), ("transit-down", KMSUnavailable)],
)
def test_create_volume_makes_nothing_when_the_kms_refuses_or_is_down(
    bao: OpenBao, tokens: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    kms_id: str, error: type[Exception],
) -> None:  # fmt: skip
    """The provisioner retries a refused claim for ever: no retry may create (and delete) a backing store."""
    dead = f"http://127.0.0.1:{free_port()}"
    bad_token = tmp_path / "bad-token"
    bad_token.write_text("not-a-token")
    listed = entries(bao, tokens, dead)
    listed["no-login"] = {**listed["kv2-auto"], "vaultTokenFile": str(bad_token)}
    listed["transit-down"] = {**listed["transit"], "vaultAddress": dead, "vaultRetryDeadline": "1.5",
                              "vaultTimeout": "0.5"}  # fmt: skip
    volumes = Volumes(tmp_path / "volumes", listed)
    created: list[str] = []
    real_create = volumes.backend.create

    def create(volume_id: str, *args: Any, **kwargs: Any) -> VolumeInfo:
        created.append(volume_id)
        return real_create(volume_id, *args, **kwargs)

    monkeypatch.setattr(volumes.backend, "create", create)
    with pytest.raises(error):
        volumes.create(f"pvc-{kms_id}", kms_id)
    assert created == [] and volumes.backend.list() == []
    assert volumes.create("pvc-reachable", "kv2-auto") in created  # the recording itself works


CEPH_CSI_HANDLE = "0001-0009-rook-ceph-0000000000000002-b0285c97-a0ce-11eb-8c66-0242ac110002"


@pytest.mark.parametrize(("kms_id", "mount", "version"), [("kv2", "secret", 2), ("kv1", "kv1", 1)])
def test_ceph_csi_volumes_keep_ceph_csi_s_secret_layout(
    bao: OpenBao, config: KMSConfig, kms_id: str, mount: str, version: int
) -> None:
    """Ceph-CSI (libopenstorage/secrets) keeps a DEK as {"data": {"passphrase": ...}} in KV v1 and v2: read
    as such, and written back so for a Ceph-CSI handle, or Ceph-CSI could not take the volume back."""
    kms = config.build(kms_id, CONTEXT)
    store = kms.integrated_dek_store
    assert store is not None
    client = bao.client()
    kv = client.secrets.kv.v2 if version == 2 else client.secrets.kv.v1
    path = f"csi/{CEPH_CSI_HANDLE}"

    def stored() -> dict[str, Any]:
        if version == 2:
            return dict(kv.read_secret_version(path=path, mount_point=mount, raise_on_deleted_version=True)
                        ["data"]["data"])  # fmt: skip
        return dict(kv.read_secret(path=path, mount_point=mount)["data"])

    # What Ceph-CSI's StoreDEK leaves.
    kv.create_or_update_secret(path=path, secret={"data": {"passphrase": "ceph-csi-dek"}}, mount_point=mount)
    assert store.fetch_dek(CEPH_CSI_HANDLE) == "ceph-csi-dek"
    store.store_dek(CEPH_CSI_HANDLE, "rotated-dek")
    assert stored() == {"data": {"passphrase": "rotated-dek"}}  # what Ceph-CSI's FetchDEK reads
    store.remove_dek(CEPH_CSI_HANDLE)
    with pytest.raises(DEKNotFound):
        store.fetch_dek(CEPH_CSI_HANDLE)

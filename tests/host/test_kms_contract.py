"""The contract every KMS type keeps, checked against the real servers: OpenBao and a Kubernetes API server.

Contract items: store and fetch (the same DEK every time, wrapped where the type wraps), remove
(idempotent, then NOT_FOUND), copy (re-wrapped for another volume's KMS, both ways), wrong key (a DEK does
not come back with another key or identity), server down (UNAVAILABLE, fast), permission denied. A type
for which an item cannot apply says why in NOT_APPLICABLE; a test checks every type covers every item.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from csi_luks import kube as plugin_kube
from csi_luks.encryption import VolumeEncryption, volume_encryption
from csi_luks.kms.base import (
    DEKDecryptError,
    DEKNotFound,
    KMSContext,
    KMSError,
    KMSPermissionDenied,
    KMSUnavailable,
)
from csi_luks.kms.config import KMSConfig
from csi_luks.kms.local import LocalKMS
from csi_luks.kms.vault import VaultKVKMS
from csi_luks.volumes.standalone import StandaloneBackend
from tests.support.kmip_server import SERVER_NAME, KMIPServer
from tests.support.kms_env import NODE_SA, SYSTEM_NAMESPACE, KmsEnv
from tests.support.moto_server import AWSEmulator
from tests.support.openbao import free_port

MiB = 1024 * 1024
ITEMS = ("store_fetch", "remove", "copy", "wrong_key", "down", "denied")
PASSPHRASE = "a-class-wide-passphrase-of-enough-length"


@dataclass
class Variant:
    """One way of building a KMS for the same volume: an entry, a context, and a Kubernetes client."""

    entry: dict[str, str]
    context: KMSContext
    kube_token: str | None = None  # the plugin's Kubernetes identity; None: the node ServiceAccount
    kube_down: bool = False  # the plugin's Kubernetes client points at a closed port


@dataclass
class Case:
    main: Variant
    wraps: bool  # the stored DEK is ciphertext, not the DEK
    variants: dict[str, Variant] = field(default_factory=dict)  # "wrong_key", "down", "denied"
    wrong_key_error: type[KMSError] = DEKDecryptError


# Why an item cannot apply to a type. Everything else is tested.
NOT_APPLICABLE: dict[str, dict[str, str]] = {
    "secrets": {
        "remove": "the passphrase is the StorageClass's shared Secret: removing one volume must not touch it",
        "copy": "the clone uses the same shared Secret; there is no per-volume DEK to copy",
        "wrong_key": "the passphrase is used as is; only LUKS can tell it is wrong (tested in the VM tier)",
        "down": "no server: the passphrase arrives in the request",
        "denied": "no server: the passphrase arrives in the request",
    },
    "local": {
        "down": "a key file on the machine: there is no server",
        "denied": "the plugin runs as root; file permissions cannot refuse it",
    },
    "metadata-request": {
        "down": "the passphrase arrives in the request: there is no server",
        "denied": "the passphrase arrives in the request: there is no server",
    },
}


def _dead_address() -> str:
    return f"http://127.0.0.1:{free_port()}"


def _fast(entry: dict[str, str]) -> dict[str, str]:
    return {**entry, "vaultRetryDeadline": "1.5", "vaultTimeout": "0.5"}


def kmip_case(name: str, env: KmsEnv, kmip: KMIPServer) -> Case:
    """kmip-rpc (the server wraps: Encrypt/Decrypt) and kmip-local (Get, wrapped here with AES-GCM)."""
    namespace = env.tenant.namespace
    env.put_secret(namespace, "kmip-creds", kmip.secret_data())
    env.put_secret(namespace, "kmip-other-key", kmip.secret_data(key="other-kek"))
    env.put_secret(namespace, "kmip-foreign", kmip.secret_data(identity="foreign"))
    entry = {
        "encryptionKMSType": "kmip", "KMIP_ENDPOINT": kmip.endpoint, "KMIP_SECRET_NAME": "kmip-creds",
        "KMIP_SECRET_NAMESPACE": namespace, "TLS_SERVER_NAME": SERVER_NAME,
        "USE_CRYPTO_RPC": "true" if name == "kmip-rpc" else "false",
    }  # fmt: skip
    none = KMSContext(secrets={})
    dead = f"127.0.0.1:{free_port()}"
    return Case(
        Variant(entry, none),
        wraps=True,
        variants={
            "wrong_key": Variant({**entry, "KMIP_SECRET_NAME": "kmip-other-key"}, none),
            "down": Variant(
                {**entry, "KMIP_ENDPOINT": dead, "READ_TIMEOUT": "1", "WRITE_TIMEOUT": "1"}, none
            ),
            # A client certificate of a CA the server does not trust: its TLS refuses the identity.
            "denied": Variant({**entry, "KMIP_SECRET_NAME": "kmip-foreign"}, none),
        },
    )


def aws_case(name: str, env: KmsEnv, aws: AWSEmulator) -> Case:
    """aws-metadata (static credentials) and aws-sts-metadata (the tenant's role through STS), on moto."""
    tenant, outsider = env.tenant.namespace, env.outsider.namespace
    dead = f"http://127.0.0.1:{free_port()}"
    if name == "aws-metadata":
        env.put_secret(tenant, "aws-creds", aws.metadata_secret())
        env.put_secret(tenant, "aws-other-cmk", aws.metadata_secret(cmk="other-cmk"))
        env.put_secret(tenant, "aws-nobody", aws.metadata_secret(user="nobody"))
        entry = {
            "encryptionKMSType": "aws-metadata", "AWS_REGION": "us-east-1", "KMS_SECRET_NAME": "aws-creds",
            "KMS_SECRET_NAMESPACE": tenant, "AWS_KMS_ENDPOINT": aws.url,
        }  # fmt: skip
        none = KMSContext(secrets={})
        return Case(
            Variant(entry, none),
            wraps=True,
            variants={
                "wrong_key": Variant({**entry, "KMS_SECRET_NAME": "aws-other-cmk"}, none),
                "down": Variant({**entry, "AWS_KMS_ENDPOINT": dead, "AWS_TIMEOUT": "1"}, none),
                "denied": Variant({**entry, "KMS_SECRET_NAME": "aws-nobody"}, none),  # no IAM policy
            },
            # moto answers a Decrypt naming another key AccessDeniedException (AWS: IncorrectKeyException,
            # a DEKDecryptError): either way the other key's holder does not get the DEK.
            wrong_key_error=KMSPermissionDenied,
        )
    env.put_secret(tenant, "ceph-csi-aws-credentials", aws.tenant_secret())  # Ceph-CSI's default name
    env.put_secret(outsider, "ceph-csi-aws-credentials", aws.tenant_secret(role="stranger"))
    entry = {
        "encryptionKMSType": "aws-sts-metadata", "tokenFilePath": str(env.node_token_file),
        "awsKMSEndpoint": aws.url, "awsSTSEndpoint": aws.url,
    }  # fmt: skip
    ctx = KMSContext(secrets={}, pvc_namespace=tenant)
    outsider_ctx = KMSContext(secrets={}, pvc_namespace=outsider)  # its role has no KMS policy
    return Case(
        Variant(entry, ctx),
        wraps=True,
        variants={
            "wrong_key": Variant(entry, outsider_ctx),
            "down": Variant(
                {**entry, "awsKMSEndpoint": dead, "awsSTSEndpoint": dead, "awsTimeout": "1"}, ctx
            ),
            "denied": Variant(entry, outsider_ctx),
        },
        wrong_key_error=KMSPermissionDenied,
    )


def build_case(
    name: str, env: KmsEnv, tmp: Path, kmip: KMIPServer | None = None, aws: AWSEmulator | None = None
) -> Case:
    bao = env.bao.address
    tenant, outsider = env.tenant.namespace, env.outsider.namespace
    none = KMSContext(secrets={})
    tmp.mkdir(parents=True, exist_ok=True)
    root_token = tmp / "root-token"
    root_token.write_text("root")
    denied_token = tmp / "denied-token"
    denied_token.write_text(
        env.bao.client().auth.token.create(policies=["nothing"], ttl="1h")["auth"]["client_token"]
    )
    if name == "secrets":
        return Case(
            Variant(
                {"encryptionKMSType": "secrets"}, KMSContext(secrets={"encryptionPassphrase": PASSPHRASE})
            ),
            wraps=False,
        )
    if name == "local":
        main = {"encryptionKMSType": "local", "keyFile": str(tmp / "kek")}
        other = {"encryptionKMSType": "local", "keyFile": str(tmp / "other-kek")}
        LocalKMS("other", tmp / "other-kek").encrypt_dek("any-volume", "any-dek")  # creates the other key
        return Case(Variant(main, none), wraps=True, variants={"wrong_key": Variant(other, none)})
    if name == "metadata-request":
        entry = {"encryptionKMSType": "metadata"}
        return Case(
            Variant(entry, KMSContext(secrets={"encryptionPassphrase": PASSPHRASE})),
            wraps=True,
            variants={
                "wrong_key": Variant(entry, KMSContext(secrets={"encryptionPassphrase": PASSPHRASE + "x"}))
            },
        )
    if name == "metadata-secret":
        env.put_secret(tenant, "luks-kek", {"encryptionPassphrase": PASSPHRASE})
        env.put_secret(tenant, "other-kek", {"encryptionPassphrase": PASSPHRASE + "x"})
        ctx = KMSContext(secrets={}, pvc_namespace=tenant)
        entry = {"encryptionKMSType": "metadata", "secretName": "luks-kek"}  # namespace: the PVC's
        return Case(
            Variant(entry, ctx),
            wraps=True,
            variants={
                "wrong_key": Variant({**entry, "secretName": "other-kek"}, ctx),
                "down": Variant(entry, ctx, kube_down=True),
                "denied": Variant(entry, ctx, kube_token=env.unprivileged_kube_token),
            },
        )
    vault = {"vaultAddress": bao, "vaultTokenFile": str(root_token)}
    if name in ("vault-kv2", "vault-kv1"):
        entry = {"encryptionKMSType": "vault", **vault, "vaultPassphrasePath": f"contract/{name}/"}
        if name == "vault-kv1":
            entry["vaultBackendPath"] = "kv1"
        return Case(
            Variant(entry, none),
            wraps=False,
            variants={
                # Another Vault identity must not get at the DEK.
                "wrong_key": Variant({**entry, "vaultTokenFile": str(denied_token)}, none),
                "down": Variant(_fast({**entry, "vaultAddress": _dead_address()}), none),
                "denied": Variant({**entry, "vaultTokenFile": str(denied_token)}, none),
            },
            wrong_key_error=KMSPermissionDenied,
        )
    if name == "vault-kubernetes-auth":
        entry = {
            "encryptionKMSType": "vault", "vaultAddress": bao, "vaultRole": "csi-luks",
            "vaultServiceAccountTokenFile": str(env.node_token_file), "vaultPassphrasePath": "contract/k8s/",
        }  # fmt: skip
        stranger = {**entry, "vaultServiceAccountTokenFile": str(env.stranger_token_file)}
        return Case(
            Variant(entry, none),
            wraps=False,
            variants={
                "wrong_key": Variant(stranger, none),
                "down": Variant(_fast({**entry, "vaultAddress": _dead_address()}), none),
                "denied": Variant(stranger, none),
            },
            wrong_key_error=KMSPermissionDenied,
        )
    if name in ("vault-transit", "vault-transit-derived"):
        entry = {"encryptionKMSType": "vault-transit", **vault, "vaultTransitKey": "csi-kek"}
        if name == "vault-transit-derived":
            entry = {**entry, "vaultTransitKey": "derived-kek", "vaultTransitDerivedKey": "true"}
        return Case(
            Variant(entry, none),
            wraps=True,
            variants={
                "wrong_key": Variant({**entry, "vaultTransitKey": "other-kek"}, none),
                "down": Variant(_fast({**entry, "vaultAddress": _dead_address()}), none),
                "denied": Variant({**entry, "vaultTokenFile": str(denied_token)}, none),
            },
        )
    if name in ("kmip-rpc", "kmip-local"):
        assert kmip is not None, "the kmip cases need the session's KMIP server"
        return kmip_case(name, env, kmip)
    if name in ("aws-metadata", "aws-sts-metadata"):
        assert aws is not None, "the aws cases need the session's AWS emulator"
        return aws_case(name, env, aws)
    if name in ("vaulttokens", "vaulttenantsa"):
        entry = {"encryptionKMSType": name, "vaultAddress": bao, "vaultPassphrasePath": f"contract/{name}/"}
        if name == "vaulttenantsa":
            entry["vaultRole"] = "tenant"
        ctx = KMSContext(secrets={}, pvc_namespace=tenant)
        outsider_ctx = KMSContext(secrets={}, pvc_namespace=outsider)
        return Case(
            Variant(entry, ctx),
            wraps=False,
            variants={
                # Another tenant's identity (its token Secret, its ServiceAccount) must not get at the DEK.
                "wrong_key": Variant(entry, outsider_ctx),
                "down": Variant(_fast({**entry, "vaultAddress": _dead_address()}), ctx),
                "denied": Variant(entry, outsider_ctx),
            },
            wrong_key_error=KMSPermissionDenied,
        )
    raise AssertionError(f"no contract case {name}")


NAMES = [
    "secrets",
    "local",
    "metadata-request",
    "metadata-secret",
    "vault-kv2",
    "vault-kv1",
    "vault-kubernetes-auth",
    "vault-transit",
    "vault-transit-derived",
    "vaulttokens",
    "vaulttenantsa",
    "kmip-rpc",
    "kmip-local",
    "aws-metadata",
    "aws-sts-metadata",
]


@pytest.fixture
def backend(tmp_path: Path) -> StandaloneBackend:
    return StandaloneBackend(tmp_path / "state")


def applicable(item: str) -> list[str]:
    """The types an item applies to: each test runs for exactly those (nothing is skipped)."""
    return [name for name in NAMES if item not in NOT_APPLICABLE.get(name, {})]


@pytest.fixture
def case(
    request: pytest.FixtureRequest, name: str, kms_env: KmsEnv, tmp_path: Path, plugin_kube_client: None
) -> Case:
    # The KMIP server starts only for a session that runs a kmip case.
    kmip = request.getfixturevalue("session_kmip") if name.startswith("kmip") else None
    aws = request.getfixturevalue("session_aws") if name.startswith("aws") else None
    return build_case(name, kms_env, tmp_path, kmip, aws)


@contextmanager
def _kube_identity(env: KmsEnv, variant: Variant) -> Iterator[None]:
    if variant.kube_down:
        dead = env.kube.api_client()
        dead.configuration.host = f"https://127.0.0.1:{free_port()}"
        plugin_kube.set_api_client(dead)
    elif variant.kube_token is not None:
        plugin_kube.set_api_client(env.kube.api_client(variant.kube_token))
    try:
        yield
    finally:
        plugin_kube.set_api_client(env.kube.api_client(env.node_token_file.read_text()))


def encryption(
    variant: Variant, backend: StandaloneBackend, env: KmsEnv
) -> Callable[[], AbstractContextManager[VolumeEncryption]]:
    @contextmanager
    def build() -> Iterator[VolumeEncryption]:
        identity = _kube_identity(env, variant) if variant.kube_down or variant.kube_token else nullcontext()
        with identity:
            config = KMSConfig(None, {"kms": variant.entry})
            yield volume_encryption(config, "kms", variant.context, backend)

    return build


def make_volume(backend: StandaloneBackend, name: str) -> str:
    volume_id = backend.volume_id_for(name, {})
    backend.create(volume_id, name, MiB, {})
    return volume_id


def test_every_type_covers_every_item(
    kms_env: KmsEnv,
    tmp_path: Path,
    plugin_kube_client: None,
    session_kmip: KMIPServer,
    session_aws: AWSEmulator,
) -> None:
    for name in NAMES:
        case = build_case(name, kms_env, tmp_path / name, session_kmip, session_aws)
        for item in ("wrong_key", "down", "denied"):
            covered = item in case.variants or item in NOT_APPLICABLE.get(name, {})
            assert covered, f"{name}: contract item {item} is neither tested nor declared not applicable"
            assert not (item in case.variants and item in NOT_APPLICABLE.get(name, {})), (name, item)


@pytest.mark.parametrize("name", applicable("store_fetch"))
def test_store_and_fetch(case: Case, backend: StandaloneBackend, kms_env: KmsEnv) -> None:
    volume_id = make_volume(backend, "pvc-store")
    with encryption(case.main, backend, kms_env)() as enc:
        enc.new_passphrase(volume_id)
        passphrase = enc.get_passphrase(volume_id)
        stored = enc.store.fetch_dek(volume_id)
    assert len(passphrase) >= 32
    with encryption(case.main, backend, kms_env)() as again:  # a new instance, as a later call builds
        assert again.get_passphrase(volume_id) == passphrase
    if case.wraps:
        assert passphrase not in stored, "a wrapping KMS stored the DEK in the clear"
    else:
        assert stored == passphrase


@pytest.mark.parametrize("name", applicable("remove"))
def test_remove(case: Case, backend: StandaloneBackend, kms_env: KmsEnv) -> None:
    volume_id = make_volume(backend, "pvc-remove")
    with encryption(case.main, backend, kms_env)() as enc:
        enc.new_passphrase(volume_id)
        enc.remove(volume_id)
        enc.remove(volume_id)  # idempotent: a retried DeleteVolume
        with pytest.raises(DEKNotFound, match=volume_id):
            enc.get_passphrase(volume_id)


@pytest.mark.parametrize("name", applicable("copy"))
def test_copy_rewraps_both_ways(
    case: Case, backend: StandaloneBackend, kms_env: KmsEnv, tmp_path: Path
) -> None:
    local = Variant(
        {"encryptionKMSType": "local", "keyFile": str(tmp_path / "copy-kek")}, KMSContext(secrets={})
    )
    source, clone, back = (make_volume(backend, n) for n in ("pvc-src", "pvc-clone", "pvc-back"))
    with encryption(case.main, backend, kms_env)() as enc, encryption(local, backend, kms_env)() as other:
        enc.new_passphrase(source)
        dek = enc.get_passphrase(source)
        enc.copy_to(source, other, clone)
        assert other.get_passphrase(clone) == dek
        other.copy_to(clone, enc, back)
        enc.remove(source)  # the copies stand on their own
        assert enc.get_passphrase(back) == dek
        assert other.get_passphrase(clone) == dek


@pytest.mark.parametrize("name", applicable("wrong_key"))
def test_wrong_key(case: Case, backend: StandaloneBackend, kms_env: KmsEnv) -> None:
    volume_id = make_volume(backend, "pvc-wrong")
    with encryption(case.main, backend, kms_env)() as enc:
        enc.new_passphrase(volume_id)
        dek = enc.get_passphrase(volume_id)
    with (
        encryption(case.variants["wrong_key"], backend, kms_env)() as wrong,
        pytest.raises(case.wrong_key_error) as info,
    ):
        wrong.get_passphrase(volume_id)
    assert dek not in str(info.value)
    with encryption(case.main, backend, kms_env)() as enc:
        assert enc.get_passphrase(volume_id) == dek  # the failed attempt changed nothing


@pytest.mark.parametrize("name", applicable("down"))
def test_server_down(case: Case, backend: StandaloneBackend, kms_env: KmsEnv) -> None:
    volume_id = make_volume(backend, "pvc-down")
    started = time.monotonic()
    with encryption(case.variants["down"], backend, kms_env)() as down, pytest.raises(KMSUnavailable):
        down.new_passphrase(volume_id)
    assert time.monotonic() - started < 15
    assert "csi-luks/dek" not in backend.get(volume_id).metadata


@pytest.mark.parametrize("name", applicable("denied"))
def test_permission_denied(name: str, case: Case, backend: StandaloneBackend, kms_env: KmsEnv) -> None:
    volume_id = make_volume(backend, "pvc-denied")
    with (
        encryption(case.variants["denied"], backend, kms_env)() as denied,
        pytest.raises(KMSPermissionDenied) as info,
    ):
        denied.new_passphrase(volume_id)
    # Refused by the server that holds the keys (Vault, or the API server's RBAC), and said so.
    assert "refused" in str(info.value) or "RBAC" in str(info.value), str(info.value)


def test_an_expired_vault_token_is_replaced_by_a_fresh_login(
    kms_env: KmsEnv, backend: StandaloneBackend, plugin_kube_client: None
) -> None:
    """Kubernetes auth with a 2-second token TTL: a call after expiry logs in again and succeeds."""
    kms_env.bao.client().auth.kubernetes.create_role(
        name="short-lived",
        bound_service_account_names=[NODE_SA],
        bound_service_account_namespaces=[SYSTEM_NAMESPACE],
        policies=["dek"],
        ttl="2s",
        max_ttl="2s",
    )
    entry = {
        "encryptionKMSType": "vault", "vaultAddress": kms_env.bao.address, "vaultRole": "short-lived",
        "vaultServiceAccountTokenFile": str(kms_env.node_token_file), "vaultPassphrasePath": "short/",
    }  # fmt: skip
    volume_id = make_volume(backend, "pvc-expiry")
    enc = volume_encryption(KMSConfig(None, {"kms": entry}), "kms", KMSContext(secrets={}), backend)
    enc.new_passphrase(volume_id)
    assert isinstance(enc.kms, VaultKVKMS)
    first_token = enc.kms.connection.current_token()
    assert first_token is not None
    time.sleep(3)
    assert kms_env.bao.client(first_token).is_authenticated() is False  # really expired
    assert len(enc.get_passphrase(volume_id)) == 43
    assert enc.kms.connection.current_token() not in (None, first_token)

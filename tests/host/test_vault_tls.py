"""Vault over TLS, against real OpenBao TLS listeners with certificates made here.

One server, two TLS listeners, both with certificates of the CA `good`:
  `ip`:   SAN vault.test and 127.0.0.1 (the address's host verifies as is),
  `name`: SAN vault.test only (reached at https://127.0.0.1:port, it verifies only with vaultTLSServerName).
A second CA, `other`, signed nothing the server presents.
"""

from __future__ import annotations

import socket
import ssl
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import requests

from csi_luks.encryption import volume_encryption
from csi_luks.errors import status_for
from csi_luks.kms import vault_tls
from csi_luks.kms.base import DEKNotFound, KMSConfigError, KMSContext, KMSObjectNotFound, KMSTLSError
from csi_luks.kms.config import KMSConfig
from csi_luks.kms.vault import VaultKVKMS
from csi_luks.kms.vault_tls import ServerNameAdapter
from csi_luks.volumes.standalone import StandaloneBackend
from tests.support.kms_env import SYSTEM_NAMESPACE, KmsEnv
from tests.support.openbao import ROOT_TOKEN, OpenBao, openbao_server
from tests.support.tls import CA

MiB = 1024 * 1024
CONTEXT = KMSContext(secrets={})
# Generous: a TLS failure must not wait for it. Tests assert they fail in well under a tenth of it.
DEADLINE = 30.0


@dataclass
class TLSBao:
    server: OpenBao
    ip: str  # https://127.0.0.1:port, certificate for vault.test and 127.0.0.1
    name_only: str  # https://127.0.0.1:port, certificate for vault.test only
    good_ca: Path
    other_ca: Path
    good_pem: str
    other_pem: str
    token_file: Path


@pytest.fixture(scope="module")
def tls_bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSBao]:
    workdir = tmp_path_factory.mktemp("tls-openbao")
    good, other = CA.create("csi-luks test CA"), CA.create("another CA")
    ip_cert = good.issue(workdir / "pki", "ip", dns=["vault.test"], ips=["127.0.0.1"])
    name_cert = good.issue(workdir / "pki", "name", dns=["vault.test"], ips=[])
    with openbao_server(workdir, tls_listeners=[ip_cert, name_cert]) as server:
        root = server.client()  # the dev mode's plain listener, for setting up and checking
        root.sys.enable_secrets_engine("transit", path="transit")
        root.secrets.transit.create_key(name="tls-kek")
        token_file = workdir / "token"
        token_file.write_text(ROOT_TOKEN)
        yield TLSBao(
            server=server,
            ip=f"https://127.0.0.1:{server.tls_ports[0]}",
            name_only=f"https://127.0.0.1:{server.tls_ports[1]}",
            good_ca=good.write(workdir / "good-ca.pem"),
            other_ca=other.write(workdir / "other-ca.pem"),
            good_pem=good.pem,
            other_pem=other.pem,
            token_file=token_file,
        )


@pytest.fixture
def backend(tmp_path: Path) -> StandaloneBackend:
    return StandaloneBackend(tmp_path / "state")


CA_SECRET = {"vaultCAFromSecret": "vault-ca", "vaultCAFromSecretNamespace": "csi"}


def kv(tls: TLSBao, address: str, **keys: str) -> dict[str, str]:
    return {"encryptionKMSType": "vault", "vaultAddress": address, "vaultTokenFile": str(tls.token_file),
            "vaultPassphrasePath": "tls/", "vaultRetryDeadline": str(DEADLINE), **keys}  # fmt: skip


def round_trip(config: KMSConfig, kms_id: str, backend: StandaloneBackend, name: str) -> str:
    """Store a new DEK through the KMS, read it back through a fresh build; the volume id."""
    volume_id = backend.volume_id_for(name, {})
    backend.create(volume_id, name, MiB, {})
    encryption = volume_encryption(config, kms_id, CONTEXT, backend)
    encryption.new_passphrase(volume_id)
    passphrase = encryption.get_passphrase(volume_id)
    assert len(passphrase) >= 43
    assert volume_encryption(config, kms_id, CONTEXT, backend).get_passphrase(volume_id) == passphrase
    return volume_id


def fails_fast_with_tls_error(config: KMSConfig, kms_id: str, backend: StandaloneBackend, name: str) -> str:
    """The call fails at once (no retries until DEADLINE) with FAILED_PRECONDITION; the message."""
    volume_id = backend.volume_id_for(name, {})
    backend.create(volume_id, name, MiB, {})
    started = time.monotonic()
    with pytest.raises(KMSTLSError) as caught:
        volume_encryption(config, kms_id, CONTEXT, backend).new_passphrase(volume_id)
    assert time.monotonic() - started < DEADLINE / 10
    code, message = status_for(caught.value)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    address = config.entry(kms_id)["vaultAddress"]
    assert f"KMS {kms_id!r}" in message and address in message and "certificate verify failed" in message
    assert ROOT_TOKEN not in message
    return message


# --- vaultCAFile, vaultCAVerify -------------------------------------------------------------------


def test_the_right_ca_file_verifies(tls_bao: TLSBao, backend: StandaloneBackend) -> None:
    config = KMSConfig(None, {"ca": kv(tls_bao, tls_bao.ip, vaultCAFile=str(tls_bao.good_ca))})
    volume_id = round_trip(config, "ca", backend, "pvc-ca")
    stored = tls_bao.server.client().secrets.kv.v2.read_secret_version(
        path=f"tls/{volume_id}", mount_point="secret", raise_on_deleted_version=True
    )
    assert stored["data"]["data"]["passphrase"]  # the DEK went through the TLS listener into Vault


def test_vault_transit_over_tls(tls_bao: TLSBao, backend: StandaloneBackend) -> None:
    entry = {"encryptionKMSType": "vault-transit", "vaultAddress": tls_bao.ip, "vaultTransitKey": "tls-kek",
             "vaultTokenFile": str(tls_bao.token_file), "vaultCAFile": str(tls_bao.good_ca)}  # fmt: skip
    round_trip(KMSConfig(None, {"transit": entry}), "transit", backend, "pvc-transit")


UNKNOWN_CA = "self-signed certificate in certificate chain"  # the server sends its CA along
# (listener, CA file, vaultTLSServerName) -> None if it verifies, else what the error says.
VERIFICATION = {
    "system-cas": ("ip", None, None, UNKNOWN_CA),
    "wrong-ca": ("ip", "other", None, UNKNOWN_CA),
    "address-not-in-cert": ("name_only", "good", None, "IP address mismatch"),
    "server-name": ("name_only", "good", "vault.test", None),
    "server-name-and-address-in-cert": ("ip", "good", "vault.test", None),
    "wrong-server-name": ("ip", "good", "other.test", "hostname 'other.test' doesn't match"),
    "server-name-wrong-ca": ("name_only", "other", "vault.test", UNKNOWN_CA),
}


@pytest.mark.parametrize("case", VERIFICATION)
def test_verification(case: str, tls_bao: TLSBao, backend: StandaloneBackend) -> None:
    listener, ca, server_name, error = VERIFICATION[case]
    keys = {"vaultCAFile": str(tls_bao.good_ca if ca == "good" else tls_bao.other_ca)} if ca else {}
    if server_name:
        keys["vaultTLSServerName"] = server_name
    config = KMSConfig(None, {case: kv(tls_bao, getattr(tls_bao, listener), **keys)})
    if error is None:
        round_trip(config, case, backend, f"pvc-{case}")
    else:
        assert error in fails_fast_with_tls_error(config, case, backend, f"pvc-{case}")


def test_ca_verify_false_accepts_any_certificate(tls_bao: TLSBao, backend: StandaloneBackend) -> None:
    config = KMSConfig(
        None,
        {
            "insecure": kv(tls_bao, tls_bao.ip, vaultCAVerify="false"),
            "insecure-wrong-ca": kv(tls_bao, tls_bao.ip, vaultCAVerify="false",
                                    vaultCAFile=str(tls_bao.other_ca)),
            "insecure-wrong-name": kv(tls_bao, tls_bao.name_only, vaultCAVerify="false",
                                      vaultTLSServerName="other.test"),
        },
    )  # fmt: skip
    for kms_id in config.ids():
        round_trip(config, kms_id, backend, f"pvc-{kms_id}")


def test_a_tls_error_while_unwrapping_is_not_a_wrong_key(tls_bao: TLSBao, backend: StandaloneBackend) -> None:
    """vault-transit turns Vault's refusal to unwrap into DEKDecryptError, but not a TLS failure."""
    base = {"encryptionKMSType": "vault-transit", "vaultAddress": tls_bao.ip, "vaultTransitKey": "tls-kek",
            "vaultTokenFile": str(tls_bao.token_file), "vaultRetryDeadline": str(DEADLINE)}  # fmt: skip
    config = KMSConfig(
        None,
        {"good": {**base, "vaultCAFile": str(tls_bao.good_ca)},
         "bad": {**base, "vaultCAFile": str(tls_bao.other_ca)}},
    )  # fmt: skip
    volume_id = backend.volume_id_for("pvc-unwrap", {})
    backend.create(volume_id, "pvc-unwrap", MiB, {})
    volume_encryption(config, "good", CONTEXT, backend).new_passphrase(volume_id)
    with pytest.raises(KMSTLSError, match="certificate verify failed"):
        volume_encryption(config, "bad", CONTEXT, backend).get_passphrase(volume_id)


# --- vaultTLSServerName ---------------------------------------------------------------------------


def test_the_server_name_is_sent_as_sni(tmp_path: Path) -> None:
    """OpenBao does not tell which name a client asked for; a plain TLS server here does."""
    ca = CA.create("sni CA")
    cert, key = ca.issue(tmp_path, "sni", dns=["vault.test"], ips=[])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    asked: list[str | None] = []
    context.sni_callback = lambda _sock, name, _ctx: asked.append(name)
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def answer_once() -> None:
            conn, _ = listener.accept()
            with context.wrap_socket(conn, server_side=True) as tls:
                tls.recv(4096)
                tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

        server = threading.Thread(target=answer_once, daemon=True)
        server.start()
        session = requests.Session()
        session.mount("https://", ServerNameAdapter("vault.test"))
        port, ca_file = listener.getsockname()[1], str(ca.write(tmp_path / "ca.pem"))
        answer = session.get(f"https://127.0.0.1:{port}/", verify=ca_file, timeout=5)
        server.join(5)
    assert answer.text == "ok"
    assert asked == ["vault.test"]


def test_a_server_name_needs_https() -> None:
    config = KMSConfig(
        None,
        {"plain": {"encryptionKMSType": "vault", "vaultAddress": "http://127.0.0.1:1",
                   "vaultTokenFile": "/t", "vaultTLSServerName": "vault.test"}},
    )  # fmt: skip
    with pytest.raises(KMSConfigError, match="'vaultTLSServerName': needs an https://"):
        config.build("plain", CONTEXT)


# --- vaultCAFromSecret ------------------------------------------------------------------------------


class FakeSecrets:
    """Stands in for csi_luks.kube's read_secret and read_config_map: {(namespace, name): data}."""

    def __init__(self) -> None:
        self.secrets: dict[tuple[str, str], dict[str, str]] = {}
        self.config_maps: dict[tuple[str, str], dict[str, str]] = {}
        self.reads: list[tuple[str, str]] = []  # Secrets read, in order

    def read_config_map(self, name: str, namespace: str, purpose: str) -> dict[str, str] | None:
        return self.config_maps.get((namespace, name))

    def read_secret(self, name: str, namespace: str, purpose: str) -> dict[str, str]:
        self.reads.append((namespace, name))
        if (namespace, name) not in self.secrets:
            raise KMSObjectNotFound(f"{purpose}: Secret {namespace}/{name} does not exist")
        return dict(self.secrets[namespace, name])


@pytest.fixture
def secrets(monkeypatch: pytest.MonkeyPatch) -> FakeSecrets:
    from csi_luks import kube

    fake = FakeSecrets()
    monkeypatch.setattr(kube, "read_secret", fake.read_secret)
    monkeypatch.setattr(kube, "read_config_map", fake.read_config_map)
    return fake


def test_a_ca_from_a_secret_verifies_and_is_kept_private(
    tls_bao: TLSBao, backend: StandaloneBackend, secrets: FakeSecrets
) -> None:
    secrets.secrets["csi", "vault-ca"] = {"cert": tls_bao.good_pem}
    config = KMSConfig(
        None, {"from-secret": kv(tls_bao, tls_bao.ip, **CA_SECRET)}
    )  # fmt: skip
    round_trip(config, "from-secret", backend, "pvc-from-secret")
    assert ("csi", "vault-ca") in secrets.reads
    kms = config.build("from-secret", CONTEXT)
    assert isinstance(kms, VaultKVKMS)
    ca_file = kms.connection._ca_file
    assert ca_file is not None and ca_file.path.read_text().strip() == tls_bao.good_pem.strip()
    assert stat.S_IMODE(ca_file.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(ca_file.path.parent.stat().st_mode) == 0o700


def test_a_fixed_ca_secret_is_picked_up_after_a_tls_failure(
    tls_bao: TLSBao, backend: StandaloneBackend, secrets: FakeSecrets
) -> None:
    secrets.secrets["csi", "rotating-ca"] = {"cert": tls_bao.other_pem}
    config = KMSConfig(
        None,
        {"rotating": kv(tls_bao, tls_bao.ip, vaultCAFromSecret="rotating-ca",
                        vaultCAFromSecretNamespace="csi")},
    )  # fmt: skip
    fails_fast_with_tls_error(config, "rotating", backend, "pvc-rotating-before")
    secrets.secrets["csi", "rotating-ca"] = {"cert": tls_bao.good_pem}
    round_trip(config, "rotating", backend, "pvc-rotating-after")  # same connection, the CA read again


def test_the_ca_secret_is_in_the_plugin_namespace_by_default(
    tls_bao: TLSBao,
    backend: StandaloneBackend,
    secrets: FakeSecrets,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    namespace_file = tmp_path / "namespace"
    namespace_file.write_text("kube-system")
    monkeypatch.setattr(vault_tls, "SA_NAMESPACE_FILE", str(namespace_file))
    secrets.secrets["kube-system", "vault-ca"] = {"cert": tls_bao.good_pem}
    config = KMSConfig(None, {"default-ns": kv(tls_bao, tls_bao.ip, vaultCAFromSecret="vault-ca")})
    round_trip(config, "default-ns", backend, "pvc-default-ns")
    assert secrets.reads[0] == ("kube-system", "vault-ca")


def test_outside_a_pod_the_ca_secret_needs_its_namespace(
    tls_bao: TLSBao, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vault_tls, "SA_NAMESPACE_FILE", str(tmp_path / "missing"))
    config = KMSConfig(None, {"no-ns": kv(tls_bao, tls_bao.ip, vaultCAFromSecret="vault-ca")})
    with pytest.raises(KMSConfigError, match="'vaultCAFromSecretNamespace'"):
        config.build("no-ns", CONTEXT)


@pytest.mark.parametrize(
    ("data", "error", "code", "words"),
    [
        (None, KMSObjectNotFound, grpc.StatusCode.FAILED_PRECONDITION, "Secret csi/vault-ca does not exist"),
        ({"ca.crt": "x"}, KMSObjectNotFound, grpc.StatusCode.FAILED_PRECONDITION, "under key 'cert'"),
        ({"cert": "garbage"}, KMSConfigError, grpc.StatusCode.INVALID_ARGUMENT, "no PEM certificate"),
    ],
)  # fmt: skip
def test_a_missing_or_broken_ca_secret(
    tls_bao: TLSBao,
    backend: StandaloneBackend,
    secrets: FakeSecrets,
    data: dict[str, str] | None,
    error: type[Exception],
    code: grpc.StatusCode,
    words: str,
) -> None:
    if data is not None:
        secrets.secrets["csi", "vault-ca"] = data
    config = KMSConfig(
        None, {"broken": kv(tls_bao, tls_bao.ip, **CA_SECRET)}
    )  # fmt: skip
    volume_id = backend.volume_id_for("pvc-broken", {})
    backend.create(volume_id, "pvc-broken", MiB, {})
    with pytest.raises(error) as caught:
        volume_encryption(config, "broken", CONTEXT, backend).new_passphrase(volume_id)
    assert status_for(caught.value) == (code, str(caught.value))
    assert "'broken'" in str(caught.value) and words in str(caught.value)


def test_without_verification_the_ca_secret_is_not_read(
    tls_bao: TLSBao, backend: StandaloneBackend, secrets: FakeSecrets
) -> None:
    config = KMSConfig(
        None,
        {"unread": kv(tls_bao, tls_bao.ip, vaultCAVerify="false", vaultCAFromSecret="absent",
                      vaultCAFromSecretNamespace="csi")},
    )  # fmt: skip
    round_trip(config, "unread", backend, "pvc-unread")
    assert secrets.reads == []


def test_a_ca_file_and_a_ca_secret_exclude_each_other(tls_bao: TLSBao) -> None:
    config = KMSConfig(
        None,
        {"both": kv(tls_bao, tls_bao.ip, vaultCAFile=str(tls_bao.good_ca), vaultCAFromSecret="vault-ca",
                    vaultCAFromSecretNamespace="csi")},
    )  # fmt: skip
    with pytest.raises(KMSConfigError, match="not both"):
        config.build("both", CONTEXT)


def tenant_tokens_entry(tls_bao: TLSBao) -> dict[str, str]:
    """A vaulttokens entry over TLS by name, with the CA in Secret csi/vault-ca; names no token Secret or
    tenant ConfigMap, so their default names are read."""
    return {"encryptionKMSType": "vaulttokens", "vaultAddress": tls_bao.name_only,
            "vaultCAFromSecret": "vault-ca", "vaultCAFromSecretNamespace": "csi",
            "vaultPassphrasePath": "tenants/", "vaultRetryDeadline": str(DEADLINE)}  # fmt: skip


def test_vaulttokens_over_tls_with_the_ca_and_the_tenant_token_from_secrets(
    tls_bao: TLSBao, backend: StandaloneBackend, secrets: FakeSecrets
) -> None:
    """The tenant types share the connection code: the tenant's token Secret, the plugin's CA Secret,
    and vaultTLSServerName set by the tenant's own ConfigMap (a tenant override key)."""
    secrets.secrets["tenant-a", "csi-luks-vault-token"] = {"token": ROOT_TOKEN}
    secrets.secrets["csi", "vault-ca"] = {"cert": tls_bao.good_pem}
    config = KMSConfig(None, {"tokens": tenant_tokens_entry(tls_bao)})
    context = KMSContext(secrets={}, pvc_namespace="tenant-a")
    volume_id = backend.volume_id_for("pvc-tenant", {})
    backend.create(volume_id, "pvc-tenant", MiB, {})
    with pytest.raises(KMSTLSError, match="IP address mismatch"):  # the certificate names only vault.test
        volume_encryption(config, "tokens", context, backend).new_passphrase(volume_id)
    secrets.config_maps["tenant-a", "csi-luks-kms-config"] = {"vaultTLSServerName": "vault.test"}
    encryption = volume_encryption(config, "tokens", context, backend)
    encryption.new_passphrase(volume_id)
    assert volume_encryption(config, "tokens", context, backend).get_passphrase(volume_id)
    assert {("tenant-a", "csi-luks-vault-token"), ("csi", "vault-ca")} <= set(secrets.reads)
    encryption.remove(volume_id)
    with pytest.raises(DEKNotFound):
        encryption.get_passphrase(volume_id)


def test_a_ca_secret_read_through_the_api_server_as_the_plugin(
    tls_bao: TLSBao, backend: StandaloneBackend, kms_env: KmsEnv, plugin_kube_client: None
) -> None:
    """A real API server and the plugin's RBAC (deploy/kustomize/base): Secret read, a missing one refused."""
    kms_env.put_secret(SYSTEM_NAMESPACE, "csi-luks-vault-ca", {"cert": tls_bao.good_pem})
    keys = {"vaultCAFromSecretNamespace": SYSTEM_NAMESPACE}
    config = KMSConfig(
        None,
        {"api-ca": kv(tls_bao, tls_bao.ip, vaultCAFromSecret="csi-luks-vault-ca", **keys),
         "api-no-ca": kv(tls_bao, tls_bao.ip, vaultCAFromSecret="no-such-secret", **keys)},
    )  # fmt: skip
    round_trip(config, "api-ca", backend, "pvc-api-ca")
    volume_id = backend.volume_id_for("pvc-api-no-ca", {})
    backend.create(volume_id, "pvc-api-no-ca", MiB, {})
    with pytest.raises(KMSObjectNotFound) as caught:
        volume_encryption(config, "api-no-ca", CONTEXT, backend).new_passphrase(volume_id)
    assert status_for(caught.value)[0] == grpc.StatusCode.FAILED_PRECONDITION
    assert f"Secret {SYSTEM_NAMESPACE}/no-such-secret does not exist" in str(caught.value)


def test_a_tenant_set_up_for_ceph_csi_is_read_under_ceph_csi_s_default_names(
    tls_bao: TLSBao, backend: StandaloneBackend, secrets: FakeSecrets
) -> None:
    """An entry that names neither: the token in Ceph-CSI's ceph-csi-kms-token and the overrides in its
    ceph-csi-kms-config are read when csi-luks's own do not exist."""
    secrets.secrets["tenant-b", "ceph-csi-kms-token"] = {"token": ROOT_TOKEN}
    secrets.secrets["csi", "vault-ca"] = {"cert": tls_bao.good_pem}
    secrets.config_maps["tenant-b", "ceph-csi-kms-config"] = {"vaultTLSServerName": "vault.test"}
    config = KMSConfig(None, {"tokens": tenant_tokens_entry(tls_bao)})
    context = KMSContext(secrets={}, pvc_namespace="tenant-b")
    volume_id = backend.volume_id_for("pvc-tenant-b", {})
    backend.create(volume_id, "pvc-tenant-b", MiB, {})
    encryption = volume_encryption(config, "tokens", context, backend)
    encryption.new_passphrase(volume_id)  # the override's server name verifies: the ConfigMap was read
    assert volume_encryption(config, "tokens", context, backend).get_passphrase(volume_id)
    assert ("tenant-b", "ceph-csi-kms-token") in set(secrets.reads)
    encryption.remove(volume_id)

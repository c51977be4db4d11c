"""What the kmip and aws-* types promise beyond the contract (tests/host/test_kms_contract.py), against
the real PyKMIP server and the moto emulator: Ceph-CSI's wrapped-DEK layout (checked with the key and
an independent AES here), both KMIP modes reading each other's DEKs, refusals naming the KMS id, and a
server that does not answer failing UNAVAILABLE within the configured timeout.

The Secret is handed to the KMS directly (csi_luks.kube.read_secret replaced): reading it through the
API server is the contract tests' part.
"""

from __future__ import annotations

import base64
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from csi_luks import kube
from csi_luks.kms.aws import AWSMetadataKMS, AWSSTSMetadataKMS
from csi_luks.kms.base import KMSContext, KMSPermissionDenied, KMSTLSError, KMSUnavailable
from csi_luks.kms.kmip import KMIPKMS, KMIPSettings
from tests.support.kmip_server import SERVER_NAME, KMIPServer
from tests.support.moto_server import AWSEmulator

DEK = "x5Q2Vb0k8X1c2PZ0lYyq7Zp3mB9E4wTg6hJ1sNf0aQk"  # as csi-luks makes them: 43 URL-safe characters


def _secret(monkeypatch: pytest.MonkeyPatch, data: dict[str, str]) -> None:
    monkeypatch.setattr(kube, "read_secret", lambda name, namespace, purpose: dict(data))


def _kmip(server: KMIPServer, **entry: str) -> KMIPKMS:
    base = {"KMIP_ENDPOINT": server.endpoint, "KMIP_SECRET_NAMESPACE": "kube-system"}
    base["TLS_SERVER_NAME"] = SERVER_NAME
    return KMIPKMS(KMIPSettings.parse("kmip-1", {**base, **entry}))


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that takes connections (the kernel's backlog) and never says a word."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


def _key_material(server: KMIPServer, name: str) -> bytes:
    client = server.client()
    client.open()
    try:
        value: bytes = client.get(server.keys[name]).value
    finally:
        client.close()
    return value


@pytest.mark.parametrize("rpc", ["true", "false"])
def test_kmip_wraps_in_ceph_csi_layout(
    session_kmip: KMIPServer, monkeypatch: pytest.MonkeyPatch, rpc: str
) -> None:
    """{"dek", "nonce"} in base64: AES-CBC/PKCS#5 under a 16-byte IV on the server, or AES-GCM under a
    12-byte nonce here, both with the server's key: what Ceph-CSI writes and reads."""
    _secret(monkeypatch, session_kmip.secret_data())
    wrapped = json.loads(_kmip(session_kmip, USE_CRYPTO_RPC=rpc).encrypt_dek("vol-1", DEK))
    assert set(wrapped) == {"dek", "nonce"}
    sealed, nonce = base64.b64decode(wrapped["dek"]), base64.b64decode(wrapped["nonce"])
    key = _key_material(session_kmip, "csi-kek")
    if rpc == "true":
        assert len(nonce) == 16
        decryptor = Cipher(algorithms.AES(key), modes.CBC(nonce)).decryptor()
        unpadder = padding.PKCS7(128).unpadder()
        padded = decryptor.update(sealed) + decryptor.finalize()
        plain = unpadder.update(padded) + unpadder.finalize()
    else:
        assert len(nonce) == 12
        plain = AESGCM(key).decrypt(nonce, sealed, None)
    assert plain.decode() == DEK


def test_kmip_modes_read_each_others_deks(session_kmip: KMIPServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A class switched between USE_CRYPTO_RPC modes keeps opening its volumes (the nonce tells which)."""
    _secret(monkeypatch, session_kmip.secret_data())
    rpc, local = _kmip(session_kmip, USE_CRYPTO_RPC="true"), _kmip(session_kmip, USE_CRYPTO_RPC="false")
    assert local.decrypt_dek("v", rpc.encrypt_dek("v", DEK)) == DEK
    assert rpc.decrypt_dek("v", local.encrypt_dek("v", DEK)) == DEK


@pytest.mark.parametrize(
    ("identity", "refusal"),
    [
        ("someone-else", "refused the client identity"),  # the server's access policy: not the key's owner
        ("foreign", "refused the client certificate"),  # a CA the server's TLS does not trust
        ("mismatched", "is not the key of"),  # CLIENT_KEY of another certificate
    ],
)
def test_kmip_wrong_client_certificate_or_key_is_permission_denied(
    session_kmip: KMIPServer, monkeypatch: pytest.MonkeyPatch, identity: str, refusal: str
) -> None:
    data = session_kmip.secret_data()
    _secret(monkeypatch, data)
    wrapped = _kmip(session_kmip).encrypt_dek("v", DEK)
    if identity == "mismatched":
        data = {**data, "CLIENT_KEY": session_kmip.secret_data(identity="someone-else")["CLIENT_KEY"]}
    else:
        data = session_kmip.secret_data(identity=identity)
    _secret(monkeypatch, data)
    with pytest.raises(KMSPermissionDenied) as info:
        _kmip(session_kmip).decrypt_dek("v", wrapped)
    assert "KMS 'kmip-1'" in str(info.value) and refusal in str(info.value)
    assert data["CLIENT_KEY"] not in str(info.value) and DEK not in str(info.value)


def test_kmip_server_of_another_name_is_a_tls_error(
    session_kmip: KMIPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    _secret(monkeypatch, session_kmip.secret_data())
    with pytest.raises(KMSTLSError, match=r"KMS 'kmip-1'.*does not verify as 'kmip\.example\.com'"):
        _kmip(session_kmip, TLS_SERVER_NAME="kmip.example.com").encrypt_dek("v", DEK)


@pytest.mark.parametrize("rpc", ["true", "false"])
def test_kmip_silent_server_is_unavailable_within_the_timeout(
    session_kmip: KMIPServer, monkeypatch: pytest.MonkeyPatch, silent_port: int, rpc: str
) -> None:
    _secret(monkeypatch, session_kmip.secret_data())
    kms = _kmip(
        session_kmip,
        KMIP_ENDPOINT=f"127.0.0.1:{silent_port}",
        READ_TIMEOUT="1",
        WRITE_TIMEOUT="1",
        USE_CRYPTO_RPC=rpc,
    )
    started = time.monotonic()
    with pytest.raises(KMSUnavailable, match=r"KMS 'kmip-1'.*no answer within 1s"):
        kms.encrypt_dek("v", DEK)
    assert time.monotonic() - started < 2.5


def _aws(emulator: AWSEmulator, **entry: str) -> AWSMetadataKMS:
    base = {
        "AWS_REGION": "us-east-1",
        "KMS_SECRET_NAMESPACE": "kube-system",
        "AWS_KMS_ENDPOINT": emulator.url,
    }
    return AWSMetadataKMS("aws-1", {**base, **entry})


def test_aws_wraps_in_ceph_csi_layout(session_aws: AWSEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    """The metadata holds base64 of KMS Encrypt's CiphertextBlob, which KMS Decrypt takes as it is."""
    _secret(monkeypatch, session_aws.metadata_secret())
    wrapped = _aws(session_aws).encrypt_dek("vol-1", DEK)
    answer = session_aws.client("kms").decrypt(CiphertextBlob=base64.b64decode(wrapped, validate=True))
    assert answer["Plaintext"].decode() == DEK and answer["KeyId"] == session_aws.cmks["csi-cmk"]


def test_aws_sts_uses_the_tenants_role(
    session_aws: AWSEmulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    token = tmp_path / "oidc-token"
    token.write_text("a projected ServiceAccount token")
    _secret(monkeypatch, session_aws.tenant_secret())
    entry = {
        "tokenFilePath": str(token),
        "awsKMSEndpoint": session_aws.url,
        "awsSTSEndpoint": session_aws.url,
    }
    tenant = AWSSTSMetadataKMS("sts-1", entry, KMSContext(secrets={}, pvc_namespace="tenant-a"))
    wrapped = tenant.encrypt_dek("vol-1", DEK)
    assert tenant.decrypt_dek("vol-1", wrapped) == DEK
    _secret(monkeypatch, session_aws.tenant_secret(role="stranger"))
    stranger = AWSSTSMetadataKMS("sts-1", entry, KMSContext(secrets={}, pvc_namespace="tenant-b"))
    with pytest.raises(KMSPermissionDenied, match=r"KMS 'sts-1'.*assumed-role/stranger"):
        stranger.decrypt_dek("vol-1", wrapped)


def test_aws_silent_endpoint_is_unavailable_within_the_timeout(
    session_aws: AWSEmulator, monkeypatch: pytest.MonkeyPatch, silent_port: int
) -> None:
    _secret(monkeypatch, session_aws.metadata_secret())
    kms = _aws(session_aws, AWS_KMS_ENDPOINT=f"http://127.0.0.1:{silent_port}", AWS_TIMEOUT="1")
    kms._kms("v")  # the client built (botocore reads its service model): the wait is what is timed
    started = time.monotonic()
    with pytest.raises(KMSUnavailable, match=r"KMS 'aws-1'.*unavailable: no answer"):
        kms.encrypt_dek("v", DEK)
    # One attempt, its answer awaited AWS_TIMEOUT (the connection is taken at once: the backlog).
    assert time.monotonic() - started < 2.5

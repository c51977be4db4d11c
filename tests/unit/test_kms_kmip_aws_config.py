"""The kmip and aws-* entries: what each key accepts, and messages that name the id and key. No server:
these fail before any connection (and a malformed wrapped DEK before any Secret is read)."""

from __future__ import annotations

import json
from collections.abc import Mapping

import pytest

from csi_luks.kms.aws import AWSMetadataKMS, AWSSTSMetadataKMS
from csi_luks.kms.base import DEKDecryptError, KMSConfigError, KMSContext
from csi_luks.kms.config import KMSConfig
from csi_luks.kms.kmip import DEFAULT_SECRET_NAME, KMIPKMS, KMIPSettings

KMIP = {"encryptionKMSType": "kmip", "KMIP_ENDPOINT": "kmip.example.com:5696", "KMIP_SECRET_NAMESPACE": "csi"}


def _kmip(**changes: str) -> KMIPSettings:
    return KMIPSettings.parse("hsm", {**KMIP, **changes})


def test_kmip_defaults_are_ceph_csis() -> None:
    settings = _kmip()
    assert (settings.host, settings.port, settings.server_name) == (
        "kmip.example.com",
        5696,
        "kmip.example.com",
    )
    assert settings.secret_name == DEFAULT_SECRET_NAME == "ceph-csi-kmip-credentials"
    assert settings.use_crypto_rpc is True and settings.timeout == 10
    assert _kmip(READ_TIMEOUT="3", WRITE_TIMEOUT="2", USE_CRYPTO_RPC="false").timeout == 3
    assert _kmip(KMIP_ENDPOINT="[::1]:5696").host == "::1"


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"KMIP_ENDPOINT": ""}, "KMIP_ENDPOINT"),
        ({"KMIP_ENDPOINT": "kmip.example.com"}, "KMIP_ENDPOINT"),
        ({"KMIP_ENDPOINT": "kmip.example.com:99999"}, "KMIP_ENDPOINT"),
        ({"USE_CRYPTO_RPC": "yes"}, "USE_CRYPTO_RPC"),
        ({"READ_TIMEOUT": "soon"}, "READ_TIMEOUT"),
        ({"WRITE_TIMEOUT": "-1"}, "WRITE_TIMEOUT"),
        ({"READ_TIMEOUT": "nan"}, "READ_TIMEOUT"),
    ],
)
def test_kmip_bad_entries_name_the_id_and_key(changes: Mapping[str, str], key: str) -> None:
    with pytest.raises(KMSConfigError, match=f"KMS 'hsm'.*{key}"):
        _kmip(**changes)


def test_kmip_outside_a_pod_needs_the_secrets_namespace() -> None:
    entry = {k: v for k, v in KMIP.items() if k != "KMIP_SECRET_NAMESPACE"}
    with pytest.raises(KMSConfigError, match="set 'KMIP_SECRET_NAMESPACE'"):
        KMIPSettings.parse("hsm", entry)


@pytest.mark.parametrize("wrapped", ["not json", "{}", json.dumps({"dek": "!!", "nonce": "AAAA"}),
                                     json.dumps({"dek": "AAAA", "nonce": "AAAA"})])  # fmt: skip
def test_kmip_a_malformed_wrapped_dek_is_refused_before_any_call(wrapped: str) -> None:
    with pytest.raises(DEKDecryptError, match="volume v1: its DEK does not unwrap"):
        KMIPKMS(_kmip()).decrypt_dek("v1", wrapped)


def test_the_types_are_registered() -> None:
    config = KMSConfig(None, {"hsm": KMIP, "aws": {"encryptionKMSType": "aws-metadata", "AWS_REGION": "x",
                                                   "KMS_SECRET_NAMESPACE": "csi"}})  # fmt: skip
    assert isinstance(config.build("hsm", KMSContext(secrets={})), KMIPKMS)
    assert isinstance(config.build("aws", KMSContext(secrets={})), AWSMetadataKMS)


def test_aws_metadata_needs_a_region_and_a_usable_endpoint() -> None:
    with pytest.raises(KMSConfigError, match=r"KMS 'aws'.*AWS_REGION"):
        AWSMetadataKMS("aws", {"KMS_SECRET_NAMESPACE": "csi"})
    with pytest.raises(KMSConfigError, match=r"KMS 'aws'.*AWS_KMS_ENDPOINT"):
        AWSMetadataKMS(
            "aws", {"AWS_REGION": "x", "KMS_SECRET_NAMESPACE": "csi", "AWS_KMS_ENDPOINT": "kms.local"}
        )
    with pytest.raises(KMSConfigError, match=r"KMS 'aws'.*AWS_TIMEOUT"):
        AWSMetadataKMS("aws", {"AWS_REGION": "x", "KMS_SECRET_NAMESPACE": "csi", "AWS_TIMEOUT": "0"})


def test_aws_sts_needs_the_pvc_namespace() -> None:
    with pytest.raises(KMSConfigError, match=r"KMS 'sts'.*PVC's namespace"):
        AWSSTSMetadataKMS("sts", {}, KMSContext(secrets={}))


def test_aws_a_wrapped_dek_that_is_not_base64_is_refused_before_any_call() -> None:
    kms = AWSMetadataKMS("aws", {"AWS_REGION": "x", "KMS_SECRET_NAMESPACE": "csi"})
    kms._client, kms._cmk = object(), "arn:aws:kms:x:1:key/k"  # connected (no call is made)
    with pytest.raises(DEKDecryptError, match="not base64"):
        kms.decrypt_dek("v1", "not base64!")

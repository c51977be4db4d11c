"""The test API server does what later tests rely on: Secrets, ConfigMaps, TokenRequest and TokenReview."""

from __future__ import annotations

import base64
import secrets
import uuid

import kubernetes.client
import pytest
from kubernetes.client.rest import ApiException

from tests.support.kube import KubeCluster, forged_token, jwt_claims


@pytest.fixture
def namespace(kube: KubeCluster) -> str:
    """A fresh namespace per test. Not deleted: without a controller manager it would stay Terminating."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    with kube.api_client() as api:
        kubernetes.client.CoreV1Api(api).create_namespace(
            kubernetes.client.V1Namespace(metadata=kubernetes.client.V1ObjectMeta(name=name))
        )
    return name


def _create_service_account(kube: KubeCluster, namespace: str, name: str) -> None:
    with kube.api_client() as api:
        kubernetes.client.CoreV1Api(api).create_namespaced_service_account(
            namespace, kubernetes.client.V1ServiceAccount(metadata=kubernetes.client.V1ObjectMeta(name=name))
        )


def _request_token(kube: KubeCluster, namespace: str, name: str, audiences: list[str]) -> str:
    with kube.api_client() as api:
        response = kubernetes.client.CoreV1Api(api).create_namespaced_service_account_token(
            name,
            namespace,
            kubernetes.client.AuthenticationV1TokenRequest(
                spec=kubernetes.client.V1TokenRequestSpec(audiences=audiences, expiration_seconds=600)
            ),
        )
    token: str = response.status.token
    return token


def _review(
    kube: KubeCluster, token: str, audiences: list[str] | None = None
) -> kubernetes.client.V1TokenReviewStatus:
    with kube.api_client() as api:
        review = kubernetes.client.AuthenticationV1Api(api).create_token_review(
            kubernetes.client.V1TokenReview(
                spec=kubernetes.client.V1TokenReviewSpec(token=token, audiences=audiences)
            )
        )
    return review.status


def test_secret_round_trip(kube: KubeCluster, namespace: str) -> None:
    # Arbitrary bytes, not only text: key material is stored in Secrets.
    value = secrets.token_bytes(64)
    with kube.api_client() as api:
        core = kubernetes.client.CoreV1Api(api)
        core.create_namespaced_secret(
            namespace,
            kubernetes.client.V1Secret(
                metadata=kubernetes.client.V1ObjectMeta(name="kms-credentials"),
                data={"key": base64.b64encode(value).decode()},
                string_data={"role": "csi-luks"},
            ),
        )
        secret = core.read_namespaced_secret("kms-credentials", namespace)
    assert base64.b64decode(secret.data["key"]) == value
    assert base64.b64decode(secret.data["role"]) == b"csi-luks"  # stringData is stored as data


def test_configmap_create_and_patch(kube: KubeCluster, namespace: str) -> None:
    with kube.api_client() as api:
        core = kubernetes.client.CoreV1Api(api)
        core.create_namespaced_config_map(
            namespace,
            kubernetes.client.V1ConfigMap(
                metadata=kubernetes.client.V1ObjectMeta(name="kms-config"), data={"address": "http://a"}
            ),
        )
        core.patch_namespaced_config_map("kms-config", namespace, {"data": {"mount": "transit"}})
        patched = core.read_namespaced_config_map("kms-config", namespace)
    # A merge patch: the new key is added and the old one kept.
    assert patched.data == {"address": "http://a", "mount": "transit"}


def test_service_account_token_is_reviewed(kube: KubeCluster, namespace: str) -> None:
    _create_service_account(kube, namespace, "csi-luks-node")
    token = _request_token(kube, namespace, "csi-luks-node", [kube.api_audience])
    assert jwt_claims(token)["iss"] == kube.issuer

    status = _review(kube, token)
    assert status.authenticated is True, status.error
    assert status.user.username == f"system:serviceaccount:{namespace}:csi-luks-node"
    assert f"system:serviceaccounts:{namespace}" in status.user.groups


def test_token_for_another_audience_is_checked_against_it(kube: KubeCluster, namespace: str) -> None:
    """OpenBao's Kubernetes auth reviews tokens minted for its own audience."""
    _create_service_account(kube, namespace, "csi-luks-node")
    token = _request_token(kube, namespace, "csi-luks-node", ["openbao"])

    accepted = _review(kube, token, audiences=["openbao"])
    assert accepted.authenticated is True, accepted.error
    assert accepted.audiences == ["openbao"]
    rejected = _review(kube, token)  # reviewed for the API server's own audience
    assert not rejected.authenticated


@pytest.mark.parametrize("kind", ["garbage", "forged"])
def test_bad_token_is_not_authenticated(kube: KubeCluster, namespace: str, kind: str) -> None:
    _create_service_account(kube, namespace, "csi-luks-node")
    token = "not-a-token" if kind == "garbage" else forged_token(kube, namespace, "csi-luks-node")

    status = _review(kube, token)
    assert not status.authenticated
    assert status.user is None or not status.user.username
    # The API server itself turns the same token away.
    with kube.api_client(token) as api, pytest.raises(ApiException) as excinfo:
        kubernetes.client.CoreV1Api(api).list_namespace()
    assert excinfo.value.status == 401


def test_service_account_is_bound_by_rbac(kube: KubeCluster, namespace: str) -> None:
    """RBAC is on: a ServiceAccount token authenticates but may not read Secrets it was not granted."""
    _create_service_account(kube, namespace, "csi-luks-node")
    token = _request_token(kube, namespace, "csi-luks-node", [kube.api_audience])
    with kube.api_client(token) as api, pytest.raises(ApiException) as excinfo:
        kubernetes.client.CoreV1Api(api).list_namespaced_secret(namespace)
    assert excinfo.value.status == 403

"""csi_luks.kube's errors are its own (it sits below the KMS types), and kms/kube_api raises each as the KMS
error it always was: the same message, the same gRPC code."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from csi_luks import kube
from csi_luks.errors import status_for
from csi_luks.kms import kube_api
from csi_luks.kms.base import KMSConfigError, KMSObjectNotFound, KMSPermissionDenied, KMSUnavailable


class _Core:
    def __init__(self, failure: BaseException) -> None:
        self.failure = failure

    def read_namespaced_secret(self, *_args: Any, **_kwargs: Any) -> Any:
        raise self.failure

    read_namespaced_config_map = read_namespaced_secret


@pytest.fixture
def failing(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[BaseException]]:
    """Every API call fails with the last exception put in the list."""
    failures: list[BaseException] = []
    kube.set_api_client(object())
    monkeypatch.setattr(k8s_client, "CoreV1Api", lambda _client: _Core(failures[-1]))
    yield failures
    kube.set_api_client(None)


@pytest.mark.parametrize(
    ("failure", "kube_kind", "kms_kind", "code", "message"),
    [
        (ApiException(status=404, reason="Not Found"), kube.KubeObjectNotFound, KMSObjectNotFound,
         grpc.StatusCode.FAILED_PRECONDITION, "KMS 'x': Secret ns/s does not exist"),
        (ApiException(status=403, reason="Forbidden"), kube.KubePermissionDenied, KMSPermissionDenied,
         grpc.StatusCode.PERMISSION_DENIED, "KMS 'x': Secret ns/s: the plugin may not access it (RBAC)"),
        (ApiException(status=500, reason="Internal Server Error"), kube.KubeUnavailable, KMSUnavailable,
         grpc.StatusCode.UNAVAILABLE,
         "KMS 'x': Secret ns/s: the Kubernetes API server answered 500 Internal Server Error"),
        (ConnectionRefusedError(111, "refused"), kube.KubeUnavailable, KMSUnavailable,
         grpc.StatusCode.UNAVAILABLE,
         "KMS 'x': Secret ns/s: the Kubernetes API server is unreachable (ConnectionRefusedError)"),
    ],
)  # fmt: skip
def test_each_api_failure_is_a_kube_error_and_the_same_kms_error_as_before(
    failing: list[BaseException],
    failure: BaseException,
    kube_kind: type[kube.KubeError],
    kms_kind: type[Exception],
    code: grpc.StatusCode,
    message: str,
) -> None:
    failing.append(failure)
    with pytest.raises(kube_kind) as raw:
        kube.read_secret("s", "ns", "KMS 'x'")
    assert str(raw.value) == message
    with pytest.raises(kms_kind) as mapped:
        kube_api.read_secret("s", "ns", "KMS 'x'")
    assert type(mapped.value) is kms_kind and str(mapped.value) == message
    assert status_for(mapped.value) == (code, message)


def test_a_missing_config_map_is_none_and_no_credentials_a_configuration_error(
    failing: list[BaseException], monkeypatch: pytest.MonkeyPatch
) -> None:
    failing.append(ApiException(status=404, reason="Not Found"))
    assert kube_api.read_config_map("m", "ns", "KMS configuration") is None

    def nowhere() -> None:
        raise ConfigException("no config")

    kube.set_api_client(None)
    monkeypatch.setattr(k8s_config, "load_incluster_config", nowhere)
    monkeypatch.setattr(k8s_config, "load_kube_config", nowhere)
    with pytest.raises(KMSConfigError) as mapped:
        kube_api.read_secret("s", "ns", "KMS 'x'")
    assert type(mapped.value) is KMSConfigError
    assert (
        str(mapped.value)
        == "no Kubernetes API credentials: not in a pod, and no usable kubeconfig (no config)"
    )
    assert status_for(mapped.value)[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_kube_imports_nothing_of_the_kms_layer() -> None:
    tree = ast.parse(Path(kube.__file__).read_text())
    imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)] + [
        alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    ]
    assert not [name for name in imported if name.startswith("csi_luks")]

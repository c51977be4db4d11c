"""The plugin's Kubernetes API client: in-cluster credentials, else $KUBECONFIG; one client, reused.

Every call maps API errors to errors of its own (KubeError's kinds) that name the object and why, never
its contents: no credentials, a missing object, a refusal (RBAC), anything else unavailable. This module
sits below its users: the KMS types reach it through kms/kube_api.py, which raises the same message as the
KMS error of each kind (a configuration error, FAILED_PRECONDITION, PERMISSION_DENIED, UNAVAILABLE).
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from urllib3.exceptions import HTTPError

T = TypeVar("T")
_lock = threading.Lock()
_api_client: Any = None
REQUEST_TIMEOUT = 10.0  # seconds per API call: a hung API server must not hang a CSI call


class KubeError(Exception):
    """A Kubernetes API call failed; the message names the object and why."""


class KubeNoCredentials(KubeError):
    """Neither in a pod nor with a usable kubeconfig."""


class KubeObjectNotFound(KubeError):
    """The object does not exist."""


class KubePermissionDenied(KubeError):
    """The API server refused the plugin the object (401, 403: its RBAC)."""


class KubeUnavailable(KubeError):
    """The API server is unreachable or answered with another error; a retry may pass."""


def set_api_client(api_client: Any) -> None:
    """Use this client from now on (tests, or a caller that built its own configuration)."""
    global _api_client
    with _lock:
        _api_client = api_client


def api_client() -> Any:
    global _api_client
    with _lock:
        if _api_client is None:
            try:
                config.load_incluster_config()
            except ConfigException:
                try:
                    config.load_kube_config()
                except (ConfigException, OSError) as exc:
                    raise KubeNoCredentials(
                        f"no Kubernetes API credentials: not in a pod, and no usable kubeconfig ({exc})"
                    ) from None
            _api_client = client.ApiClient()
        return _api_client


def _call(what: str, fn: Callable[[client.CoreV1Api], T]) -> T:
    try:
        return fn(client.CoreV1Api(api_client()))
    except ApiException as exc:
        if exc.status == 404:
            raise KubeObjectNotFound(f"{what} does not exist") from None
        if exc.status in (401, 403):
            raise KubePermissionDenied(f"{what}: the plugin may not access it (RBAC)") from None
        answer = f"{exc.status} {exc.reason}"
        raise KubeUnavailable(f"{what}: the Kubernetes API server answered {answer}") from None
    except (HTTPError, OSError) as exc:
        reason = type(exc).__name__
        raise KubeUnavailable(f"{what}: the Kubernetes API server is unreachable ({reason})") from None


def read_secret(name: str, namespace: str, purpose: str) -> dict[str, str]:
    """A Secret's data, decoded; errors say which Secret and why, never its contents."""
    secret = _call(
        f"{purpose}: Secret {namespace}/{name}",
        lambda core: core.read_namespaced_secret(name, namespace, _request_timeout=REQUEST_TIMEOUT),
    )
    return {key: base64.b64decode(value).decode() for key, value in (secret.data or {}).items()}


def read_config_map(name: str, namespace: str, purpose: str) -> dict[str, str] | None:
    """A ConfigMap's data, or None when it does not exist."""
    try:
        config_map = _call(
            f"{purpose}: ConfigMap {namespace}/{name}",
            lambda core: core.read_namespaced_config_map(name, namespace, _request_timeout=REQUEST_TIMEOUT),
        )
    except KubeObjectNotFound:
        return None
    return dict(config_map.data or {})


def request_service_account_token(name: str, namespace: str, audiences: list[str], purpose: str) -> str:
    """A fresh, short-lived token for a ServiceAccount (the TokenRequest API)."""
    body = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(audiences=audiences, expiration_seconds=600)
    )
    response = _call(
        f"{purpose}: ServiceAccount {namespace}/{name}",
        lambda core: core.create_namespaced_service_account_token(
            name, namespace, body, _request_timeout=REQUEST_TIMEOUT
        ),
    )
    token: str = response.status.token
    return token

"""The plugin's Kubernetes API client: in-cluster credentials, else $KUBECONFIG; one client, reused."""

from __future__ import annotations

import base64
import threading
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from urllib3.exceptions import HTTPError

from csi_luks.kms.base import KMSConfigError, KMSPermissionDenied, KMSUnavailable

_lock = threading.Lock()
_api_client: Any = None


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
                    raise KMSConfigError(
                        f"no Kubernetes API credentials: not in a pod, and no usable kubeconfig ({exc})"
                    ) from None
            _api_client = client.ApiClient()
        return _api_client


def read_secret(name: str, namespace: str, purpose: str) -> dict[str, str]:
    """A Secret's data, decoded; errors say which Secret and why, never its contents."""
    try:
        secret = client.CoreV1Api(api_client()).read_namespaced_secret(name, namespace)
    except ApiException as exc:
        where = f"{purpose}: Secret {namespace}/{name}"
        if exc.status == 404:
            raise KMSConfigError(f"{where} does not exist") from None
        if exc.status in (401, 403):
            raise KMSPermissionDenied(f"{where}: the plugin may not read it (RBAC)") from None
        raise KMSUnavailable(f"{where}: the API server answered {exc.status} {exc.reason}") from None
    except HTTPError as exc:
        raise KMSUnavailable(f"{purpose}: the Kubernetes API server is unreachable: {exc}") from None
    return {key: base64.b64decode(value).decode() for key, value in (secret.data or {}).items()}

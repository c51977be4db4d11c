"""The Kubernetes API as the KMS types use it: csi_luks.kube's calls, each of its errors raised again as the
KMS error of its kind with the same message (so the gRPC code a KMS failure gets stays the KMS's).

csi_luks.kube's functions are looked up at each call, so a test that replaces one there replaces it here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from csi_luks import kube
from csi_luks.kms.base import (
    KMSConfigError,
    KMSError,
    KMSObjectNotFound,
    KMSPermissionDenied,
    KMSUnavailable,
)

_AS_KMS_ERROR: dict[type[kube.KubeError], type[KMSError]] = {
    kube.KubeNoCredentials: KMSConfigError,
    kube.KubeObjectNotFound: KMSObjectNotFound,
    kube.KubePermissionDenied: KMSPermissionDenied,
    kube.KubeUnavailable: KMSUnavailable,
}


@contextlib.contextmanager
def _kms_errors() -> Iterator[None]:
    try:
        yield
    except kube.KubeError as exc:
        raise _AS_KMS_ERROR.get(type(exc), KMSUnavailable)(str(exc)) from None


def read_secret(name: str, namespace: str, purpose: str) -> dict[str, str]:
    """A Secret's data, decoded (kube.read_secret)."""
    with _kms_errors():
        return kube.read_secret(name, namespace, purpose)


def read_config_map(name: str, namespace: str, purpose: str) -> dict[str, str] | None:
    """A ConfigMap's data, or None when it does not exist (kube.read_config_map)."""
    with _kms_errors():
        return kube.read_config_map(name, namespace, purpose)


def request_service_account_token(name: str, namespace: str, audiences: list[str], purpose: str) -> str:
    """A fresh, short-lived token for a ServiceAccount (kube.request_service_account_token)."""
    with _kms_errors():
        return kube.request_service_account_token(name, namespace, audiences, purpose)

"""The session's Kubernetes API server as a pytest fixture: conftest or test modules import `kube` here."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.kube import KubeCluster, kube_cluster


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeCluster]:
    """One etcd + kube-apiserver for the whole session: starting one takes seconds and ~350 MB."""
    with kube_cluster(tmp_path_factory.mktemp("kube")) as cluster:
        yield cluster

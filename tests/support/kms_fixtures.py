"""Session fixtures for KMS tests on real servers: `kube`, `session_bao`, `kms_env`, `plugin_kube_client`,
`session_kmip` (PyKMIP's server), `session_aws` (moto, an AWS KMS/STS emulator), `breadth_volumes`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_luks import kube as plugin_kube
from tests.support.kmip_server import KMIPServer, kmip_server
from tests.support.kms_env import KmsEnv, build_kms_env
from tests.support.kube import KubeCluster
from tests.support.kube_fixture import kube
from tests.support.moto_server import AWSEmulator, moto_server
from tests.support.openbao import OpenBao, openbao_server
from tests.support.operations import Volumes, breadth_entries, write_kubeconfig

__all__ = [
    "breadth_volumes",
    "kms_env",
    "kube",
    "plugin_kube_client",
    "session_aws",
    "session_bao",
    "session_kmip",
]


@pytest.fixture(scope="session")
def session_bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    with openbao_server(tmp_path_factory.mktemp("session-openbao")) as server:
        root = server.client()
        root.sys.enable_secrets_engine("kv", path="kv1", options={"version": "1"})
        root.sys.enable_secrets_engine("transit", path="transit")
        root.secrets.transit.create_key(name="csi-kek")
        root.secrets.transit.create_key(name="other-kek")
        root.secrets.transit.create_key(name="derived-kek", derived=True)  # vaultTransitDerivedKey
        yield server


@pytest.fixture(scope="session")
def session_kmip(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KMIPServer]:
    """PyKMIP's server with keys csi-kek and other-kek, owned by the plugin's client identity."""
    with kmip_server(tmp_path_factory.mktemp("session-kmip")) as server:
        yield server


@pytest.fixture(scope="session")
def session_aws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AWSEmulator]:
    """moto in server mode (an emulator of AWS KMS, STS and IAM, with IAM authorization on)."""
    with moto_server(tmp_path_factory.mktemp("session-aws")) as emulator:
        yield emulator


@pytest.fixture(scope="session")
def kms_env(session_bao: OpenBao, kube: KubeCluster, tmp_path_factory: pytest.TempPathFactory) -> KmsEnv:
    return build_kms_env(session_bao, kube, tmp_path_factory.mktemp("kms-env"))


@pytest.fixture
def plugin_kube_client(kms_env: KmsEnv) -> Iterator[None]:
    """The plugin's Kubernetes client talks to the test cluster, as its own ServiceAccount would."""
    plugin_kube.set_api_client(kms_env.kube.api_client(kms_env.node_token_file.read_text()))
    try:
        yield
    finally:
        plugin_kube.set_api_client(None)


@pytest.fixture
def breadth_volumes(
    tmp_path: Path,
    kms_env: KmsEnv,
    session_kmip: KMIPServer,
    session_aws: AWSEmulator,
    plugin_kube_client: None,
    monkeypatch: pytest.MonkeyPatch,
) -> Volumes:
    """Volumes (tests/support/operations.py) with the KMS ids kmip-rpc, kmip-local, aws-metadata and
    aws-sts-metadata, created in the tenant's namespace. Their Secrets are read with the plugin's
    ServiceAccount token: in this process through plugin_kube_client, in the CLI through $KUBECONFIG."""
    monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path, kms_env.kube, kms_env.node_token_file)))
    entries = breadth_entries(kms_env, session_kmip, session_aws)
    return Volumes(tmp_path, entries, pvc_namespace=kms_env.tenant.namespace)

"""Every object in deploy/ is accepted by a real API server (server-side dry run: validated, not stored)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import utils

from tests.support.kube import KubeCluster

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
MANIFESTS = sorted(DEPLOY.glob("*.yaml"))


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_the_manifests_are_all_here() -> None:
    kinds = {doc["kind"] for path in MANIFESTS for doc in _documents(path)}
    assert {"CSIDriver", "DaemonSet", "Deployment", "ClusterRole", "ServiceAccount"} <= kinds


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_the_api_server_accepts_every_object(kube: KubeCluster, manifest: Path) -> None:
    with kube.api_client() as api:
        for doc in _documents(manifest):
            name = f"{manifest.name}: {doc['kind']} {doc['metadata']['name']}"
            try:
                utils.create_from_dict(
                    api, doc, namespace=doc["metadata"].get("namespace", "default"), dry_run="All"
                )
            except utils.FailToCreateError as failure:
                for exc in failure.api_exceptions:
                    # deploy/rbac.yaml is applied for real by the KMS tests of the same session: it exists,
                    # so it was validated when it was created.
                    assert exc.status == 409 and manifest.name == "rbac.yaml", f"{name}: {exc.body}"

"""Every object of the kustomize base (deploy/kustomize/base) is accepted by a real API server (server-side
dry run: validated, not stored), and its sidecars are the versions the suite runs."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import utils

from tests.support import csi_tools
from tests.support.deployed_plugin import DEPLOY_BASE
from tests.support.kube import KubeCluster

MANIFESTS = [
    DEPLOY_BASE / name
    for name in yaml.safe_load((DEPLOY_BASE / "kustomization.yaml").read_text())["resources"]
]
SIDECAR_REGISTRY = "registry.k8s.io/sig-storage/"


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
                    # rbac.yaml is applied for real by the KMS tests of the same session: it exists,
                    # so it was validated when it was created.
                    assert exc.status == 409 and manifest.name == "rbac.yaml", f"{name}: {exc.body}"


def test_the_sidecars_are_the_versions_the_suite_runs() -> None:
    """Each sidecar image's tag is the one ../shared/tools builds: the e2e tier runs the plugin with it."""
    if not csi_tools.BUILD_SCRIPT.exists():
        if csi_tools.STRICT:
            pytest.fail(csi_tools.HOW_TO_GET)
        pytest.skip(csi_tools.HOW_TO_GET)
    listed = subprocess.run(
        ["bash", str(csi_tools.BUILD_SCRIPT), "--list"], capture_output=True, text=True, check=True
    ).stdout
    tested = {name: stem.rsplit("-", 1)[1] for name, stem in (line.split() for line in listed.splitlines())}
    images = [
        container["image"]
        for path in MANIFESTS
        for doc in _documents(path)
        if doc["kind"] in ("Deployment", "DaemonSet")
        for container in doc["spec"]["template"]["spec"]["containers"]
        if container["image"].startswith(SIDECAR_REGISTRY)
    ]
    # provisioner, attacher, resizer, snapshotter, livenessprobe; registrar, livenessprobe
    assert len(images) == 7
    for image in images:
        name, tag = image.removeprefix(SIDECAR_REGISTRY).split(":")
        assert tag == tested[name], f"{image}: the suite runs {name} {tested[name]}"


def test_each_plugin_container_is_probed_for_liveness_through_its_sidecar() -> None:
    """kubelet restarts a plugin whose Probe fails: its livenessProbe asks the port the sidecar serves."""
    for path in MANIFESTS:
        for doc in _documents(path):
            if doc["kind"] not in ("Deployment", "DaemonSet"):
                continue
            containers = {c["name"]: c for c in doc["spec"]["template"]["spec"]["containers"]}
            plugin, sidecar = containers["csi-luks"], containers["liveness-probe"]
            ports = {port["name"]: port["containerPort"] for port in plugin["ports"]}
            probe = plugin["livenessProbe"]["httpGet"]
            assert probe["path"] == "/healthz", doc["metadata"]["name"]
            assert f"--health-port={ports[probe['port']]}" in sidecar["args"], doc["metadata"]["name"]

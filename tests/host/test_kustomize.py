"""The kustomize base and overlays render with the real `kubectl kustomize`, and the API server accepts every
object as an operator would apply it: `kubectl apply -k DIR --dry-run=server` (validated, not stored).

kubectl is built from the same Debian source as the test kube-apiserver (scripts/build-kube-apiserver.sh);
it carries kustomize v2.0.3, so what renders here renders with every later kubectl too. The snapshot CRDs
(for the VolumeSnapshotClass) come from ../shared/tools, the tag the suite runs its sidecars at.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from csi_luks.kms.aws import DEFAULT_TOKEN_FILE
from csi_luks.settings import DEFAULT_DRIVER_NAME
from csi_luks.volumes.ceph_csi import DEFAULT_INSTANCE_ID
from csi_luks.volumes.ceph_csi import DRIVER_NAME as CEPH_CSI_DRIVER
from tests.support import csi_tools
from tests.support.deployed_plugin import DEPLOY_BASE
from tests.support.kube import BUILD_SCRIPT, KubeCluster, kube_apiserver_binary

KUSTOMIZE = DEPLOY_BASE.parent
OVERLAYS = {"base": DEPLOY_BASE} | {p.name: p for p in sorted((KUSTOMIZE / "overlays").iterdir())}


@pytest.fixture(scope="module")
def kubectl() -> Path:
    kube_apiserver_binary()  # builds kubectl with it when the cache has neither
    printed = subprocess.run(
        ["bash", str(BUILD_SCRIPT), "--print-path", "kubectl"], capture_output=True, text=True, check=True
    )
    return Path(printed.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def kubeconfig(kube: KubeCluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The admin's kubeconfig for the session's API server, with the snapshot CRDs installed."""
    crds = sorted(csi_tools.tool("snapshot-controller").parent.glob("snapshot-crds-*"))
    assert crds, "build-csi-tools.sh unpacks the snapshot CRDs beside snapshot-controller"
    with kube.api_client() as api:
        extensions = client.ApiextensionsV1Api(api)
        existing = {crd.metadata.name for crd in extensions.list_custom_resource_definition().items}
        for path in sorted(crds[-1].glob("snapshot.storage.k8s.io_*.yaml")):
            crd = yaml.safe_load(path.read_text())
            if crd["metadata"]["name"] not in existing:
                extensions.create_custom_resource_definition(crd)
    path = tmp_path_factory.mktemp("kubectl") / "kubeconfig"
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "test", "cluster": {"server": kube.url, "certificate-authority": str(kube.ca_file)}}
        ],
        "users": [{"name": "admin", "user": {"token": kube.admin_token}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "admin"}}],
        "current-context": "test",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


def _kubectl(kubectl: Path, *args: str, kubeconfig: Path | None = None) -> str:
    config = [f"--kubeconfig={kubeconfig}"] if kubeconfig else []
    result = subprocess.run([str(kubectl), *config, *args], capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"kubectl {' '.join(args)}: {result.stderr}"
    return result.stdout


def _render(kubectl: Path, directory: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(_kubectl(kubectl, "kustomize", str(directory))) if doc]


def _names(documents: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(doc["kind"], doc["metadata"]["name"]) for doc in documents}


def _containers(documents: list[dict[str, Any]], kind: str) -> Iterator[dict[str, Any]]:
    for doc in documents:
        if doc["kind"] == kind:
            yield from doc["spec"]["template"]["spec"]["containers"]


def _plugin_env(documents: list[dict[str, Any]], kind: str) -> dict[str, str]:
    plugin = next(c for c in _containers(documents, kind) if c["name"] == "csi-luks")
    return {e["name"]: e.get("value", "") for e in plugin.get("env", [])}


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_api_server_accepts_every_rendered_object(kubectl: Path, kubeconfig: Path, name: str) -> None:
    rendered = _render(kubectl, OVERLAYS[name])
    applied = _kubectl(
        kubectl, "apply", "-k", str(OVERLAYS[name]), "--dry-run=server", "-o", "name", kubeconfig=kubeconfig
    )
    # -o name prints kind.group/name for every object the server accepted; any refusal fails the command.
    accepted = {(line.split("/")[0].split(".")[0], line.split("/")[1]) for line in applied.split()}
    assert {(kind.lower(), obj) for kind, obj in _names(rendered)} == accepted
    assert {"CSIDriver", "Deployment", "DaemonSet", "ClusterRole", "ServiceAccount"} <= {
        k for k, _ in _names(rendered)
    }


def test_the_base_is_the_deploy_manifests(kubectl: Path) -> None:
    files = yaml.safe_load((DEPLOY_BASE / "kustomization.yaml").read_text())["resources"]
    listed = [doc for f in files for doc in yaml.safe_load_all((DEPLOY_BASE / f).read_text()) if doc]
    assert sorted(DEPLOY_BASE.glob("*.yaml")) == sorted(
        [DEPLOY_BASE / f for f in files] + [DEPLOY_BASE / "kustomization.yaml"]
    )
    assert _names(_render(kubectl, DEPLOY_BASE)) == _names(listed)


def test_the_standalone_overlay_runs_both_roles_on_local_files(kubectl: Path) -> None:
    rendered = _render(kubectl, OVERLAYS["standalone"])
    for kind in ("Deployment", "DaemonSet"):
        env = _plugin_env(rendered, kind)
        assert env["CSI_LUKS_BACKEND"] == "standalone"
        assert "CSI_LUKS_CEPH_CONFIG" not in env and "CSI_LUKS_CEPH_SECRETS" not in env
    text = yaml.safe_dump_all(rendered)
    assert "ceph-csi-config" not in text  # no volume waits for a ConfigMap never made
    assert "csi-rbd-secret" not in text and "csi-luks-ceph-secret" not in text
    kms = next(
        d for d in rendered if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "csi-luks-kms-config"
    )
    classes = [d for d in rendered if d["kind"] == "StorageClass"]
    assert [c["parameters"]["encryptionKMSID"] for c in classes] == list(kms["data"])
    assert yaml.safe_load(kms["data"]["local-1"])["encryptionKMSType"] == "local"


def test_the_rbd_vault_overlay_names_only_kms_ids_it_configures(kubectl: Path) -> None:
    rendered = _render(kubectl, OVERLAYS["rbd-vault"])
    kms = next(
        d for d in rendered if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "csi-luks-kms-config"
    )
    types = {key: yaml.safe_load(value)["encryptionKMSType"] for key, value in kms["data"].items()}
    assert set(types.values()) == {"vault", "vault-transit", "vaulttenantsa"}
    for storage_class in (d for d in rendered if d["kind"] == "StorageClass"):
        assert storage_class["parameters"]["encryptionKMSID"] in types
    ceph = next(
        d for d in rendered if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "ceph-csi-config"
    )
    cluster_ids = {entry["clusterID"] for entry in yaml.safe_load(ceph["data"]["config.json"])}
    assert {c["parameters"]["clusterID"] for c in rendered if c["kind"] == "StorageClass"} <= cluster_ids
    assert _plugin_env(rendered, "DaemonSet")["CSI_LUKS_BACKEND"] == "rbd"
    # The controller's own cephx user (owed flattens at start-up): the StorageClasses' Secret, optional.
    controller = next(d for d in rendered if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    secret = next(v for v in controller["volumes"] if v["name"] == "ceph-secret")["secret"]
    names = {c["parameters"]["csi.storage.k8s.io/provisioner-secret-name"]
             for c in rendered if c["kind"] == "StorageClass"}  # fmt: skip
    assert secret == {"secretName": "csi-rbd-secret", "optional": True} and names == {"csi-rbd-secret"}
    assert _plugin_env(rendered, "Deployment")["CSI_LUKS_CEPH_SECRETS"] == "/etc/csi-luks-ceph-secret"


def test_the_ceph_csi_takeover_overlay_serves_under_ceph_csi_s_driver_name(kubectl: Path) -> None:
    rendered = _render(kubectl, OVERLAYS["ceph-csi-takeover"])
    text = yaml.safe_dump_all(rendered)
    assert DEFAULT_DRIVER_NAME not in text  # no object, path or setting keeps csi-luks's own name
    driver = next(d for d in rendered if d["kind"] == "CSIDriver")
    base_driver = next(d for d in _render(kubectl, DEPLOY_BASE) if d["kind"] == "CSIDriver")
    assert driver["metadata"]["name"] == CEPH_CSI_DRIVER and driver["spec"] == base_driver["spec"]
    for kind in ("Deployment", "DaemonSet"):
        env = _plugin_env(rendered, kind)
        assert env["CSI_DRIVER_NAME"] == CEPH_CSI_DRIVER, kind
        assert env["CSI_LUKS_BACKEND"] == "rbd", kind
        # Ceph-CSI's KMS ConfigMap, the one its install made, in the plugin's own namespace.
        assert env["CSI_LUKS_KMS_CONFIG_MAP"] == "kube-system/csi-kms-connection-details", kind
        # Ceph-CSI's cluster list, mounted where both read it, and not generated by the overlay.
        assert env["CSI_LUKS_CEPH_CONFIG"] == "/etc/ceph-csi-config/config.json", kind
        pod = next(d for d in rendered if d["kind"] == kind)["spec"]["template"]["spec"]
        plugin = next(c for c in pod["containers"] if c["name"] == "csi-luks")
        mounted = {m["name"] for m in plugin["volumeMounts"] if m["mountPath"] == "/etc/ceph-csi-config"}
        assert [v["configMap"] for v in pod["volumes"] if v["name"] in mounted] == [
            {"name": "ceph-csi-config"}
        ]
    assert _plugin_env(rendered, "Deployment")["CSI_LUKS_CEPH_CSI_INSTANCE_ID"] == DEFAULT_INSTANCE_ID
    assert not [d for d in rendered if d["kind"] in ("ConfigMap", "StorageClass", "VolumeSnapshotClass")]
    node = next(d for d in rendered if d["kind"] == "DaemonSet")["spec"]["template"]["spec"]
    registrar = next(c for c in node["containers"] if c["name"] == "node-driver-registrar")
    plugin_dir = f"/var/lib/kubelet/plugins/{CEPH_CSI_DRIVER}"
    assert f"--kubelet-registration-path={plugin_dir}/csi.sock" in registrar["args"]
    socket_dir = next(v for v in node["volumes"] if v["name"] == "socket-dir")
    assert socket_dir["hostPath"]["path"] == plugin_dir
    # Both roles read the ConfigMaps through the API: the base's csi-luks-kms ClusterRole, bound to both.
    role = next(d for d in rendered if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "csi-luks-kms")
    assert any("configmaps" in rule["resources"] and "get" in rule["verbs"] for rule in role["rules"])
    bound = {
        subject["name"]
        for d in rendered
        if d["kind"] == "ClusterRoleBinding" and d["roleRef"]["name"] == "csi-luks-kms"
        for subject in d["subjects"]
    }
    pods = [d["spec"]["template"]["spec"] for d in rendered if d["kind"] in ("Deployment", "DaemonSet")]
    assert {pod["serviceAccountName"] for pod in pods} <= bound
    # The sidecars reach the plugin through the socket directory, whatever its path on the host.
    for container in (*_containers(rendered, "Deployment"), *_containers(rendered, "DaemonSet")):
        addresses = [a for a in container.get("args", []) if a.startswith("--csi-address=")]
        assert addresses in ([], ["--csi-address=/csi/csi.sock"]), container["name"]


def test_the_controller_runs_unprivileged_and_the_node_plugin_privileged(kubectl: Path) -> None:
    rendered = _render(kubectl, DEPLOY_BASE)
    controller = next(d for d in rendered if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert controller["securityContext"]["runAsNonRoot"] is True
    for container in controller["containers"]:
        assert container["securityContext"]["allowPrivilegeEscalation"] is False, container["name"]
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"], container["name"]
    node = next(c for c in _containers(rendered, "DaemonSet") if c["name"] == "csi-luks")
    assert node["securityContext"]["privileged"] is True


def test_both_roles_mount_the_projected_token_aws_sts_metadata_reads_by_default(kubectl: Path) -> None:
    rendered = _render(kubectl, DEPLOY_BASE)
    directory, name = DEFAULT_TOKEN_FILE.rsplit("/", 1)
    for kind in ("Deployment", "DaemonSet"):
        pod = next(d for d in rendered if d["kind"] == kind)["spec"]["template"]["spec"]
        plugin = next(c for c in pod["containers"] if c["name"] == "csi-luks")
        mounted = {m["name"] for m in plugin["volumeMounts"] if m["mountPath"] == directory}
        projected = [
            source["serviceAccountToken"]
            for volume in pod["volumes"]
            if volume["name"] in mounted and "projected" in volume
            for source in volume["projected"]["sources"]
            if "serviceAccountToken" in source
        ]
        assert [token["path"] for token in projected] == [name], kind
        assert projected[0]["audience"] == "ceph-csi-kms"  # Ceph-CSI's: its IAM OIDC provider accepts it

"""What the e2e tests ask of Kubernetes: StorageClasses, PVCs, snapshots and pods, and waiting on them.

Every wait that times out fails with the driver's diagnostics (events, kubelet, sidecar and plugin log
tails), so a failing scenario shows the lines that explain it.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import kubernetes.client as k8s

from tests.support.kube_node import NODE_NAME, CsiDriver, wait_for

SNAPSHOT_GROUP, SNAPSHOT_VERSION = "snapshot.storage.k8s.io", "v1"
MOUNT = "/data"


def mount_path(index: int) -> str:
    return MOUNT if index == 0 else f"{MOUNT}{index}"


class Workloads:
    """Objects in one namespace of the driver's cluster."""

    def __init__(self, driver: CsiDriver, namespace: str | None = None) -> None:
        self.driver = driver
        self.node = driver.node
        self.namespace = namespace or f"e2e-{uuid.uuid4().hex[:8]}"

    # --- plumbing -----------------------------------------------------------------------------------

    def diagnostics(self) -> str:
        return self.driver.diagnostics(self.namespace)

    def wait(self, what: str, check: Any, timeout: float = 420, interval: float = 2) -> Any:
        return wait_for(f"{self.namespace}: {what}", check, timeout, self.diagnostics, interval)

    def apply(self, manifest: Mapping[str, Any]) -> None:
        """Create the object (an existing one is left as it is)."""
        if manifest["apiVersion"].startswith(SNAPSHOT_GROUP):
            plural = {"VolumeSnapshot": "volumesnapshots", "VolumeSnapshotClass": "volumesnapshotclasses"}
            with self.node.client() as client:
                custom = k8s.CustomObjectsApi(client)
                try:
                    namespace = manifest["metadata"].get("namespace")
                    if namespace:
                        custom.create_namespaced_custom_object(
                            SNAPSHOT_GROUP,
                            SNAPSHOT_VERSION,
                            namespace,
                            plural[manifest["kind"]],
                            dict(manifest),
                        )
                    else:
                        custom.create_cluster_custom_object(
                            SNAPSHOT_GROUP, SNAPSHOT_VERSION, plural[manifest["kind"]], dict(manifest)
                        )
                except k8s.ApiException as exc:
                    if exc.status != 409:
                        raise
            return
        self.node.create(manifest)

    def core(self) -> tuple[k8s.ApiClient, k8s.CoreV1Api]:
        client = self.node.client()
        return client, k8s.CoreV1Api(client)

    # --- objects ------------------------------------------------------------------------------------

    def create_namespace(self) -> None:
        self.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": self.namespace}})

        def default_account() -> bool:
            client, core = self.core()
            with client:
                core.read_namespaced_service_account("default", self.namespace)
            return True

        self.wait("the default ServiceAccount (kube-controller-manager makes it)", default_account)

    def storage_class(self, name: str, parameters: Mapping[str, str]) -> None:
        self.apply({
            "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": name},
            "provisioner": self.driver.name, "allowVolumeExpansion": True, "reclaimPolicy": "Delete",
            "volumeBindingMode": "Immediate",
            "parameters": {"csi.storage.k8s.io/fstype": "ext4", **parameters},
        })  # fmt: skip

    def snapshot_class(self, name: str, parameters: Mapping[str, str] | None = None) -> None:
        self.apply({
            "apiVersion": f"{SNAPSHOT_GROUP}/{SNAPSHOT_VERSION}", "kind": "VolumeSnapshotClass",
            "metadata": {"name": name}, "driver": self.driver.name, "deletionPolicy": "Delete",
            "parameters": dict(parameters or {}),
        })  # fmt: skip

    def pvc(self, name: str, storage_class: str, size: str = "64Mi",
            data_source: Mapping[str, str] | None = None) -> None:  # fmt: skip
        spec: dict[str, Any] = {
            "accessModes": ["ReadWriteOnce"], "storageClassName": storage_class,
            "resources": {"requests": {"storage": size}},
        }  # fmt: skip
        if data_source:
            spec["dataSource"] = dict(data_source)
        self.apply({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                    "metadata": {"name": name, "namespace": self.namespace}, "spec": spec})  # fmt: skip

    def snapshot(self, name: str, pvc: str, snapshot_class: str) -> None:
        self.apply({
            "apiVersion": f"{SNAPSHOT_GROUP}/{SNAPSHOT_VERSION}", "kind": "VolumeSnapshot",
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": {"volumeSnapshotClassName": snapshot_class,
                     "source": {"persistentVolumeClaimName": pvc}},
        })  # fmt: skip

    def pod(self, name: str, *pvcs: str, once: str = "true", loop: str = "true") -> None:
        """A pod mounting each PVC (the first at /data, the next at /data1, ...) that runs the shell
        command `once`, then `loop` every second until it is stopped.

        Its results go to files on its volumes, which the test reads from the node (`pod_file`):
        `kubectl exec` through kube-apiserver and kubelet costs minutes under TCG.
        """
        command = ["/bin/sh", "-c", f"{once}; trap 'exit 0' TERM; while true; do {loop}; sleep 1; done"]
        mounts = [{"name": f"v{i}", "mountPath": mount_path(i)} for i in range(len(pvcs))]
        volumes = [{"name": f"v{i}", "persistentVolumeClaim": {"claimName": c}} for i, c in enumerate(pvcs)]
        self.apply({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": self.namespace},
            "spec": {
                "hostNetwork": True, "dnsPolicy": "Default", "automountServiceAccountToken": False,
                "enableServiceLinks": False, "terminationGracePeriodSeconds": 5,
                "containers": [{
                    "name": "app", "image": self.node.images.pod_image, "imagePullPolicy": "Never",
                    "command": command, "volumeMounts": mounts,
                }],
                "volumes": volumes,
            },
        })  # fmt: skip

    def resize(self, pvc: str, size: str) -> None:
        patch = {"spec": {"resources": {"requests": {"storage": size}}}}
        client, core = self.core()
        with client:
            core.patch_namespaced_persistent_volume_claim(pvc, self.namespace, patch)

    def events_text(self) -> str:
        return self.node.events(self.namespace)

    def capacity(self, pvc: str) -> str | None:
        client, core = self.core()
        with client:
            claim = core.read_namespaced_persistent_volume_claim(pvc, self.namespace)
        found: str | None = (claim.status.capacity or {}).get("storage")
        return found

    # --- waits --------------------------------------------------------------------------------------

    def bound_volume(self, pvc: str, timeout: float = 420) -> k8s.V1PersistentVolume:
        """Wait until the PVC is Bound; its PersistentVolume."""

        def bound() -> k8s.V1PersistentVolume | None:
            client, core = self.core()
            with client:
                claim = core.read_namespaced_persistent_volume_claim(pvc, self.namespace)
                if claim.status.phase != "Bound":
                    return None
                return core.read_persistent_volume(claim.spec.volume_name)

        volume: k8s.V1PersistentVolume = self.wait(f"PVC {pvc} Bound", bound, timeout)
        return volume

    def running(self, pod: str, timeout: float = 600) -> None:
        def is_running() -> bool:
            client, core = self.core()
            with client:
                status = core.read_namespaced_pod(pod, self.namespace).status
            if status.phase in ("Failed", "Succeeded"):
                raise AssertionError(f"pod {pod} ended: {status}")
            return bool(status.phase == "Running")

        self.wait(f"pod {pod} Running", is_running, timeout)

    def _object(self, kind: str, name: str, action: str) -> Any:
        """read or delete a pod, pvc or volumesnapshot of this namespace."""
        client = self.node.client()
        with client:
            if kind == "volumesnapshot":
                custom = k8s.CustomObjectsApi(client)
                verb = {"read": "get", "delete": "delete"}[action]  # CustomObjectsApi reads with get_...
                method = getattr(custom, f"{verb}_namespaced_custom_object")
                return method(SNAPSHOT_GROUP, SNAPSHOT_VERSION, self.namespace, "volumesnapshots", name)
            resource = {"pod": "pod", "pvc": "persistent_volume_claim"}[kind]
            return getattr(k8s.CoreV1Api(client), f"{action}_namespaced_{resource}")(name, self.namespace)

    def names(self, kind: str) -> list[str]:
        client = self.node.client()
        with client:
            if kind == "volumesnapshot":
                listed = k8s.CustomObjectsApi(client).list_namespaced_custom_object(
                    SNAPSHOT_GROUP, SNAPSHOT_VERSION, self.namespace, "volumesnapshots"
                )
                return [item["metadata"]["name"] for item in listed["items"]]
            resource = {"pod": "pod", "pvc": "persistent_volume_claim"}[kind]
            items = getattr(k8s.CoreV1Api(client), f"list_namespaced_{resource}")(self.namespace).items
            return [item.metadata.name for item in items]

    def driver_objects(self) -> tuple[list[str], list[str]]:
        """The names of the PersistentVolumes and VolumeSnapshotContents of this driver, in any namespace."""
        client = self.node.client()
        with client:
            volumes = k8s.CoreV1Api(client).list_persistent_volume().items
            contents = k8s.CustomObjectsApi(client).list_cluster_custom_object(
                SNAPSHOT_GROUP, SNAPSHOT_VERSION, "volumesnapshotcontents"
            )["items"]
        return (
            [v.metadata.name for v in volumes if v.spec.csi and v.spec.csi.driver == self.driver.name],
            [c["metadata"]["name"] for c in contents if c["spec"]["driver"] == self.driver.name],
        )

    def delete(self, kind: str, name: str, timeout: float = 420) -> None:
        """Delete a pod, pvc or volumesnapshot and wait until it is gone (finalizers and all)."""
        try:
            self._object(kind, name, "delete")
        except k8s.ApiException as exc:
            if exc.status != 404:
                raise

        def gone() -> bool:
            try:
                self._object(kind, name, "read")
            except k8s.ApiException as exc:
                if exc.status == 404:
                    return True
                raise
            return False

        self.wait(f"{kind}/{name} deleted", gone, timeout)

    def pod_file(self, pod: str, pvc: str, name: str) -> Path:
        """A file on the pod's volume, seen from the node (kubelet's publish path of the PVC for that pod)."""
        client, core = self.core()
        with client:
            uid: str = core.read_namespaced_pod(pod, self.namespace).metadata.uid
            volume: str = core.read_namespaced_persistent_volume_claim(pvc, self.namespace).spec.volume_name
        return (
            self.node.kubelet_root / "pods" / uid / "volumes" / "kubernetes.io~csi" / volume / "mount" / name
        )

    def read_pod_file(self, pod: str, pvc: str, name: str) -> str | None:
        path = self.pod_file(pod, pvc, name)
        return path.read_text().strip() if path.exists() else None

    def ready_snapshot(self, name: str, timeout: float = 600) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            client = self.node.client()
            with client:
                obj: dict[str, Any] = k8s.CustomObjectsApi(client).get_namespaced_custom_object(
                    SNAPSHOT_GROUP, SNAPSHOT_VERSION, self.namespace, "volumesnapshots", name
                )
            status = obj.get("status") or {}
            if status.get("error"):
                raise AssertionError(f"snapshot {name}: {status['error']}")
            return obj if status.get("readyToUse") else None

        snap: dict[str, Any] = self.wait(f"VolumeSnapshot {name} readyToUse", ready, timeout)
        return snap

    def snapshot_handle(self, snap: Mapping[str, Any]) -> str:
        content_name = snap["status"]["boundVolumeSnapshotContentName"]
        client = self.node.client()
        with client:
            content: dict[str, Any] = k8s.CustomObjectsApi(client).get_cluster_custom_object(
                SNAPSHOT_GROUP, SNAPSHOT_VERSION, "volumesnapshotcontents", content_name
            )
        handle: str = content["status"]["snapshotHandle"]
        return handle

    def volume_in_use(self, volume_handle: str) -> bool:
        """Whether kubelet still reports the volume in use on the node (it stays until NodeUnstage ran)."""
        client, core = self.core()
        with client:
            node = core.read_node(NODE_NAME)
        return any(volume_handle in name for name in node.status.volumes_in_use or [])

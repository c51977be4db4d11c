"""Work in progress, NOT COLLECTED (the file name does not start with test_): e2e scenario 4 of issue 10.

A `vaulttenantsa` KMS on OpenBao with the PVC in a tenant namespace. It passes run alone in the guest
(355 s with the bring-up) since the OpenBao fixture keeps dev mode's token file out of /root (read-only
in the guest) and retries a slow health check; it joins test_kubernetes_e2e.py once a full suite run
has been measured with it in. Run it alone with
`.venv/bin/python -m pytest tests/vm/kubernetes_e2e_wip.py -rA`.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.support.kms_env import build_kms_env
from tests.support.kube_node_fixture import k8s_node, luks_driver
from tests.support.kube_workloads import Workloads
from tests.support.openbao import OpenBao
from tests.support.operations import vault_kv_has
from tests.vm.test_kubernetes_e2e import assert_unstaged, backend, local, writer

__all__ = ["k8s_node", "local", "luks_driver"]

pytestmark = pytest.mark.timeout(1800)


def test_vault_tenant_serviceaccount_writes_the_dek_of_a_pvc_in_its_namespace(
    local: Workloads, session_bao: OpenBao, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """vaulttenantsa: the plugin logs in to OpenBao as the PVC namespace's ServiceAccount.

    The namespace reaches CreateVolume only through external-provisioner's --extra-create-metadata; a
    namespace whose ServiceAccount OpenBao's role does not bind gets no volume.
    """
    env = build_kms_env(session_bao, local.node.api, tmp_path_factory.mktemp("e2e-kms-env"))
    entry = {
        "encryptionKMSType": "vaulttenantsa", "vaultAddress": session_bao.address,
        "vaultRole": "tenant", "vaultPassphrasePath": "e2e-tenants/",
    }  # fmt: skip
    config = json.loads(local.driver.kms_config.read_text())
    local.driver.kms_config.write_text(json.dumps({**config, "tenant-sa": entry}))
    tenant = Workloads(local.driver, env.tenant.namespace)
    tenant.create_namespace()
    tenant.storage_class("luks-tenant-sa", {"encrypted": "true", "encryptionKMSID": "tenant-sa"})
    tenant.pvc("tenant-data", "luks-tenant-sa")
    volume_id = tenant.bound_volume("tenant-data").spec.csi.volume_handle
    stored = env.bao.client().secrets.kv.v2.read_secret_version(
        path=f"e2e-tenants/{volume_id}", mount_point="secret", raise_on_deleted_version=True
    )
    assert len(stored["data"]["data"]["passphrase"]) == 43

    marker = f"csi-luks-e2e-tenant-{os.urandom(8).hex()}"
    writer(tenant, "tenant-user", "tenant-data", marker)
    tenant.delete("pod", "tenant-user")
    assert_unstaged(tenant, volume_id)

    # The outsider's ServiceAccount is bound to no role: provisioning fails and leaves no volume.
    outsider = Workloads(local.driver, env.outsider.namespace)
    outsider.create_namespace()
    before = {v.volume_id for v in backend(local.driver).list()}
    outsider.pvc("outsider-data", "luks-tenant-sa")
    outsider.wait(
        "ProvisioningFailed (permission denied) for the outsider's PVC",
        lambda: "ProvisioningFailed" in (text := outsider.events_text()) and "ermission" in text,
    )
    assert {v.volume_id for v in backend(local.driver).list()} <= before | {volume_id}
    outsider.delete("pvc", "outsider-data")

    tenant.delete("pvc", "tenant-data")
    tenant.wait(
        "the DEK removed from OpenBao with the volume",
        lambda: not vault_kv_has(env.bao, f"e2e-tenants/{volume_id}"),
    )

"""Encrypted standalone volumes on the host for the operator commands: created by the real Controller,
formatted the way the first NodeStage formats them, on their image file (no device-mapper needed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import hvac

from csi_luks.csi import csi_pb2
from csi_luks.kms.config import KMSConfig
from csi_luks.locks import OperationLocks
from csi_luks.luks import FormatOptions
from csi_luks.operations.header_backup import refresh_header_backup
from csi_luks.operations.tool import Tool
from csi_luks.services.controller import PARAM_PVC_NAMESPACE, ControllerService
from csi_luks.volume_metadata import STATE, EncryptionState
from csi_luks.volumes.standalone import StandaloneBackend
from tests.support.kmip_server import SERVER_NAME, KMIPServer
from tests.support.kms_env import KmsEnv
from tests.support.kube import KubeCluster
from tests.support.moto_server import AWSEmulator
from tests.support.openbao import ROOT_TOKEN, OpenBao
from tests.support.plugin import MiB, mount_capability


def vault_login(root: Path, address: str, retry_deadline: str = "1") -> dict[str, str]:
    """The keys of a vault or vault-transit entry that reaches address with the root token."""
    (root / "token").write_text(ROOT_TOKEN)
    return {
        "vaultAddress": address,
        "vaultTokenFile": str(root / "token"),
        "vaultRetryDeadline": retry_deadline,
    }


def write_kubeconfig(root: Path, kube: KubeCluster, token_file: Path) -> Path:
    """A kubeconfig for the test cluster that authenticates with the token in token_file: what the
    CLI's Kubernetes client loads from $KUBECONFIG (outside a Pod)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "test", "cluster": {"server": kube.url, "certificate-authority": str(kube.ca_file)}}
        ],
        "users": [{"name": "csi-luks", "user": {"token": token_file.read_text().strip()}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "csi-luks"}}],
        "current-context": "test",
    }
    path = root / "kubeconfig"
    path.write_text(json.dumps(config))
    return path


def breadth_entries(env: KmsEnv, kmip: KMIPServer, aws: AWSEmulator | None) -> dict[str, dict[str, str]]:
    """Entries `kmip-rpc`, `kmip-local`, `aws-metadata` and `aws-sts-metadata`, their Secrets put in the
    tenant's namespace (the aws-sts-metadata one is the tenant's own: volumes need it as PVC namespace).
    Without an AWS emulator, the kmip entries only."""
    namespace = env.tenant.namespace
    env.put_secret(namespace, "ops-kmip", kmip.secret_data())
    kmip_entry = {
        "encryptionKMSType": "kmip", "KMIP_ENDPOINT": kmip.endpoint, "KMIP_SECRET_NAME": "ops-kmip",
        "KMIP_SECRET_NAMESPACE": namespace, "TLS_SERVER_NAME": SERVER_NAME,
    }  # fmt: skip
    entries = {
        "kmip-rpc": {**kmip_entry, "USE_CRYPTO_RPC": "true"},
        "kmip-local": {**kmip_entry, "USE_CRYPTO_RPC": "false"},
    }
    if aws is None:
        return entries
    env.put_secret(namespace, "ops-aws", aws.metadata_secret())
    env.put_secret(namespace, "ceph-csi-aws-credentials", aws.tenant_secret())
    return {
        **entries,
        "aws-metadata": {
            "encryptionKMSType": "aws-metadata",
            "AWS_REGION": "us-east-1",
            "KMS_SECRET_NAME": "ops-aws",
            "KMS_SECRET_NAMESPACE": namespace,
            "AWS_KMS_ENDPOINT": aws.url,
        },
        "aws-sts-metadata": {
            "encryptionKMSType": "aws-sts-metadata",
            "tokenFilePath": str(env.node_token_file),
            "awsKMSEndpoint": aws.url,
            "awsSTSEndpoint": aws.url,
        },
    }


def vault_kv_has(bao: OpenBao, path: str) -> bool:
    """Whether the KV v2 engine at secret/ of bao holds a secret at path."""
    try:
        bao.client().secrets.kv.v2.read_secret_metadata(path=path, mount_point="secret")
    except hvac.exceptions.InvalidPath:
        return False
    return True


class Volumes:
    """A standalone state directory, a KMS configuration file, and the controller and tool over them."""

    def __init__(
        self,
        root: Path,
        entries: dict[str, dict[str, str]],
        secrets: dict[str, str] | None = None,
        pvc_namespace: str | None = None,  # the PVC namespace of every volume created (tenant KMS types)
    ):
        root.mkdir(parents=True, exist_ok=True)
        self.pvc_namespace = pvc_namespace
        self.root = root
        self.state_dir = root / "state"
        self.kms_config = root / "kms-config.json"
        self.secrets = secrets or {}
        self.secrets_file = root / "secrets.json"
        self.secrets_file.write_text(json.dumps(self.secrets))
        self.configure(entries)
        self.backend = StandaloneBackend(self.state_dir)
        self.config = KMSConfig.from_file(str(self.kms_config))
        self.controller = ControllerService(self.backend, self.config, OperationLocks())
        self.tool = Tool(self.backend, self.config, secrets=self.secrets)

    def configure(self, entries: dict[str, dict[str, str]]) -> None:
        self.kms_config.write_text(json.dumps(entries))

    def create(self, name: str, kms_id: str, size: int = 16 * MiB) -> str:
        parameters = {"encrypted": "true", "encryptionKMSID": kms_id}
        if self.pvc_namespace is not None:
            parameters[PARAM_PVC_NAMESPACE] = self.pvc_namespace
        response = self.controller.CreateVolume(
            csi_pb2.CreateVolumeRequest(
                name=name,
                capacity_range=csi_pb2.CapacityRange(required_bytes=size),
                volume_capabilities=[mount_capability()],
                parameters=parameters,
                secrets=self.secrets,
            ),
            None,
        )
        volume_id: str = response.volume.volume_id
        return volume_id

    def image(self, volume_id: str) -> str:
        return str(self.backend.image_path(volume_id))

    def format(self, volume_id: str) -> None:
        """What the first NodeStage does before it opens the volume: luksFormat, header backup, state."""
        dek = self.dek(volume_id)
        self.tool.cryptsetup.format(self.image(volume_id), dek, FormatOptions())
        refresh_header_backup(self.tool.cryptsetup, self.backend, volume_id, self.image(volume_id))
        self.backend.set_metadata(volume_id, STATE, EncryptionState.ENCRYPTED.value)

    def create_formatted(self, name: str, kms_id: str) -> str:
        volume_id = self.create(name, kms_id)
        self.format(volume_id)
        return volume_id

    def dek(self, volume_id: str) -> str:
        return self.tool.encryption(volume_id).get_passphrase(volume_id)

    def pending_dek(self, volume_id: str) -> str | None:
        return self.tool.encryption(volume_id).get_pending_passphrase(volume_id)

    def opens(self, volume_id: str, dek: str | None) -> int | None:
        """The key slot dek opens on the volume's image, or None."""
        return self.tool.cryptsetup.slot_of(self.image(volume_id), dek)

    def slots(self, volume_id: str) -> list[int]:
        return self.tool.cryptsetup.active_slots(self.image(volume_id))

    def state(self, volume_id: str) -> str:
        return self.backend.get(volume_id).metadata[STATE]

    def cli(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """`csi-luks ARGS --state-dir ... --kms-config ... --secrets-file ...` in a child process."""
        command, *rest = args
        argv = [sys.executable, "-m", "csi_luks.cli", command, *rest, "--state-dir", str(self.state_dir),
                "--kms-config", str(self.kms_config), "--secrets-file", str(self.secrets_file)]  # fmt: skip
        return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, check=False)

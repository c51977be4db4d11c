"""CreateVolume+DeleteVolume pairs per second with the `vault` KMS (KV v2) vs the bare hvac calls.

Everything runs against one real OpenBao dev server started here (as the tests start it), in alternating
rounds, so a noisy neighbour slows every side alike. The sides:
- grpc: the plugin's controller on a unix socket (standalone backend), CreateVolume then DeleteVolume;
- kms: only the KMS work of such a pair, as the controller does it (a KMS built from the configuration
  per call; store the DEK; remove the pending and the current DEK): the Vault path itself;
- grpc-tmpfs, local-tmpfs: the gRPC pair with the state directory on tmpfs (no fsync cost), with the
  `vault` KMS and with the `local` KMS (no Vault at all: what gRPC and the backend cost);
- bare: hvac alone writing, reading and destroying one secret per pair (the reference).
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import hvac

from bench.table import Row, Target
from csi_luks.csi import csi_pb2
from csi_luks.encryption import volume_encryption
from csi_luks.kms.base import KMSContext
from csi_luks.settings import Mode
from tests.support.openbao import ROOT_TOKEN, OpenBao, openbao_server
from tests.support.plugin import RunningPlugin, running_plugin

TARGET = Target("ratio", ">=", 0.8)
KMS_ID = "vault-kv"


def _grpc_pair(plugin: RunningPlugin, kms_id: str) -> Callable[[int], None]:
    def pair(i: int) -> None:
        volume = plugin.create(f"{kms_id}-{i}", parameters={"encrypted": "true", "encryptionKMSID": kms_id})
        plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))

    return pair


def _kms_pair(plugin: RunningPlugin) -> Callable[[int], None]:
    config, backend, context = plugin.server.kms_config, plugin.backend, KMSContext(secrets={})

    def pair(i: int) -> None:
        volume_id = backend.volume_id_for(f"kms-only-{i}", {})
        volume_encryption(config, KMS_ID, context, backend).new_passphrase(volume_id)
        volume_encryption(config, KMS_ID, context, backend).remove(volume_id)

    return pair


def _bare_pair(bao: OpenBao) -> Callable[[int], None]:
    kv = hvac.Client(url=bao.address, token=ROOT_TOKEN).secrets.kv.v2

    def pair(i: int) -> None:
        path = f"bare/{uuid.uuid4()}"
        kv.create_or_update_secret(path=path, secret={"passphrase": uuid.uuid4().hex}, mount_point="secret")
        kv.read_secret_version(path=path, mount_point="secret", raise_on_deleted_version=True)
        kv.delete_metadata_and_all_versions(path=path, mount_point="secret")

    return pair


def _timed(pair: Callable[[int], None], first: int, count: int) -> float:
    started = time.perf_counter()
    for i in range(first, first + count):
        pair(i)
    return time.perf_counter() - started


def _state_on_tmpfs(scratch: Path) -> Path:
    """A state directory in /dev/shm (beside scratch where there is none): the backend without fsync cost."""
    shm = Path("/dev/shm")  # noqa: S108 - a private directory made in it by mkdtemp
    return Path(tempfile.mkdtemp(prefix="csi-luks-bench-state-", dir=shm if shm.is_dir() else scratch))


def measure(pairs: int = 500, rounds: int = 25) -> list[Row]:
    """pairs per side, split over rounds that alternate the sides (one warm-up pair each first); each
    side's rate is that of its median round."""
    with tempfile.TemporaryDirectory(prefix="csi-luks-bench-vault-") as scratch, ExitStack() as stack:
        root = Path(scratch)
        bao = stack.enter_context(openbao_server(root / "openbao"))
        (root / "token").write_text(ROOT_TOKEN)
        entry = {"encryptionKMSType": "vault", "vaultAddress": bao.address,
                 "vaultTokenFile": str(root / "token"), "vaultPassphrasePath": "csi-luks/"}  # fmt: skip
        config = json.dumps(
            {KMS_ID: entry, "local": {"encryptionKMSType": "local", "keyFile": str(root / "kek")}}
        )
        for name in ("disk", "tmpfs"):
            (root / name).mkdir()
            (root / name / "kms-config.json").write_text(config)
        disk = stack.enter_context(running_plugin(root / "disk", mode=Mode.CONTROLLER))
        tmpfs_state = _state_on_tmpfs(root)
        stack.callback(shutil.rmtree, tmpfs_state, ignore_errors=True)
        tmpfs = stack.enter_context(
            running_plugin(root / "tmpfs", mode=Mode.CONTROLLER, state_dir=tmpfs_state)
        )
        sides = {
            "grpc": _grpc_pair(disk, KMS_ID),
            "grpc-tmpfs": _grpc_pair(tmpfs, KMS_ID),
            "local-tmpfs": _grpc_pair(tmpfs, "local"),
            "kms": _kms_pair(disk),
            "bare": _bare_pair(bao),
        }
        for pair in sides.values():
            pair(-1)  # warm-up: connections, logins, imports
        per_round = max(1, pairs // rounds)
        rates: dict[str, list[float]] = {side: [] for side in sides}
        for r in range(rounds):
            for side, pair in sides.items():
                rates[side].append(per_round / _timed(pair, r * per_round, per_round))
    # The median round of each side: a burst of load from elsewhere that hits one side's round is ignored.
    rate = {side: statistics.median(values) for side, values in rates.items()}
    bare, local = "bare hvac write+read+destroy", "the same with the local KMS"
    grpc_pair = "vault KV v2: CreateVolume+DeleteVolume (gRPC)"
    return [
        Row(grpc_pair, rate["grpc"], "pairs/s", rate["bare"], bare, TARGET),
        Row(f"{grpc_pair}, state on tmpfs", rate["grpc-tmpfs"], "pairs/s", rate["bare"], bare, TARGET),
        Row("vault KV v2: the KMS calls of a pair", rate["kms"], "pairs/s", rate["bare"], bare, TARGET),
        # What gRPC and the backend leave to the KMS: the same pair without Vault.
        Row(f"{grpc_pair}, state on tmpfs", rate["grpc-tmpfs"], "pairs/s", rate["local-tmpfs"], local),
    ]

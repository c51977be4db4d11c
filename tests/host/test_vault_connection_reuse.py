"""One Vault connection per KMS entry, on a real OpenBao: the KV version is asked once, the token is kept
while it is good, and a changed entry gets a new connection.

The requests are counted where they leave the process (requests.Session.send, passed through unchanged):
the server is the real one, the count is what it received.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

from csi_luks import kube as plugin_kube
from csi_luks.encryption import volume_encryption
from csi_luks.kms.base import KMSContext
from csi_luks.kms.config import KMSConfig
from csi_luks.kms.vault import VaultKVKMS
from csi_luks.volumes.standalone import StandaloneBackend
from tests.support.kms_env import NODE_SA, SYSTEM_NAMESPACE, KmsEnv
from tests.support.openbao import ROOT_TOKEN, OpenBao

MiB = 1024 * 1024
CONTEXT = KMSContext(secrets={})
MOUNTS = "/v1/sys/internal/ui/mounts/"
LOGIN = "/v1/auth/kubernetes/login"


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """The path of every HTTP request this process sends, counted."""
    counts: Counter[str] = Counter()
    send = requests.Session.send

    def counted(self: requests.Session, request: requests.PreparedRequest, **kwargs: Any) -> Any:
        counts[urlsplit(str(request.url)).path] += 1
        return send(self, request, **kwargs)

    monkeypatch.setattr(requests.Session, "send", counted)
    return counts


def _count(sent: Counter[str], prefix: str) -> int:
    return sum(n for path, n in sent.items() if path.startswith(prefix))


@pytest.fixture
def backend(tmp_path: Path) -> StandaloneBackend:
    return StandaloneBackend(tmp_path / "state")


def _lifecycles(config: KMSConfig, kms_id: str, backend: StandaloneBackend, names: list[str]) -> None:
    """What the controller and node do per volume, with a KMS built afresh for each call as they build it."""
    for name in names:
        volume_id = backend.volume_id_for(name, {})
        backend.create(volume_id, name, MiB, {})
        volume_encryption(config, kms_id, CONTEXT, backend).new_passphrase(volume_id)
        assert len(volume_encryption(config, kms_id, CONTEXT, backend).get_passphrase(volume_id)) == 43
        volume_encryption(config, kms_id, CONTEXT, backend).remove(volume_id)
        backend.delete(volume_id)


def _entry(bao: OpenBao, token_file: Path, **extra: str) -> dict[str, str]:
    token_file.write_text(ROOT_TOKEN)
    return {"encryptionKMSType": "vault", "vaultAddress": bao.address, "vaultTokenFile": str(token_file),
            "vaultPassphrasePath": "reuse/", **extra}  # fmt: skip


def test_the_kv_version_is_asked_once_per_connection(
    session_bao: OpenBao, tmp_path: Path, backend: StandaloneBackend, sent: Counter[str]
) -> None:
    config = KMSConfig(None, {
        "kv2": _entry(session_bao, tmp_path / "token"),
        "kv1": _entry(session_bao, tmp_path / "token", vaultBackendPath="kv1"),
    })  # fmt: skip
    _lifecycles(config, "kv2", backend, [f"pvc-kv2-{i}" for i in range(4)])
    _lifecycles(config, "kv1", backend, [f"pvc-kv1-{i}" for i in range(2)])
    # Once per connection and mount, for the current and the pending-DEK store alike.
    assert sent[f"{MOUNTS}secret"] == 1 and sent[f"{MOUNTS}kv1"] == 1, sent
    # Each lifecycle: store, read, remove the pending and the current DEK; nothing else (no login, and no
    # read before a KV v1 write).
    assert sum(sent.values()) == 2 + 4 * 4 + 2 * 4, sent


def test_a_changed_entry_gets_a_new_connection_which_asks_again(
    session_bao: OpenBao, tmp_path: Path, backend: StandaloneBackend, sent: Counter[str]
) -> None:
    path = tmp_path / "kms-config.json"
    path.write_text(json.dumps({"kv": _entry(session_bao, tmp_path / "token")}))
    config = KMSConfig.from_file(path)
    first = config.build("kv", CONTEXT)
    assert isinstance(first, VaultKVKMS)
    assert config.build("kv", CONTEXT).connection is first.connection  # type: ignore[attr-defined]
    _lifecycles(config, "kv", backend, ["pvc-before"])

    path.write_text(json.dumps({"kv": _entry(session_bao, tmp_path / "token", vaultTimeout="7")}))
    second = config.build("kv", CONTEXT)
    assert isinstance(second, VaultKVKMS)
    assert second.connection is not first.connection
    assert second.connection.settings.timeout == 7
    assert config.build("kv", CONTEXT).connection is second.connection  # type: ignore[attr-defined]
    _lifecycles(config, "kv", backend, ["pvc-after"])
    assert sent[f"{MOUNTS}secret"] == 2, sent  # the new connection detected the version afresh


@pytest.fixture
def plugin_identity(kms_env: KmsEnv) -> Iterator[None]:
    plugin_kube.set_api_client(kms_env.kube.api_client(kms_env.node_token_file.read_text()))
    try:
        yield
    finally:
        plugin_kube.set_api_client(None)


def test_kubernetes_auth_logs_in_once_while_the_token_is_good_and_again_after_it_expired(
    kms_env: KmsEnv, backend: StandaloneBackend, plugin_identity: None, sent: Counter[str]
) -> None:
    ttl = 4
    kms_env.bao.client().auth.kubernetes.create_role(
        name="reuse-short-lived",
        bound_service_account_names=[NODE_SA],
        bound_service_account_namespaces=[SYSTEM_NAMESPACE],
        policies=["dek"],
        ttl=f"{ttl}s",
        max_ttl=f"{ttl}s",
    )
    entry = {
        "encryptionKMSType": "vault", "vaultAddress": kms_env.bao.address, "vaultRole": "reuse-short-lived",
        "vaultServiceAccountTokenFile": str(kms_env.node_token_file), "vaultPassphrasePath": "reuse-k8s/",
        "vaultBackend": "kv-v2",
    }  # fmt: skip
    config = KMSConfig(None, {"k8s": entry})
    started = time.monotonic()
    _lifecycles(config, "k8s", backend, ["pvc-k8s-1", "pvc-k8s-2"])
    assert time.monotonic() - started < ttl, "too slow to test reuse within the token's lifetime"
    assert sent[LOGIN] == 1, sent
    kms = config.build("k8s", CONTEXT)
    assert isinstance(kms, VaultKVKMS)
    first_token = kms.connection.current_token()
    assert first_token is not None

    time.sleep(ttl + 1)
    assert kms_env.bao.client(first_token).is_authenticated() is False  # really expired
    _lifecycles(config, "k8s", backend, ["pvc-k8s-3"])  # refused once (403), logged in again, done
    assert sent[LOGIN] == 2, sent
    assert kms.connection.current_token() not in (None, first_token)

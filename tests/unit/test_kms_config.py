"""The KMS configuration file: loading, reloading, defaults, and messages that never show secrets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_luks import kube
from csi_luks.errors import status_for
from csi_luks.kms.base import (
    BUILT_IN,
    KMSBackendMissing,
    KMSConfigError,
    KMSContext,
    factory_for,
    known_types,
)
from csi_luks.kms.config import KMSConfig
from csi_luks.kms.local import LocalKMS
from csi_luks.kms.secrets import SecretsKMS

SECRET = "hvs.super-secret-token-value"
NO_SECRETS = KMSContext(secrets={})


def write(path: Path, document: Any, mtime_ns: int | None = None) -> None:
    """Write the file and give it a distinct mtime: a same-second, same-size edit would not show."""
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "kms-config.json"


def test_loads_entries_and_ids(path: Path) -> None:
    write(path, {"b": {"encryptionKMSType": "secrets"}, "a": {"encryptionKMSType": "local", "keyFile": "/k"}})
    config = KMSConfig.from_file(path)
    assert config.ids() == ["a", "b"]
    assert config.entry("a") == {"encryptionKMSType": "local", "keyFile": "/k"}


def test_entry_is_a_copy(path: Path) -> None:
    write(path, {"a": {"encryptionKMSType": "local"}})
    config = KMSConfig.from_file(path)
    config.entry("a")["encryptionKMSType"] = "changed"
    assert config.entry("a") == {"encryptionKMSType": "local"}


def test_a_missing_file_is_an_empty_configuration(path: Path) -> None:
    config = KMSConfig.from_file(path)
    assert config.ids() == []
    assert config.entry("") == {"encryptionKMSType": "secrets"}


def test_the_empty_id_is_the_secrets_type_unless_the_file_defines_it(path: Path) -> None:
    write(path, {"x": {"encryptionKMSType": "local"}})
    config = KMSConfig.from_file(path)
    assert isinstance(config.build("", NO_SECRETS), SecretsKMS)
    assert "" not in config.ids()
    write(path, {"": {"encryptionKMSType": "local", "keyFile": "/k"}}, mtime_ns=10**18)
    assert isinstance(config.build("", NO_SECRETS), LocalKMS)


def test_an_edit_is_picked_up_without_a_restart(path: Path) -> None:
    write(path, {"one": {"encryptionKMSType": "local"}}, mtime_ns=10**18)
    config = KMSConfig.from_file(path)
    assert config.ids() == ["one"]
    # Same size, same mtime as before: only the explicit mtime change makes the edit visible.
    write(path, {"two": {"encryptionKMSType": "local"}}, mtime_ns=10**18 + 1)
    assert config.ids() == ["two"]


def test_a_file_created_or_removed_later_is_picked_up(path: Path) -> None:
    config = KMSConfig.from_file(path)
    write(path, {"late": {"encryptionKMSType": "secrets"}})
    assert config.ids() == ["late"]
    path.unlink()
    assert config.ids() == []


def test_an_atomically_replaced_file_is_picked_up(path: Path, tmp_path: Path) -> None:
    write(path, {"old": {"encryptionKMSType": "local"}}, mtime_ns=10**18)
    config = KMSConfig.from_file(path)
    assert config.ids() == ["old"]
    replacement = tmp_path / "new.json"
    write(replacement, {"new": {"encryptionKMSType": "local"}}, mtime_ns=10**18)  # same size and mtime
    os.replace(replacement, path)
    assert config.ids() == ["new"]


@pytest.mark.parametrize(
    ("broken", "problem"),
    [
        ("{not json", "not valid JSON"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"a": ' + "9" * 5000 + "}", "JSON parsing refuses"),
        ('{"a": {"encryptionKMSType": 1}}', "must be a string"),
    ],
)
def test_a_broken_edit_keeps_the_last_good_configuration(
    path: Path, broken: str, problem: str, caplog: pytest.LogCaptureFixture
) -> None:
    write(path, {"a": {"encryptionKMSType": "local"}}, mtime_ns=10**18)
    config = KMSConfig.from_file(path)
    write(path, broken, mtime_ns=10**18 + 1)
    for _ in range(2):
        assert config.entry("a") == {"encryptionKMSType": "local"}
    assert problem in caplog.text and "last good" in caplog.text and str(path) in caplog.text
    write(path, {"a": {"encryptionKMSType": "secrets"}}, mtime_ns=10**18 + 2)
    assert config.entry("a") == {"encryptionKMSType": "secrets"}


@pytest.mark.parametrize(
    ("broken", "problem"),
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"a": ' + "9" * 5000 + "}", "JSON parsing refuses"),
    ],
)
def test_a_hostile_file_fails_at_start_up_with_a_configuration_error(
    path: Path, broken: str, problem: str
) -> None:
    write(path, broken)
    with pytest.raises(KMSConfigError, match=problem):
        KMSConfig.from_file(path)


def test_a_broken_file_fails_at_start_up(path: Path) -> None:
    write(path, "[]")
    with pytest.raises(KMSConfigError, match=str(path)):
        KMSConfig.from_file(path)


def test_an_unknown_id_lists_the_known_ids(path: Path) -> None:
    write(path, {"local-1": {"encryptionKMSType": "local"}, "vault-2": {"encryptionKMSType": "secrets"}})
    with pytest.raises(KMSConfigError) as info:
        KMSConfig.from_file(path).entry("vault-x")
    message = str(info.value)
    assert "'vault-x'" in message and "local-1, vault-2" in message and str(path) in message


def test_an_unknown_id_with_no_configuration_says_so(path: Path) -> None:
    with pytest.raises(KMSConfigError, match="known ids: none"):
        KMSConfig.from_file(path).entry("x")


def test_an_unknown_type_names_the_id_and_the_known_types(path: Path) -> None:
    write(path, {"v": {"encryptionKMSType": "nope"}})
    with pytest.raises(KMSConfigError) as info:
        KMSConfig.from_file(path).build("v", NO_SECRETS)
    message = str(info.value)
    assert "'v'" in message and "'nope'" in message and "encryptionKMSType" in message
    assert all(t in message for t in known_types())


def test_building_the_default_alias_gives_the_secrets_type(path: Path) -> None:
    write(path, {"d": {"encryptionKMSType": "default"}})
    assert isinstance(KMSConfig.from_file(path).build("d", NO_SECRETS), SecretsKMS)
    assert {"local", "secrets", "default"} <= set(known_types())


def test_each_built_in_type_is_registered_by_the_module_named_for_it() -> None:
    for kms_type, module in BUILT_IN.items():
        assert factory_for(kms_type).__module__ == module, kms_type
    # Every module now imported: none registers a type the table misses (it would not be found).
    assert known_types() == sorted(BUILT_IN)


def test_a_type_whose_library_is_missing_fails_when_built_naming_the_type_and_the_library() -> None:
    # A fresh interpreter: in this one the vault module may already be imported.
    script = """
import sys
sys.modules["hvac"] = None  # as if not installed: importing it raises ImportError
from csi_luks.kms.base import KMSConfigError, KMSContext
from csi_luks.kms.config import KMSConfig
config = KMSConfig(None, {"v": {"encryptionKMSType": "vault", "vaultAddress": "http://vault:8200"}})
try:
    config.build("v", KMSContext(secrets={}))
except KMSConfigError as exc:
    print(type(exc).__name__, exc)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    message = result.stdout
    assert "KMS id 'v'" in message and "encryptionKMSType 'vault'" in message and "hvac" in message
    assert message.startswith("KMSBackendMissing ")  # the image's to fix, not the request's


@pytest.mark.parametrize(
    ("document", "needles"),
    [
        ({"kms-a": "local"}, ["'kms-a'", "object"]),
        ({"kms-a": ["local"]}, ["'kms-a'", "object"]),
        ({"kms-a": {"keyFile": "/k"}}, ["'kms-a'", "'encryptionKMSType'", "missing"]),
        ({"kms-a": {"encryptionKMSType": 3}}, ["'kms-a'", "'encryptionKMSType'", "string"]),
        ({"kms-a": {"encryptionKMSType": ""}}, ["'kms-a'", "'encryptionKMSType'", "empty"]),
        ({"kms-a": {"encryptionKMSType": "local", "keyFile": None}}, ["'kms-a'", "'keyFile'", "null"]),
        ({"kms-a": {"encryptionKMSType": "local", "retries": 3}}, ["'kms-a'", "'retries'", "number"]),
        ("42", ["object keyed by KMS id"]),
        ('{"kms-a": {"encryptionKMSType": "local", "encryptionKMSType": "secrets"}}', ["twice"]),
    ],
)
def test_a_malformed_entry_names_the_file_the_id_and_the_key(
    path: Path, document: Any, needles: list[str]
) -> None:
    write(path, document)
    with pytest.raises(KMSConfigError) as info:
        KMSConfig.from_file(path)
    message = str(info.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message


@pytest.mark.parametrize(
    "document",
    [
        {"vault": {"encryptionKMSType": "vault", "token": [SECRET]}},
        {"vault": {"encryptionKMSType": "vault", "passphrase": {"v": SECRET}}},
        {"vault": {"token": SECRET}},  # missing type next to a secret
        {"vault": {"encryptionKMSType": "vault", "token": SECRET}, "other": {"secret": [SECRET]}},
        '{"vault": {"encryptionKMSType": "vault", "token": "' + SECRET + '",}}',  # a trailing comma
        '{"vault": {"encryptionKMSType": "vault", "token": "' + SECRET + '"',  # truncated
        '{"vault": {"encryptionKMSType": "vault", "password": "' + SECRET + '", "password": "x"}}',
    ],
)
def test_secret_values_never_appear_in_error_messages(path: Path, document: Any) -> None:
    write(path, document)
    with pytest.raises(KMSConfigError) as info:
        KMSConfig.from_file(path).build("vault", NO_SECRETS)
    assert SECRET not in str(info.value)
    assert "super-secret" not in str(info.value)


def test_an_unknown_type_with_a_secret_does_not_show_the_secret(path: Path) -> None:
    write(path, {"vault": {"encryptionKMSType": "vault", "token": SECRET}})
    config = KMSConfig.from_file(path)
    with pytest.raises(KMSConfigError) as info:
        config.build("vault", NO_SECRETS)
    assert SECRET not in str(info.value) and SECRET not in repr(config)


def test_an_unreadable_path_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(KMSConfigError, match="cannot read"):
        KMSConfig.from_file(tmp_path)  # a directory


def test_an_in_memory_configuration_is_validated_too() -> None:
    with pytest.raises(KMSConfigError, match=r"'x'.*'encryptionKMSType'"):
        KMSConfig(None, {"x": {"keyFile": "/k"}})
    assert KMSConfig(None, {"x": {"encryptionKMSType": "local"}}).ids() == ["x"]


def test_concurrent_readers_during_edits_see_a_whole_configuration(path: Path) -> None:
    versions = [{f"id-{n}": {"encryptionKMSType": "local"}} for n in range(20)]
    write(path, versions[0], mtime_ns=10**18)
    config = KMSConfig.from_file(path)
    seen: list[list[str]] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            try:
                seen.append(config.ids())
            except KMSConfigError:
                pass  # a reader may catch the file half-written; the next stat re-reads it
            except BaseException as exc:
                errors.append(exc)

    readers = [threading.Thread(target=read) for _ in range(4)]
    for reader in readers:
        reader.start()
    for n, version in enumerate(versions[1:], start=1):
        replacement = path.with_suffix(".new")
        write(replacement, version, mtime_ns=10**18 + n)
        os.replace(replacement, path)  # how a ConfigMap update lands: atomically
    done.set()
    for reader in readers:
        reader.join()
    assert errors == []
    assert all(len(ids) == 1 for ids in seen)
    assert config.ids() == ["id-19"]


# --- Vault login choice, tenant types, tenant allow-lists -------------------------------------------

VAULT = {"encryptionKMSType": "vault", "vaultAddress": "https://vault.example:8200"}


@pytest.mark.parametrize(
    "login",
    [
        {},
        {"vaultRole": "r", "vaultTokenFile": "/t"},
        {"vaultTokenFile": "/t", "vaultTokenSecretName": "s", "vaultTokenSecretNamespace": "n"},
    ],
)
def test_a_vault_entry_needs_exactly_one_login(login: dict[str, str]) -> None:
    config = KMSConfig(None, {"v": {**VAULT, **login}})
    with pytest.raises(KMSConfigError, match="set exactly one of 'vaultRole'"):
        config.build("v", KMSContext(secrets={}))


def test_a_token_secret_needs_its_namespace() -> None:
    config = KMSConfig(None, {"v": {**VAULT, "vaultTokenSecretName": "vault-token"}})
    with pytest.raises(KMSConfigError, match="'vaultTokenSecretNamespace' is required"):
        config.build("v", KMSContext(secrets={}))


@pytest.mark.parametrize("kms_type", ["vaulttokens", "vaulttenantsa"])
def test_tenant_types_need_the_pvc_namespace(kms_type: str) -> None:
    config = KMSConfig(None, {"t": {**VAULT, "encryptionKMSType": kms_type}})
    with pytest.raises(KMSConfigError, match="--extra-create-metadata"):
        config.build("t", KMSContext(secrets={}))


def test_only_tenant_types_take_tenant_overrides() -> None:
    from csi_luks.kms.base import tenant_keys_for

    assert "vaultAddress" in tenant_keys_for("vaulttokens")
    assert {"vaultRole", "vaultAuthPath"} <= tenant_keys_for("vaulttenantsa")
    assert not tenant_keys_for("vaulttokens") & {
        "vaultTokenFile",
        "vaultCAFile",
        "vaultServiceAccountTokenFile",
    }
    for kms_type in ("secrets", "local", "metadata", "vault", "vault-transit"):
        assert tenant_keys_for(kms_type) == frozenset(), kms_type


def test_a_broken_config_map_edit_keeps_the_last_good_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    data = {"a": json.dumps({"encryptionKMSType": "local"})}
    monkeypatch.setattr(kube, "read_config_map", lambda name, namespace, purpose: dict(data))
    config = KMSConfig.from_file(tmp_path / "absent.json", config_map=("csi-luks", "kms"))
    assert config.entry("a") == {"encryptionKMSType": "local"}
    data["a"] = '{"encryptionKMSType": ' + "[" * 100_000
    assert config.entry("a") == {"encryptionKMSType": "local"}
    assert "nested too deeply" in caplog.text and "ConfigMap csi-luks/kms is fixed" in caplog.text
    data["a"] = json.dumps({"encryptionKMSType": "secrets"})
    assert config.entry("a") == {"encryptionKMSType": "secrets"}


def test_ceph_csi_env_style_entries_read_as_the_entries_they_stand_for(path: Path) -> None:
    """ODF/OCS write Ceph-CSI's csi-kms-connection-details with Vault's environment names (Ceph-CSI's
    transformConfig); the file-style key wins where both are given."""
    write(path, {
        "vault-tenant": {
            "KMS_PROVIDER": "vaulttokens", "VAULT_ADDR": "https://vault.example:8200",
            "VAULT_BACKEND_PATH": "ceph-csi/", "VAULT_BACKEND": "kv-v2", "VAULT_NAMESPACE": "ns1",
            "VAULT_CACERT": "vault-ca", "VAULT_SKIP_VERIFY": "true", "vaultTokensPath": "tokens",
        },
        "verify": {"KMS_PROVIDER": "vaulttenantsa", "VAULT_ADDR": "https://v", "VAULT_SKIP_VERIFY": "false",
                   "vaultAddress": "https://file-style-wins"},
        "nonsense-verify": {"KMS_PROVIDER": "vault", "VAULT_SKIP_VERIFY": "maybe"},
        "missing": {"VAULT_ADDR": "https://v"},
    })  # fmt: skip
    with pytest.raises(KMSConfigError, match="'KMS_PROVIDER'"):
        KMSConfig.from_file(path).entry("vault-tenant")
    document = json.loads(path.read_text())
    del document["missing"]
    write(path, document, mtime_ns=1)
    config = KMSConfig.from_file(path)
    assert config.entry("vault-tenant") == {
        "encryptionKMSType": "vaulttokens", "vaultAddress": "https://vault.example:8200",
        "vaultBackendPath": "ceph-csi/", "vaultBackend": "kv-v2", "vaultNamespace": "ns1",
        "vaultCAFromSecret": "vault-ca", "vaultCAVerify": "false", "vaultTokensPath": "tokens",
    }  # fmt: skip
    assert config.entry("verify") == {
        "encryptionKMSType": "vaulttenantsa",
        "vaultAddress": "https://file-style-wins",
        "vaultCAVerify": "true",
    }
    assert config.entry("nonsense-verify") == {"encryptionKMSType": "vault"}


def test_a_missing_kms_library_is_failed_precondition_not_the_requests_fault() -> None:
    assert status_for(KMSBackendMissing("encryptionKMSType 'vault' cannot be loaded"))[0] == (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    assert status_for(KMSConfigError("unknown encryptionKMSType"))[0] == grpc.StatusCode.INVALID_ARGUMENT

"""The `local` and `secrets` KMS types, the KMS configuration, and VolumeEncryption."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from csi_luks.encryption import VolumeEncryption
from csi_luks.kms.base import (
    DEKDecryptError,
    DEKNotFound,
    DEKStore,
    KMSConfigError,
    KMSContext,
    MissingSecret,
)
from csi_luks.kms.config import KMSConfig
from csi_luks.kms.local import LocalKMS
from csi_luks.kms.secrets import SecretsKMS


class MemoryStore(DEKStore):
    def __init__(self) -> None:
        self.deks: dict[str, str] = {}

    def store_dek(self, volume_id: str, dek: str) -> None:
        self.deks[volume_id] = dek

    def fetch_dek(self, volume_id: str) -> str:
        if volume_id not in self.deks:
            raise DEKNotFound(volume_id)
        return self.deks[volume_id]

    def remove_dek(self, volume_id: str) -> None:
        self.deks.pop(volume_id, None)


def test_local_kms_round_trip_and_removal(tmp_path: Path) -> None:
    store = MemoryStore()
    encryption = VolumeEncryption(LocalKMS("local-1", tmp_path / "kek"), store)
    encryption.new_passphrase("vol-a")
    encryption.new_passphrase("vol-b")
    a, b = encryption.get_passphrase("vol-a"), encryption.get_passphrase("vol-b")
    assert len(a) >= 43 and a != b
    assert a not in store.deks["vol-a"] and set(json.loads(store.deks["vol-a"])) == {"dek", "nonce"}
    assert oct((tmp_path / "kek").stat().st_mode & 0o777) == "0o600"
    encryption.remove("vol-a")
    with pytest.raises(DEKNotFound):
        encryption.get_passphrase("vol-a")


def test_a_wrapped_dek_is_bound_to_its_volume_and_key(tmp_path: Path) -> None:
    kms = LocalKMS("local-1", tmp_path / "kek")
    wrapped = kms.encrypt_dek("vol-a", "the-dek")
    with pytest.raises(DEKDecryptError, match="vol-b"):
        kms.decrypt_dek("vol-b", wrapped)
    other = LocalKMS("local-2", tmp_path / "other-kek")
    other.encrypt_dek("x", "y")  # creates its own key
    with pytest.raises(DEKDecryptError):
        other.decrypt_dek("vol-a", wrapped)
    tampered = json.loads(wrapped)
    tampered["dek"] = tampered["dek"][:-4] + ("AAAA" if tampered["dek"][-4:] != "AAAA" else "BBBB")
    with pytest.raises(DEKDecryptError):
        kms.decrypt_dek("vol-a", json.dumps(tampered))
    with pytest.raises(DEKDecryptError):
        kms.decrypt_dek("vol-a", "not json")


def test_a_missing_or_loose_key_file_is_a_configuration_error(tmp_path: Path) -> None:
    kms = LocalKMS("local-1", tmp_path / "kek")
    with pytest.raises(KMSConfigError, match="missing"):
        kms.decrypt_dek("vol", '{"dek": "", "nonce": ""}')
    assert not (tmp_path / "kek").exists()  # decrypting never creates a key
    wrapped = kms.encrypt_dek("vol", "dek")
    os.chmod(tmp_path / "kek", 0o644)
    with pytest.raises(KMSConfigError, match="readable by others"):
        kms.decrypt_dek("vol", wrapped)


def test_concurrent_first_use_makes_one_key(tmp_path: Path) -> None:
    barrier = threading.Barrier(6)
    wrapped: dict[int, str] = {}

    def wrap(i: int) -> None:
        kms = LocalKMS("local-1", tmp_path / "kek")
        barrier.wait()
        wrapped[i] = kms.encrypt_dek(f"vol-{i}", f"dek-{i}")

    threads = [threading.Thread(target=wrap, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    kms = LocalKMS("local-1", tmp_path / "kek")
    assert all(kms.decrypt_dek(f"vol-{i}", wrapped[i]) == f"dek-{i}" for i in range(6))


def test_secrets_kms_uses_the_request_secret(tmp_path: Path) -> None:
    config = KMSConfig(None)
    kms = config.build("", KMSContext(secrets={"encryptionPassphrase": "class-wide-secret"}))
    store = kms.integrated_dek_store
    assert isinstance(kms, SecretsKMS) and store is kms
    encryption = VolumeEncryption(kms, store)
    encryption.new_passphrase("vol")
    assert encryption.get_passphrase("vol") == "class-wide-secret"
    bare = config.build("", KMSContext(secrets={}))
    assert bare.integrated_dek_store is not None
    with pytest.raises(MissingSecret, match="node-stage-secret-name"):
        VolumeEncryption(bare, bare.integrated_dek_store).get_passphrase("vol")


def test_config_reload_unknown_ids_and_bad_entries(tmp_path: Path) -> None:
    path = tmp_path / "kms.json"
    config = KMSConfig.from_file(path)
    assert config.ids() == [] and config.entry("") == {"encryptionKMSType": "secrets"}
    path.write_text(json.dumps({"one": {"encryptionKMSType": "local"}}))
    assert config.ids() == ["one"]
    path.write_text(
        json.dumps({"one": {"encryptionKMSType": "local"}, "two": {"encryptionKMSType": "secrets"}})
    )
    os.utime(path, ns=(1, 1))  # a different mtime even within the same second
    assert config.ids() == ["one", "two"]
    with pytest.raises(KMSConfigError, match="known ids: one, two"):
        config.entry("three")
    path.write_text(json.dumps({"v": {"encryptionKMSType": "local", "token": 12345}}))
    with pytest.raises(KMSConfigError) as info:
        config.ids()
    assert "'v'" in str(info.value) and "'token'" in str(info.value) and "12345" not in str(info.value)
    path.write_text(json.dumps({"v": {"vaultAddress": "x"}}))
    with pytest.raises(KMSConfigError, match="encryptionKMSType"):
        config.ids()
    path.write_text(json.dumps({"v": {"encryptionKMSType": "nope"}}))
    with pytest.raises(KMSConfigError, match="known types"):
        config.build("v", KMSContext(secrets={}))

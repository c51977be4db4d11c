"""The `metadata` KMS type with the passphrase from the request's secrets (the Secret path: tests/host)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from csi_luks.encryption import volume_encryption
from csi_luks.kms.base import DEKDecryptError, KMSContext, MissingSecret
from csi_luks.kms.config import KMSConfig
from csi_luks.kms.metadata import derive_kek
from csi_luks.volumes.standalone import StandaloneBackend

MiB = 1024 * 1024
CONFIG = KMSConfig(None, {"meta": {"encryptionKMSType": "metadata"}})


def _volume(tmp_path: Path, name: str = "pvc-1") -> tuple[StandaloneBackend, str]:
    backend = StandaloneBackend(tmp_path / "state")
    volume_id = backend.volume_id_for(name, {})
    backend.create(volume_id, name, MiB, {})
    return backend, volume_id


def test_round_trip_stores_only_a_wrapped_dek(tmp_path: Path) -> None:
    backend, volume_id = _volume(tmp_path)
    context = KMSContext(secrets={"encryptionPassphrase": "tenant passphrase"})
    encryption = volume_encryption(CONFIG, "meta", context, backend)
    encryption.new_passphrase(volume_id)
    dek = encryption.get_passphrase(volume_id)
    stored = json.loads(backend.get(volume_id).metadata["csi-luks/dek"])
    assert set(stored) == {"dek", "nonce"} and dek not in json.dumps(stored)
    assert volume_encryption(CONFIG, "meta", context, backend).get_passphrase(volume_id) == dek


def test_another_passphrase_does_not_decrypt(tmp_path: Path) -> None:
    backend, volume_id = _volume(tmp_path)
    volume_encryption(
        CONFIG, "meta", KMSContext(secrets={"encryptionPassphrase": "one"}), backend
    ).new_passphrase(volume_id)
    other = volume_encryption(CONFIG, "meta", KMSContext(secrets={"encryptionPassphrase": "two"}), backend)
    with pytest.raises(DEKDecryptError, match=volume_id):
        other.get_passphrase(volume_id)


def test_the_kek_is_salted_with_the_volume_id() -> None:
    assert derive_kek("same", "vol-a") != derive_kek("same", "vol-b")
    assert len(derive_kek("same", "vol-a")) == 32


def test_removal_needs_no_passphrase_but_use_does(tmp_path: Path) -> None:
    backend, volume_id = _volume(tmp_path)
    with_secret = KMSContext(secrets={"encryptionPassphrase": "p"})
    volume_encryption(CONFIG, "meta", with_secret, backend).new_passphrase(volume_id)
    bare = volume_encryption(CONFIG, "meta", KMSContext(secrets={}), backend)
    with pytest.raises(MissingSecret, match="secretName"):
        bare.get_passphrase(volume_id)
    bare.remove(volume_id)
    assert "csi-luks/dek" not in backend.get(volume_id).metadata

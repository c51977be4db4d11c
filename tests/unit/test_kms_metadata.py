"""The `metadata` KMS type with the passphrase from the request's secrets (the Secret path: tests/host)."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from csi_luks.encryption import volume_encryption
from csi_luks.kms import kdf, metadata
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


class _CountingScrypt:
    """A stand-in for Scrypt (a fast keyed hash, not 32 MiB) counting the derivations running at once."""

    lock = threading.Lock()
    running = 0
    most = 0

    def __init__(self, *, salt: bytes, **_: Any) -> None:
        self._salt = salt

    def derive(self, key_material: bytes) -> bytes:
        cls = _CountingScrypt
        with cls.lock:
            cls.running += 1
            cls.most = max(cls.most, cls.running)
        try:
            time.sleep(0.02)  # long enough that every thread is in, whatever the machine's speed
            return hashlib.sha256(self._salt + key_material).digest()
        finally:
            with cls.lock:
                cls.running -= 1


@pytest.fixture
def counting_scrypt(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[_CountingScrypt]]:
    monkeypatch.setattr(metadata, "Scrypt", _CountingScrypt)
    _CountingScrypt.running = _CountingScrypt.most = 0
    yield _CountingScrypt
    kdf.SLOTS.set_limit(kdf.DEFAULT_MAX_KDFS)


@pytest.mark.parametrize("limit", [1, 4])
def test_no_more_key_derivations_run_at_once_than_the_limit(
    counting_scrypt: type[_CountingScrypt], limit: int
) -> None:
    """16 threads wrap and unwrap DEKs at once (the gRPC pool's size); at most `limit` derive together."""
    kdf.SLOTS.set_limit(limit)
    kms = metadata.MetadataKMS("meta", {}, KMSContext(secrets={"encryptionPassphrase": "p"}))
    start = threading.Barrier(16)

    def wrap_and_unwrap(i: int) -> str:
        start.wait()
        return kms.decrypt_dek(f"vol-{i}", kms.encrypt_dek(f"vol-{i}", f"dek-{i}"))

    with ThreadPoolExecutor(max_workers=16) as pool:
        assert list(pool.map(wrap_and_unwrap, range(16))) == [f"dek-{i}" for i in range(16)]
    assert counting_scrypt.most == limit  # reached, never passed
    assert counting_scrypt.running == 0


def test_a_failed_derivation_gives_its_slot_back() -> None:
    slots = kdf.KDFSlots(1)

    def fail() -> bytes:
        raise MemoryError("scrypt could not allocate")

    with pytest.raises(MemoryError):
        slots.run(fail)
    assert slots.run(lambda: b"next") == b"next"  # would wait for ever with the slot still held


def test_raising_the_limit_wakes_the_waiting_derivations() -> None:
    slots = kdf.KDFSlots(1)
    inside, release = threading.Event(), threading.Event()
    done: list[int] = []

    def hold() -> None:
        inside.set()
        release.wait()

    first = threading.Thread(target=slots.run, args=(hold,))
    first.start()
    inside.wait()
    second = threading.Thread(target=slots.run, args=(lambda: done.append(2),))
    second.start()
    second.join(0.2)
    assert done == []  # waits: the one slot is held
    slots.set_limit(2)
    second.join(5)
    assert done == [2]
    release.set()
    first.join(5)
    with pytest.raises(ValueError, match="at least 1"):
        slots.set_limit(0)

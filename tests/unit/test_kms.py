"""KMS backends (secrets, local), the metadata DEK store and VolumeEncryption.

The contract tests run over every built-in type, built the way the services build them: through a
KMSConfig and volume_encryption() against an in-memory volume backend.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest

from csi_luks import encryption as encryption_module
from csi_luks.encryption import VolumeEncryption, new_dek, volume_encryption
from csi_luks.errors import status_for
from csi_luks.kms.base import (
    DEKDecryptError,
    DEKNotFound,
    KMSConfigError,
    KMSContext,
    KMSError,
    MissingSecret,
)
from csi_luks.kms.config import KMSConfig
from csi_luks.kms.dek_store import DEK_KEY, MetadataDEKStore
from csi_luks.kms.local import KEK_BYTES, LocalKMS
from csi_luks.kms.secrets import SecretsKMS
from csi_luks.volumes.base import VolumeBackend, VolumeInfo, VolumeNotFound

CLASS_PASSPHRASE = "class-wide-passphrase-from-a-secret"


class MemoryBackend(VolumeBackend):
    """Volumes as dicts: enough for a DEK store, which only reads and writes metadata."""

    def __init__(self) -> None:
        self.volumes: dict[str, VolumeInfo] = {}

    def volume_id_for(
        self, name: str, parameters: Mapping[str, str], like: str | None = None, snapshot: bool = False
    ) -> str:
        return f"{'snap' if snapshot else 'vol'}-{name}"

    def create(
        self,
        volume_id: str,
        name: str,
        size_bytes: int,
        metadata: Mapping[str, str],
        source_id: str | None = None,
        parameters: Mapping[str, str] | None = None,
    ) -> VolumeInfo:
        return self.volumes.setdefault(volume_id, VolumeInfo(volume_id, name, size_bytes, dict(metadata)))

    def get(self, volume_id: str) -> VolumeInfo:
        try:
            info = self.volumes[volume_id]
        except KeyError:
            raise VolumeNotFound(volume_id) from None
        return replace(info, metadata=dict(info.metadata))

    def list(self) -> list[VolumeInfo]:
        return [self.get(v) for v in sorted(self.volumes)]

    def delete(self, volume_id: str) -> None:
        self.volumes.pop(volume_id, None)

    def resize(self, volume_id: str, size_bytes: int) -> int:
        raise NotImplementedError

    def set_metadata(self, volume_id: str, key: str, value: str) -> None:
        info = self.get(volume_id)
        self.volumes[volume_id] = replace(info, metadata={**info.metadata, key: value})

    def remove_metadata(self, volume_id: str, key: str) -> None:
        info = self.get(volume_id)
        self.volumes[volume_id] = replace(info, metadata={k: v for k, v in info.metadata.items() if k != key})

    def attach(self, volume_id: str) -> str:
        raise NotImplementedError

    def find_attachment(self, volume_id: str) -> str | None:
        raise NotImplementedError

    def in_use(self, volume_id: str) -> str | None:
        raise NotImplementedError

    def detach(self, volume_id: str) -> None:
        raise NotImplementedError

    def refresh_attachment_size(self, volume_id: str) -> None:
        raise NotImplementedError

    def free_bytes(self) -> int | None:
        raise NotImplementedError


@dataclass
class World:
    """One KMS configuration and one volume backend, as a running plugin has them."""

    config: KMSConfig
    backend: MemoryBackend
    key_file: Path

    def volume(self, volume_id: str) -> str:
        self.backend.create(volume_id, volume_id, 1024, {})
        return volume_id

    def encryption(self, kms_id: str, secrets: Mapping[str, str] | None = None) -> VolumeEncryption:
        context = KMSContext(secrets={} if secrets is None else secrets)
        return volume_encryption(self.config, kms_id, context, self.backend)


@pytest.fixture
def world(tmp_path: Path) -> World:
    key_file = tmp_path / "keys" / "kek"
    config_path = tmp_path / "kms-config.json"
    config_path.write_text(
        json.dumps(
            {
                "local-1": {"encryptionKMSType": "local", "keyFile": str(key_file)},
                "from-secret": {"encryptionKMSType": "secrets"},
                "alias": {"encryptionKMSType": "default"},
            }
        )
    )
    return World(KMSConfig.from_file(config_path), MemoryBackend(), key_file)


@pytest.fixture
def generated(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every DEK VolumeEncryption generates, in order."""
    made: list[str] = []

    def recording() -> str:
        made.append(new_dek())
        return made[-1]

    monkeypatch.setattr(encryption_module, "new_dek", recording)
    return made


@dataclass(frozen=True)
class Flavour:
    """How one KMS type meets the contract."""

    kms_id: str
    secrets: Mapping[str, str]
    # The passphrase get_passphrase must return, given the DEK new_passphrase generated.
    expected: Callable[[str], str]
    # What a volume without a key raises, and the context in which it does.
    missing: type[KMSError]
    missing_secrets: Mapping[str, str]
    removes: bool  # whether remove() makes the key unavailable


FLAVOURS = {
    "local": Flavour(
        kms_id="local-1",
        secrets={},
        expected=lambda dek: dek,
        missing=DEKNotFound,
        missing_secrets={},
        removes=True,
    ),
    "secrets": Flavour(
        kms_id="from-secret",
        secrets={"encryptionPassphrase": CLASS_PASSPHRASE},
        expected=lambda dek: CLASS_PASSPHRASE,
        missing=MissingSecret,
        missing_secrets={"otherKey": "x"},
        removes=False,
    ),
}


@pytest.fixture(params=sorted(FLAVOURS))
def flavour(request: pytest.FixtureRequest) -> Iterator[Flavour]:
    yield FLAVOURS[request.param]


# --- the contract, over every type ---------------------------------------------------------------------


def test_get_passphrase_returns_the_key_new_passphrase_made(
    world: World, flavour: Flavour, generated: list[str]
) -> None:
    volume = world.volume("vol-a")
    world.encryption(flavour.kms_id, flavour.secrets).new_passphrase(volume)
    assert len(generated) == 1
    # A fresh KMS instance, as the next gRPC call builds one, finds the same passphrase.
    assert world.encryption(flavour.kms_id, flavour.secrets).get_passphrase(volume) == flavour.expected(
        generated[0]
    )


def test_the_passphrase_never_appears_in_reprs(world: World, flavour: Flavour, generated: list[str]) -> None:
    volume = world.volume("vol-a")
    encryption = world.encryption(flavour.kms_id, flavour.secrets)
    encryption.new_passphrase(volume)
    passphrase = encryption.get_passphrase(volume)
    for thing in (encryption, encryption.kms, encryption.store, world.config):
        assert passphrase not in repr(thing)


def test_remove_is_idempotent_and_removes_what_the_kms_stored(world: World, flavour: Flavour) -> None:
    volume = world.volume("vol-a")
    encryption = world.encryption(flavour.kms_id, flavour.secrets)
    encryption.new_passphrase(volume)
    encryption.remove(volume)
    encryption.remove(volume)
    if flavour.removes:
        with pytest.raises(DEKNotFound, match=volume):
            encryption.get_passphrase(volume)
        assert DEK_KEY not in world.backend.get(volume).metadata
    else:  # the passphrase is the class's Secret, shared by other volumes: nothing to remove
        assert encryption.get_passphrase(volume) == CLASS_PASSPHRASE


def test_a_volume_without_a_key_raises_the_kms_specific_error(world: World, flavour: Flavour) -> None:
    volume = world.volume("vol-never-prepared")
    with pytest.raises(flavour.missing):
        world.encryption(flavour.kms_id, flavour.missing_secrets).get_passphrase(volume)


def test_removing_needs_no_secrets(world: World, flavour: Flavour) -> None:
    volume = world.volume("vol-a")
    world.encryption(flavour.kms_id, flavour.secrets).new_passphrase(volume)
    world.encryption(flavour.kms_id, {}).remove(volume)  # DeleteVolume may come without secrets


# --- DEKs ----------------------------------------------------------------------------------------------


def test_a_dek_is_256_random_bits_encoded_as_a_printable_passphrase() -> None:
    first, second = new_dek(), new_dek()
    assert len(first) >= 43 and len(second) >= 43
    assert first != second
    assert first.isprintable() and " " not in first


def test_each_volume_gets_its_own_dek(world: World, generated: list[str]) -> None:
    encryption = world.encryption("local-1")
    for volume in ("vol-a", "vol-b"):
        encryption.new_passphrase(world.volume(volume))
    a, b = encryption.get_passphrase("vol-a"), encryption.get_passphrase("vol-b")
    assert a != b and [a, b] == generated


# --- secrets -------------------------------------------------------------------------------------------


def test_the_secrets_type_is_the_default_and_has_an_alias(world: World) -> None:
    context = KMSContext(secrets={"encryptionPassphrase": CLASS_PASSPHRASE})
    for kms_id in ("", "from-secret", "alias"):
        kms = world.config.build(kms_id, context)
        assert isinstance(kms, SecretsKMS) and kms.integrated_dek_store is kms
        assert kms.kms_id == kms_id


def test_a_missing_passphrase_secret_says_how_to_provide_it(world: World) -> None:
    with pytest.raises(MissingSecret) as info:
        world.encryption("", {"encryptionpassphrase": CLASS_PASSPHRASE}).get_passphrase("vol-a")
    message = str(info.value)
    assert "'encryptionPassphrase'" in message and "csi.storage.k8s.io/node-stage-secret-name" in message
    assert "provisioner-secret-name" in message and "vol-a" in message
    assert "'encryptionpassphrase'" in message  # the misspelt key present is named, its value is not
    assert CLASS_PASSPHRASE not in message


def test_an_empty_passphrase_secret_is_missing(world: World) -> None:
    with pytest.raises(MissingSecret, match="empty"):
        world.encryption("", {"encryptionPassphrase": ""}).get_passphrase("vol-a")


def test_the_secrets_type_stores_nothing_in_the_volume(world: World) -> None:
    volume = world.volume("vol-a")
    world.encryption("", {"encryptionPassphrase": CLASS_PASSPHRASE}).new_passphrase(volume)
    assert world.backend.get(volume).metadata == {}


# --- local ---------------------------------------------------------------------------------------------


def test_local_stores_only_a_wrapped_dek_in_the_volume_metadata(world: World, generated: list[str]) -> None:
    volume = world.volume("vol-a")
    world.encryption("local-1").new_passphrase(volume)
    stored = world.backend.get(volume).metadata[DEK_KEY]
    assert set(json.loads(stored)) == {"dek", "nonce"}
    assert generated[0] not in stored


def test_local_dek_of_one_volume_does_not_decrypt_for_another(world: World) -> None:
    kms = LocalKMS("local-1", world.key_file)
    wrapped = kms.encrypt_dek("vol-a", new_dek())
    with pytest.raises(DEKDecryptError) as info:
        kms.decrypt_dek("vol-b", wrapped)
    assert "vol-b" in str(info.value) and "'local-1'" in str(info.value)


def test_local_dek_does_not_decrypt_under_another_key_file(tmp_path: Path) -> None:
    wrapped = LocalKMS("local-1", tmp_path / "kek-1").encrypt_dek("vol-a", new_dek())
    other = LocalKMS("local-2", tmp_path / "kek-2")
    other.encrypt_dek("vol-x", new_dek())  # creates the other key
    with pytest.raises(DEKDecryptError, match="vol-a"):
        other.decrypt_dek("vol-a", wrapped)


@pytest.mark.parametrize("field", ["dek", "nonce"])
def test_local_tampered_wrapped_dek_is_a_decrypt_error(tmp_path: Path, field: str) -> None:
    kms = LocalKMS("local-1", tmp_path / "kek")
    wrapped = json.loads(kms.encrypt_dek("vol-a", new_dek()))
    raw = bytearray(base64.b64decode(wrapped[field]))
    raw[0] ^= 0x01
    wrapped[field] = base64.b64encode(bytes(raw)).decode()
    with pytest.raises(DEKDecryptError, match="vol-a"):
        kms.decrypt_dek("vol-a", json.dumps(wrapped))


@pytest.mark.parametrize(
    "stored",
    ["not json", "[]", '{"dek": "AAAA"}', '{"dek": "!!", "nonce": "AAAA"}', '{"dek": 1, "nonce": 2}'],
)
def test_local_malformed_wrapped_dek_is_a_decrypt_error(tmp_path: Path, stored: str) -> None:
    kms = LocalKMS("local-1", tmp_path / "kek")
    kms.encrypt_dek("vol-x", new_dek())
    with pytest.raises(DEKDecryptError) as info:
        kms.decrypt_dek("vol-a", stored)
    assert "vol-a" in str(info.value) and "'local-1'" in str(info.value)


def test_local_key_file_is_created_0600_once_and_reused(tmp_path: Path) -> None:
    key_file = tmp_path / "new-dir" / "kek"
    kms = LocalKMS("local-1", key_file)
    first = kms.encrypt_dek("vol-a", "dek-a")
    created = key_file.stat()
    assert stat.S_IMODE(created.st_mode) == 0o600 and created.st_size == KEK_BYTES
    key = key_file.read_bytes()
    second = LocalKMS("local-1", key_file).encrypt_dek("vol-b", "dek-b")
    assert key_file.read_bytes() == key and key_file.stat().st_ino == created.st_ino
    assert kms.decrypt_dek("vol-a", first) == "dek-a" and kms.decrypt_dek("vol-b", second) == "dek-b"
    assert sorted(p.name for p in key_file.parent.iterdir()) == ["kek"]  # no temporary file left


def test_local_missing_key_file_on_decrypt_is_a_failed_precondition_and_creates_nothing(world: World) -> None:
    with pytest.raises(KMSConfigError) as info:
        LocalKMS("local-1", world.key_file).decrypt_dek("vol-a", '{"dek": "", "nonce": ""}')
    assert str(world.key_file) in str(info.value) and "'local-1'" in str(info.value)
    assert not world.key_file.exists()
    # The request is fine, the node is not: not INVALID_ARGUMENT, which a CO takes as final.
    assert status_for(info.value) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        f"key file {world.key_file} of KMS 'local-1' is missing; it is created with the first volume, so "
        "it was removed or keyFile changed: restore it from a backup",
    )


def test_local_key_file_open_to_group_or_others_is_refused(tmp_path: Path) -> None:
    kms = LocalKMS("local-1", tmp_path / "kek")
    wrapped = kms.encrypt_dek("vol-a", "dek")
    for mode in (0o640, 0o604):
        os.chmod(tmp_path / "kek", mode)
        with pytest.raises(KMSConfigError, match="kek"):
            kms.decrypt_dek("vol-a", wrapped)
        with pytest.raises(KMSConfigError):
            kms.encrypt_dek("vol-b", "dek")
    os.chmod(tmp_path / "kek", 0o400)  # stricter is fine
    assert kms.decrypt_dek("vol-a", wrapped) == "dek"


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_local_key_file_of_the_wrong_size_is_refused(tmp_path: Path, size: int) -> None:
    key_file = tmp_path / "kek"
    key_file.write_bytes(b"k" * size)
    key_file.chmod(0o600)
    with pytest.raises(KMSConfigError, match="32"):
        LocalKMS("local-1", key_file).encrypt_dek("vol-a", "dek")
    assert key_file.read_bytes() == b"k" * size  # never replaced


def test_local_key_file_that_cannot_be_created_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(KMSConfigError) as info:
        LocalKMS("local-1", blocker / "kek").encrypt_dek("vol-a", "dek")
    assert str(blocker / "kek") in str(info.value) and "'local-1'" in str(info.value)


def test_local_concurrent_first_use_yields_one_key(tmp_path: Path) -> None:
    key_file = tmp_path / "kek"
    threads_count = 8
    barrier = threading.Barrier(threads_count)
    wrapped: dict[int, str] = {}
    errors: list[BaseException] = []

    def first_use(i: int) -> None:
        try:
            kms = LocalKMS("local-1", key_file)
            barrier.wait()
            wrapped[i] = kms.encrypt_dek(f"vol-{i}", f"dek-{i}")
        except BaseException as exc:  # surfaced below: a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=first_use, args=(i,)) for i in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    kms = LocalKMS("local-1", key_file)
    assert [kms.decrypt_dek(f"vol-{i}", wrapped[i]) for i in range(threads_count)] == [
        f"dek-{i}" for i in range(threads_count)
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kek"]


def test_local_relative_key_file_is_a_config_error(tmp_path: Path) -> None:
    config = KMSConfig(None, {"rel": {"encryptionKMSType": "local", "keyFile": "relative/kek"}})
    with pytest.raises(KMSConfigError, match=r"'rel'.*'keyFile'"):
        config.build("rel", KMSContext(secrets={}))


def test_local_default_key_file(tmp_path: Path) -> None:
    kms = KMSConfig(None, {"l": {"encryptionKMSType": "local"}}).build("l", KMSContext(secrets={}))
    assert isinstance(kms, LocalKMS) and str(kms.key_file) == "/var/lib/csi-luks/local-kek"


# --- the metadata DEK store ----------------------------------------------------------------------------


def test_metadata_store_keeps_the_dek_in_the_volume_metadata() -> None:
    backend = MemoryBackend()
    backend.create("vol-a", "a", 1, {"other": "kept"})
    store = MetadataDEKStore(backend)
    store.store_dek("vol-a", "wrapped")
    assert backend.get("vol-a").metadata == {"other": "kept", DEK_KEY: "wrapped"}
    assert store.fetch_dek("vol-a") == "wrapped"
    store.remove_dek("vol-a")
    store.remove_dek("vol-a")
    assert backend.get("vol-a").metadata == {"other": "kept"}


def test_metadata_store_missing_dek_names_the_volume() -> None:
    backend = MemoryBackend()
    backend.create("vol-a", "a", 1, {})
    with pytest.raises(DEKNotFound, match="vol-a"):
        MetadataDEKStore(backend).fetch_dek("vol-a")


def test_metadata_store_uses_its_own_key() -> None:
    backend = MemoryBackend()
    backend.create("vol-a", "a", 1, {})
    MetadataDEKStore(backend, key="custom/dek").store_dek("vol-a", "w")
    assert backend.get("vol-a").metadata == {"custom/dek": "w"}
    with pytest.raises(DEKNotFound):
        MetadataDEKStore(backend).fetch_dek("vol-a")


def test_metadata_store_of_a_deleted_volume() -> None:
    store = MetadataDEKStore(MemoryBackend())
    store.remove_dek("gone")  # no volume, no DEK: already removed
    with pytest.raises(VolumeNotFound):
        store.fetch_dek("gone")


def test_volume_encryption_uses_the_metadata_store_only_for_kms_that_store_nothing(world: World) -> None:
    assert isinstance(world.encryption("local-1").store, MetadataDEKStore)
    secrets_encryption = world.encryption("")
    assert secrets_encryption.store is secrets_encryption.kms.integrated_dek_store is not None

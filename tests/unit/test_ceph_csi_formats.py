"""Ceph-CSI's volume handles and image-meta, read and written as Ceph-CSI v3.8.1 does (volumes/ceph_csi).

The real cephcsi checks the same formats end to end (tests/host/test_ceph_csi_volumes.py); these pin
the parsing and the translation, including the refusals.
"""

from __future__ import annotations

import pytest

from csi_luks.kms.dek_store import DEK_KEY
from csi_luks.volume_metadata import (
    CAPACITY,
    ENCRYPTED,
    KMS_ID,
    LUKS_HEADER_BYTES,
    NAME,
    STATE,
    EncryptionState,
    VolumeRecord,
)
from csi_luks.volumes import ceph_csi
from csi_luks.volumes.base import BackendRequestError, MalformedId
from csi_luks.volumes.rbd_ids import check_volume_id

# A handle as Ceph-CSI's own documentation shows one (rook-ceph, pool id 2).
ROOK = "0001-0009-rook-ceph-0000000000000002-b0285c97-a0ce-11eb-8c66-0242ac110002"


def test_a_handle_decomposes_as_ceph_csi_composes_it() -> None:
    handle = ceph_csi.parse_handle(ROOK)
    assert handle == ceph_csi.Handle("rook-ceph", 2, "b0285c97-a0ce-11eb-8c66-0242ac110002")
    assert handle.default_image == "csi-vol-b0285c97-a0ce-11eb-8c66-0242ac110002"
    assert ceph_csi.VOLUMES.uuid_object(handle) == "csi.volume.b0285c97-a0ce-11eb-8c66-0242ac110002"
    assert ceph_csi.SNAPSHOTS.uuid_object(handle) == "csi.snap.b0285c97-a0ce-11eb-8c66-0242ac110002"
    assert ceph_csi.compose_handle("rook-ceph", 2, handle.uuid) == ROOK
    assert ceph_csi.is_handle(ROOK)
    check_volume_id(ROOK)  # the RBD backend accepts it beside its own ids


@pytest.mark.parametrize(
    "volume_id",
    [
        ROOK.replace("0009", "000a"),  # the length does not fit the cluster id
        ROOK.replace("0000000000000002", "000000000000002"),  # a short pool id
        ROOK.replace("0000000000000002", "00000000000000g2"),
        ROOK[:-1],  # a short uuid
        ROOK.upper().replace("0001-0009-ROOK-CEPH", "0001-0009-rook-ceph"),  # not Go's lower-case uuid
        "0001-0003-../-0000000000000002-b0285c97-a0ce-11eb-8c66-0242ac110002",  # a path in the cluster id
        "0001-0009-rook-ceph-0000000000000002-b0285c97-a0ce-11eb-8c66-0242ac110002" + "x" * 60,
    ],
)
def test_a_malformed_handle_names_nothing(volume_id: str) -> None:
    with pytest.raises(MalformedId):
        ceph_csi.parse_handle(volume_id)
    with pytest.raises(MalformedId):
        check_volume_id(volume_id)


def test_ceph_csi_state_reads_as_csi_luks_state_with_the_header_inside_the_image() -> None:
    attributes = {
        ceph_csi.REQUEST_NAME_KEY: "pvc-1",
        ceph_csi.KMS_ID_KEY: "secrets-metadata-test",
        ceph_csi.ENCRYPTION_TYPE_KEY: "block",
    }
    size = 1024 * 1024 * 1024
    prepared = ceph_csi.view(
        {ceph_csi.ENCRYPTED_META: "encryptionPrepared", ceph_csi.DEK_META: '{"dek":"x","nonce":"y"}'},
        attributes,
        size,
    )
    assert prepared == {
        NAME: "pvc-1",
        ENCRYPTED: "true",
        STATE: "prepared",
        KMS_ID: "secrets-metadata-test",
        CAPACITY: str(size - LUKS_HEADER_BYTES),
        DEK_KEY: '{"dek":"x","nonce":"y"}',
    }
    record = VolumeRecord.parse(prepared)
    assert not record.may_hold_data  # never staged: the node formats it, once
    assert record.backing_bytes == size
    staged = VolumeRecord.parse(ceph_csi.view({ceph_csi.ENCRYPTED_META: "encrypted"}, attributes, size))
    assert staged.may_hold_data  # Ceph-CSI's node ran luksFormat and mkfs: never formatted again
    # Older Ceph-CSI keys and states.
    old = ceph_csi.view({ceph_csi.OLD_ENCRYPTED_META: "requiresEncryption"}, attributes, size)
    assert old[STATE] == "prepared"
    # csi-luks's own keys written since (a rotation under way) win over the translation.
    rotating = ceph_csi.view({ceph_csi.ENCRYPTED_META: "encrypted", STATE: "rotating"}, attributes, size)
    assert rotating[STATE] == "rotating"
    plain = ceph_csi.view({}, {ceph_csi.REQUEST_NAME_KEY: "pvc-2"}, size)
    assert ENCRYPTED not in plain and plain[CAPACITY] == str(size)


def test_a_ceph_csi_snapshot_reads_as_a_csi_luks_snapshot() -> None:
    attributes = {
        ceph_csi.SNAPSHOT_NAME_KEY: "snap-1",
        ceph_csi.SOURCE_KEY: "csi-vol-x",
        ceph_csi.KMS_ID_KEY: "k",
    }
    found = VolumeRecord.parse(
        ceph_csi.view({ceph_csi.ENCRYPTED_META: "encrypted"}, attributes, 1 << 30, ceph_csi.SNAPSHOTS)
    )
    assert (found.is_snapshot, found.name, found.kms_id, found.state) == (
        True,
        "snap-1",
        "k",
        EncryptionState.ENCRYPTED,
    )
    assert not VolumeRecord.parse(ceph_csi.view({}, {}, 1 << 30)).is_snapshot


def test_fscrypt_volumes_are_refused_by_name() -> None:
    with pytest.raises(BackendRequestError, match="'file' encryption"):
        ceph_csi.view({ceph_csi.ENCRYPTED_META: "encrypted"}, {ceph_csi.ENCRYPTION_TYPE_KEY: "file"}, 1 << 30)


def test_what_csi_luks_writes_ceph_csi_reads_back() -> None:
    assert ceph_csi.native_writes(DEK_KEY, "wrapped") == {ceph_csi.DEK_META: "wrapped"}
    assert ceph_csi.native_writes(DEK_KEY, "") == {ceph_csi.DEK_META: ""}
    assert ceph_csi.native_writes(STATE, "prepared") == {ceph_csi.ENCRYPTED_META: "encryptionPrepared"}
    assert ceph_csi.native_writes(STATE, "encrypted") == {ceph_csi.ENCRYPTED_META: "encrypted"}
    # Mid-rotation the header opens with the current DEK still: Ceph-CSI sees an encrypted volume.
    assert ceph_csi.native_writes(STATE, "rotating") == {ceph_csi.ENCRYPTED_META: "encrypted"}
    assert ceph_csi.native_writes(CAPACITY, "5") == {}
    assert ceph_csi.DEK_KEY == DEK_KEY
    # A migration's new KMS id goes into the journal, where Ceph-CSI looks it up.
    assert ceph_csi.journal_writes(KMS_ID) == ceph_csi.KMS_ID_KEY
    assert ceph_csi.journal_writes(STATE) is None


def test_the_journal_pool_key_is_hex_of_the_pool_id() -> None:
    assert ceph_csi.journal_pool_id({}) is None
    assert ceph_csi.journal_pool_id({ceph_csi.JOURNAL_POOL_KEY: "0000000000000007"}) == 7
    with pytest.raises(BackendRequestError):
        ceph_csi.journal_pool_id({ceph_csi.JOURNAL_POOL_KEY: "zz"})

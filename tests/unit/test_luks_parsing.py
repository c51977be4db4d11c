from __future__ import annotations

import json

from csi_luks.luks.status import parse_dump, parse_status

ACTIVE = """/dev/mapper/luks-vol1 is active and is in use.
  type:    LUKS2
  cipher:  aes-xts-plain64
  keysize: 512 bits
  key location: dm-crypt
  device:  /dev/loop0
  loop:    /var/lib/csi-luks/vol1.img
  sector size:  4096
  offset:  32768 sectors
  size:    98304 sectors
  mode:    read/write
  flags:   discards no_read_workqueue
  some future field: whatever
"""


def test_parse_active_status() -> None:
    status = parse_status("luks-vol1", ACTIVE)
    assert status.active and status.in_use
    assert status.type == "LUKS2" and status.cipher == "aes-xts-plain64"
    assert status.key_size_bits == 512 and status.key_location == "dm-crypt"
    assert status.device == "/dev/loop0" and status.loop_file == "/var/lib/csi-luks/vol1.img"
    assert (status.sector_size, status.offset_sectors, status.size_sectors) == (4096, 32768, 98304)
    assert not status.readonly
    assert status.flags == ("discards", "no_read_workqueue")


def test_parse_inactive_and_readonly() -> None:
    assert not parse_status("x", "/dev/mapper/x is inactive.\n").active
    readonly = parse_status("y", "/dev/mapper/y is active.\n  mode:    readonly\n")
    assert readonly.active and readonly.readonly and not readonly.in_use
    assert parse_status("z", "").active is False


def test_parse_dump_combines_json_and_text() -> None:
    meta = {
        "keyslots": {
            "0": {"type": "luks2", "key_size": 64, "kdf": {"type": "pbkdf2", "iterations": 1000}},
            "2": {
                "type": "luks2",
                "key_size": 64,
                "kdf": {"type": "argon2id", "time": 4, "memory": 32768, "cpus": 1},
            },
        },
        "segments": {
            "0": {"type": "crypt", "offset": "16777216", "encryption": "aes-xts-plain64", "sector_size": 4096}
        },
    }
    text = "LUKS header information\nVersion:       \t2\nUUID:          \tabc-123\nLabel:         \tpvc-1\n"
    header = parse_dump(json.dumps(meta), text)
    assert header.version == 2 and header.uuid == "abc-123" and header.label == "pvc-1"
    assert header.cipher == "aes-xts-plain64" and header.sector_size == 4096
    assert header.data_offset_bytes == 16 * 1024 * 1024
    assert header.key_size_bits == 512
    assert header.keyslots[2].kdf == "argon2id" and header.keyslots[2].memory_kib == 32768
    assert header.keyslots[0].iterations == 1000


def test_parse_dump_without_label() -> None:
    meta = {"keyslots": {}, "segments": {"0": {"type": "crypt", "offset": "0", "encryption": "x"}}}
    assert parse_dump(json.dumps(meta), "Label:\t(no label)\n").label is None

"""Parsing of `cryptsetup status` and `luksDump` output into values."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

_FIRST_LINE = re.compile(r"^(?P<path>\S+) is (?P<state>active|inactive)(?P<in_use> and is in use)?\.?\s*$")
_FIELD = re.compile(r"^\s+(?P<key>[A-Za-z][A-Za-z ]*?):\s*(?P<value>.*?)\s*$")
_NUMBER = re.compile(r"^(\d+)")


@dataclass(frozen=True)
class MappingStatus:
    """What `cryptsetup status NAME` says of a mapping."""

    name: str
    active: bool
    in_use: bool = False
    type: str | None = None
    cipher: str | None = None
    key_size_bits: int | None = None
    key_location: str | None = None
    device: str | None = None
    loop_file: str | None = None
    sector_size: int | None = None
    offset_sectors: int | None = None
    size_sectors: int | None = None
    readonly: bool = False
    flags: tuple[str, ...] = ()


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    match = _NUMBER.match(value)
    return int(match.group(1)) if match else None


def parse_status(name: str, output: str) -> MappingStatus:
    """Parse `cryptsetup status`; unknown lines are ignored so newer cryptsetup versions still parse."""
    lines = output.splitlines()
    active = False
    in_use = False
    fields: dict[str, str] = {}
    for line in lines:
        first = _FIRST_LINE.match(line.strip())
        if first:
            active = first.group("state") == "active"
            in_use = bool(first.group("in_use"))
            continue
        match = _FIELD.match(line)
        if match:
            fields[match.group("key").strip().lower()] = match.group("value")
    flags = tuple(fields["flags"].split()) if fields.get("flags") else ()
    return MappingStatus(
        name=name,
        active=active,
        in_use=in_use,
        type=fields.get("type"),
        cipher=fields.get("cipher"),
        key_size_bits=_int(fields.get("keysize")),
        key_location=fields.get("key location"),
        device=fields.get("device"),
        loop_file=fields.get("loop"),
        sector_size=_int(fields.get("sector size")),
        offset_sectors=_int(fields.get("offset")),
        size_sectors=_int(fields.get("size")),
        readonly=fields.get("mode", "").strip() == "readonly",
        flags=flags,
    )


@dataclass(frozen=True)
class KeySlot:
    slot: int
    kdf: str
    key_size_bits: int
    iterations: int | None = None  # pbkdf2 iterations or argon2 time cost
    memory_kib: int | None = None  # argon2 only
    parallel: int | None = None  # argon2 only


@dataclass(frozen=True)
class LuksHeader:
    """The parts of a LUKS2 header an operator (and our tests) care about."""

    version: int
    uuid: str | None
    label: str | None
    cipher: str
    sector_size: int
    data_offset_bytes: int
    keyslots: dict[int, KeySlot] = field(default_factory=dict)
    flags: tuple[str, ...] = ()  # persistent activation flags (config.flags): allow-discards, ...

    @property
    def key_size_bits(self) -> int | None:
        sizes = {slot.key_size_bits for slot in self.keyslots.values()}
        return sizes.pop() if len(sizes) == 1 else None


def parse_dump(json_metadata: str, text_dump: str) -> LuksHeader:
    """Combine `luksDump --dump-json-metadata` (slots, segments) with the text dump (UUID, label)."""
    meta = json.loads(json_metadata)
    segments = meta.get("segments", {})
    crypt = next((s for _, s in sorted(segments.items()) if s.get("type") == "crypt"), None)
    if crypt is None:
        raise ValueError("LUKS2 metadata has no crypt segment")
    keyslots: dict[int, KeySlot] = {}
    for slot_id, slot in meta.get("keyslots", {}).items():
        kdf = slot.get("kdf", {})
        keyslots[int(slot_id)] = KeySlot(
            slot=int(slot_id),
            kdf=kdf.get("type", "unknown"),
            key_size_bits=int(slot.get("key_size", 0)) * 8,
            iterations=kdf.get("iterations", kdf.get("time")),
            memory_kib=kdf.get("memory"),
            parallel=kdf.get("cpus"),
        )
    text: dict[str, str] = {}
    for line in text_dump.splitlines():
        key, sep, value = line.partition(":")
        if sep and not line.startswith((" ", "\t")):
            text.setdefault(key.strip(), value.strip())
    label = text.get("Label")
    return LuksHeader(
        version=int(text.get("Version", "2") or 2),
        uuid=text.get("UUID") or None,
        label=None if label in (None, "", "(no label)") else label,
        cipher=crypt["encryption"],
        sector_size=int(crypt.get("sector_size", 512)),
        data_offset_bytes=int(crypt.get("offset", 0)),
        keyslots=keyslots,
        flags=tuple(meta.get("config", {}).get("flags", [])),
    )


_LUKS2_MAGIC = b"LUKS\xba\xbe\x00\x02"  # magic, then the version, big-endian
_LUKS2_LABEL = slice(24, 72)  # after the magic, version, header size and sequence id


def luks2_label(block: bytes) -> str | None:
    """The label in a LUKS2 primary binary header ("" for none), read from the raw bytes, so from a
    header whose checksum a torn write broke too; None if block does not start with a LUKS2 header."""
    if not block.startswith(_LUKS2_MAGIC):
        return None
    return block[_LUKS2_LABEL].split(b"\0", 1)[0].decode("utf-8", "replace")

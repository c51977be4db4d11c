"""A LUKS2 header backup read straight from the device: what `cryptsetup luksHeaderBackup` writes, without
the process.

For LUKS2 cryptsetup's backup is the device's first bytes up to the end of the key-slot area: the primary
binary header and its JSON area, the secondary copy of both, then the key slots (`hdr_size` twice, plus
the JSON's `config.keyslots_size`), read raw and zero-padded to a whole page. Read here only when the
header is one cryptsetup would read the same way: both copies with the LUKS2 magic, checksums that match,
the same sequence id and sizes. Anything else (LUKS1, a torn or stale copy, an unreadable device) is left
to cryptsetup, which picks the copy to trust, repairs nothing in a backup, and says what is wrong.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct

_BINARY_HEADER = 4096  # the binary header; its JSON area follows, up to hdr_size
_MAGIC = {0: b"LUKS\xba\xbe", 1: b"SKUL\xba\xbe"}  # primary, secondary
# magic[6], version u16, hdr_size u64, seqid u64, label[48], checksum_alg[32], salt[64], uuid[40],
# subsystem[48], hdr_offset u64, padding[184], csum[64]: all big-endian.
_FIELDS = struct.Struct(">6sHQQ48s32s64s40s48sQ184s64s")
_CSUM = slice(448, 512)
# The header sizes (binary header and JSON area) LUKS2 allows: 16 KiB to 4 MiB.
_HEADER_SIZES = {16 << 10 << n for n in range(9)}
_MAX_KEYSLOTS_SIZE = 128 << 20  # cryptsetup's bound on the key-slot area


def read_luks2_header_backup(device: str) -> bytes | None:
    """The bytes `cryptsetup luksHeaderBackup device FILE` writes to FILE for a LUKS2 device; None when
    the header is not one read here with certainty (see the module), and cryptsetup must make the backup."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        primary = _read(fd, _BINARY_HEADER, 0)
        if primary is None:
            return None
        hdr_size = _header_size(primary, 0)
        if hdr_size is None:
            return None
        metadata = _read(fd, 2 * hdr_size, 0)
        if metadata is None:
            return None
        keyslots_size = _keyslots_size(metadata, hdr_size)
        if keyslots_size is None:
            return None
        # All of it in one read, one buffer (16 MiB by default; no copies: stages run concurrently), and
        # the header copies checked above must be what it starts with.
        backup = _read(fd, 2 * hdr_size + keyslots_size, 0)
        if backup is None or not backup.startswith(metadata):
            return None
        # Read once: its pages need not stay cached, counted in this process's cgroup (16 stages at once).
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, len(backup), os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    padding = -len(backup) % os.sysconf("SC_PAGE_SIZE")
    return backup + bytes(padding) if padding else backup


def _header_size(block: bytes, copy: int) -> int | None:
    """hdr_size of the binary header at the start of block (copy 0 primary, 1 secondary), if it is one."""
    magic, version, hdr_size, *_ = _FIELDS.unpack_from(block)
    if magic != _MAGIC[copy] or version != 2 or hdr_size not in _HEADER_SIZES:
        return None
    return int(hdr_size)


def _keyslots_size(metadata: bytes, hdr_size: int) -> int | None:
    """The key-slot area's size, when both header copies in metadata are intact and agree."""
    primary, secondary = metadata[:hdr_size], metadata[hdr_size:]
    if _header_size(secondary, 1) != hdr_size:
        return None
    first, second = _FIELDS.unpack_from(primary), _FIELDS.unpack_from(secondary)
    if first[3] != second[3] or first[9] != 0 or second[9] != hdr_size:  # seqid, hdr_offset
        return None
    if not (_checksum_ok(primary, first[5]) and _checksum_ok(secondary, second[5])):
        return None
    if primary[_BINARY_HEADER:] != secondary[_BINARY_HEADER:]:  # the same JSON in both
        return None
    try:
        config = json.loads(primary[_BINARY_HEADER:].split(b"\0", 1)[0])["config"]
        json_size, keyslots_size = int(config["json_size"]), int(config["keyslots_size"])
    except (ValueError, KeyError, TypeError):
        return None
    if json_size != hdr_size - _BINARY_HEADER or not 0 <= keyslots_size <= _MAX_KEYSLOTS_SIZE:
        return None
    return keyslots_size


def _checksum_ok(copy: bytes, algorithm: bytes) -> bool:
    """Whether a header copy (binary header and JSON area) matches its checksum, taken with the checksum
    field zeroed."""
    try:
        digest = hashlib.new(algorithm.split(b"\0", 1)[0].decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        return False
    digest.update(copy[: _CSUM.start])
    digest.update(bytes(_CSUM.stop - _CSUM.start))
    digest.update(copy[_CSUM.stop :])
    expected = digest.digest()
    return copy[_CSUM][: len(expected)] == expected


def _read(fd: int, size: int, offset: int) -> bytes | None:
    """size bytes at offset (one pread, as a rule); None at the device's end or on a read error
    (cryptsetup then says what it is)."""
    chunks: list[bytes] = []
    done = 0
    try:
        while done < size:
            chunk = os.pread(fd, size - done, offset + done)
            if not chunk:
                return None
            chunks.append(chunk)
            done += len(chunk)
    except OSError:
        return None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)  # one chunk: no copy

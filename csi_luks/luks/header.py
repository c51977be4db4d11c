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

import errno
import hashlib
import json
import mmap
import os
import struct
from collections.abc import Iterator

_BINARY_HEADER = 4096  # the binary header; its JSON area follows, up to hdr_size
_MAGIC = {0: b"LUKS\xba\xbe", 1: b"SKUL\xba\xbe"}  # primary, secondary
# magic[6], version u16, hdr_size u64, seqid u64, label[48], checksum_alg[32], salt[64], uuid[40],
# subsystem[48], hdr_offset u64, padding[184], csum[64]: all big-endian.
_FIELDS = struct.Struct(">6sHQQ48s32s64s40s48sQ184s64s")
_CSUM = slice(448, 512)
# The header sizes (binary header and JSON area) LUKS2 allows: 16 KiB to 4 MiB.
_HEADER_SIZES = {16 << 10 << n for n in range(9)}
_MAX_KEYSLOTS_SIZE = 128 << 20  # cryptsetup's bound on the key-slot area


_SECTOR = 4096  # LUKS2 aligns its areas to this; direct reads need it
_CHUNK = 1 << 20  # what a stream holds at a time: 16 stages at once hold 16 MiB, not 256


class HeaderBackupStream:
    """A LUKS2 header backup read from the device a chunk at a time: `size` bytes, each chunk a view of
    one page-aligned buffer that the next chunk reuses (write it out or copy it before asking for the
    next). Read with O_DIRECT where the device allows it, so the device's pages are not cached either:
    16 stages at once would otherwise hold 16 copies of 16 MiB, counted in the plugin's cgroup."""

    def __init__(self, fd: int, metadata: bytes, end: int) -> None:
        self._fd = fd
        self.read_error: OSError | None = None  # why chunks() stopped, if the device (not the caller) failed
        self._metadata = metadata  # the header copies checked when the stream was opened
        self._end = end  # the end of the key-slot area: what is read from the device
        self.size = end + (-end % os.sysconf("SC_PAGE_SIZE"))  # zero-padded to a whole page

    def __enter__(self) -> HeaderBackupStream:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)

    def chunks(self) -> Iterator[memoryview]:
        """The backup's bytes in order; OSError (kept as read_error) if the device fails or its header
        changes meanwhile."""
        buffer = memoryview(mmap.mmap(-1, _CHUNK))  # page-aligned, as O_DIRECT needs; freed with its views
        offset = 0
        while offset < self.size:
            chunk = buffer[: min(_CHUNK, self.size - offset)]
            try:
                self._fill(chunk, offset)
            except OSError as exc:
                self.read_error = exc
                raise
            yield chunk
            offset += len(chunk)

    def _fill(self, chunk: memoryview, offset: int) -> None:
        readable = max(0, min(len(chunk), self._end - offset))
        if _read_into(self._fd, chunk[:readable], offset) != readable:
            raise OSError(errno.EIO, "the device ended inside its LUKS header")
        chunk[readable:] = bytes(len(chunk) - readable)  # the page padding past the key slots
        # The header copies checked at the open (up to 8 MiB, several chunks) must be what is read now.
        expected = self._metadata[offset : offset + len(chunk)]
        if chunk[: len(expected)] != expected:
            raise OSError(errno.EAGAIN, "the LUKS header changed while it was read for its backup")


def open_luks2_header_backup(device: str) -> HeaderBackupStream | None:
    """The bytes `cryptsetup luksHeaderBackup device FILE` writes to FILE, as a stream, for a LUKS2
    device; None when the header is not one read here with certainty (see the module), and cryptsetup
    must make the backup."""
    fd = _open_for_reading(device)
    if fd is None:
        return None
    try:
        primary = _read(fd, _BINARY_HEADER, 0)
        hdr_size = None if primary is None else _header_size(primary, 0)
        metadata = None if hdr_size is None else _read(fd, 2 * hdr_size, 0)
        keyslots_size = None if metadata is None or hdr_size is None else _keyslots_size(metadata, hdr_size)
        if metadata is None or hdr_size is None or keyslots_size is None:
            os.close(fd)
            return None
        end = 2 * hdr_size + keyslots_size
        # A truncated device, or an area O_DIRECT cannot read to its end: cryptsetup's backup.
        if end % _SECTOR or _device_size(fd) < end:
            os.close(fd)
            return None
    except BaseException:
        os.close(fd)
        raise
    return HeaderBackupStream(fd, metadata, end)


def read_luks2_header_backup(device: str) -> bytes | None:
    """The whole backup in memory (a comparison, a test); None as for open_luks2_header_backup."""
    stream = open_luks2_header_backup(device)
    if stream is None:
        return None
    with stream:
        try:
            return b"".join(bytes(chunk) for chunk in stream.chunks())
        except OSError:
            return None


def _open_for_reading(device: str) -> int | None:
    """The device opened for direct reads, or buffered where it refuses O_DIRECT; None if it cannot be
    opened (cryptsetup then says why)."""
    for flags in (os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT, os.O_RDONLY | os.O_CLOEXEC):
        try:
            return os.open(device, flags)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                return None
    return None


def _device_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)


def _read_into(fd: int, buffer: memoryview, offset: int) -> int:
    """Fill buffer from offset; the bytes read, fewer only at the device's end."""
    done = 0
    while done < len(buffer):
        count = os.preadv(fd, [buffer[done:]], offset + done)
        if count == 0:
            break
        done += count
    return done


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
    """size bytes at offset (a page-aligned buffer: the fd may be O_DIRECT); None at the device's end or
    on a read error (cryptsetup then says what it is)."""
    buffer = memoryview(mmap.mmap(-1, size))
    try:
        done = _read_into(fd, buffer, offset)
    except OSError:
        return None
    return bytes(buffer) if done == size else None

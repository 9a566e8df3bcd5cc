"""Cutting images into chunks, naming and compressing them, and the wire frames that carry them.

Shared by the chunk store (``chunks.py``, server side) and the client (``client.py``, helper side):

- chunks are cut by content (FastCDC 2020, ``pyfastcdc``; ~64 KiB on average, 16 KiB to 256 KiB), so
  an insertion in a data file or a migration stream moves only the chunks around it;
- a chunk's id is the BLAKE3 hash of its content (64 hex digits, ``blake3``);
- a chunk is kept and sent zstd-compressed (``zstandard``, level -5 by default: at level 1 the
  chunks of docs/bench's database-like data come out 1.9x smaller (0.32 of the content vs 0.60),
  but compressing is ~2.3x and decompressing ~3.6x slower, more than a first snapshot's cutting
  (>= 300 MB/s on one core) or a restore (no slower than whole files) can afford; the negative
  levels between differ little in size (-1: 0.55, -3: 0.57); $VIOLIN_CHUNK_LEVEL chooses, and
  docs/bench/bench_storage.json measures 1, -1, -3 and the default side by side);
- a batch of chunks travels as frames: 32 bytes of id, the content's size and the compressed size
  (two big-endian u32), then the compressed bytes. The receiver decompresses and hashes every frame,
  so a chunk is never stored or used under a name that is not its content's hash.
"""

import hashlib
import io
import os
import struct
import threading
from typing import Iterable, Iterator, List, NamedTuple, Optional, Tuple

import blake3
import zstandard
from pyfastcdc import FastCDC

AVG, MIN, MAX = 64 << 10, 16 << 10, 256 << 10
LEVEL = -5  # see the module docstring; VIOLIN_CHUNK_LEVEL overrides
ID_RE = r"^[0-9a-f]{64}$"
_HEAD = struct.Struct(">32sII")
MAX_FRAME = MAX + (MAX >> 4) + 1024  # zstd's worst case for a MAX chunk, with room to spare
BATCH_BYTES = 8 << 20  # bytes a client cuts per batch (one "missing" call, one upload: bounds its memory)
BATCH_IDS = 4096  # chunks per batch at most (cached chunks carry no bytes: this bounds the "missing" call)
_local = threading.local()


class ChunkError(ValueError):
    """A frame or chunk that is not what it claims (bad id, size, or content)."""


class Chunk(NamedTuple):
    id: str
    size: int  # of the content
    packed: bytes  # zstd-compressed content


def chunk_id(data) -> str:
    return blake3.blake3(data).hexdigest()


def is_id(text) -> bool:
    return isinstance(text, str) and len(text) == 64 and all(c in "0123456789abcdef" for c in text)


class Piece(NamedTuple):
    id: str
    data: Optional[bytes]  # the content, not yet compressed (a client compresses only what the server
    # lacks); None for a chunk named from a cache (tree.StatCache), not read
    size: int  # of the content


class Packer:
    """Cut, hash and compress; one per thread (the chunker and compressor are not thread-safe).
    ``small`` cuts finer (16 KiB on average, 4 KiB to 64 KiB): for CRIU page images, whose changes
    are scattered pages rather than insertions."""

    def __init__(self, level: Optional[int] = None, small: bool = False):
        sizes = (AVG >> 2, MIN >> 2, MAX >> 2) if small else (AVG, MIN, MAX)
        self.cdc = FastCDC(sizes[0], min_size=sizes[1], max_size=sizes[2])
        self.level = level_from_env() if level is None else level
        self.compressor = zstandard.ZstdCompressor(level=self.level)

    def pack(self, data) -> Chunk:
        return Chunk(chunk_id(data), len(data), self.compressor.compress(data))

    def compress(self, piece: Piece) -> Chunk:
        return Chunk(piece.id, len(piece.data), self.compressor.compress(piece.data))

    def pieces(self, reader) -> Iterator[Piece]:
        """The chunks of everything ``reader.read(n)`` gives until b"", hashed, not compressed (only
        the chunker's buffer and the current chunk in memory)."""
        for piece in self.cdc.cut_stream(reader):
            data = bytes(piece.data)
            yield Piece(chunk_id(data), data, len(data))

    def buffer_pieces(self, data) -> Iterator[Piece]:
        """The same chunks of bytes already in memory (no reader's copies: FastCDC's ``cut_buf``)."""
        view = memoryview(data)
        for cut in self.cdc.cut_buf(data):
            piece = bytes(view[cut.offset:cut.offset + cut.length])
            yield Piece(chunk_id(piece), piece, cut.length)

    def cut(self, reader) -> Iterator[Chunk]:
        """The chunks of ``reader``, compressed."""
        for piece in self.pieces(reader):
            yield self.compress(piece)


def level_from_env() -> int:
    """zstd's level for new chunks: $VIOLIN_CHUNK_LEVEL (a negative level is faster and compresses
    less: docs/bench/bench_storage.json measures both), else ``LEVEL``."""
    text = os.environ.get("VIOLIN_CHUNK_LEVEL", "")
    try:
        level = int(text) if text else LEVEL
    except ValueError:
        raise ValueError("VIOLIN_CHUNK_LEVEL must be an integer zstd level, got %r" % text) from None
    if not -131072 <= level <= 22:
        raise ValueError("VIOLIN_CHUNK_LEVEL must be a zstd level in -131072..22, got %d" % level)
    return level


def packer_for(name: str, level: Optional[int] = None) -> Packer:
    """Page images (``pages-*.img``) cut small, everything else (archives, streams) at 64 KiB."""
    return Packer(level=level, small=name.startswith("pages-"))


class IterReader(io.RawIOBase):
    """``read(n)`` over an iterator of byte strings (a request body), for the chunker."""

    def __init__(self, pieces: Iterable[bytes]):
        self.pieces, self.rest = iter(pieces), memoryview(b"")

    def readable(self):
        return True

    def readinto(self, buffer) -> int:
        while not self.rest:
            try:
                self.rest = memoryview(next(self.pieces))
            except StopIteration:
                return 0
        n = min(len(buffer), len(self.rest))
        buffer[:n] = self.rest[:n]
        self.rest = self.rest[n:]
        return n


def unpack(expected_id: str, size: int, packed: bytes, where: str = "") -> bytes:
    """The content of a stored or received chunk, checked against its id and size; ChunkError if not."""
    decompressor = getattr(_local, "decompressor", None)
    if decompressor is None:  # one per thread: making one per chunk costs more than the decompression
        decompressor = _local.decompressor = zstandard.ZstdDecompressor()
    try:
        data = decompressor.decompress(packed, max_output_size=max(size, 1))
    except zstandard.ZstdError as error:
        raise ChunkError("chunk %s%s does not decompress: %s" % (expected_id, where, error)) from None
    if len(data) != size or chunk_id(data) != expected_id:
        raise ChunkError("chunk %s%s is corrupt: its content hashes to %s (%d bytes, expected %d)"
                         % (expected_id, where, chunk_id(data), len(data), size))
    return data


HEAD_SIZE = _HEAD.size


def frame_head(cid: str, packed: bytes, size: int = 0) -> bytes:
    """A frame's head; ``size`` 0 (unknown: a stored chunk sent back) is checked by the receiver's manifest."""
    return _HEAD.pack(bytes.fromhex(cid), size, len(packed))


def frame(chunk: Chunk) -> bytes:
    return frame_head(chunk.id, chunk.packed, chunk.size) + chunk.packed


def read_frames(stream) -> Iterator[Chunk]:
    """The chunks of a frame stream (``stream.read(n)``), as sent (not yet checked: see ``unpack``)."""
    while True:
        head = _read(stream, _HEAD.size, allow_end=True)
        if head is None:
            return
        raw_id, size, length = _HEAD.unpack(head)
        if size > MAX or length > MAX_FRAME:  # (size 0: not given, the reader knows it)
            raise ChunkError("frame of %d bytes (content %d) is larger than any chunk" % (length, size))
        yield Chunk(raw_id.hex(), size, _read(stream, length))


def split_frames(data) -> Iterator[Chunk]:
    """The chunks of a whole frame stream in memory, their ``packed`` views into ``data`` (no copies)."""
    view, offset = memoryview(data), 0
    while offset < len(view):
        if offset + _HEAD.size > len(view):
            raise ChunkError("the frame stream ended inside a frame")
        raw_id, size, length = _HEAD.unpack_from(view, offset)
        if size > MAX or length > MAX_FRAME or offset + _HEAD.size + length > len(view):
            raise ChunkError("frame of %d bytes (content %d) is larger than any chunk or the stream" % (length, size))
        yield Chunk(raw_id.hex(), size, view[offset + _HEAD.size:offset + _HEAD.size + length])
        offset += _HEAD.size + length


def scan_pack(path: str) -> Iterator[Tuple[str, int, int, int]]:
    """(id, offset of its data, compressed length, size) of every frame of a pack file, reading only
    the heads; ChunkError after the last whole frame if the file ends inside one."""
    with open(path, "rb") as handle:
        end = os.fstat(handle.fileno()).st_size
        offset = 0
        while offset < end:
            head = handle.read(_HEAD.size)
            if len(head) < _HEAD.size:
                raise ChunkError("pack %s ends inside a frame head at byte %d" % (os.path.basename(path), offset))
            raw_id, size, length = _HEAD.unpack(head)
            if offset + _HEAD.size + length > end or length > MAX_FRAME:
                raise ChunkError("pack %s ends inside the frame of chunk %s at byte %d"
                                 % (os.path.basename(path), raw_id.hex(), offset))
            yield raw_id.hex(), offset + _HEAD.size, length, size
            offset += _HEAD.size + length
            handle.seek(offset)


def _read(stream, length: int, allow_end: bool = False) -> Optional[bytes]:
    parts, remaining = [], length
    while remaining:
        data = stream.read(remaining)
        if not data:
            if allow_end and remaining == length:
                return None
            raise ChunkError("the frame stream ended inside a frame")
        parts.append(data)
        remaining -= len(data)
    return b"".join(parts)


def batches(chunks: Iterable, limit: int = BATCH_BYTES) -> Iterator[list]:
    """Consecutive chunks (or pieces) grouped so that each group's bytes stay about ``limit``."""
    group, size = [], 0
    for chunk in chunks:
        group.append(chunk)
        size += len(chunk[2]) if isinstance(chunk, Chunk) else len(chunk.data or b"")
        if size >= limit or len(group) >= BATCH_IDS:
            yield group
            group, size = [], 0
    if group:
        yield group


def manifest_entries(chunks: Iterable[Tuple[str, int]]) -> List[list]:
    return [[cid, size] for cid, size in chunks]


LIST_CHECKSUM = "chunk-list"  # a manifest's "checksum": its sha256 is of the chunk list, not of the content


def list_checksum(chunks: Iterable) -> str:
    """sha256 of a chunk list (32 bytes of id, 4 of size, each): the checksum of a file put together
    from chunks named without reading them all (a tree's cached files). Every chunk's content is
    checked against its id wherever it is read, so this pins the content as well as the list."""
    digest = hashlib.sha256()
    for cid, size in chunks:
        digest.update(bytes.fromhex(cid) + struct.pack(">I", size))
    return digest.hexdigest()

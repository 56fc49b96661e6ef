"""Reading text files as lines: plain, gzip (``.gz``), bzip2 (``.bz2``) or xz (``.xz``).

:func:`iter_line_chunks` streams any file as string arrays of lines; a plain file is also cut into
byte ranges of whole lines without reading it (:func:`plan_byte_chunks`, :class:`ByteChunk`),
which independent workers read (:func:`read_byte_chunk`) and split (:func:`bytes_to_lines`).
Invalid UTF-8 never raises: it is decoded with U+FFFD, which the parsers reject. A UTF-8 byte
order mark at the start of a file is dropped (every reader here: facts, names, questions,
embeddings). A directory, or a compressed file that is truncated or corrupt, is a `FormatError`
naming the file.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from hmn.formats.parsed import FormatError

__all__ = [
    "is_compressed",
    "open_text",
    "iter_line_chunks",
    "ByteChunk",
    "plan_byte_chunks",
    "read_byte_chunk",
    "count_lines",
    "bytes_to_lines",
    "sniff_lines",
]

_BLOCK_BYTES = 16 << 20
_COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz")
#: the UTF-8 byte order mark some editors write at the start of a file
BOM = b"\xef\xbb\xbf"
#: what a truncated or corrupt compressed stream raises (gzip.BadGzipFile is an OSError)
_STREAM_ERRORS = (EOFError, OSError, lzma.LZMAError, zlib.error)


def is_compressed(path: str) -> bool:
    """True when ``open_text`` decompresses ``path`` (by its extension)."""
    return str(path).endswith(_COMPRESSED_SUFFIXES)


def open_text(path: str) -> io.BufferedIOBase:
    """Open ``path`` for binary reading, decompressing ``.gz``/``.bz2``/``.xz`` by extension."""
    path = str(path)
    if os.path.isdir(path):
        raise FormatError(path, None, "is a directory, not a file")
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".bz2"):
        return bz2.open(path, "rb")
    if path.endswith(".xz"):
        return lzma.open(path, "rb")
    return open(path, "rb")


def _bytes_to_lines(data: bytes) -> pa.Array:
    """Split a byte string of complete lines into a string array of lines.

    ``data`` holds N lines separated by ``\\n`` (no terminator after the last). A trailing
    ``\\r`` is removed from each line. Invalid UTF-8 is decoded with U+FFFD replacement
    characters, which the parsers reject as "invalid UTF-8".
    """
    raw = pc.list_flatten(pc.split_pattern(pa.array([data], pa.binary()), "\n"))
    try:
        lines = raw.cast(pa.string())
    except pa.ArrowInvalid:
        # slow path, only for blocks that contain invalid UTF-8
        lines = pa.array(
            [b.decode("utf-8", errors="replace") for b in raw.to_pylist()], pa.string()
        )
    return pc.utf8_rtrim(lines, "\r")


def _strip_bom(data: bytes) -> bytes:
    """``data`` (the start of a file) without a UTF-8 byte order mark."""
    return data[len(BOM):] if data.startswith(BOM) else data


@contextmanager
def _named_stream_errors(path: str) -> Iterator[None]:
    """Turn a decompressor's error (a truncated ``.gz``: "Compressed file ended before the
    end-of-stream marker was reached") into a `FormatError` naming the file."""
    try:
        yield
    except FormatError:
        raise
    except _STREAM_ERRORS as e:
        if not is_compressed(path) or isinstance(e, (FileNotFoundError, PermissionError)):
            raise
        raise FormatError(path, None, f"truncated or corrupt compressed file: {e}") from None


def _concat(arrays: list[pa.Array]) -> pa.Array:
    if not arrays:
        return pa.array([], pa.string())
    return pa.concat_arrays(arrays) if len(arrays) > 1 else arrays[0]


def iter_line_chunks(path: str, chunk_lines: int = 1_000_000) -> Iterator[tuple[int, pa.Array]]:
    """Stream ``path`` as ``(first 1-based line number, string array of up to chunk_lines lines)``.

    Lines have no ``\\n``/``\\r`` terminator. Every line counts, empty ones included; a final
    trailing newline does not make an extra line. Memory stays bounded by one chunk plus one
    read block. Invalid UTF-8 never raises (see :func:`_bytes_to_lines`).
    """
    if chunk_lines < 1:
        raise ValueError(f"chunk_lines={chunk_lines}: must be >= 1")
    pending: list[pa.Array] = []
    pending_n = 0
    next_line = 1
    carry = b""
    with open_text(path) as f, _named_stream_errors(path):
        first_block = True
        while True:
            block = f.read(_BLOCK_BYTES)
            if not block:
                break
            if first_block:
                block, first_block = _strip_bom(block), False
            data = carry + block if carry else block
            cut = data.rfind(b"\n")
            if cut < 0:
                carry = data
                continue
            carry = data[cut + 1 :]
            lines = _bytes_to_lines(data[:cut])
            pending.append(lines)
            pending_n += len(lines)
            while pending_n >= chunk_lines:
                merged = _concat(pending)
                yield next_line, merged.slice(0, chunk_lines)
                next_line += chunk_lines
                rest = merged.slice(chunk_lines)
                pending = [rest] if len(rest) else []
                pending_n = len(rest)
    if carry:
        pending.append(_bytes_to_lines(carry))
        pending_n += 1
    if pending_n:
        merged = _concat(pending)
        for start in range(0, pending_n, chunk_lines):
            yield next_line + start, merged.slice(start, chunk_lines)



@dataclass(frozen=True)
class ByteChunk:
    """Whole lines of one plain file: bytes ``byte_start`` (inclusive) to ``byte_end``
    (exclusive), cut at line ends. The line numbers are not known when planning (no scan of the
    file): a parser numbers the chunk's lines from 1 and the caller shifts them by the lines of
    the chunks before (their counts come back with the results)."""

    path: str
    byte_start: int
    byte_end: int


def plan_byte_chunks(path: str, chunk_bytes: int) -> list[ByteChunk]:
    """Cut a plain file into chunks of about ``chunk_bytes`` bytes of whole lines, without
    reading it: a cut at offset x moves to just after the first ``\n`` at or after x (one small
    read per cut). An empty file has no chunks."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes={chunk_bytes}: must be >= 1")
    path = str(path)
    size = os.path.getsize(path)
    cuts = [0]
    with open(path, "rb") as f:
        target = chunk_bytes
        while target < size:
            f.seek(target - 1)
            pos = target - 1
            while True:
                piece = f.read(1 << 16)
                if not piece:
                    pos = size
                    break
                nl = piece.find(b"\n")
                if nl >= 0:
                    pos += nl + 1
                    break
                pos += len(piece)
            if pos >= size:
                break
            if pos > cuts[-1]:
                cuts.append(pos)
            target = max(pos, cuts[-1]) + chunk_bytes
    cuts.append(size)
    return [ByteChunk(path, a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def read_byte_chunk(chunk: ByteChunk) -> bytes:
    """The raw bytes of one :class:`ByteChunk`."""
    with open(chunk.path, "rb") as f:
        f.seek(chunk.byte_start)
        data = f.read(chunk.byte_end - chunk.byte_start)
    if len(data) != chunk.byte_end - chunk.byte_start:
        raise FormatError(chunk.path, None, "file changed while reading (short read)")
    return _strip_bom(data) if chunk.byte_start == 0 else data


def count_lines(data: bytes) -> int:
    """Lines in ``data`` (an unterminated last line counts; a final ``\n`` adds none)."""
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


def bytes_to_lines(data: bytes) -> pa.Array:
    """The lines of ``data`` (whole lines, as :func:`read_byte_chunk` returns them) as a string
    array, ``\r`` removed, invalid UTF-8 replaced by U+FFFD (see :func:`_bytes_to_lines`)."""
    if not data:
        return pa.array([], pa.string())
    return _bytes_to_lines(data[:-1] if data.endswith(b"\n") else data)



def sniff_lines(path: str, n: int = 64, max_bytes: int = 1 << 20) -> list[str]:
    """Up to ``n`` non-blank, non-comment lines from the start of ``path`` (decompressed)."""
    with open_text(path) as f, _named_stream_errors(path):
        head = _strip_bom(f.read(max_bytes))
    out = []
    for raw in head.split(b"\n")[:-1] if len(head) == max_bytes else head.split(b"\n"):
        line = raw.decode("utf-8", errors="replace").rstrip("\r")
        if line.strip() and not line.lstrip().startswith("#"):
            out.append(line)
            if len(out) >= n:
                break
    return out

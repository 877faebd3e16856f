"""Random access to TFRecord shards: a checked index of record offsets, cached on disk, and checked reads.

A TFRecord file is a sequence of framed records (TensorFlow's ``core/lib/io/record_writer``)::

    uint64 length | uint32 masked_crc32c(length bytes) | data[length] | uint32 masked_crc32c(data)

with ``masked_crc32c(b) = ((crc >> 15) | (crc << 17)) + 0xa282ead8  (mod 2^32)``, ``crc = crc32c(b)``, all little
endian. :func:`build_index` walks a shard once, checks BOTH checksums of every record, refuses a length larger than
what is left of the file and an empty shard, and returns one ``(offset, length)`` row per record, ``length``
covering the whole frame (16 + data bytes). That is the index format of the ``tfrecord`` package's
``tfrecord2idx`` (text lines ``"offset length"``), so the cached files also work with
``tfrecord.torch.TFRecordDataset(index_path=...)``.

The cache (:func:`shard_index`) holds one ``.tfindex`` file per shard: beside the shard (``train-00.tfrecords`` ->
``train-00.tfindex``, ``tfrecord2idx``'s naming), or under ``cache_dir`` when the shard's folder is read-only (or
when ``cache_dir`` is given). Its first line is a ``#`` comment holding the shard's fingerprint: size, mtime (ns)
and the crc32c of its first and last 64 KiB. ``numpy.loadtxt`` (and so the ``tfrecord`` package) skips it. An index
whose fingerprint differs from the shard's is rebuilt, as is one written by ``tfrecord2idx`` (no fingerprint).

Every error names the shard and the record (counting from 0).
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
from pathlib import Path

import crc32c
import numpy as np

CRC_MASK_DELTA = 0xA282EAD8
HEADER_BYTES = 12  # uint64 length + uint32 crc of the length
FRAME_BYTES = 16  # header + uint32 crc of the data
FINGERPRINT_SPAN = 64 * 1024
INDEX_SUFFIX = ".tfindex"


def masked_crc32c(data: bytes | memoryview) -> int:
    """TensorFlow's masked CRC32-C of ``data``: ``((crc >> 15) | (crc << 17)) + 0xa282ead8`` mod 2^32."""
    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + CRC_MASK_DELTA) & 0xFFFFFFFF


class CorruptShardError(ValueError):
    """A shard that is empty, truncated, or whose record framing or checksums are wrong."""


def _check_frame(path: str, record: int, header: bytes, left: int) -> int:
    """Data length of the record whose 12-byte ``header`` starts with ``left`` bytes left in the file."""
    where = f"{path}: record {record}"
    if len(header) < HEADER_BYTES:
        raise CorruptShardError(f"{where}: truncated header ({len(header)} of {HEADER_BYTES} bytes)")
    length_bytes, (length_crc,) = header[:8], struct.unpack("<I", header[8:12])
    if masked_crc32c(length_bytes) != length_crc:
        raise CorruptShardError(f"{where}: length checksum mismatch (corrupt length field)")
    (length,) = struct.unpack("<Q", length_bytes)
    if length + FRAME_BYTES > left:
        raise CorruptShardError(
            f"{where}: record length {length} is larger than what is left of the file "
            f"({max(left - FRAME_BYTES, 0)} bytes after the framing)"
        )
    return length


def _check_data(path: str, record: int, data: bytes | memoryview, crc_bytes: bytes) -> None:
    if masked_crc32c(data) != struct.unpack("<I", crc_bytes)[0]:
        raise CorruptShardError(f"{path}: record {record}: data checksum mismatch (corrupt record)")


def build_index(path: str | os.PathLike) -> np.ndarray:
    """``(offset, length)`` int64 [N, 2] of every record of a shard, every frame and both checksums checked."""
    path = str(path)
    size = os.path.getsize(path)
    if size == 0:
        raise CorruptShardError(f"{path}: empty shard (0 bytes, no record)")
    rows = []
    with open(path, "rb") as file:
        offset = 0
        while offset < size:
            record = len(rows)
            length = _check_frame(path, record, file.read(HEADER_BYTES), size - offset)
            data = file.read(length)
            _check_data(path, record, data, file.read(4))
            rows.append((offset, length + FRAME_BYTES))
            offset += length + FRAME_BYTES
    return np.asarray(rows, dtype=np.int64).reshape(-1, 2)


def read_record(path: str, record: int, offset: int, length: int) -> bytes:
    """The data of the record framed at ``offset`` (``length`` bytes with its framing), checksums checked again
    (a shard rewritten after its index was built is caught here)."""
    with open(path, "rb") as file:
        file.seek(offset)
        frame = file.read(length)
    left = len(frame)
    data_length = _check_frame(path, record, frame[:HEADER_BYTES], left)
    if data_length + FRAME_BYTES != length:
        raise CorruptShardError(
            f"{path}: record {record}: the index says {length} bytes but the record holds {data_length + FRAME_BYTES}"
            " (the shard changed after its index was built: delete its .tfindex file)"
        )
    data = frame[HEADER_BYTES : HEADER_BYTES + data_length]
    _check_data(path, record, data, frame[HEADER_BYTES + data_length :])
    return data


def fingerprint(path: str | os.PathLike) -> str:
    """``size=<bytes> mtime_ns=<ns> crc=<crc32c of the first and last 64 KiB>`` of a file."""
    stat = os.stat(path)
    with open(path, "rb") as file:
        head = file.read(FINGERPRINT_SPAN)
        file.seek(max(stat.st_size - FINGERPRINT_SPAN, 0))
        tail = file.read(FINGERPRINT_SPAN)
    return f"size={stat.st_size} mtime_ns={stat.st_mtime_ns} crc={crc32c.crc32c(head + tail):08x}"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/harmonization/tfindex`` (``~/.cache/...`` by default)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "harmonization" / "tfindex"


def index_candidates(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> list[Path]:
    """Where the index of a shard is looked for, in order: ``cache_dir`` if given, else beside the shard, then the
    default cache directory (named by a hash of the shard's absolute path, so equal names never collide)."""
    shard = Path(path).resolve()
    key = hashlib.sha1(str(shard).encode()).hexdigest()[:16]
    cached = Path(cache_dir or default_cache_dir()) / f"{shard.stem}-{key}{INDEX_SUFFIX}"
    if cache_dir is not None:
        return [cached]
    return [shard.with_suffix(INDEX_SUFFIX), cached]


def _read_cached(index_file: Path, expected: str) -> np.ndarray | None:
    try:
        with open(index_file) as file:
            header = file.readline()
            if header.strip() != f"# {expected}":
                return None
            rows = np.loadtxt(file, dtype=np.int64, ndmin=2)
    except (OSError, ValueError):
        return None
    return rows.reshape(-1, 2) if rows.size else None


def _write_atomically(index_file: Path, header: str, rows: np.ndarray) -> None:
    """Write to a temporary file of the same folder, then rename: ranks building at once never see half a file."""
    index_file.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=index_file.parent, prefix=index_file.name, suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as file:
            file.write(f"# {header}\n")
            file.writelines(f"{offset} {length}\n" for offset, length in rows.tolist())
        os.replace(temporary, index_file)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def shard_index(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> np.ndarray:
    """The ``(offset, length)`` rows of a shard: read from a cached index whose fingerprint matches the shard, or
    built (:func:`build_index`) and cached in the first writable place of :func:`index_candidates`."""
    expected = fingerprint(path)
    candidates = index_candidates(path, cache_dir)
    for candidate in candidates:
        rows = _read_cached(candidate, expected)
        if rows is not None:
            return rows
    rows = build_index(path)
    errors = []
    for candidate in candidates:
        try:
            _write_atomically(candidate, expected, rows)
            return rows
        except OSError as error:  # a read-only folder: try the next place
            errors.append(f"{candidate}: {error}")
    raise OSError(f"{path}: cannot write its index anywhere ({'; '.join(errors)}): pass a writable cache_dir")

"""TFRecord framing, read without TensorFlow, with both CRCs checked.

A TFRecord file is a sequence of records, each::

    uint64  length              little-endian
    uint32  masked_crc32c(length bytes)
    byte    data[length]
    uint32  masked_crc32c(data)

CRC32C (Castagnoli) comes from ``google_crc32c`` (C, Apache-2.0) when installed; otherwise a
table-driven pure-Python version is used, which is correct but slow (about 10 MB/s, so ~100 s
for a ~1 GB Waymo segment), and a warning says how to get the fast one.
"""

from __future__ import annotations

import os
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path

_MASK_DELTA = 0xA282EAD8
_POLY_REVERSED = 0x82F63B78  # Castagnoli polynomial, bit-reversed


class TFRecordError(ValueError):
    """A corrupt or truncated TFRecord; the message names the file and the record index."""


def _make_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _POLY_REVERSED if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _make_table()


def crc32c_python(data: bytes) -> int:
    """CRC32C of ``data`` in pure Python (table-driven, one byte per step)."""
    crc = 0xFFFFFFFF
    table = _TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _fast_crc32c():
    try:
        import google_crc32c
    except ImportError:
        return None
    # The package silently falls back to its own pure-Python code when its C extension is
    # missing; that one is no faster than ours, so only the C build counts.
    return google_crc32c.value if google_crc32c.implementation == "c" else None


_FAST = _fast_crc32c()
_warned_slow = False


def crc32c(data: bytes) -> int:
    """CRC32C of ``data``: the C implementation if available, else :func:`crc32c_python`."""
    global _warned_slow
    if _FAST is not None:
        return _FAST(data)
    if not _warned_slow and len(data) > 1 << 20:
        warnings.warn("google-crc32c is not installed; checking TFRecord CRCs in pure Python is slow "
                      "(pip install google-crc32c)", stacklevel=2)
        _warned_slow = True
    return crc32c_python(data)


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: rotate right by 15 bits and add a constant (mod 2^32)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def _read_exact(f, n: int, path: Path, index: int, what: str) -> bytes:
    buf = f.read(n)
    if len(buf) != n:
        raise TFRecordError(f"{path}: record {index}: truncated file: expected {n} bytes of {what}, "
                            f"got {len(buf)} (the download or copy is incomplete; fetch it again)")
    return buf


def read_records(path: str | os.PathLike, verify: bool = True) -> Iterator[bytes]:
    """Yield the payload of each record of a TFRecord file, in order.

    Raises:
        TFRecordError: a truncated record or a CRC mismatch, naming ``path`` and the record index.
    """
    path = Path(path)
    with open(path, "rb") as f:
        index = 0
        while True:
            header = f.read(8)
            if not header:
                return
            if len(header) < 8:
                raise TFRecordError(f"{path}: record {index}: truncated file: {len(header)} of 8 "
                                    "length bytes (the download or copy is incomplete)")
            (length,) = struct.unpack("<Q", header)
            (length_crc,) = struct.unpack("<I", _read_exact(f, 4, path, index, "length CRC"))
            if verify and masked_crc32c(header) != length_crc:
                raise TFRecordError(f"{path}: record {index}: length CRC mismatch (corrupt file, or "
                                    "not a TFRecord)")
            data = _read_exact(f, length, path, index, "record data")
            (data_crc,) = struct.unpack("<I", _read_exact(f, 4, path, index, "data CRC"))
            if verify and masked_crc32c(data) != data_crc:
                raise TFRecordError(f"{path}: record {index}: data CRC mismatch (corrupt file)")
            yield data
            index += 1


def write_records(path: str | os.PathLike, records: list[bytes]) -> None:
    """Write ``records`` as a TFRecord file (used to build test inputs)."""
    with open(path, "wb") as f:
        for data in records:
            header = struct.pack("<Q", len(data))
            f.write(header)
            f.write(struct.pack("<I", masked_crc32c(header)))
            f.write(data)
            f.write(struct.pack("<I", masked_crc32c(data)))

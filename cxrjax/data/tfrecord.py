"""TFRecord framing without TensorFlow, plus random access by byte offset.

Hand-written because grain reads TFRecords only sequentially and cxrjax must not
import TensorFlow; the format is four fields: uint64 length, masked CRC32C of the
length, the payload, masked CRC32C of the payload (all little-endian).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from typing import BinaryIO

import google_crc32c

from cxrjax.errors import InputError

_MASK_DELTA = 0xA282EAD8


class RecordError(InputError):
    """A TFRecord frame whose length or checksum does not match its bytes."""


def masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame(payload: bytes) -> bytes:
    header = struct.pack("<Q", len(payload))
    return b"".join((header, struct.pack("<I", masked_crc(header)), payload, struct.pack("<I", masked_crc(payload))))


def read_at(fd: int, offset: int, source: str = "record", verify: bool = True) -> bytes:
    """The payload of the record that starts at `offset` in the open file `fd`.

    os.pread keeps no file position, so grain's reader threads can share one fd.
    """
    head = os.pread(fd, 12, offset)
    if len(head) != 12:
        raise RecordError(f"{source}: no record header at byte {offset}")
    (length,) = struct.unpack("<Q", head[:8])
    # A damaged length field is caught before it sizes a read (it could ask for exabytes).
    if verify and struct.unpack("<I", head[8:])[0] != masked_crc(head[:8]):
        raise RecordError(f"{source}: CRC mismatch in the length field of the record at byte {offset}")
    if offset + 12 + length + 4 > os.fstat(fd).st_size:
        raise RecordError(f"{source}: record at byte {offset} is truncated")
    body = os.pread(fd, length + 4, offset + 12)
    if len(body) != length + 4:
        raise RecordError(f"{source}: record at byte {offset} is truncated")
    payload = body[:length]
    if verify:
        (payload_crc,) = struct.unpack("<I", body[length:])
        if payload_crc != masked_crc(payload):
            raise RecordError(f"{source}: CRC mismatch in record at byte {offset}")
    return payload


def scan_offsets(f: BinaryIO, source: str = "records") -> Iterator[int]:
    """Offsets of every record, by walking the length fields (rebuilds a lost index)."""
    offset = 0
    while True:
        f.seek(offset)
        head = f.read(8)
        if not head:
            return
        if len(head) != 8:
            raise RecordError(f"{source}: trailing bytes at {offset}")
        (length,) = struct.unpack("<Q", head)
        yield offset
        offset += 16 + length

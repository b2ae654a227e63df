"""Kafka record batches (message format v2) read straight from the bytes of a fetch response.

The consumer's hot path of the kafka-python backend: :mod:`stream_influence.io.kafka_python`
hands every completed fetch's bytes to :func:`read_batches` and uses its records when it returns
them.  It reads only what :class:`~stream_influence.io.broker.ConsumedRecord` needs, in one loop
over the buffer, and refuses (returns ``None``) every fetch it does not fully vouch for, so that
the client's own parser reads it and raises its own errors:

- another message format (v0/v1), a compressed or control batch, a negative record count;
- a batch whose CRC-32C differs (when a checksum function is given: the client's ``check_crcs``);
- any record whose framing the client's parser would reject: a varint past the batch or out of
  int64 range, a stated record length that differs from what was read, a negative header count
  or header name length, a header name that is not UTF-8, bytes left over after the last record.

Record layout (Kafka's ``DefaultRecordBatch``/``DefaultRecord``): a 61-byte batch header
(base offset, length, leader epoch, magic, CRC, attributes, last offset delta, first and max
timestamps, producer id/epoch, base sequence, record count), then per record the zig-zag
varints length, attributes, timestamp delta, offset delta, key length, key, value length, value,
header count, and per header name length, name, value length, value (-1 length: null).
"""

from __future__ import annotations

import struct
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass

from stream_influence.io.broker import Record

__all__ = ["Fetched", "read_batches"]

_HEADER = struct.Struct(">qiibIhiqqqhii")  # the v2 batch header, through the record count
_LENGTH = struct.Struct(">i")
_LOG_OVERHEAD = 12  # base offset + batch length: what the batch length does not count
_MIN_BATCH = _LOG_OVERHEAD + 14  # the smallest slice the client accepts (its message v0 overhead)
_CRC_FROM = 21  # the CRC covers the bytes from the attributes to the end of the batch
_REFUSED_ATTRIBUTES = 0x07 | 0x20  # a compression codec, or a control batch
_LOG_APPEND_TIME = 0x08


@dataclass(slots=True)
class Fetched:
    """The records of one fetch response's partition data, and what a consumer tracks while it
    hands them out: ``records`` are those at or after the fetch offset (the broker returns whole
    batches, so a fetch from inside a batch starts with records below it: ``skipped``)."""

    records: list[Record]
    skipped: int
    #: ``cum_bytes[j]``: the record bytes (as the batch's stated record lengths count them) of the
    #: skipped records and of ``records[:j]``; one entry more than ``records``.
    cum_bytes: list[int]
    #: per batch: the index in ``records`` of its first record, and its partition leader epoch
    batch_starts: list[int]
    batch_epochs: list[int]
    #: the offset after the last batch (its base offset + last offset delta + 1: also past
    #: records compaction removed from its end), None when the fetch held no complete batch
    end_offset: int | None
    last_epoch: int | None

    def epoch_of(self, index: int) -> int:
        """The leader epoch of the batch that holds ``records[index]``."""
        return self.batch_epochs[bisect_right(self.batch_starts, index) - 1]


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """A zig-zag varint at ``pos`` and the position after it (any length up to 64 bits)."""
    result = buf[pos] & 0x7F
    shift = 7
    if buf[pos] & 0x80:
        while True:
            pos += 1
            b = buf[pos]
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                break
            shift += 7
            if shift >= 64:
                raise ValueError("Out of int64 range")
    return (result >> 1) ^ -(result & 1), pos + 1


def read_batches(
    buffer: bytes | bytearray | memoryview,
    topic: str,
    partition: int,
    fetch_offset: int,
    crc32c: Callable[[memoryview], int] | None,
) -> Fetched | None:
    """The records of the v2 batches in ``buffer`` (one partition's data of a fetch response),
    or ``None`` where the client's parser must read it (see the module docstring).

    ``crc32c`` checks each batch's CRC (None: not checked).  A batch cut off at the end of the
    buffer (the broker fills a fetch up to its size limit) is left out, as the client does."""
    buf = buffer if type(buffer) is bytes else bytes(buffer)
    view = memoryview(buf)
    size = len(buf)
    out: list[Record] = []
    append = out.append
    cum: list[int] = []
    cum_append = cum.append
    starts: list[int] = []
    epochs: list[int] = []
    nbytes = skipped = 0
    end_offset: int | None = None
    last_epoch: int | None = None
    unpack = _HEADER.unpack_from
    varint = _varint
    pos = 0
    try:
        while size - pos >= _LOG_OVERHEAD:
            end = pos + _LOG_OVERHEAD + _LENGTH.unpack_from(buf, pos + 8)[0]
            if end > size:
                break  # cut off: the next fetch starts at it
            if end - pos < _MIN_BATCH:
                return None
            (base, _, epoch, magic, crc, attrs, last_delta, first_ts, max_ts, _, _, _, count) = unpack(
                buf, pos
            )
            if magic != 2 or attrs & _REFUSED_ATTRIBUTES or count < 0:
                return None
            if crc32c is not None and crc32c(view[pos + _CRC_FROM : end]) != crc:
                return None
            log_append = attrs & _LOG_APPEND_TIME
            starts.append(len(out))
            epochs.append(epoch)
            p = pos + _HEADER.size
            for _ in range(count):
                # Varints of one byte, and of two (lengths over 63, deltas over 63), inline.
                b = buf[p]
                if b < 0x80:
                    length = (b >> 1) ^ -(b & 1)
                    p += 1
                elif buf[p + 1] < 0x80:
                    u = (b & 0x7F) | (buf[p + 1] << 7)
                    length = (u >> 1) ^ -(u & 1)
                    p += 2
                else:
                    length, p = varint(buf, p)
                start = p
                if buf[p] < 0x80:  # attributes (unused), read as a varint as the client does
                    p += 1
                else:
                    _, p = varint(buf, p)
                b = buf[p]
                if b < 0x80:
                    ts_delta = (b >> 1) ^ -(b & 1)
                    p += 1
                elif buf[p + 1] < 0x80:
                    u = (b & 0x7F) | (buf[p + 1] << 7)
                    ts_delta = (u >> 1) ^ -(u & 1)
                    p += 2
                else:
                    ts_delta, p = varint(buf, p)
                b = buf[p]
                if b < 0x80:
                    offset_delta = (b >> 1) ^ -(b & 1)
                    p += 1
                elif buf[p + 1] < 0x80:
                    u = (b & 0x7F) | (buf[p + 1] << 7)
                    offset_delta = (u >> 1) ^ -(u & 1)
                    p += 2
                else:
                    offset_delta, p = varint(buf, p)
                b = buf[p]
                if b < 0x80:
                    n = (b >> 1) ^ -(b & 1)
                    p += 1
                else:
                    n, p = varint(buf, p)
                if n >= 0:
                    key: bytes | None = buf[p : p + n]
                    p += n
                else:
                    key = None
                b = buf[p]
                if b < 0x80:
                    n = (b >> 1) ^ -(b & 1)
                    p += 1
                elif buf[p + 1] < 0x80:
                    u = (b & 0x7F) | (buf[p + 1] << 7)
                    n = (u >> 1) ^ -(u & 1)
                    p += 2
                else:
                    n, p = varint(buf, p)
                if n >= 0:
                    value: bytes | None = buf[p : p + n]
                    p += n
                else:
                    value = None
                b = buf[p]
                if b < 0x80:
                    nh = (b >> 1) ^ -(b & 1)
                    p += 1
                else:
                    nh, p = varint(buf, p)
                headers: list[tuple[str, bytes | None]] = []
                if nh:
                    if nh < 0:
                        return None
                    for _ in range(nh):
                        n, p = varint(buf, p)
                        if n < 0:
                            return None
                        name = buf[p : p + n].decode("utf-8")
                        p += n
                        n, p = varint(buf, p)
                        if n >= 0:
                            headers.append((name, buf[p : p + n]))
                            p += n
                        else:
                            headers.append((name, None))
                if p - start != length:
                    return None
                offset = base + offset_delta
                if offset < fetch_offset and not out:
                    skipped += 1  # before the fetch offset: the client drops these too
                else:
                    cum_append(nbytes)
                    append(
                        Record(
                            topic,
                            partition,
                            offset,
                            key,
                            value,
                            headers,
                            max_ts if log_append else first_ts + ts_delta,
                        )
                    )
                nbytes += length
            if p != end:
                return None
            end_offset = base + last_delta + 1
            last_epoch = epoch
            pos = end
    except (IndexError, ValueError, struct.error):  # UnicodeDecodeError is a ValueError
        return None
    cum_append(nbytes)
    return Fetched(out, skipped, cum, starts, epochs, end_offset, last_epoch)

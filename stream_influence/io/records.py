"""Output records and their headers: one place for what the service writes and how it is encoded.

Backend-neutral (no Kafka client here): record size is counted as Kafka's record format v2
counts it (every broker since 0.11), so a copy can be cut to the producer's ``max_request_size``
before it is produced.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from itertools import chain, repeat
from operator import attrgetter
from typing import Any

import numpy as np
import orjson

from stream_influence.core.decisions import DecisionRecord
from stream_influence.errors import OutputError
from stream_influence.io.broker import Headers, OutputRecord

__all__ = [
    "OUTPUT_FAILED",
    "OWN_HEADERS",
    "RECORD_FRAMING",
    "ChunkHeaders",
    "OutputRecord",
    "dead_letter_headers",
    "decision_value",
    "encode_key",
    "fit_record",
    "fit_records",
    "header_dict",
    "quarantine_headers",
    "record_size",
    "source_headers",
    "value_proof",
]

# Dead-letter reason of a message whose own output (quarantine copy, …) could not be built or
# sent: its key or a header cannot be encoded, serialisation failed, or the broker refused it.
OUTPUT_FAILED = "output_failed"

# Header names this service writes; an input header of the same name is replaced, not duplicated.
# ``original_size`` / ``original_sha256`` appear only on a copy whose value was truncated to fit
# the producer's ``max_request_size``: the original value's length in bytes and its SHA-256 (hex).
OWN_HEADERS = frozenset(
    {
        "original_size",
        "original_sha256",
        "reason",
        "detail",
        "source_topic",
        "source_partition",
        "source_offset",
        "influence",
        "relative_influence",
        "cosine_influence",
        "self_influence",
        "threshold",
        "policy_version",
        "model_version",
    }
)

# Record format v2: batch header (61 B) plus the most a record's own framing takes (length 5,
# timestamp delta 10, offset delta 5, attributes 1).
_BATCH_HEADER = 61
_RECORD_OVERHEAD = 21
#: What :func:`record_size` adds to the encoded key, value and headers.
RECORD_FRAMING = _BATCH_HEADER + _RECORD_OVERHEAD


def encode_key(text: str) -> bytes:
    """UTF-8 bytes of an event id; :class:`OutputError` if it holds a lone surrogate."""
    try:
        return text.encode()
    except UnicodeEncodeError as exc:
        raise OutputError(f"the event id cannot be encoded as UTF-8: {exc}") from exc


def _varint_size(n: int) -> int:
    n = (n << 1) ^ (n >> 63)  # zig-zag, as Kafka encodes signed lengths
    size = 1
    while n > 0x7F:
        n >>= 7
        size += 1
    return size


def _bytes_size(b: bytes | None) -> int:
    return 1 if b is None else _varint_size(len(b)) + len(b)


def record_size(key: bytes | None, value: bytes | None, headers: Headers) -> int:
    """Bytes the record takes in a batch of its own, as a producer counts it against
    ``max_request_size`` (record format v2, every broker since Kafka 0.11)."""
    size = RECORD_FRAMING + _bytes_size(key) + _bytes_size(value)
    size += _varint_size(len(headers))
    for name, v in headers:
        size += _bytes_size(name.encode()) + _bytes_size(v)
    return size


def value_proof(value: bytes | None) -> Headers:
    """``original_size`` and ``original_sha256`` headers of a value that is not sent whole."""
    value = value or b""
    return [
        ("original_size", str(len(value)).encode()),
        ("original_sha256", hashlib.sha256(value).hexdigest().encode()),
    ]


def fit_record(rec: OutputRecord, limit: int) -> OutputRecord:
    """``rec``, or a copy that fits ``limit`` bytes: the value is truncated (then, if the rest is
    still too big, the input's own headers dropped and the key cut), with the original value's size
    and SHA-256 in ``original_size`` / ``original_sha256``.  Raises :class:`OutputError` if even
    the service's own headers do not fit."""
    # Cheap bound first (batch header 61 B, record framing ≤ 36 B, ≤ 10 B per header, ≤ 4 UTF-8
    # bytes per character of a header; summed in C, no Python call per header): the hot path
    # never pays for the exact estimate.
    payload = (
        len(rec.key or b"") + len(rec.value or b"") + 4 * sum(map(len, chain.from_iterable(rec.headers)))
    )
    if (
        payload + 128 + 16 * len(rec.headers) <= limit
        or record_size(rec.key, rec.value, rec.headers) <= limit
    ):
        return rec
    value = rec.value or b""
    proof = value_proof(value)
    own = [(n, v) for n, v in rec.headers if n in OWN_HEADERS]
    for key, headers in (
        (rec.key, [*rec.headers, *proof]),
        (rec.key, [*own, *proof]),
        ((rec.key or b"")[:64] or None, [*own, *proof]),
    ):
        room = limit - record_size(key, b"", headers)
        if room < 0:
            continue
        cut = value[:room]
        # Length varints grow with the value: shrink until the estimate fits.
        while cut and record_size(key, cut, headers) > limit:
            cut = cut[: len(cut) - max(1, record_size(key, cut, headers) - limit)]
        return OutputRecord(rec.topic, key, cut, headers)
    raise OutputError(f"an output to {rec.topic} cannot fit {limit} bytes even without its value")


_KEY, _VALUE, _HEADERS = attrgetter("key"), attrgetter("value"), attrgetter("headers")
#: The longest number :func:`_nums` writes (``repr`` of a float64: "-2.2250738585072014e-308").
_NUM_CHARS = 24
#: The longest offset :func:`_ints` writes (a signed 64-bit integer).
_INT_CHARS = 20


def fit_records(
    recs: Sequence[OutputRecord], limit: int, header_bound: tuple[int, int] | None = None
) -> bool:
    """True when every record of ``recs`` certainly fits ``limit`` bytes, proved for the whole
    chunk at once (in C, no Python call per record): :func:`fit_record`'s cheap bound with the
    largest key, the largest value and, for the headers, ``header_bound`` — (characters, count)
    that no record's headers exceed, when the caller knows it
    (:meth:`ChunkHeaders.quarantine_bound`) — else *all* the chunk's header characters.  False:
    some record may not fit, :func:`fit_record` each."""
    if not recs:
        return True
    keys = max(map(len, filter(None, map(_KEY, recs))), default=0)
    values = max(map(len, filter(None, map(_VALUE, recs))), default=0)
    if header_bound is None:
        headers = list(map(_HEADERS, recs))
        try:
            header_bound = (
                sum(map(len, chain.from_iterable(chain.from_iterable(headers)))),
                max(map(len, headers)),
            )
        except TypeError:
            # A header without a value (Kafka's null, None here): not proved for the chunk;
            # fit_record answers each record, as it always did (the caller dead-letters it).
            return False
    chars, count = header_bound
    return keys + values + 4 * chars + 128 + 16 * count <= limit


# -- headers ------------------------------------------------------------------------------
def _keep(original: Headers | None) -> list[tuple[str, bytes]]:
    return [(n, v) for n, v in (original or ()) if n not in OWN_HEADERS]


def _num(x: float | None) -> bytes:
    return b"nan" if x is None or (isinstance(x, float) and math.isnan(x)) else repr(float(x)).encode()


def _nums(xs: Sequence[float | None] | np.ndarray) -> list[bytes]:
    """``_num`` of every value (the shortest ``repr`` of each float64; None and NaN ``nan``), a
    column at a time.  orjson writes the same shortest round-trip digits as ``repr`` ~15× faster,
    and in the same form wherever ``repr`` writes no exponent below 1e-4 (orjson writes
    ``0.00001`` and ``4e-6`` where ``repr`` writes ``1e-05`` and ``4e-06``) — checked against
    ``repr`` in tests/test_records_columns.py; the values outside ``[1e-4, 1e16)`` (zero aside),
    NaN and infinities (orjson: ``null``) are written by ``repr`` itself."""
    a = np.ascontiguousarray(xs, dtype=np.float64).ravel()
    if not a.size:
        return []
    out = orjson.dumps(a, option=orjson.OPT_SERIALIZE_NUMPY)[1:-1].split(b",")
    with np.errstate(invalid="ignore"):
        m = np.abs(a)
        odd = np.flatnonzero(((m < 1e-4) & (a != 0)) | ~(m < 1e16))  # NaN: not < 1e16
    if odd.size:
        values = a.tolist()
        for i in odd.tolist():
            out[i] = _num(values[i])
    return out


def _ints(xs: Sequence[int]) -> list[bytes]:
    """``str(x).encode()`` of every int, in one pass."""
    return " ".join(map(str, xs)).encode().split(b" ") if len(xs) else []


# The per-message headers of a quarantine copy (besides the chunk's source and versions).
_QUARANTINE_NAMES = (
    "source_offset",
    "reason",
    "influence",
    "relative_influence",
    "cosine_influence",
    "threshold",
)


class ChunkHeaders:
    """The headers of one chunk's outputs: what every output of the chunk shares (source topic
    and partition, policy and model versions) is encoded once, not once per message, and the
    per-message numbers a column at a time (:meth:`quarantine_many`)."""

    __slots__ = ("_source", "_versions")

    def __init__(self, topic: str, partition: int, policy_version: int = 0, model_version: int = 0) -> None:
        self._source = (("source_topic", topic.encode()), ("source_partition", str(partition).encode()))
        self._versions = (
            ("policy_version", str(policy_version).encode()),
            ("model_version", str(model_version).encode()),
        )

    def source(self, offset: int) -> list[tuple[str, bytes]]:
        return [*self._source, ("source_offset", str(offset).encode())]

    def source_many(self, offsets: Sequence[int]) -> list[list[tuple[str, bytes]]]:
        """:meth:`source` of every offset."""
        a, b = self._source
        return list(map(list, zip(repeat(a), repeat(b), zip(repeat("source_offset"), _ints(offsets)))))

    def dead_letter(self, original: Headers | None, reason: str, detail: str, offset: int) -> Headers:
        return [
            *_keep(original),
            ("reason", reason.encode()),
            ("detail", detail.encode("utf-8", "replace")),
            *self.source(offset),
        ]

    def quarantine(
        self,
        original: Headers | None,
        offset: int,
        *,
        reason: str,
        influence: float,
        relative_influence: float,
        cosine_influence: float,
        threshold: float,
    ) -> Headers:
        return self.quarantine_many(
            [original],
            [offset],
            reasons=[reason],
            influence=[influence],
            relative_influence=[relative_influence],
            cosine_influence=[cosine_influence],
            threshold=[threshold],
        )[0]

    def quarantine_bound(
        self, originals: Sequence[Headers | None], reasons: Sequence[str]
    ) -> tuple[int, int]:
        """(characters, count) that no message's :meth:`quarantine_many` headers exceed — name
        characters plus value characters or bytes (UTF-8 takes at most 4 bytes a character:
        :func:`fit_records` counts 4 for each) — from the chunk's columns, not per message."""
        own = (*self._source, *self._versions)
        chars = sum(len(n) + len(v) for n, v in own) + sum(map(len, _QUARANTINE_NAMES))
        chars += _INT_CHARS + max(map(len, reasons), default=0) + 4 * _NUM_CHARS
        count = len(own) + len(_QUARANTINE_NAMES)
        if any(originals):
            kept = [_keep(o) for o in originals if o]
            chars += max(sum(len(n) + len(v or b"") for n, v in k) for k in kept)
            count += max(map(len, kept))
        return chars, count

    def quarantine_many(
        self,
        originals: Sequence[Headers | None],
        offsets: Sequence[int],
        *,
        reasons: Sequence[str],
        influence: Sequence[float] | np.ndarray,
        relative_influence: Sequence[float] | np.ndarray,
        cosine_influence: Sequence[float] | np.ndarray,
        threshold: Sequence[float] | np.ndarray,
    ) -> list[Headers]:
        """The quarantine-copy headers of a chunk's messages (the input's own headers, the source,
        the routing reason, the scores and the versions), one list per message.  Built a column
        at a time: each header tuple by ``zip`` over the column, each message's list by ``map``
        over the columns (no Python step per message where no input has headers of its own)."""
        n = len(offsets)
        src_topic, src_partition = self._source
        policy, model = self._versions
        reason_of = {r: ("reason", r.encode()) for r in set(reasons)}
        columns = zip(
            repeat(src_topic, n),
            repeat(src_partition, n),
            zip(repeat("source_offset"), _ints(offsets)),
            map(reason_of.__getitem__, reasons),
            zip(repeat("influence"), _nums(influence)),
            zip(repeat("relative_influence"), _nums(relative_influence)),
            zip(repeat("cosine_influence"), _nums(cosine_influence)),
            zip(repeat("threshold"), _nums(threshold)),
            repeat(policy, n),
            repeat(model, n),
            strict=True,
        )
        out = list(map(list, columns))
        if len(originals) != n:
            raise ValueError(f"{len(originals)} input header lists for {n} messages")
        if any(originals):
            for i, original in enumerate(originals):
                if original:  # the input's own headers first, ours replacing any of the same name
                    out[i][:0] = _keep(original)
        return out


def source_headers(topic: str, partition: int, offset: int) -> Headers:
    return ChunkHeaders(topic, partition).source(offset)


def dead_letter_headers(
    original: Headers | None, reason: str, detail: str, topic: str, partition: int, offset: int
) -> Headers:
    return ChunkHeaders(topic, partition).dead_letter(original, reason, detail, offset)


def quarantine_headers(
    original: Headers | None,
    topic: str,
    partition: int,
    offset: int,
    *,
    reason: str,
    influence: float,
    relative_influence: float,
    cosine_influence: float,
    threshold: float,
    policy_version: int,
    model_version: int,
) -> Headers:
    return ChunkHeaders(topic, partition, policy_version, model_version).quarantine(
        original,
        offset,
        reason=reason,
        influence=influence,
        relative_influence=relative_influence,
        cosine_influence=cosine_influence,
        threshold=threshold,
    )


def header_dict(headers: Sequence[tuple[str, bytes]] | None) -> dict[str, str]:
    """Last value of every header, decoded (for tests, requeue and humans)."""
    return {n: (v or b"").decode("utf-8", "replace") for n, v in (headers or ())}


def decision_value(record: dict[str, Any], topic: str, partition: int, offset: int) -> bytes:
    """The decisions-topic value of ``record`` (a :class:`DecisionRecord` as a JSON object)."""
    return DecisionRecord.from_dict(record).with_source(topic, partition, offset).to_json().encode()

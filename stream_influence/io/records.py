"""Output records and their headers: one place for what the service writes and how it is encoded.

Backend-neutral (no Kafka client here): record size is counted as Kafka's record format v2
counts it (every broker since 0.11), so a copy can be cut to the producer's ``max_request_size``
before it is produced.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from itertools import chain
from typing import Any

import numpy as np

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


# -- headers ------------------------------------------------------------------------------
def _keep(original: Headers | None) -> list[tuple[str, bytes]]:
    return [(n, v) for n, v in (original or ()) if n not in OWN_HEADERS]


def _num(x: float | None) -> bytes:
    return b"nan" if x is None or (isinstance(x, float) and math.isnan(x)) else repr(float(x)).encode()


def _nums(xs: Sequence[float | None] | np.ndarray) -> list[bytes]:
    """``_num`` of every value, in one pass (the shortest repr of each float64; None and NaN
    ``nan``): one join and one encode for the whole column instead of a call per value."""
    values = np.asarray(xs, dtype=np.float64).tolist()
    return " ".join(map(repr, values)).encode().split(b" ") if values else []


def _ints(xs: Sequence[int]) -> list[bytes]:
    """``str(x).encode()`` of every int, in one pass."""
    return " ".join(map(str, xs)).encode().split(b" ") if len(xs) else []


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
        return [[a, b, ("source_offset", o)] for o in _ints(offsets)]

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
        the routing reason, the scores and the versions), one list per message."""
        src_topic, src_partition = self._source
        policy, model = self._versions
        reason_of = {r: ("reason", r.encode()) for r in set(reasons)}
        return [
            [
                *(_keep(original) if original else ()),
                src_topic,
                src_partition,
                ("source_offset", offset),
                reason_of[reason],
                ("influence", inf),
                ("relative_influence", rel),
                ("cosine_influence", cos),
                ("threshold", thr),
                policy,
                model,
            ]
            for original, offset, reason, inf, rel, cos, thr in zip(
                originals,
                _ints(offsets),
                reasons,
                _nums(influence),
                _nums(relative_influence),
                _nums(cosine_influence),
                _nums(threshold),
                strict=True,
            )
        ]


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

"""kafka-python plumbing: client construction, output headers, the reference reader, lag.

Everything that knows kafka-python lives here so :mod:`stream_influence.service.loop` reads as the
checkpoint protocol it implements.  Security settings (SASL/SSL) and ``client_options`` from
:class:`~stream_influence.config.KafkaSettings` reach every client unchanged; secrets stay
:class:`~pydantic.SecretStr` everywhere else and are unwrapped only in the option dicts built here.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.record.default_records import DefaultRecordBatchBuilder
from pydantic import SecretStr

from stream_influence.config import KafkaSettings
from stream_influence.core.decisions import DecisionRecord
from stream_influence.errors import BrokerUnreachableError, OutputError

__all__ = [
    "OUTPUT_FAILED",
    "Headers",
    "OutputRecord",
    "PastEnd",
    "ReferenceReader",
    "admin_options",
    "broker_reachable",
    "build_admin",
    "build_consumer",
    "build_producer",
    "check_broker",
    "consumer_options",
    "dead_letter_headers",
    "encode_key",
    "ensure_topics",
    "fit_record",
    "producer_options",
    "quarantine_headers",
    "record_size",
    "source_headers",
    "value_proof",
    "watermarks",
]

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]

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


def common_options(k: KafkaSettings) -> dict[str, Any]:
    """Connection and security options shared by consumers, producers and the admin client."""
    opts: dict[str, Any] = {
        "bootstrap_servers": k.bootstrap_list(),
        "security_protocol": k.security_protocol,
        "client_id": k.client_id,
        "ssl_check_hostname": k.ssl_check_hostname,
        "reconnect_backoff_max_ms": k.reconnect_backoff_max_ms,
    }
    if k.sasl_mechanism:
        opts["sasl_mechanism"] = k.sasl_mechanism
    if k.sasl_plain_username is not None:
        opts["sasl_plain_username"] = k.sasl_plain_username
    for name in ("sasl_plain_password", "ssl_password"):
        secret = getattr(k, name)
        if secret is not None:
            opts[name] = secret.get_secret_value()
    for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        value = getattr(k, name)
        if value is not None:
            opts[name] = str(value)
    return opts


def _with_passthrough(opts: dict[str, Any], k: KafkaSettings, allowed: Iterable[str]) -> dict[str, Any]:
    # client_options apply to every client that understands them (kafka-python rejects unknown keys).
    known = set(allowed)
    opts.update(
        {
            key: v.get_secret_value() if isinstance(v, SecretStr) else v
            for key, v in k.client_options.items()
            if key in known
        }
    )
    return opts


def consumer_options(k: KafkaSettings, *, group: bool = True) -> dict[str, Any]:
    """Keyword arguments of the training-events consumer (or of a group-less reader)."""
    opts = common_options(k)
    opts.update(
        enable_auto_commit=False,
        auto_offset_reset=k.auto_offset_reset,
        max_poll_records=k.max_poll_records,
        session_timeout_ms=k.session_timeout_ms,
        heartbeat_interval_ms=k.heartbeat_interval_ms,
        max_poll_interval_ms=k.max_poll_interval_ms,
        request_timeout_ms=k.request_timeout_ms,
        group_id=k.group_id if group else None,
    )
    return _with_passthrough(opts, k, KafkaConsumer.DEFAULT_CONFIG)


def build_consumer(k: KafkaSettings, *, group: bool = True) -> KafkaConsumer:
    """The training-events consumer (in the group, auto-commit off), or a group-less reader."""
    return KafkaConsumer(**consumer_options(k, group=group))


def producer_options(k: KafkaSettings) -> dict[str, Any]:
    """Keyword arguments of the output producer."""
    opts = common_options(k)
    opts.update(
        acks=k.producer_acks,
        linger_ms=k.producer_linger_ms,
        batch_size=k.producer_batch_bytes,
        enable_idempotence=k.producer_idempotence,
        compression_type=k.producer_compression,
        request_timeout_ms=k.request_timeout_ms,
        max_block_ms=k.producer_max_block_ms,
    )
    if "bootstrap_timeout_ms" in KafkaProducer.DEFAULT_CONFIG:  # kafka-python ≥ 3: bounded construction
        opts["bootstrap_timeout_ms"] = min(k.request_timeout_ms, k.producer_max_block_ms)
    return _with_passthrough(opts, k, KafkaProducer.DEFAULT_CONFIG)


def build_producer(k: KafkaSettings) -> KafkaProducer:
    """The output producer.  Outputs are at-least-once with stable keys; see docs/architecture.md."""
    return KafkaProducer(**producer_options(k))


def admin_options(k: KafkaSettings) -> dict[str, Any]:
    """Keyword arguments of the admin client."""
    opts = common_options(k)
    opts["request_timeout_ms"] = k.request_timeout_ms
    return _with_passthrough(opts, k, KafkaAdminClient.DEFAULT_CONFIG)


def build_admin(k: KafkaSettings) -> KafkaAdminClient:
    return KafkaAdminClient(**admin_options(k))


# kafka-python's records of why one connection or bootstrap attempt failed (its only record of it).
_CAUSE = re.compile(
    r"(?:Bootstrap connection to \S+ failed|Bootstrap attempt to \S+ failed|Connection failed): "
    r"(?:KafkaConnectionError: )?(?:Handshake failed: )?(.*?)(?: \(backoff [\d.]+ secs\))?$"
)


class _LastFailure(logging.Handler):
    """Keeps the cause of the last failed connection attempt kafka-python logged."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.cause: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        m = _CAUSE.search(record.getMessage())
        if m:
            self.cause = m.group(1)


def check_broker(k: KafkaSettings, timeout_s: float | None = None) -> None:
    """Connect to the bootstrap servers as the service will (TLS, SASL and all) within
    ``timeout_s`` (default ``k.startup_timeout_seconds``), or raise :class:`BrokerUnreachableError`
    whose message names the servers and the cause.  kafka-python's own retry lines are held back
    meanwhile (they would repeat the cause once per attempt)."""
    timeout_s = k.startup_timeout_seconds if timeout_s is None else timeout_s
    kafka_log = logging.getLogger("kafka")
    capture = _LastFailure()
    propagate, level = kafka_log.propagate, kafka_log.level
    kafka_log.addHandler(capture)
    kafka_log.propagate = kafka_log.isEnabledFor(logging.DEBUG)  # -v shows every attempt
    kafka_log.setLevel(min(kafka_log.getEffectiveLevel(), logging.WARNING))
    admin: KafkaAdminClient | None = None
    started = time.monotonic()
    try:
        opts = admin_options(k)
        timeout_ms = max(1, int(timeout_s * 1000))
        opts.update(bootstrap_timeout_ms=timeout_ms, request_timeout_ms=min(k.request_timeout_ms, timeout_ms))
        admin = KafkaAdminClient(**opts)
        admin.list_topics()
    except Exception as exc:
        cause = capture.cause or f"{type(exc).__name__}: {exc}"
        raise BrokerUnreachableError(
            f"cannot reach the Kafka broker(s) {k.bootstrap_servers} "
            f"({k.security_protocol}) within {time.monotonic() - started:.0f}s: {cause}"
        ) from None
    finally:
        if admin is not None:
            try:
                admin.close()
            except Exception:  # closing a half-open client must not hide the real outcome
                log.debug("closing the start-up admin client", exc_info=True)
        kafka_log.removeHandler(capture)
        kafka_log.propagate = propagate
        kafka_log.setLevel(level)


def ensure_topics(k: KafkaSettings, names: Sequence[str], partitions: int = 1) -> list[str]:
    """Create the output topics that do not exist yet; returns the ones created.

    Best effort: a broker that forbids topic creation (or is down) leaves the decision to the
    operator, and producing will tell.
    """
    try:
        admin = build_admin(k)
    except Exception as exc:
        log.warning("cannot reach the broker to check output topics: %s", exc)
        return []
    try:
        existing = set(admin.list_topics())
        missing = [n for n in dict.fromkeys(names) if n and n not in existing]
        if missing:
            admin.create_topics(
                [NewTopic(n, num_partitions=partitions, replication_factor=-1) for n in missing]
            )
        return missing
    except Exception as exc:
        log.warning("could not create output topics %s: %s", list(names), exc)
        return []
    finally:
        admin.close()


# -- output records -------------------------------------------------------------------------
@dataclass(frozen=True)
class OutputRecord:
    """One message the service produces (dead letter, quarantine/accepted copy, decision)."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers


def encode_key(text: str) -> bytes:
    """UTF-8 bytes of an event id; :class:`OutputError` if it holds a lone surrogate."""
    try:
        return text.encode()
    except UnicodeEncodeError as exc:
        raise OutputError(f"the event id cannot be encoded as UTF-8: {exc}") from exc


def record_size(key: bytes | None, value: bytes | None, headers: Headers) -> int:
    """Bytes the record takes in a batch, as the producer counts it against ``max_request_size``
    (record format v2, every broker since Kafka 0.11)."""
    return int(DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers))


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
    # Cheap bound first (batch header 61 B, record framing ≤ 36 B, ≤ 10 B per header): the hot
    # path never pays for the exact estimate.
    payload = len(rec.key or b"") + len(rec.value or b"") + sum(len(n) * 4 + len(v) for n, v in rec.headers)
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
def _keep(original: Sequence[tuple[str, bytes]] | None) -> Headers:
    return [(n, v) for n, v in (original or ()) if n not in OWN_HEADERS]


def _num(x: float | None) -> bytes:
    return b"nan" if x is None or (isinstance(x, float) and math.isnan(x)) else repr(float(x)).encode()


def source_headers(topic: str, partition: int, offset: int) -> Headers:
    return [
        ("source_topic", topic.encode()),
        ("source_partition", str(partition).encode()),
        ("source_offset", str(offset).encode()),
    ]


def dead_letter_headers(
    original: Sequence[tuple[str, bytes]] | None,
    reason: str,
    detail: str,
    topic: str,
    partition: int,
    offset: int,
) -> Headers:
    return [
        *_keep(original),
        ("reason", reason.encode()),
        ("detail", detail.encode("utf-8", "replace")),
        *source_headers(topic, partition, offset),
    ]


def quarantine_headers(
    original: Sequence[tuple[str, bytes]] | None,
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
    return [
        *_keep(original),
        *source_headers(topic, partition, offset),
        ("reason", reason.encode()),
        ("influence", _num(influence)),
        ("relative_influence", _num(relative_influence)),
        ("cosine_influence", _num(cosine_influence)),
        ("threshold", _num(threshold)),
        ("policy_version", str(policy_version).encode()),
        ("model_version", str(model_version).encode()),
    ]


def header_dict(headers: Sequence[tuple[str, bytes]] | None) -> dict[str, str]:
    """Last value of every header, decoded (for tests, requeue and humans)."""
    return {n: (v or b"").decode("utf-8", "replace") for n, v in (headers or ())}


def decision_value(record: dict[str, Any], topic: str, partition: int, offset: int) -> bytes:
    """The decisions-topic value of ``record`` (a :class:`DecisionRecord` as a JSON object)."""
    return DecisionRecord.from_dict(record).with_source(topic, partition, offset).to_json().encode()


# -- reference topic ------------------------------------------------------------------------
class ReferenceReader:
    """Reads every partition of the reference topic outside the consumer group.

    Starts at the offsets a checkpoint recorded (so a restart does not add the same trusted
    events to the buffer twice) or at the beginning.
    """

    def __init__(self, k: KafkaSettings, topic: str, offsets: dict[int, int] | None = None) -> None:
        self.topic = topic
        self.consumer = build_consumer(k, group=False)
        self.offsets: dict[int, int] = dict(offsets or {})
        self._assigned: set[int] = set()
        self._past_end = PastEnd()
        self._max_records = k.max_poll_records

    def _assign(self) -> bool:
        parts = self.consumer.partitions_for_topic(self.topic)
        if not parts:
            return False
        if set(parts) == self._assigned:
            return True
        tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
        self.consumer.assign(tps)
        for tp in tps:
            if tp.partition in self.offsets:
                self.consumer.seek(tp, self.offsets[tp.partition])
            else:
                self.consumer.seek_to_beginning(tp)
        self._assigned = set(parts)
        return True

    def rewind(self, offsets: dict[int, int]) -> None:
        """Continue from ``offsets`` (a restored checkpoint's); partitions it lacks restart at 0."""
        self.offsets = dict(offsets)
        for p in self._assigned:
            tp = TopicPartition(self.topic, p)
            if p in self.offsets:
                self.consumer.seek(tp, self.offsets[p])
            else:
                self.consumer.seek_to_beginning(tp)

    def poll(self, timeout_ms: int = 0) -> list[bytes | None]:
        """New reference messages (values), advancing :attr:`offsets`."""
        if not self._assign():
            return []
        out: list[bytes | None] = []
        polled = self.consumer.poll(timeout_ms=timeout_ms, max_records=self._max_records)
        for tp, msgs in polled.items():
            out.extend(m.value for m in msgs)
            self.offsets[tp.partition] = msgs[-1].offset + 1
        return out

    def check_recreated(self) -> list[int]:
        """Re-read from the beginning every partition whose position has been past its high
        watermark at two checks in a row: the topic was deleted and re-created (or truncated).
        Apache Kafka answers OFFSET_OUT_OF_RANGE there; not every broker does.  Returns them."""
        reset: list[int] = []
        for p in sorted(self._assigned):
            tp = TopicPartition(self.topic, p)
            wm = watermarks(self.consumer, tp)
            if wm is not None and self._past_end.check(p, *wm):
                log.warning(
                    "reference topic %s-%d: position %d is past the end (%d): topic re-created or "
                    "truncated; reading it again from the beginning",
                    self.topic,
                    p,
                    *wm,
                )
                self.consumer.seek_to_beginning(tp)
                self.offsets[p] = 0
                reset.append(p)
        return reset

    def caught_up(self) -> bool:
        if not self._assigned:
            return False
        for p in self._assigned:
            hw = self.consumer.highwater(TopicPartition(self.topic, p))
            if hw is None or self.offsets.get(p, 0) < hw:
                return False
        return True

    def read_backlog(self, timeout_s: float) -> list[bytes | None]:
        """Everything up to the current end of the topic (bounded by ``timeout_s``)."""
        out: list[bytes | None] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            out.extend(self.poll(timeout_ms=200))
            if self.caught_up():
                return out
        log.warning(
            "reference topic %s: backlog not fully read after %.0fs (%d events so far)",
            self.topic,
            timeout_s,
            len(out),
        )
        return out

    def close(self) -> None:
        self.consumer.close()


# -- lag and health -----------------------------------------------------------------------
def watermarks(consumer: KafkaConsumer, tp: TopicPartition) -> tuple[int, int] | None:
    """``(position, high watermark)`` of ``tp`` without blocking, or None while either is unknown.

    Lag is ``high watermark − position``: ``end_offsets`` is not reliable on every broker."""
    hw = consumer.highwater(tp)
    if hw is None:
        return None
    try:
        pos = consumer.position(tp, timeout_ms=0)
    except Exception:
        return None
    return None if pos is None else (pos, hw)


class PastEnd:
    """Notices a partition whose position stays past its high watermark: the topic was deleted
    and re-created (or truncated).  Apache Kafka answers OFFSET_OUT_OF_RANGE there; not every
    broker does.  Two checks in a row, so a watermark that lags one fetch is not mistaken."""

    def __init__(self) -> None:
        self._count: dict[Any, int] = {}

    def check(self, key: Any, pos: int, hw: int) -> bool:
        """True when ``key`` must be reset (its count then starts again)."""
        if pos <= hw:
            self._count.pop(key, None)
            return False
        n = self._count.get(key, 0) + 1
        if n >= 2:
            self._count.pop(key, None)
            return True
        self._count[key] = n
        return False


def broker_reachable(consumer: KafkaConsumer) -> bool:
    """True when the client holds a live connection to at least one broker."""
    try:
        client = consumer._client  # no public API for this in kafka-python
        brokers = client.cluster.brokers()
        return any(client.connected(b.node_id) for b in brokers)
    except Exception:
        return True

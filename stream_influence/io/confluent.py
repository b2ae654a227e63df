"""The confluent-kafka (librdkafka) backend of :mod:`stream_influence.io.broker`.

Optional: ``confluent_kafka`` is imported lazily, so the package works without the ``[confluent]``
extra, and selecting ``kafka.client: confluent`` without it is a :class:`ConfigError` that names
the extra.  Every :class:`~stream_influence.config.KafkaSettings` field means the same as with
kafka-python; here it is spelled with librdkafka's property names.  Secrets are unwrapped only in
the property dicts built here.

**Threads.**  librdkafka runs its network I/O on its own threads, but it calls the application
back (rebalance, delivery reports, errors, statistics, log lines) only from inside ``poll`` /
``consume`` / ``flush`` on the calling thread — the service's loop thread.  The callbacks here only
record: a :class:`~stream_influence.io.broker.Rebalance`, a resolved
:class:`~stream_influence.io.broker.Delivery`, the last error, the brokers' states.

**Revocation.**  librdkafka gives revoked partitions up when the ``on_revoke`` callback returns
(confluent-kafka unassigns them right after it, still inside that ``consume``), so the revocation
cannot wait for the next poll as with kafka-python.  The callback records the event and then calls
the loop's ``hand_over`` (:meth:`~stream_influence.io.broker.BrokerConsumer.subscribe`), on this
same thread: the loop flushes, checkpoints and commits the revoked partitions while this member
still owns them, and only then does the group move on.  Revocation inside ``close()`` is only
recorded (the loop checkpointed and committed before closing).

**Assignment.**  ``on_assign`` records the partitions and hands librdkafka an empty assignment;
the next :meth:`ConfluentConsumer.poll` assigns them with the offsets the loop sought meanwhile.
A seek made while librdkafka still looks a partition's start offset up (committed, or the
beginning) is overridden by that answer, so starting each partition where the loop wants is the
only reliable way.  Eager rebalancing only: incremental protocols are refused in the settings.
librdkafka reports no position before a partition's first record; for one started at its
beginning (an empty topic read to its end) :meth:`ConfluentConsumer.position` answers the log start
offset the last fetch reported.  A seek that a newer operation on the partition overtook (a
rebalance pausing its fetcher) is answered ``_OUTDATED`` and made again, never raised
(docs/broker-notes.md).

**Broker quirks (Tansu, the test broker).**  A ListOffsets query for the latest offset
(``get_watermark_offsets`` without ``cached``, ``offsets_for_times``) answers 1 on Tansu, not the
end of the partition; :meth:`ConfluentConsumer.highwater` uses the high watermark of the last fetch
response (``cached=True``), which is right on Tansu and on Apache Kafka alike.  Deleting a topic
that a consumer is assigned crashes librdkafka 2.16.0 (confluent-kafka 2.16.1) on Tansu: SIGSEGV on
librdkafka's own thread (``rd_kafka_metadata_cache_find`` with a NULL topic name, from a KIP-951
leader update) after Tansu answers the fetch with UNKNOWN_TOPIC_OR_PARTITION and a zero topic id —
before any call of ours returns, so nothing here can step around it; the re-created reference
topic test is a strict xfail on this backend, and tests/fixtures/librdkafka_deleted_topic.py
reproduces it.  Everything else the service uses (produce with headers, idempotence, TLS, group
join and rebalance between two members, commit/committed, seek) behaves as on Apache Kafka.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import repeat
from operator import is_not, itemgetter
from types import ModuleType
from typing import Any

import orjson
from pydantic import SecretStr

from stream_influence.config import TLS_PROTOCOLS, KafkaSettings
from stream_influence.errors import BrokerUnreachableError, ConfigError
from stream_influence.io.broker import (
    BrokerTrouble,
    Delivery,
    OutputRecord,
    Queued,
    Rebalance,
    RebalanceKind,
    Record,
    RecordRefused,
    TopicPartition,
)

__all__ = [
    "ConfluentBroker",
    "ConfluentConsumer",
    "ConfluentProducer",
    "admin_config",
    "client_module",
    "common_config",
    "consumer_config",
    "producer_config",
]

log = logging.getLogger(__name__)
# librdkafka's own log lines, delivered through Python logging (and so through the secret filter
# and the rate limit of repeated client lines, observability/logs.py).
rdkafka_log = logging.getLogger("stream_influence.io.librdkafka")
# The start-up check's own lines: every failed connection attempt logs the cause again, which the
# check's one error names once; held back unless debug logging is on (as kafka-python's are).
check_log = rdkafka_log.getChild("check")
check_log.addHandler(logging.NullHandler())

#: Diagnostics switch: ``STREAM_INFLUENCE_RDKAFKA_DEBUG=consumer,cgrp,fetch,topic`` makes every
#: consumer log those librdkafka debug contexts to stderr (the service's log file in tests).
RDKAFKA_DEBUG_ENV = "STREAM_INFLUENCE_RDKAFKA_DEBUG"

EXTRA_HINT = "install the optional extra: pip install 'stream-influence[confluent]'"


def client_module() -> ModuleType:
    """``confluent_kafka``, or :class:`ConfigError` naming the extra that provides it."""
    try:
        import confluent_kafka
    except ImportError as exc:
        raise ConfigError(
            f"kafka.client is confluent but confluent-kafka is not installed ({exc}); {EXTRA_HINT}"
        ) from None
    return confluent_kafka


def common_config(k: KafkaSettings) -> dict[str, Any]:
    """Connection and security properties shared by consumers, producers and the admin client."""
    conf: dict[str, Any] = {
        "bootstrap.servers": ",".join(k.bootstrap_list()),
        "client.id": k.client_id,
        "security.protocol": k.security_protocol.lower(),
        "reconnect.backoff.max.ms": k.reconnect_backoff_max_ms,
        "socket.timeout.ms": k.request_timeout_ms,
    }
    if k.sasl_mechanism:
        conf["sasl.mechanism"] = k.sasl_mechanism
    if k.sasl_plain_username is not None:
        conf["sasl.username"] = k.sasl_plain_username
    if k.sasl_plain_password is not None:
        conf["sasl.password"] = k.sasl_plain_password.get_secret_value()
    if k.security_protocol in TLS_PROTOCOLS:
        # "probe": the wheel's bundled OpenSSL does not know the system's trust store path.
        conf["ssl.ca.location"] = str(k.ssl_cafile) if k.ssl_cafile is not None else "probe"
        conf["ssl.endpoint.identification.algorithm"] = "https" if k.ssl_check_hostname else "none"
        if k.ssl_certfile is not None:
            conf["ssl.certificate.location"] = str(k.ssl_certfile)
        if k.ssl_keyfile is not None:
            conf["ssl.key.location"] = str(k.ssl_keyfile)
        if k.ssl_password is not None:
            conf["ssl.key.password"] = k.ssl_password.get_secret_value()
    return conf


class _Lines:
    """librdkafka's ``logger``.  It hands every line over as ``log(level, "%s [%s] %s", facility,
    client, text)``; each is logged with its facility and client in the template instead, so the
    rate limit counts a retry storm of one kind (``FAIL`` of one client while the broker is down:
    ~20 lines a second) apart from every other line."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger

    def log(self, level: int, msg: str, *args: Any) -> None:
        if msg == "%s [%s] %s" and len(args) == 3:
            facility, client, text = args
            kind = f"{facility} [{client}]".replace("%", "%%")
            self.logger.log(level, f"{kind} %s", text)
        else:
            self.logger.log(level, msg, *args)


def _with_passthrough(conf: dict[str, Any], k: KafkaSettings) -> dict[str, Any]:
    # Every client gets every option: librdkafka ignores (and logs) a property of the other kind.
    conf.update(
        {key: v.get_secret_value() if isinstance(v, SecretStr) else v for key, v in k.client_options.items()}
    )
    conf["logger"] = _Lines(rdkafka_log)
    return conf


def consumer_config(k: KafkaSettings, *, group: bool = True) -> dict[str, Any]:
    """Properties of the training-events consumer (in the group, manual commits) or of a
    group-less reader (librdkafka requires a ``group.id`` even then; it never joins or commits)."""
    conf = common_config(k)
    conf.update(
        {
            "group.id": k.group_id if group else f"{k.group_id}.reader",
            "enable.auto.commit": False,
            # Positions move only through what the service hands back; nothing is stored behind it.
            "enable.auto.offset.store": False,
            "auto.offset.reset": k.auto_offset_reset,
            "session.timeout.ms": k.session_timeout_ms,
            "heartbeat.interval.ms": k.heartbeat_interval_ms,
            "max.poll.interval.ms": k.max_poll_interval_ms,
            "fetch.wait.max.ms": k.fetch_max_wait_ms,
        }
    )
    conf = _with_passthrough(conf, k)
    debug = os.environ.get(RDKAFKA_DEBUG_ENV)
    if debug:
        # Diagnostics only: librdkafka's own debug contexts, written by librdkafka straight to
        # stderr (no Python logger: the root level and the rate limit would hide or thin them).
        conf["debug"] = debug
        del conf["logger"]
    return conf


_ACKS = {0: "0", 1: "1", "all": "all"}


def producer_config(k: KafkaSettings) -> dict[str, Any]:
    """Properties of the output producer."""
    conf = common_config(k)
    conf.update(
        {
            "acks": _ACKS[k.producer_acks],
            "linger.ms": k.producer_linger_ms,
            "batch.size": k.producer_batch_bytes,
            "enable.idempotence": k.producer_idempotence,
            "compression.type": k.producer_compression or "none",
            "request.timeout.ms": k.request_timeout_ms,
            # The largest record: kafka-python's max_request_size default and Apache Kafka's
            # own limit (librdkafka's default is 1,000,000), so both backends cut outputs alike.
            "message.max.bytes": 1_048_576,
        }
    )
    return _with_passthrough(conf, k)


def admin_config(k: KafkaSettings) -> dict[str, Any]:
    """Properties of the admin client."""
    return _with_passthrough(common_config(k), k)


# -- clients --------------------------------------------------------------------------------
class _Errors:
    """Global client errors (``error_cb``): the last one, for messages that name the cause."""

    def __init__(self) -> None:
        self.last: str | None = None

    def __call__(self, err: Any) -> None:
        self.last = err.str()
        log.debug("librdkafka: %s", self.last)


def _kafka_exception(exc: BaseException) -> Any:
    """The ``KafkaError`` inside a confluent-kafka exception, or None."""
    args = getattr(exc, "args", ())
    return args[0] if args and hasattr(args[0], "code") else None


def _build(kind: str, conf: dict[str, Any]) -> Any:
    """``confluent_kafka.<kind>(conf)``; a property librdkafka refuses is a :class:`ConfigError`."""
    module = client_module()
    if kind == "AdminClient":
        from confluent_kafka.admin import AdminClient as cls
    else:
        cls = getattr(module, kind)
    try:
        return cls(conf)
    except module.KafkaException as exc:
        err = _kafka_exception(exc)
        if err is not None and err.code() == module.KafkaError._INVALID_ARG:
            raise ConfigError(
                f"kafka (client confluent): librdkafka refuses the configuration: {err.str()}"
            ) from None
        raise


def _one_partition(msgs: list[Any], message: Any) -> list[Record] | None:
    """The records of a ``consume()`` batch in the usual case — every message from one partition,
    none an error, none with headers, each with a timestamp — else None (the caller's loop then
    takes each message on its own).  Each field is read for the whole batch by ``map`` over
    ``confluent_kafka.Message``'s getters (``message``) and the records are built from those
    columns in C, without a bytecode step per message.
    """
    n = len(msgs)
    topics = list(map(message.topic, msgs))
    parts = list(map(message.partition, msgs))
    if topics.count(topics[0]) != n or parts.count(parts[0]) != n:
        return None
    # By identity: a KafkaError compared with None raises inside list.count().
    if any(map(is_not, map(message.error, msgs), repeat(None, n))):
        return None
    if list(map(message.headers, msgs)).count(None) != n:
        return None
    stamps = list(map(message.timestamp, msgs))  # (type, ms); type 0: the broker reported none
    if 0 in map(_FIRST, stamps):
        return None
    columns = zip(
        repeat(topics[0], n),
        repeat(parts[0], n),
        map(message.offset, msgs),
        map(message.key, msgs),
        map(message.value, msgs),
        repeat((), n),
        map(_SECOND, stamps),
        strict=True,
    )
    return list(map(tuple.__new__, repeat(Record, n), columns))


_FIRST, _SECOND = itemgetter(0), itemgetter(1)
_SEEK_TRIES = 3  # seeks of one partition in a row that librdkafka may answer _OUTDATED


class ConfluentConsumer:
    """:class:`~stream_influence.io.broker.BrokerConsumer` on a ``confluent_kafka.Consumer``."""

    def __init__(self, k: KafkaSettings, *, group: bool = True) -> None:
        self._ck = client_module()
        conf = consumer_config(k, group=group)
        self.errors = _Errors()
        conf["error_cb"] = self.errors
        # Broker states for reachable(): librdkafka publishes them only in its statistics.
        conf.setdefault("statistics.interval.ms", 1000)
        conf["stats_cb"] = self._on_stats
        self._c = _build("Consumer", conf)
        self._events: list[Rebalance] = []
        self._revoked = False  # a revocation was recorded during the current consume()
        self._positions: dict[TopicPartition, int] = {}  # next offset poll() returns, where known
        # Partitions handed to librdkafka at the next poll(), with their start offsets (see
        # _take_assignment); OFFSET_INVALID: the committed offset, else auto_offset_reset.
        self._pending: dict[TopicPartition, int] = {}
        # Partitions librdkafka was told to start at their beginning: until a record comes, their
        # position is the log start offset (librdkafka reports none before the first record).
        self._from_start: set[TopicPartition] = set()
        self._metadata: dict[str, tuple[float, set[int] | None]] = {}  # topic → (when, partitions)
        self._brokers_up: bool | None = None
        self._hand_over: Callable[[], None] | None = None
        self._closing = False
        # Partitions the loop paused: librdkafka has no query for it, and its pause outlives an
        # unassign (see pause()).
        self._paused: set[TopicPartition] = set()

    # Callbacks: run inside consume() on the calling thread; they only record.
    def _record(self, kind: RebalanceKind, parts: Sequence[Any]) -> None:
        tps = frozenset(TopicPartition(p.topic, p.partition) for p in parts)
        self._events.append(Rebalance(kind, tps))
        for tp in tps:
            self._positions.pop(tp, None)
            self._pending.pop(tp, None)
            self._from_start.discard(tp)
            self._paused.discard(tp)  # a rebalance clears the loop's pauses (resumed on assignment)
        if kind is not RebalanceKind.ASSIGNED:
            self._revoked = True

    def _on_assign(self, consumer: Any, parts: Sequence[Any]) -> None:
        self._record(RebalanceKind.ASSIGNED, parts)
        ck = self._ck
        for p in parts:
            self._pending[TopicPartition(p.topic, p.partition)] = ck.OFFSET_INVALID
        # Taken over at the next poll(), after the loop has sought them: librdkafka would start
        # fetching at the committed offset now, and that lookup overrides a seek made before it
        # answers.  (Eager protocol: the whole assignment arrives here, nothing else is kept.)
        consumer.assign([])

    def _on_revoke(self, _c: Any, parts: Sequence[Any]) -> None:
        self._record(RebalanceKind.REVOKED, parts)
        if self._hand_over is not None and not self._closing:
            # Still their owner until this callback returns: the loop flushes, checkpoints and
            # commits them now, on this same thread (librdkafka calls back inside consume()).
            self._hand_over()

    def _on_lost(self, _c: Any, parts: Sequence[Any]) -> None:
        self._record(RebalanceKind.LOST, parts)

    def _on_stats(self, text: str) -> None:
        try:
            brokers = orjson.loads(text).get("brokers", {})
        except orjson.JSONDecodeError:
            return
        # nodeid -1: the bootstrap placeholders, not real brokers of the cluster.
        states = [b.get("state") for b in brokers.values() if b.get("nodeid", -1) >= 0]
        self._brokers_up = any(s == "UP" for s in states) if states else None

    # BrokerConsumer
    def subscribe(self, topics: Sequence[str], hand_over: Callable[[], None] | None = None) -> None:
        self._hand_over = hand_over
        self._c.subscribe(
            list(topics), on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )

    def rebalances(self) -> list[Rebalance]:
        events, self._events = self._events, []
        return events

    def assign(self, partitions: Sequence[TopicPartition]) -> None:
        self._c.assign([])
        self._positions.clear()
        self._from_start.clear()
        self._paused.clear()  # resumed when handed to librdkafka (_take_assignment)
        self._pending = dict.fromkeys(partitions, self._ck.OFFSET_BEGINNING)

    def _take_assignment(self) -> None:
        """Hand librdkafka the pending partitions with the start offsets chosen meanwhile; the
        partitions it fetches already keep their positions."""
        ck = self._ck
        parts = []
        for p in self._c.assignment():
            tp = TopicPartition(p.topic, p.partition)
            if tp not in self._pending:
                parts.append(
                    ck.TopicPartition(tp.topic, tp.partition, self._positions.get(tp, ck.OFFSET_INVALID))
                )
        parts.extend(ck.TopicPartition(tp.topic, tp.partition, off) for tp, off in self._pending.items())
        for tp, off in self._pending.items():
            if off == ck.OFFSET_BEGINNING:
                self._from_start.add(tp)
            else:
                self._from_start.discard(tp)
        fresh = [ck.TopicPartition(tp.topic, tp.partition) for tp in self._pending if tp not in self._paused]
        self._pending = {}
        self._c.assign(parts)
        if fresh:
            # librdkafka keeps a partition's pause across unassign and assign (measured, 2.16):
            # a partition this member paused before a rebalance would come back paused.
            self._c.resume(fresh)

    def partitions_for(self, topic: str) -> set[int] | None:
        # A blocking metadata request in librdkafka (~0.2 s measured; kafka-python answers from
        # its cache), and callers ask on every poll: a known answer is kept 5 minutes (kafka-python's
        # metadata max age), an unknown topic asked again at most once a second.
        now = time.monotonic()
        cached = self._metadata.get(topic)
        if cached is not None and now - cached[0] < (300.0 if cached[1] else 1.0):
            return cached[1]
        try:
            md = self._c.list_topics(topic, timeout=5)
        except self._ck.KafkaException:
            return None
        t = md.topics.get(topic)
        parts = None if t is None or t.error is not None or not t.partitions else set(t.partitions)
        self._metadata[topic] = (now, parts)
        return parts

    def poll(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Record]]:
        self._revoked = False
        if self._pending:
            self._take_assignment()
        deadline = time.monotonic() + timeout_ms / 1000
        out: dict[TopicPartition, list[Record]] = {}
        while True:
            # Short slices: a revocation recorded in one slice goes to the loop at once.
            left = max(0.0, deadline - time.monotonic())
            msgs = self._c.consume(max_records, min(left, 0.1))
            if msgs:
                break
            if self._revoked or left <= 0:
                return out
        positions = self._positions
        one = _one_partition(msgs, self._ck.Message)
        if one is not None:
            tp = TopicPartition(one[0].topic, one[0].partition)
            out[tp] = one
            positions[tp] = one[-1].offset + 1
            return out
        # One Record per event, built without a Python-level __new__ frame, grouped under plain
        # (topic, partition) tuples (equal to, and hashed like, TopicPartition).
        make = tuple.__new__
        by_tp: dict[tuple[str, int], list[Record]] = {}
        for m in msgs:
            if m.error() is not None:
                self._message_error(m)
                continue
            key = (m.topic(), m.partition())
            batch = by_tp.get(key)
            if batch is None:
                batch = by_tp[key] = []
            kind, ts = m.timestamp()
            batch.append(
                make(
                    Record,
                    (key[0], key[1], m.offset(), m.key(), m.value(), m.headers() or (), ts if kind else None),
                )
            )
        for key, batch in by_tp.items():
            tp = TopicPartition(*key)
            out[tp] = batch
            positions[tp] = batch[-1].offset + 1
        return out

    def _message_error(self, m: Any) -> None:
        err = m.error()
        if err.code() == self._ck.KafkaError._PARTITION_EOF:
            return
        log.warning("consumer: %s-%s: %s", m.topic(), m.partition(), err.str())

    def pause(self, partitions: Iterable[TopicPartition]) -> None:
        # Records librdkafka prefetched for them are dropped; resume() fetches from the position
        # (the offset after the last record poll() returned, or the last seek's).
        ck = self._ck
        owned = self._owned()
        tps = [tp for tp in partitions if tp in owned and tp not in self._paused]
        if tps:
            self._c.pause([ck.TopicPartition(tp.topic, tp.partition) for tp in tps])
            self._paused.update(tps)

    def resume(self, partitions: Iterable[TopicPartition]) -> None:
        ck = self._ck
        tps = [tp for tp in partitions if tp in self._paused]
        if tps:
            self._paused.difference_update(tps)
            self._c.resume([ck.TopicPartition(tp.topic, tp.partition) for tp in tps])

    def paused(self) -> frozenset[TopicPartition]:
        return frozenset(self._paused)

    def _owned(self) -> set[TopicPartition]:
        """This consumer's partitions: librdkafka's assignment and those handed over at the next poll."""
        return {TopicPartition(p.topic, p.partition) for p in self._c.assignment()} | set(self._pending)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self._seek(tp, offset)
        self._positions[tp] = offset

    def seek_to_beginning(self, tp: TopicPartition) -> None:
        self._seek(tp, self._ck.OFFSET_BEGINNING)
        self._positions.pop(tp, None)

    def _seek(self, tp: TopicPartition, offset: int) -> None:
        if tp in self._pending:  # not handed to librdkafka yet: it starts there
            self._pending[tp] = offset
            return
        ck = self._ck
        for _ in range(_SEEK_TRIES):
            try:
                self._c.seek(ck.TopicPartition(tp.topic, tp.partition, offset))
            except ck.KafkaException as exc:
                err = _kafka_exception(exc)
                code = None if err is None else err.code()
                if code == ck.KafkaError._OUTDATED:
                    # librdkafka served a newer operation on the partition before this seek
                    # (a rebalance pausing its fetcher) and dropped the seek: seek again, the
                    # newest operation now.  Raised, this crashed a score worker mid-rebalance
                    # (docs/broker-notes.md, "A seek that races a rebalance").
                    log.info("%s-%d: seek to %d outdated by a rebalance; seeking again", *tp, offset)
                    continue
                if code != ck.KafkaError._STATE:
                    raise
                # Its fetcher is not started yet: start it there at the next poll() instead.
                self._pending[tp] = offset
                return
            if offset == ck.OFFSET_BEGINNING:
                self._from_start.add(tp)
            else:
                self._from_start.discard(tp)
            return
        # Outdated every time: the partition is being handed over.  Start it there at the next
        # poll() if it is still ours (a revocation drops it from _pending first).
        log.warning(
            "%s-%d: seek to %d outdated %d times; deferred to the next poll", *tp, offset, _SEEK_TRIES
        )
        self._pending[tp] = offset

    def position(self, tp: TopicPartition) -> int | None:
        pos = self._positions.get(tp)
        if pos is not None:
            return pos
        ck = self._ck
        try:
            (p,) = self._c.position([ck.TopicPartition(tp.topic, tp.partition)])
        except ck.KafkaException:
            return None
        if p.offset >= 0:
            return p.offset
        if tp in self._from_start:
            # Started at the beginning and nothing consumed yet (an empty partition, or records
            # still on their way): the log start offset, once a fetch has reported it.
            return self._watermarks(tp)[0]
        # Nothing consumed yet and no seek: the committed offset, else where auto_offset_reset
        # would start; unknown until librdkafka has fetched (lag is then simply not reported).
        return None

    def _watermarks(self, tp: TopicPartition) -> tuple[int | None, int | None]:
        """(log start, high watermark) as the last fetch response reported them."""
        ck = self._ck
        try:
            low, high = self._c.get_watermark_offsets(ck.TopicPartition(tp.topic, tp.partition), cached=True)
        except ck.KafkaException:
            return None, None
        return (low if low >= 0 else None), (high if high >= 0 else None)

    def highwater(self, tp: TopicPartition) -> int | None:
        return self._watermarks(tp)[1]

    def committed(self, tps: Sequence[TopicPartition], timeout_ms: int) -> dict[TopicPartition, int | None]:
        ck = self._ck
        if not tps:
            return {}
        try:
            got = self._c.committed(
                [ck.TopicPartition(tp.topic, tp.partition) for tp in tps], timeout=timeout_ms / 1000
            )
        except ck.KafkaException as exc:
            log.warning("cannot read committed offsets of %s: %s", list(tps), exc)
            return dict.fromkeys(tps)
        return {
            TopicPartition(p.topic, p.partition): (p.offset if p.error is None and p.offset >= 0 else None)
            for p in got
        }

    def commit(self, offsets: Mapping[TopicPartition, int], timeout_ms: int) -> None:
        # librdkafka has no timeout for a synchronous commit: it is bounded by socket.timeout.ms.
        ck = self._ck
        if not offsets:
            return
        parts = [ck.TopicPartition(tp.topic, tp.partition, off) for tp, off in offsets.items()]
        result = self._c.commit(offsets=parts, asynchronous=False)
        failed = [f"{p.topic}-{p.partition}: {p.error}" for p in result or () if p.error is not None]
        if failed:
            raise ck.KafkaException(f"commit refused for {', '.join(failed)}")

    def reachable(self) -> bool:
        return self._brokers_up is not False

    def close(self, timeout_ms: int) -> None:
        # close() leaves the group; its revocation is only recorded (the loop checkpointed and
        # committed before closing) and nothing is committed here: enable.auto.commit is off.
        self._closing = True
        self._c.close()


def _headers(record: OutputRecord) -> list[tuple[str, bytes]] | None:
    """A record's headers as librdkafka takes them: a list (None: no headers)."""
    h = record.headers
    return h if type(h) is list else (list(h) or None)


class _Report(Delivery):
    """A :class:`Delivery` that is its own ``on_delivery`` callback (no closure per record);
    librdkafka calls it inside ``poll``/``flush``, on the loop thread."""

    __slots__ = ("producer",)
    producer: ConfluentProducer

    def __call__(self, err: Any, _msg: Any) -> None:
        if err is None:
            self.done = True  # error and transient already say delivered (Delivery.__init__)
        else:
            p = self.producer
            self.resolve(
                p._ck.KafkaException(err), transient=err.retriable() or err.code() in p._transient_codes
            )


class ConfluentProducer:
    """:class:`~stream_influence.io.broker.BrokerProducer` on a ``confluent_kafka.Producer``."""

    def __init__(self, k: KafkaSettings) -> None:
        self._ck = client_module()
        conf = producer_config(k)
        self.errors = _Errors()
        conf["error_cb"] = self.errors
        self._p = _build("Producer", conf)
        self._max_block_s = k.producer_max_block_ms / 1000
        self._max_bytes = int(conf.get("message.max.bytes", 1_000_000))
        self._unserved = 0
        err = self._ck.KafkaError
        # Delivery errors that are broker trouble (the window is retried), not this record's fault.
        self._transient_codes = {
            err._MSG_TIMED_OUT,
            err._TIMED_OUT,
            err._TRANSPORT,
            err._ALL_BROKERS_DOWN,
            err._PURGE_QUEUE,
            err._PURGE_INFLIGHT,
            err.REQUEST_TIMED_OUT,
            err.UNKNOWN_TOPIC_OR_PART,
            err.NOT_ENOUGH_REPLICAS,
            err.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
        }

    @property
    def max_request_size(self) -> int:
        return self._max_bytes

    def produce(self, record: OutputRecord) -> Delivery:
        delivery = _Report(record)
        delivery.producer = self
        deadline: float | None = None
        while True:
            try:
                self._p.produce(
                    record.topic, record.value, record.key, on_delivery=delivery, headers=_headers(record)
                )
                break
            except BufferError:
                # The local queue is full: serve delivery reports until it drains, up to max_block.
                now = time.monotonic()
                deadline = deadline or now + self._max_block_s
                if now >= deadline:
                    raise BrokerTrouble(
                        f"the producer's queue stayed full for {self._max_block_s:.1f}s"
                    ) from None
                self._p.poll(0.05)
            except self._ck.KafkaException as exc:
                err = _kafka_exception(exc)
                if err is not None and (err.retriable() or err.code() in self._transient_codes):
                    raise BrokerTrouble(f"cannot queue an output to {record.topic}: {err.str()}") from None
                raise RecordRefused(f"{record.topic}: {err.str() if err is not None else exc}") from None
            except (TypeError, ValueError) as exc:  # a header or key that is not bytes/str
                raise RecordRefused(f"{record.topic}: {type(exc).__name__}: {exc}") from None
        self._served()
        return delivery

    def _served(self, n: int = 1) -> None:
        self._unserved += n
        if self._unserved >= 1000:  # serve delivery reports now and then, not per record
            self._unserved = 0
            self._p.poll(0)

    def produce_many(self, records: Sequence[OutputRecord]) -> Queued:
        """One librdkafka ``produce`` per record (it queues in C), called here directly with its
        arguments positional (partition -1: the partitioner's choice, callback None, timestamp 0:
        now — librdkafka's defaults, so the same records as the keyword call; checked by
        tests/test_emitter_bytes.py); a record it does not take at once (a full queue, an error,
        a bad header) goes through :meth:`produce`, which waits, classifies and raises as for a
        single record."""
        produce, queued = self._p.produce, 0
        deliveries: list[Delivery] = []
        append = deliveries.append
        for record in records:
            delivery = _Report(record)
            delivery.producer = self
            try:
                produce(record.topic, record.value, record.key, -1, delivery, None, 0, _headers(record))
            except Exception:  # nothing was queued: the single-record path answers it
                self._served(queued)
                queued = 0
                try:
                    append(self.produce(record))
                except RecordRefused as exc:
                    return Queued(deliveries, exc)
                continue
            append(delivery)
            queued += 1
        self._served(queued)
        return Queued(deliveries, None)

    def flush(self, timeout_s: float) -> None:
        left = self._p.flush(timeout_s)
        self._unserved = 0
        if left:
            cause = f" (last client error: {self.errors.last})" if self.errors.last else ""
            raise BrokerTrouble(f"{left} output(s) not acknowledged within {timeout_s:.1f}s{cause}")

    def close(self, timeout_s: float) -> None:
        if self._p.flush(timeout_s):
            # Whatever is still queued is abandoned: its deliveries resolve as purged (transient).
            self._p.purge()
            self._p.flush(0)


class ConfluentBroker:
    """:class:`~stream_influence.io.broker.Broker` on confluent-kafka."""

    def __init__(self, k: KafkaSettings) -> None:
        client_module()  # a missing extra is a ConfigError now, not at the first client
        self.k = k

    def _admin(
        self, timeout_s: float | None = None, logger: logging.Logger | None = None
    ) -> tuple[Any, _Errors]:
        conf = admin_config(self.k)
        errors = _Errors()
        conf["error_cb"] = errors
        if logger is not None:
            conf["logger"] = _Lines(logger)
        if timeout_s is not None:
            conf["socket.timeout.ms"] = max(10, int(timeout_s * 1000))
        return _build("AdminClient", conf), errors

    def check(self, timeout_s: float | None = None) -> None:
        timeout_s = self.k.startup_timeout_seconds if timeout_s is None else timeout_s
        started = time.monotonic()
        check_log.propagate = rdkafka_log.isEnabledFor(logging.DEBUG)  # -v shows every attempt
        admin, errors = self._admin(timeout_s, check_log)
        try:
            admin.list_topics(timeout=timeout_s)
        except Exception as exc:
            admin.poll(0.1)  # serve the error callbacks: they name the cause (TLS, refused, …)
            cause = errors.last or f"{type(exc).__name__}: {exc}"
            raise BrokerUnreachableError(
                f"cannot reach the Kafka broker(s) {self.k.bootstrap_servers} "
                f"({self.k.security_protocol}) within {time.monotonic() - started:.0f}s: {cause}"
            ) from None

    def ensure_topics(self, names: Sequence[str], partitions: int = 1) -> list[str]:
        ck = client_module()
        from confluent_kafka.admin import NewTopic

        try:
            admin, _ = self._admin()
            existing = set(admin.list_topics(timeout=self.k.request_timeout_ms / 1000).topics)
        except Exception as exc:
            log.warning("cannot reach the broker to check output topics: %s", exc)
            return []
        missing = [n for n in dict.fromkeys(names) if n and n not in existing]
        if not missing:
            return []
        futures = admin.create_topics(
            [NewTopic(n, num_partitions=partitions, replication_factor=-1) for n in missing],
            request_timeout=self.k.request_timeout_ms / 1000,
        )
        created = []
        for name, future in futures.items():
            try:
                future.result()
                created.append(name)
            except ck.KafkaException as exc:
                err = _kafka_exception(exc)
                if err is None or err.code() != ck.KafkaError.TOPIC_ALREADY_EXISTS:
                    log.warning("could not create output topic %s: %s", name, exc)
        return created

    def consumer(self, *, group: bool = True) -> ConfluentConsumer:
        return ConfluentConsumer(self.k, group=group)

    def producer(self) -> ConfluentProducer:
        return ConfluentProducer(self.k)

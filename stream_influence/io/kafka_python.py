"""The kafka-python backend of :mod:`stream_influence.io.broker` (the default).

The only module of the package that imports kafka-python.  Security settings (SASL/SSL) and
``client_options`` from :class:`~stream_influence.config.KafkaSettings` reach every client
unchanged; secrets stay :class:`~pydantic.SecretStr` everywhere else and are unwrapped only in the
option dicts built here.

**Revocation with kafka-python 3.0.12.**  Its rebalance listener runs on the client's I/O thread
while the loop thread is parked inside ``consumer.poll`` (the group join runs there), so the loop
cannot act while the listener runs, and the listener must not act for it.  Eager rebalance, step
by step (see also docs/architecture.md):

1. the loop calls :meth:`KafkaPythonConsumer.poll`; kafka-python learns of the rebalance and, before
   sending JoinGroup, calls ``on_partitions_revoked`` on its I/O thread;
2. the listener records ``revoked`` and raises :class:`_HandOver`: kafka-python aborts the join
   *before* giving the partitions up (the member stays in the group, heartbeats go on, the group
   waits up to ``max_poll_interval_ms`` for it) and ``poll`` returns no records;
3. the loop drains :meth:`~KafkaPythonConsumer.rebalances` (which marks the revocation as handed
   over), flushes, checkpoints and commits the revoked partitions — still their owner, in the
   current generation;
4. the loop polls again: kafka-python calls ``on_partitions_revoked`` again with the same partitions,
   the listener sees them handed over and returns, and the join completes; ``on_partitions_assigned``
   records the new assignment, which the loop seeks after that poll.

``on_partitions_lost`` (evicted) and the revocation inside ``close()`` are recorded only.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka import TopicPartition as _KafkaTP
from kafka.admin import NewTopic
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.errors import IllegalStateError, KafkaError, KafkaTimeoutError, MessageSizeTooLargeError
from kafka.structs import OffsetAndMetadata
from kafka.version import __version__ as kafka_version
from pydantic import SecretStr

from stream_influence.config import KafkaSettings
from stream_influence.errors import BrokerUnreachableError
from stream_influence.io.broker import (
    BrokerTrouble,
    ConsumedRecord,
    Delivery,
    OutputRecord,
    Queued,
    Rebalance,
    RebalanceKind,
    RecordRefused,
    TopicPartition,
)
from stream_influence.io.record_batches import Fetched, read_batches
from stream_influence.io.records import RECORD_FRAMING

__all__ = [
    "KafkaPythonBroker",
    "KafkaPythonConsumer",
    "KafkaPythonProducer",
    "admin_options",
    "build_admin",
    "build_consumer",
    "build_producer",
    "check_broker",
    "common_options",
    "consumer_options",
    "ensure_topics",
    "producer_options",
]

log = logging.getLogger(__name__)

try:  # kafka-python internals, for _Appender only (another release may lay them out differently)
    from kafka.producer.producer_batch import ProducerBatch
    from kafka.record.memory_records import MemoryRecordsBuilder
except ImportError:  # pragma: no cover - depends on the installed release
    kafka_version = "unknown"

try:  # kafka-python internals, for _PlainRecords only
    from kafka.consumer.fetcher import Fetcher
    from kafka.protocol.consumer import IsolationLevel
    from kafka.record.util import calc_crc32c

    _PartitionRecords: Any = Fetcher.PartitionRecords
except (ImportError, AttributeError):  # pragma: no cover - depends on the installed release
    Fetcher = None  # type: ignore[assignment,misc]
    _PartitionRecords = object


# -- client options -------------------------------------------------------------------------
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
        fetch_max_wait_ms=k.fetch_max_wait_ms,
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


# -- start-up check and topics --------------------------------------------------------------
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
    """Create the topics that do not exist yet; returns the ones created.

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


# -- consumer -------------------------------------------------------------------------------
class _HandOver(Exception):
    """Raised by the revocation listener to stop kafka-python's join until the loop has acted."""


class _HideHandOver(logging.Filter):
    """kafka-python logs a listener exception with its traceback; a hand-over is not an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, _HandOver)


_HIDE = _HideHandOver()
logging.getLogger("kafka.coordinator.consumer").addFilter(_HIDE)


def _tps(partitions: Iterable[Any]) -> frozenset[TopicPartition]:
    return frozenset(TopicPartition(tp.topic, tp.partition) for tp in partitions)


class _Listener(AsyncConsumerRebalanceListener):
    """Runs on kafka-python's I/O thread: records, never acts (see the module docstring)."""

    def __init__(self, owner: KafkaPythonConsumer) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: Any) -> None:
        parts = _tps(revoked)
        owner = self.owner
        if not parts:
            return
        if owner._handed_over is not None and parts <= owner._handed_over:
            owner._handed_over = None  # the loop acted on it: let the join go on
            return
        owner._record(Rebalance(RebalanceKind.REVOKED, parts))
        if not owner._closing:
            raise _HandOver

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.owner._handed_over = None
        self.owner._record(Rebalance(RebalanceKind.ASSIGNED, _tps(assigned)))

    async def on_partitions_lost(self, lost: Any) -> None:
        self.owner._handed_over = None
        parts = _tps(lost)
        if parts:
            self.owner._record(Rebalance(RebalanceKind.LOST, parts))


#: kafka-python releases whose fetcher internals :class:`_PlainRecords` was written against and is
#: tested with (tests/test_fetch_path.py): any other release parses fetches its own way.
FETCH_VERSIONS = frozenset({"3.0.12"})


class _PlainRecords(_PartitionRecords):  # type: ignore[misc,valid-type]
    """kafka-python's ``Fetcher.PartitionRecords`` (one partition's records of one completed fetch,
    handed out by ``take``) with the records read by :func:`~stream_influence.io.record_batches.read_batches`
    — one loop over the fetch's bytes, one :class:`~stream_influence.io.broker.Record`
    per record — where that reproduces the client's own iterator.

    What it reproduces of kafka-python 3.0.12's ``PartitionRecords`` over uncompressed v2 batches:
    the records' topic, partition, offset, key, value, headers (a list of ``(str, bytes | None)``)
    and timestamp; the records below the fetch offset left out; ``take(n)``'s
    ``next_fetch_offset`` (the record after the last one taken, and the end of the last batch once
    ``take`` asked for more than was left — when the client's iterator finishes and drains),
    ``leader_epoch``, ``records_read`` and ``bytes_read`` (the consumer's fetch metrics) and the
    drain.  Not the attributes only kafka-python's ``ConsumerRecord`` has (``timestamp_type``,
    ``checksum``, serialized sizes, ``leader_epoch``), which :class:`ConsumedRecord` does not name.

    The client's own iterator (built by ``__init__`` as always, left unstarted) reads everything
    else, so that it raises its own errors: a fetch with a compressed, control or v0/v1 batch, a
    CRC that differs (``check_crcs``), a record the client would find corrupt, a read_committed
    fetch that lists aborted transactions, a deserializer.  One difference on that path: after
    the client's iterator raised (a CRC that differs, a corrupt record), this drains, so that the
    next poll raises the error again rather than spinning for ever as kafka-python 3.0.12 does."""

    def __init__(self, fetch_offset: int, tp: Any, records: Any, **kw: Any) -> None:
        super().__init__(fetch_offset, tp, records, **kw)
        self._taken = 0
        self._read: Fetched | None = None
        if (
            kw.get("key_deserializer") is None
            and kw.get("value_deserializer") is None
            and not (self.isolation_level == IsolationLevel.READ_COMMITTED and self.aborted_transactions)
        ):
            self._read = read_batches(
                records._buffer,
                tp.topic,
                tp.partition,
                fetch_offset,
                calc_crc32c if self.check_crcs else None,
            )

    def take(self, n: int | None = None) -> list[Any]:
        read = self._read
        if read is None:
            try:
                return super().take(n)  # type: ignore[no-any-return]
            except Exception:
                # The client leaves its failed iterator in place, and every later poll spins on it
                # (its fetched_records loops while take returns nothing, past the poll's timeout).
                # Drained, the next poll fetches from the same position again and raises the same
                # error again, as Apache Kafka's consumer does.
                self.drain()
                raise
        recs = read.records
        i, total = self._taken, len(recs)
        if n is not None and i + n <= total:  # the client's iterator stops after the n-th record
            if n <= 0:
                return []
            j = i + n
            self.next_fetch_offset = recs[j - 1].offset + 1
            self.leader_epoch = read.epoch_of(j - 1)
            finished = False
        else:  # the client's iterator runs to its end and drains
            j = total
            if read.end_offset is not None:
                self.next_fetch_offset = read.end_offset
                self.leader_epoch = read.last_epoch
            finished = True
        out = recs[i:j]
        self._taken = j
        self.records_read = read.skipped + j
        self.bytes_read = read.cum_bytes[j]
        if finished:
            self.drain()
        return out


def _plain_fetches(client: KafkaConsumer) -> bool:
    """Have ``client``'s fetcher read records with :class:`_PlainRecords`, where this release's
    fetcher is the one it was written against and nothing else replaced its records class."""
    fetcher = getattr(client, "_fetcher", None)
    if (
        kafka_version not in FETCH_VERSIONS
        or Fetcher is None
        or type(fetcher) is not Fetcher
        or "PartitionRecords" in vars(fetcher)
        or fetcher.config["key_deserializer"] is not None
        or fetcher.config["value_deserializer"] is not None
    ):
        return False
    fetcher.PartitionRecords = _PlainRecords  # this client's fetcher only
    return True


class KafkaPythonConsumer:
    """:class:`~stream_influence.io.broker.BrokerConsumer` over a :class:`kafka.KafkaConsumer`.

    Fetched records are read by :class:`_PlainRecords` where that reproduces the client's own
    parser (:attr:`plain_fetches`), by the client otherwise."""

    def __init__(self, client: KafkaConsumer) -> None:
        self.client = client
        self.plain_fetches = _plain_fetches(client)
        self._groupless_fast = self.plain_fetches and client.config["group_id"] is None
        self._events: deque[Rebalance] = deque()  # appended on the I/O thread, drained by the loop
        self._lock = threading.Lock()
        self._handed_over: frozenset[TopicPartition] | None = None
        self._pending_revocation: frozenset[TopicPartition] | None = None
        self._closing = False

    def _record(self, event: Rebalance) -> None:
        with self._lock:
            self._events.append(event)
            if event.kind is RebalanceKind.REVOKED and not self._closing:
                self._pending_revocation = event.partitions

    def subscribe(self, topics: Sequence[str], hand_over: Callable[[], None] | None = None) -> None:
        # hand_over is not called: the listener runs on the I/O thread (module docstring).
        self.client.subscribe(list(topics), listener=_Listener(self))

    def rebalances(self) -> list[Rebalance]:
        with self._lock:
            out = list(self._events)
            self._events.clear()
            if self._pending_revocation is not None:
                # Handed to the loop, which acts on it before it polls again.
                self._handed_over, self._pending_revocation = self._pending_revocation, None
        for event in out:
            if event.kind is RebalanceKind.ASSIGNED:
                # kafka-python 3.0.12 keeps the state (pause flag included) of a partition the
                # eager rebalance revoked and gave back to this member; the seam promises a
                # (re-)assigned partition unpaused (docs/broker-notes.md, "Pause and resume").
                self.resume(event.partitions)
        return out

    def assign(self, partitions: Sequence[TopicPartition]) -> None:
        self.client.assign([_KafkaTP(tp.topic, tp.partition) for tp in partitions])

    def partitions_for(self, topic: str) -> set[int] | None:
        parts = self.client.partitions_for_topic(topic)
        return set(parts) if parts else None

    def _nothing_yet(self) -> bool:
        """True when a group-less consumer's fetch is still in flight and nothing is buffered: a
        ``poll(0)`` would only make two round trips to the client's I/O thread (sending no fetch
        while one is pending on the node, then a zero wait) and return nothing.  The service
        polls its reference reader so every step (kafka-python 3.0.12's fetcher: FETCH_VERSIONS).
        The response, once it arrives, is buffered first, then the request marked done: read in
        this order, a fetch that completes meanwhile is never missed, only read by the next poll."""
        fetcher = self.client._fetcher
        return bool(
            fetcher._nodes_with_pending_fetch_requests
            and not fetcher._completed_fetches
            and not fetcher._next_partition_records
            and fetcher._next_in_line_exception_metadata is None
        )

    def poll(self, timeout_ms: int, max_records: int) -> Mapping[TopicPartition, Sequence[ConsumedRecord]]:
        if timeout_ms == 0 and self._groupless_fast and self._nothing_yet():
            return {}
        try:
            polled = self.client.poll(timeout_ms=timeout_ms, max_records=max_records)
        except KafkaError as exc:
            if isinstance(exc.__cause__, _HandOver):
                return {}  # a revocation waits for the loop (module docstring, step 2)
            raise
        # Record and kafka-python's ConsumerRecord have every ConsumedRecord attribute, and its
        # TopicPartition equals and hashes like ours: handed through as they are, no copy.
        return polled  # type: ignore[no-any-return]

    def pause(self, partitions: Iterable[TopicPartition]) -> None:
        # The client parks what it fetched for a paused partition (not returned, the position
        # unchanged); resume() drops it.
        assigned = self.client.assignment()
        self.client.pause(
            *[tp for tp in (_KafkaTP(t.topic, t.partition) for t in partitions) if tp in assigned]
        )

    def resume(self, partitions: Iterable[TopicPartition]) -> None:
        assigned = self.client.assignment()
        tps = [tp for tp in (_KafkaTP(t.topic, t.partition) for t in partitions) if tp in assigned]
        self.client.resume(*tps)
        # kafka-python 3.0.12 parks the parsed records of a paused partition and hands them back
        # only while no other partition's records are in line, but a drained batch stays in line:
        # the resumed partition then returned nothing again and was never fetched again (measured
        # on the embedded broker; tests/test_pause_resume.py).  Dropped, they are fetched again
        # from the position.
        parked = getattr(self.client._fetcher, "_paused_partition_records", None)
        for tp in tps if parked else ():
            records = parked.pop(tp, None)
            if records is not None:
                records.drain()

    def paused(self) -> frozenset[TopicPartition]:
        return frozenset(TopicPartition(tp.topic, tp.partition) for tp in self.client.paused())

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.client.seek(_KafkaTP(tp.topic, tp.partition), offset)

    def seek_to_beginning(self, tp: TopicPartition) -> None:
        self.client.seek_to_beginning(_KafkaTP(tp.topic, tp.partition))

    def position(self, tp: TopicPartition) -> int | None:
        try:
            return self.client.position(_KafkaTP(tp.topic, tp.partition), timeout_ms=0)
        except Exception:  # not assigned (any more), or no position yet
            return None

    def highwater(self, tp: TopicPartition) -> int | None:
        try:
            return self.client.highwater(_KafkaTP(tp.topic, tp.partition))
        except Exception:
            return None

    def committed(self, tps: Sequence[TopicPartition], timeout_ms: int) -> dict[TopicPartition, int | None]:
        out: dict[TopicPartition, int | None] = {}
        for tp in tps:
            try:
                out[tp] = self.client.committed(_KafkaTP(tp.topic, tp.partition), timeout_ms=timeout_ms)
            except Exception as exc:
                log.warning("cannot read the committed offset of %s-%d: %s", tp.topic, tp.partition, exc)
                out[tp] = None
        return out

    def commit(self, offsets: Mapping[TopicPartition, int], timeout_ms: int) -> None:
        self.client.commit(
            {_KafkaTP(tp.topic, tp.partition): OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()},
            timeout_ms=timeout_ms,
        )

    def reachable(self) -> bool:
        try:
            client = self.client._client  # no public API for this in kafka-python
            return any(client.connected(b.node_id) for b in client.cluster.brokers())
        except Exception:
            return True

    def close(self, timeout_ms: int) -> None:
        self._closing = True  # the revocation inside close() is recorded only
        self.client.close(autocommit=False, timeout_ms=timeout_ms)


# -- producer -------------------------------------------------------------------------------
def _transient(exc: BaseException | None) -> bool:
    """Broker trouble (retry the window) rather than a refusal of this one record."""
    return isinstance(exc, KafkaTimeoutError | IllegalStateError) or bool(getattr(exc, "retriable", False))


#: kafka-python releases whose producer internals :class:`_Appender` was written against and is
#: tested with (tests/test_produce_many.py): any other release takes the plain ``send``.
APPENDER_VERSIONS = frozenset({"3.0.12"})
_BYTES_LIKE = (bytes, bytearray, memoryview)


def _varint_bytes(n: int) -> bytes:
    """``n`` as Kafka encodes a signed varint (zig-zag, 7 bits a byte, low bits first)."""
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n > 0x7F:
        out.append(0x80 | (n & 0x7F))
        n >>= 7
    out.append(n)
    return bytes(out)


# Zig-zag varints of the lengths and deltas most records have, looked up rather than encoded.
_VARINT = [_varint_bytes(n) for n in range(1 << 12)]
_NVARINT = len(_VARINT)


class _Appender:
    """Appends records to a :class:`kafka.KafkaProducer`'s accumulator many at a time: each
    record's key, value and headers are encoded to record format v2 bytes once (``send`` encodes
    and sizes the headers three times, in pure Python), and a partition's records are appended
    under one acquisition of its lock, straight into the open batch's buffer.

    What the broker receives is what ``send`` would have queued, byte for byte: the same record
    bytes in the same batches (same ``batch_size`` cut), partition and order; only the records'
    create timestamps are taken once per call instead of once per record.  The checks ``send``
    makes (closed, key/value/header types, size, metadata) are made here with the same outcome;
    whatever this path does not cover — an unknown topic, a key-less record the partitioner
    would spread, serialisers, transactions, another kafka-python release, a ``send``
    that something (a tracing instrumentation, a test) wrapped — takes ``send`` itself.
    """

    def __init__(self, accumulator: Any, max_request_size: int, wakeup: Callable[[], None]) -> None:
        self.acc = accumulator
        self.max_request_size = max_request_size
        self.wakeup = wakeup  # the producer's sender thread: a batch is ready
        self._names: dict[str, bytes] = {}  # header name → its encoding

    @staticmethod
    def usable(client: KafkaProducer) -> bool:
        """True when this path reproduces ``client.send`` (see the class docstring)."""
        cfg = client.config
        tm = client._transaction_manager
        return (
            kafka_version in APPENDER_VERSIONS
            and type(client).send is _PLAIN_SEND
            and "send" not in vars(client)
            and cfg["key_serializer"] is None
            and cfg["value_serializer"] is None
            and not (tm is not None and tm.is_transactional())
            and client._accumulator.config["message_version"] == 2
        )

    def encode(self, key: Any, value: Any, headers: Any) -> bytes:
        """The record's key, value and headers in record format v2 (the record's body after its
        attributes and two deltas).  Raises what ``send`` raises for a record it refuses, checking
        in ``send``'s order: key or value, the headers' types, the key's and value's types, the
        header names' encoding, the size."""
        if value is None and key is None:
            raise ValueError("Need at least one: key or value")
        if headers is None:
            headers = []
        elif not isinstance(headers, list):
            raise TypeError("headers must be list-type")
        n = len(headers)
        parts: list[bytes] = [b"", b"", b"", b"", _VARINT[n] if n < _NVARINT else _varint_bytes(n)]
        names = self._names
        unencodable: UnicodeEncodeError | None = None
        for item in headers:
            if not (type(item) is tuple or isinstance(item, tuple)) or len(item) != 2:
                raise TypeError("All headers items must be (str, bytes) tuples")
            name, v = item
            enc = names.get(name) if type(name) is str else None
            if enc is None:
                if not isinstance(name, str) or not isinstance(v, bytes):
                    raise TypeError("All headers items must be (str, bytes) tuples")
                try:
                    raw = name.encode("utf-8")
                except UnicodeEncodeError as exc:  # send finds this later, when it sizes the record
                    unencodable = unencodable or exc
                    continue
                enc = _varint_bytes(len(raw)) + raw
                if len(names) < 4096:  # names repeat; a stream of unique ones must not grow this
                    names[name] = enc
            elif type(v) is not bytes and not isinstance(v, bytes):
                raise TypeError("All headers items must be (str, bytes) tuples")
            n = len(v)
            parts += (enc, _VARINT[n] if n < _NVARINT else _varint_bytes(n), v)
        for at, what, k_v in ((0, "key", key), (2, "value", value)):
            if k_v is None:
                parts[at] = b"\x01"  # null: length -1
            elif type(k_v) in _BYTES_LIKE:
                n = len(k_v)
                parts[at] = _VARINT[n] if n < _NVARINT else _varint_bytes(n)
                parts[at + 1] = k_v
            else:
                raise TypeError(f"Unsupported type for serialized {what}: {type(k_v)}")
        if unencodable is not None:
            raise unencodable
        body = b"".join(parts)
        # send's own check, on its own estimate (records.record_size: kafka-python's, to the byte)
        size = RECORD_FRAMING + len(body)
        if size > self.max_request_size:
            raise MessageSizeTooLargeError(
                f"The message is {size} bytes when serialized which is larger than the maximum"
                " request size you have configured with the max_request_size configuration"
            )
        return body

    def append(self, tp: _KafkaTP, records: list[tuple[bytes, _RecordDelivery]], timestamp_ms: int) -> None:
        """Append ``records`` (body from :meth:`encode`, delivery) to ``tp`` in order, under one
        acquisition of its lock, as ``RecordAccumulator.append`` would one by one."""
        acc = self.acc
        now = time.monotonic()
        new_batch = False
        acc._appends_in_progress.increment()
        try:
            with acc._tp_lock(tp):
                if acc._closed:
                    raise IllegalStateError("RecordAccumulator is closed")
                dq = acc._batches[tp]
                batch = dq[-1] if dq else None
                b = batch.records._builder if batch is not None and not batch.records._closed else None
                run: list[_RecordDelivery] = []  # appended to `batch` by this call
                for body, delivery in records:
                    while True:
                        if b is None:
                            if run:
                                _Run.register(batch, run)
                                run = []
                            batch = ProducerBatch(
                                tp,
                                MemoryRecordsBuilder(
                                    acc.config["message_version"],
                                    acc.config["compression_attrs"],
                                    acc.config["batch_size"],
                                ),
                                now=now,
                            )
                            dq.append(batch)
                            acc._incomplete.add(batch)
                            new_batch = True
                            b = batch.records._builder
                        assert batch is not None
                        offset = batch.records._next_offset
                        first = b._first_timestamp is None
                        delta = 0 if first else timestamp_ms - b._first_timestamp
                        head = (
                            b"\x00"  # attributes
                            + (_VARINT[delta] if 0 <= delta < _NVARINT else _varint_bytes(delta))
                            + (_VARINT[offset] if offset < _NVARINT else _varint_bytes(offset))
                        )
                        length = len(head) + len(body)
                        prefix = _VARINT[length] if length < _NVARINT else _varint_bytes(length)
                        required = len(prefix) + length
                        buf = b._buffer
                        if first or required + len(buf) <= b._batch_size:
                            break
                        b = None  # the batch is full: the record opens the next one
                    if first:
                        b._first_timestamp = b._max_timestamp = timestamp_ms
                    elif b._max_timestamp < timestamp_ms:
                        b._max_timestamp = timestamp_ms
                    b._num_records += 1
                    b._last_offset = offset
                    buf += prefix
                    buf += head
                    buf += body
                    batch.records._next_offset = offset + 1
                    if required > batch.max_record_size:
                        batch.max_record_size = required
                    batch.last_append = now
                    delivery.index = offset
                    batch._record_futures.append(delivery)  # rebound if the batch is ever split
                    run.append(delivery)
                if run:
                    _Run.register(batch, run)
                full = len(dq) > 1 or (batch is not None and batch.records.is_full())
        finally:
            acc._appends_in_progress.decrement()
        if full or new_batch:
            self.wakeup()


class _RecordDelivery(Delivery):
    """The :class:`Delivery` of a record :class:`_Appender` queued.  It stands in the batch's
    record futures, where kafka-python keeps one ``FutureRecordMetadata`` per record only to
    :meth:`rebind` it when it splits a batch the broker found too large; otherwise the batch's
    answer reaches it through :class:`_Run` — no future, lock or callback per record."""

    __slots__ = ("index",)  # the record's offset in its batch, set when appended

    def answer(self, result: tuple[int, int, Callable[[int], BaseException] | None]) -> None:
        errors = result[2]  # per record of the batch, None when the batch was taken
        exc = errors(self.index) if errors is not None else None
        self.resolve(exc, transient=_transient(exc))

    def fail(self, exc: BaseException) -> None:
        self.resolve(exc, transient=_transient(exc))

    def rebind(self, produce_future: Any, index: int) -> None:
        """Called by ``RecordAccumulator.split_and_reenqueue`` on the I/O thread: the record moved
        to a new batch (the old batch's answer never comes)."""
        self.index = index
        produce_future._add_cb_eb(self.answer, self.fail)


class _Run:
    """The records one :meth:`_Appender.append` call put into one batch: resolved together when
    the broker answers for the batch (on kafka-python's I/O thread; only fields are set)."""

    __slots__ = ("deliveries",)

    def __init__(self, deliveries: list[_RecordDelivery]) -> None:
        self.deliveries = deliveries

    @classmethod
    def register(cls, batch: Any, deliveries: list[_RecordDelivery]) -> None:
        run = cls(deliveries)
        batch.produce_future._add_cb_eb(run.answer, run.fail)

    def answer(self, result: tuple[int, int, Callable[[int], BaseException] | None]) -> None:
        for d in self.deliveries:
            d.answer(result)

    def fail(self, exc: BaseException) -> None:
        for d in self.deliveries:
            d.fail(exc)


_PLAIN_SEND = KafkaProducer.send


class KafkaPythonProducer:
    """:class:`~stream_influence.io.broker.BrokerProducer` over a :class:`kafka.KafkaProducer`.

    :meth:`produce_many` (and :meth:`produce`, one record) appends records through
    :class:`_Appender` where that reproduces ``send``, and through ``send`` itself otherwise.  An
    appended record's delivery is resolved when the broker answers for its batch (one callback
    per batch, on kafka-python's I/O thread); a sent one's from its future on the loop thread at
    :meth:`flush`.  Either way every delivery is done when :meth:`flush` returns."""

    def __init__(self, client: KafkaProducer) -> None:
        self.client = client
        self._max = int(client.config["max_request_size"])
        self._pending: list[tuple[Any, Delivery]] = []
        self._resolve_at = 4096
        self._appender = (
            _Appender(client._accumulator, self._max, client._sender.wakeup)
            if kafka_version in APPENDER_VERSIONS
            else None
        )

    @property
    def max_request_size(self) -> int:
        return self._max

    def _one_partition(self, topic: str) -> int | None:
        """The partition of ``topic`` when its cached metadata has exactly one, else None."""
        try:
            parts = self.client._metadata.partitions_for_topic(topic)  # no public non-blocking API
        except Exception:
            return None
        return next(iter(parts)) if parts and len(parts) == 1 else None

    def _partition(self, record: OutputRecord) -> int | None:
        """The partition ``send`` would pick for ``record``, where that is certain from cached
        metadata; None: ``send`` decides (metadata unknown — it waits for it — or a key-less record
        on a topic of several partitions, which the partitioner spreads).  Naming the one
        partition of a single-partition topic also saves ``send`` hashing every key (murmur2 in
        Python: ~10 % of a ``send``)."""
        one = self._one_partition(record.topic)
        if one is not None:
            return one
        key, value = record.key, record.value
        if type(key) not in _BYTES_LIKE:
            return None  # key-less, or a key send refuses itself
        try:
            partition = self.client._partition(record.topic, None, key, value, key, value)
        except Exception:
            return None
        return None if partition is None else int(partition)  # None: the topic's metadata is unknown

    def _send(self, record: OutputRecord) -> Delivery:
        """``record`` through kafka-python's own ``send``."""
        try:
            future = self.client.send(
                record.topic,
                value=record.value,
                key=record.key,
                headers=record.headers,
                partition=self._partition(record),
            )
        except (KafkaTimeoutError, IllegalStateError) as exc:  # buffer full, metadata unknown
            raise BrokerTrouble(repr(exc)) from exc
        except Exception as exc:  # this record only: encoding, serialisation, size
            raise RecordRefused(f"{type(exc).__name__}: {exc}") from exc
        delivery = Delivery(record)
        self._pending.append((future, delivery))
        return delivery

    def produce(self, record: OutputRecord) -> Delivery:
        q = self.produce_many([record])
        if q.refused is not None:
            raise q.refused
        return q.deliveries[0]

    def produce_many(self, records: Sequence[OutputRecord]) -> Queued:
        deliveries: list[Delivery] = []
        refused: RecordRefused | None = None
        appender = self._appender
        if appender is not None and (self.client._closed or not _Appender.usable(self.client)):
            appender = None  # send decides (a closed producer: send raises, broker trouble)
        runs: dict[_KafkaTP, list[tuple[bytes, _RecordDelivery]]] = {}  # per partition, in order
        one: dict[str, int | None] = {}  # per topic of this call: its partition, if it has only one
        timestamp_ms = int(time.time() * 1000)
        try:
            for record in records:
                partition = None
                if appender is not None:
                    topic = record.topic
                    partition = (
                        one[topic] if topic in one else one.setdefault(topic, self._one_partition(topic))
                    )
                    if partition is None:
                        partition = self._partition(record)
                if partition is None:  # send decides: first queue what precedes it
                    self._append(runs, timestamp_ms)
                    try:
                        deliveries.append(self._send(record))
                    except RecordRefused as exc:
                        refused = exc
                        break
                    continue
                assert appender is not None
                try:
                    body = appender.encode(record.key, record.value, record.headers)
                except Exception as exc:  # as _send: this record only (encoding, size)
                    refused = RecordRefused(f"{type(exc).__name__}: {exc}")
                    break
                delivery = _RecordDelivery(record)
                tp = _KafkaTP(record.topic, partition)
                run = runs.get(tp)
                if run is None:
                    run = runs[tp] = []
                run.append((body, delivery))
                deliveries.append(delivery)
            self._append(runs, timestamp_ms)
        except IllegalStateError as exc:  # closed meanwhile
            raise BrokerTrouble(repr(exc)) from exc
        if len(self._pending) >= self._resolve_at:
            # A long run between flushes must not keep every answered future.
            self._resolve()
            self._resolve_at = len(self._pending) + 4096
        return Queued(deliveries, refused)

    def _append(self, runs: dict[_KafkaTP, list[tuple[bytes, _RecordDelivery]]], timestamp_ms: int) -> None:
        if runs:
            assert self._appender is not None
            for tp, run in runs.items():
                self._appender.append(tp, run, timestamp_ms)
            runs.clear()

    def _resolve(self) -> None:
        still: list[tuple[Any, Delivery]] = []
        for future, delivery in self._pending:
            if future.is_done:
                exc = future.exception
                delivery.resolve(exc, transient=_transient(exc))
            else:
                still.append((future, delivery))
        self._pending = still

    def flush(self, timeout_s: float) -> None:
        try:
            self.client.flush(timeout=timeout_s)
        except KafkaTimeoutError as exc:
            raise BrokerTrouble(f"outputs not acknowledged within {timeout_s:.1f}s: {exc!r}") from exc
        finally:
            self._resolve()

    def close(self, timeout_s: float) -> None:
        """Close; with ``timeout_s == 0`` the outputs still buffered are *discarded* (a rollback).

        kafka-python's ``close`` flushes first and raises at the timeout without aborting what is
        still buffered; the producer's ``__del__`` then flushes those records for up to a second,
        so a rolled-back window's outputs were published once the broker came back."""
        try:
            self.client.close(timeout=timeout_s)
        except KafkaTimeoutError:
            sender = self.client._sender  # no public abort in kafka-python
            if sender is not None:
                sender.force_close()  # fails the unsent batches, then stops the I/O thread
                sender.join(5)
            self.client._closed = True  # so __del__ does not flush again
            if timeout_s > 0:
                raise


class KafkaPythonBroker:
    """:class:`~stream_influence.io.broker.Broker` for kafka-python."""

    def __init__(self, k: KafkaSettings) -> None:
        self.k = k

    def check(self, timeout_s: float | None = None) -> None:
        check_broker(self.k, timeout_s)

    def ensure_topics(self, names: Sequence[str], partitions: int = 1) -> list[str]:
        return ensure_topics(self.k, names, partitions)

    def consumer(self, *, group: bool = True) -> KafkaPythonConsumer:
        return KafkaPythonConsumer(build_consumer(self.k, group=group))

    def producer(self) -> KafkaPythonProducer:
        return KafkaPythonProducer(build_producer(self.k))

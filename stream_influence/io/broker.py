"""The broker seam: what the service needs from a Kafka client, and nothing more.

A backend (:mod:`stream_influence.io.kafka_python`, the default; a confluent-kafka one behind the
same protocol) implements three small protocols:

- :class:`Broker` — the factory: start-up reachability check, output-topic creation, and the
  clients below, built from one :class:`~stream_influence.config.KafkaSettings`;
- :class:`BrokerConsumer` — a group member (``subscribe``) or a group-less reader (``assign``):
  poll, pause/resume, seek, position, high watermark, committed offsets, commit, close,
  reachability;
- :class:`BrokerProducer` — asynchronous ``produce`` (and ``produce_many``, a chunk's records at
  once) with one :class:`Delivery` per record, ``flush``, close.

Only typed values cross the seam: :class:`TopicPartition`, :class:`ConsumedRecord` (consumed;
:class:`Record` is one),
:class:`OutputRecord` (to produce), :class:`Delivery`, :class:`Rebalance`.

**Threads.**  Every method is called from one thread, the service's loop thread.  A backend may
run its own I/O threads, but its rebalance callbacks only *record* what happened
(:meth:`BrokerConsumer.rebalances` hands the records to the loop) and its delivery callbacks only
fill in a :class:`Delivery`.

**Revocation is handed over before the group moves on.**  When the group takes partitions from
this member, the backend records a :class:`Rebalance` of kind ``revoked`` and returns from
:meth:`~BrokerConsumer.poll` *without giving the partitions up yet* (a backend whose callbacks
run on the loop thread calls the loop's ``hand_over`` instead: :meth:`BrokerConsumer.subscribe`).  The loop drains
:meth:`~BrokerConsumer.rebalances`, flushes, checkpoints and commits the revoked partitions'
offsets (the member still owns them), and polls again; that poll completes the revocation and
the join.  ``lost`` partitions (this member was evicted) are recorded without that pause: another
member may own them already, so they must not be committed.  ``assigned`` is recorded when the
join completes; the loop seeks the new partitions right after the poll that returned it (records
that poll returned for them are dropped and fetched again).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, NamedTuple, Protocol

from stream_influence.errors import OutputError, StreamInfluenceError

if TYPE_CHECKING:
    from stream_influence.config import KafkaSettings

__all__ = [
    "Broker",
    "BrokerConsumer",
    "BrokerProducer",
    "BrokerTrouble",
    "ConsumedRecord",
    "Delivery",
    "Headers",
    "OutputRecord",
    "Queued",
    "Rebalance",
    "RebalanceKind",
    "Record",
    "RecordRefused",
    "TopicPartition",
    "open_broker",
    "produce_each",
]

Headers = Sequence[tuple[str, bytes]]


class TopicPartition(NamedTuple):
    """A partition of a topic (equal to, and hashed like, kafka-python's own tuple)."""

    topic: str
    partition: int


class ConsumedRecord(Protocol):
    """What the service reads of one consumed message.  A backend hands its client's own record
    objects through as they are when they have these attributes (kafka-python's
    ``ConsumerRecord`` does: no per-message copy on the hot path), else builds :class:`Record`."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Headers: ...
    @property
    def timestamp(self) -> int | None:
        """Milliseconds since the epoch as the broker reports it; None when it reports none."""


class Record(NamedTuple):
    """One consumed message, for a backend whose client's records lack :class:`ConsumedRecord`'s
    attributes.  A named tuple rather than a dataclass: one is built per event."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers
    #: Milliseconds since the epoch as the broker reports it; None when it reports none.
    timestamp: int | None


class OutputRecord(NamedTuple):
    """One message the service produces (dead letter, quarantine/accepted copy, decision).  A
    named tuple rather than a dataclass: one is built per output, a chunk's at once in C."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers


class Delivery:
    """The outcome of one produced record, filled in by the backend when the broker answers.

    ``done`` turns True once, after ``error`` and ``transient`` are set; after a successful
    :meth:`BrokerProducer.flush` every delivery of that producer is done.
    """

    __slots__ = ("done", "error", "record", "transient")

    def __init__(self, record: OutputRecord) -> None:
        self.record = record
        self.done = False
        #: Why the broker did not take the record (None: delivered, or not answered yet).
        self.error: BaseException | None = None
        #: True when ``error`` is broker trouble (retry the window), False when the broker refused
        #: this record itself (dead-letter its input message instead).
        self.transient = False

    def failed(self) -> bool:
        return self.done and self.error is not None

    def resolve(self, error: BaseException | None = None, *, transient: bool = False) -> None:
        """Called by the backend (possibly on its I/O thread): only fields are set."""
        self.error, self.transient = error, transient
        self.done = True


class RebalanceKind(StrEnum):
    ASSIGNED = "assigned"
    REVOKED = "revoked"
    LOST = "lost"


@dataclass(frozen=True, slots=True)
class Rebalance:
    """What a rebalance callback recorded, for the loop to act on."""

    kind: RebalanceKind
    partitions: frozenset[TopicPartition]


class RecordRefused(OutputError):
    """This one output record cannot be sent (encoding, serialisation, size): the caller
    dead-letters its input message; the stream goes on."""


class BrokerTrouble(StreamInfluenceError):
    """The broker did not take outputs in time (buffer full, metadata unknown, flush timed out):
    the window is rolled back and replayed, not any single record blamed."""


class Queued(NamedTuple):
    """What :meth:`BrokerProducer.produce_many` queued: the deliveries of the first
    ``len(deliveries)`` records, and why the record after them was refused (then the records
    after that one were not tried), or None when every record was queued."""

    deliveries: list[Delivery]
    refused: RecordRefused | None


class BrokerConsumer(Protocol):
    """A consumer: a group member after :meth:`subscribe`, a plain reader after :meth:`assign`."""

    def subscribe(self, topics: Sequence[str], hand_over: Callable[[], None] | None = None) -> None:
        """Join the group for ``topics``; rebalances are recorded for :meth:`rebalances`.

        ``hand_over`` is the loop's handler of recorded events.  A backend whose rebalance
        callbacks run *on the loop thread, inside* :meth:`poll` (librdkafka) calls it from its
        revocation callback, after recording the event, so the loop acts before the revocation
        completes.  A backend whose callbacks run on another thread (kafka-python) never calls
        it: it defers the revocation to the next poll instead (module docstring)."""

    def rebalances(self) -> list[Rebalance]:
        """The rebalance events recorded since the last call, oldest first (see the module
        docstring: a revocation waits for this call before the group moves on)."""

    def assign(self, partitions: Sequence[TopicPartition]) -> None:
        """Read exactly ``partitions``, outside any group."""

    def partitions_for(self, topic: str) -> set[int] | None:
        """The partition numbers of ``topic`` from cached metadata, or None while unknown."""

    def poll(self, timeout_ms: int, max_records: int) -> Mapping[TopicPartition, Sequence[ConsumedRecord]]:
        """Up to ``max_records`` records, grouped by partition in offset order (the keys equal
        and hash like :class:`TopicPartition`)."""

    def pause(self, partitions: Iterable[TopicPartition]) -> None:
        """Stop fetching ``partitions`` (those not assigned are ignored): until :meth:`resume`,
        :meth:`poll` returns none of their records and their :meth:`position` stays where it is.
        For holding records back without re-reading them (a seek back would fetch them again)."""

    def resume(self, partitions: Iterable[TopicPartition]) -> None:
        """Fetch ``partitions`` again, from their :meth:`position`: the offset after the last
        record :meth:`poll` returned, or the last :meth:`seek`'s (a seek while paused wins)."""

    def paused(self) -> frozenset[TopicPartition]:
        """The assigned partitions paused now.  A rebalance clears pauses: a revoked or lost
        partition is forgotten, and one assigned (again) starts unpaused, at the offset the loop
        seeks it to (docs/broker-notes.md, "Pause and resume")."""

    def seek(self, tp: TopicPartition, offset: int) -> None: ...

    def seek_to_beginning(self, tp: TopicPartition) -> None: ...

    def position(self, tp: TopicPartition) -> int | None:
        """The next offset to fetch, without blocking; None while unknown."""

    def highwater(self, tp: TopicPartition) -> int | None:
        """The last high watermark a fetch reported; None while unknown."""

    def committed(self, tps: Sequence[TopicPartition], timeout_ms: int) -> dict[TopicPartition, int | None]:
        """The group's committed offsets (None: none committed, or not readable now)."""

    def commit(self, offsets: Mapping[TopicPartition, int], timeout_ms: int) -> None:
        """Commit the next offset to read of each partition; raises if the broker did not."""

    def reachable(self) -> bool:
        """True while the client holds a live connection to at least one broker."""

    def close(self, timeout_ms: int) -> None:
        """Leave the group (without committing) and release the client."""


class BrokerProducer(Protocol):
    """The output producer."""

    @property
    def max_request_size(self) -> int:
        """The largest record (key, value, headers, framing) the producer sends, in bytes."""

    def produce(self, record: OutputRecord) -> Delivery:
        """Queue ``record``.  Raises :class:`RecordRefused` for this record alone, or
        :class:`BrokerTrouble` when it cannot be queued in time."""

    def produce_many(self, records: Sequence[OutputRecord]) -> Queued:
        """Queue ``records`` in order, as many :meth:`produce` calls would, stopping at the first
        one refused (:class:`Queued`), so the caller can act on it before the rest are queued.
        Raises :class:`BrokerTrouble` when they cannot be queued in time (the window is rolled
        back, and what was queued with it discarded)."""

    def flush(self, timeout_s: float) -> None:
        """Wait until every queued record is answered; :class:`BrokerTrouble` past ``timeout_s``."""

    def close(self, timeout_s: float) -> None: ...


class Broker(Protocol):
    """A backend: the clients of one cluster, all built from the same settings."""

    def check(self, timeout_s: float | None = None) -> None:
        """Connect as the service will; :class:`~stream_influence.errors.BrokerUnreachableError`
        naming the servers and the cause if that fails within ``timeout_s``."""

    def ensure_topics(self, names: Sequence[str], partitions: int = 1) -> list[str]:
        """Create the topics that do not exist yet (best effort); returns the ones created."""

    def consumer(self, *, group: bool = True) -> BrokerConsumer:
        """The training-events consumer (in the group, auto-commit off), or a group-less reader."""

    def producer(self) -> BrokerProducer:
        """A new output producer (at-least-once, stable keys)."""


def produce_each(produce: Callable[[OutputRecord], Delivery], records: Sequence[OutputRecord]) -> Queued:
    """:meth:`BrokerProducer.produce_many` as one ``produce`` per record, for a producer whose
    per-record call is already as cheap as a batch would be (librdkafka queues in C)."""
    deliveries: list[Delivery] = []
    for record in records:
        try:
            deliveries.append(produce(record))
        except RecordRefused as exc:
            return Queued(deliveries, exc)
    return Queued(deliveries, None)


def open_broker(k: KafkaSettings) -> Broker:
    """The backend ``k.client`` names (kafka-python unless configured otherwise)."""
    if k.client == "confluent":
        from stream_influence.io.confluent import ConfluentBroker

        return ConfluentBroker(k)
    from stream_influence.io.kafka_python import KafkaPythonBroker

    return KafkaPythonBroker(k)

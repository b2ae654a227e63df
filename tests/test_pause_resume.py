"""Pause and resume at the broker seam, on the real embedded broker, for both backends.

What a score worker holding chunks back relies on (docs/broker-notes.md, "Pause and resume"):
a paused partition returns no records and keeps its position while the others go on; resume
continues at the next offset, with nothing read twice and nothing skipped; a seek while paused
wins over what the client had prefetched; and a rebalance clears pauses — a partition revoked and
assigned again comes back unpaused (kafka-python keeps the state of a partition it gets back,
librdkafka keeps a pause across unassign and assign: both backends undo that).
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Callable

import pytest

from stream_influence.config import KafkaSettings
from stream_influence.io.broker import BrokerConsumer, RebalanceKind, TopicPartition, open_broker
from tests.fixtures.broker import Broker, fresh_topic

pytestmark = pytest.mark.integration

# Generous: group joins and fetches are slower on a loaded 2-core machine.
TIMEOUT = float(os.environ.get("PAUSE_TEST_TIMEOUT", "60"))
PAUSED_FOR = 1.5  # seconds a paused partition is polled for and must stay silent
N = 200  # records per partition


def _produce(bootstrap: str, topic: str, partitions: int, n: int = N) -> None:
    from kafka import KafkaProducer

    p = KafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False, linger_ms=20, acks=1)
    try:
        for part in range(partitions):
            for i in range(n):
                p.send(topic, value=b"%d-%d" % (part, i), partition=part)
        p.flush(60)
    finally:
        p.close()


def _settings(broker: Broker, topic: str, client: str) -> KafkaSettings:
    return KafkaSettings(
        client=client,
        bootstrap_servers=broker.bootstrap,
        topic=topic,
        group_id=f"{topic}-g",
        auto_offset_reset="earliest",
        session_timeout_ms=2000,
        heartbeat_interval_ms=500,
    )


class Reader:
    """A consumer polled in small batches, remembering every offset it returned per partition."""

    def __init__(self, consumer: BrokerConsumer) -> None:
        self.c = consumer
        self.got: dict[TopicPartition, list[int]] = defaultdict(list)
        self.events: list[tuple[RebalanceKind, frozenset[TopicPartition]]] = []

    def poll(self, max_records: int = 20) -> dict[TopicPartition, list[int]]:
        out = {
            TopicPartition(tp.topic, tp.partition): [m.offset for m in msgs]
            for tp, msgs in self.c.poll(100, max_records).items()
        }
        for tp, offsets in out.items():
            self.got[tp] += offsets
        # Drained after every poll, as the service's loop does (a revocation waits for it).
        self.events += [(e.kind, e.partitions) for e in self.c.rebalances()]
        return out

    def until(self, done: Callable[[], bool], what: str, *others: Reader) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not done():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            self.poll()
            for o in others:
                o.poll()


def test_pause_holds_a_partition_and_resume_continues_at_the_next_offset(
    broker: Broker, kafka_client: str
) -> None:
    topic = fresh_topic(broker, "pause", partitions=2)
    _produce(broker.bootstrap, topic, 2)
    p0, p1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    r = Reader(open_broker(_settings(broker, topic, kafka_client)).consumer())
    try:
        r.c.subscribe([topic])
        r.until(lambda: len(r.got[p0]) >= 10, "records of partition 0")
        assert len(r.got[p0]) < N, "partition 0 was read to its end before it could be paused"
        r.c.pause([p0])
        assert r.c.paused() == {p0}
        held = list(r.got[p0])
        t_end = time.monotonic() + PAUSED_FOR
        while time.monotonic() < t_end:
            r.poll()
        r.until(lambda: len(r.got[p1]) == N, "partition 1 to its end while 0 is paused")
        assert r.got[p0] == held, "a paused partition returned records"
        assert r.c.position(p0) == held[-1] + 1

        r.c.resume([p0])
        assert r.c.paused() == frozenset()
        r.until(lambda: len(r.got[p0]) >= N, "partition 0 after resume")
        # Resumed at the next offset: nothing read twice, nothing skipped.
        assert r.got[p0] == list(range(N))
        assert r.got[p1] == list(range(N))

        # A seek while paused wins over whatever the client had fetched or parked meanwhile.
        r.c.pause([p1])
        r.c.seek(p1, 50)
        r.got[p1].clear()
        r.poll()
        assert r.got[p1] == [], "a paused partition returned records after a seek"
        r.c.resume([p1])
        r.until(lambda: len(r.got[p1]) >= N - 50, "partition 1 after the seek")
        assert r.got[p1] == list(range(50, N))
    finally:
        r.c.close(2000)


def _assigned(r: Reader) -> frozenset[TopicPartition]:
    """The partitions of ``r``'s latest assignment (empty before one)."""
    return next((tps for kind, tps in reversed(r.events) if kind is RebalanceKind.ASSIGNED), frozenset())


def test_a_rebalance_clears_pauses_and_a_partition_assigned_again_comes_back_unpaused(
    broker: Broker, kafka_client: str
) -> None:
    topic = fresh_topic(broker, "pause-rebalance", partitions=2)
    _produce(broker.bootstrap, topic, 2)
    both = {TopicPartition(topic, 0), TopicPartition(topic, 1)}
    k = _settings(broker, topic, kafka_client)
    a = Reader(open_broker(k).consumer())
    b: Reader | None = None
    try:
        a.c.subscribe([topic])
        a.until(lambda: all(a.got[tp] for tp in both), "a's first records")
        a.c.commit({tp: 5 for tp in both}, 5000)
        a.c.pause(both)
        assert a.c.paused() == both
        a.events.clear()

        b = Reader(open_broker(k).consumer())
        b.c.subscribe([topic])
        a.until(lambda: _assigned(a) and _assigned(b), "the rebalance", b)
        (kept,) = _assigned(a)
        (moved,) = _assigned(b)
        assert {kept, moved} == both
        assert any(kind is RebalanceKind.REVOKED and tps == both for kind, tps in a.events)
        # The partition a kept was revoked and assigned again: unpaused; the one it lost is forgotten.
        assert a.c.paused() == frozenset()
        # As the service's loop does after an assignment: seek to the committed offset.
        for r, tp in ((a, kept), (b, moved)):
            assert r.c.committed([tp], 5000) == {tp: 5}
            r.c.seek(tp, 5)
            r.got[tp].clear()
        a.until(
            lambda: len(a.got[kept]) >= N - 5 and len(b.got[moved]) >= N - 5, "both after the rebalance", b
        )
        assert a.got[kept] == list(range(5, N))
        assert b.got[moved] == list(range(5, N))
    finally:
        a.c.close(2000)
        if b is not None:
            b.c.close(2000)

"""The Broker protocol (io/broker.py) on every backend, against the real embedded broker.

What the service relies on, checked the same way for kafka-python and confluent-kafka: records
come back with key, value, headers and offsets; the high watermark and position give the lag; seek
moves the next poll; deliveries resolve after flush; a record too large is refused alone;
a group member commits, reads its commits back, and hands revoked partitions over — the member
taking them over reads the offsets the old owner committed after it was told of the revocation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from stream_influence.config import KafkaSettings
from stream_influence.errors import BrokerUnreachableError
from stream_influence.io.broker import (
    Broker,
    BrokerConsumer,
    OutputRecord,
    RebalanceKind,
    Record,
    RecordRefused,
    TopicPartition,
    open_broker,
)
from tests.fixtures.broker import Broker as EmbeddedBroker
from tests.fixtures.broker import free_port, fresh_topic

pytestmark = pytest.mark.integration

TIMEOUT = 30.0  # generous: the machine may be loaded; every wait polls a condition
HANDOVER_WORK_S = 0.5  # time a revoked member spends flushing and checkpointing before it commits


def _settings(client: str, bootstrap: str, topic: str, **extra: Any) -> KafkaSettings:
    return KafkaSettings(
        client=client,
        bootstrap_servers=bootstrap,
        topic=topic,
        group_id=f"{topic}-group",
        session_timeout_ms=2000,
        heartbeat_interval_ms=500,
        **extra,
    )


def _until(what: str, step: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not step():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _drain(c: BrokerConsumer, into: dict[TopicPartition, list[Record]], timeout_ms: int = 200) -> None:
    for tp, recs in c.poll(timeout_ms, 500).items():
        into.setdefault(tp, []).extend(recs)


def _fill(backend: Broker, topic: str, n: int, partitions: int) -> None:
    p = backend.producer()
    deliveries = [
        p.produce(OutputRecord(topic, b"k%d" % i, b"v%d" % i, [("h", b"%d" % i), ("empty", b"")]))
        for i in range(n)
    ]
    p.flush(TIMEOUT)
    assert all(d.done and d.error is None for d in deliveries)
    p.close(5)


def test_records_watermarks_and_seek(broker: EmbeddedBroker, kafka_client: str) -> None:
    topic = fresh_topic(broker, "be-read", partitions=2)
    backend = open_broker(_settings(kafka_client, broker.bootstrap, topic))
    backend.check(TIMEOUT)
    _fill(backend, topic, 400, 2)
    reader = backend.consumer(group=False)
    _until("partition metadata", lambda: reader.partitions_for(topic) == {0, 1})
    tps = [TopicPartition(topic, 0), TopicPartition(topic, 1)]
    reader.assign(tps)
    got: dict[TopicPartition, list[Record]] = {}
    _until("400 records", lambda: _drain(reader, got) or sum(map(len, got.values())) == 400)
    everything = [r for recs in got.values() for r in recs]
    assert sorted(int(r.value[1:]) for r in everything) == list(range(400))
    for tp, recs in got.items():
        assert [r.offset for r in recs] == list(range(len(recs))), "offset order, no gap"
        for r in recs:
            assert (r.topic, r.partition) == tp
            assert r.key == b"k" + r.value[1:]
            assert dict(r.headers) == {"h": r.value[1:], "empty": b""}
            assert r.timestamp is None or r.timestamp > 1_600_000_000_000
        # Lag = high watermark − position: both known after a fetch, and equal at the end.
        assert reader.highwater(tp) == len(recs)
        assert reader.position(tp) == len(recs)
    # seek moves the next poll, also back to the beginning.
    reader.seek(tps[0], 5)
    assert reader.position(tps[0]) == 5
    again: dict[TopicPartition, list[Record]] = {}
    _until("records from offset 5", lambda: _drain(reader, again) or tps[0] in again)
    assert again[tps[0]][0].offset == 5
    reader.seek_to_beginning(tps[1])
    _until("records from offset 0", lambda: _drain(reader, again) or tps[1] in again)
    assert again[tps[1]][0].offset == 0
    assert reader.reachable()
    reader.close(5000)


def test_an_empty_partition_read_from_its_beginning_is_caught_up(
    broker: EmbeddedBroker, kafka_client: str
) -> None:
    """Position and high watermark of an empty partition become known once the reader has
    fetched, so "read to the end" (the scale-out updater's start on a new model topic) ends.
    librdkafka reports no position before the first record: the confluent updater never started."""
    topic = fresh_topic(broker, "be-empty")
    backend = open_broker(_settings(kafka_client, broker.bootstrap, topic))
    reader = backend.consumer(group=False)
    tp = TopicPartition(topic, 0)
    _until("partition metadata", lambda: reader.partitions_for(topic) == {0})
    reader.assign([tp])
    reader.seek_to_beginning(tp)

    def caught_up() -> bool:
        assert not reader.poll(200, 100), "records from an empty partition"
        return reader.highwater(tp) == 0 and reader.position(tp) == 0

    _until("position 0 = high watermark 0", caught_up)
    # And it moves on with the first records.
    _fill(backend, topic, 3, 1)
    got: dict[TopicPartition, list[Record]] = {}
    _until("3 records", lambda: _drain(reader, got) or len(got.get(tp, [])) == 3)
    _until("position 3", lambda: _drain(reader, got) or (reader.position(tp), reader.highwater(tp)) == (3, 3))
    reader.close(5000)


def test_a_record_too_large_is_refused_alone(broker: EmbeddedBroker, kafka_client: str) -> None:
    topic = fresh_topic(broker, "be-big")
    p = open_broker(_settings(kafka_client, broker.bootstrap, topic)).producer()
    ok = p.produce(OutputRecord(topic, None, b"small", []))
    with pytest.raises(RecordRefused):
        p.produce(OutputRecord(topic, None, b"x" * (p.max_request_size + 1), []))
    after = p.produce(OutputRecord(topic, None, b"after", []))
    p.flush(TIMEOUT)
    assert ok.done and after.done and ok.error is None and after.error is None
    p.close(5)


def test_unreachable_broker_fails_fast_naming_it(kafka_client: str) -> None:
    bootstrap = f"127.0.0.1:{free_port()}"  # nothing listens there
    backend = open_broker(_settings(kafka_client, bootstrap, "t"))
    t0 = time.monotonic()
    with pytest.raises(BrokerUnreachableError, match=bootstrap):
        backend.check(2.0)
    assert time.monotonic() - t0 < 15


def test_group_commit_and_revocation_hand_over(broker: EmbeddedBroker, kafka_client: str) -> None:
    topic = fresh_topic(broker, "be-group", partitions=2)
    backend = open_broker(_settings(kafka_client, broker.bootstrap, topic))
    _fill(backend, topic, 200, 2)
    tps = {TopicPartition(topic, 0), TopicPartition(topic, 1)}

    first = backend.consumer()
    owned: set[TopicPartition] = set()
    handed: dict[TopicPartition, int] = {}

    def act() -> None:
        """The loop's handling of recorded rebalances: after a poll, or as the backend's
        hand_over from inside its revocation callback (librdkafka)."""
        for e in first.rebalances():
            if e.kind is RebalanceKind.ASSIGNED:
                owned.update(e.partitions)
            elif e.kind is RebalanceKind.REVOKED:
                owned.difference_update(e.partitions)
                time.sleep(HANDOVER_WORK_S)  # the loop flushes and checkpoints first
                commit = {tp: 20 + tp.partition for tp in e.partitions}  # below either partition's end
                first.commit(commit, 10_000)
                handed.update(commit)

    first.subscribe([topic], hand_over=act)
    got: dict[TopicPartition, list[Record]] = {}

    def first_step() -> bool:
        _drain(first, got)
        act()
        return owned == tps and sum(map(len, got.values())) == 200

    _until("the first member owns both partitions and read everything", first_step)
    first.commit({tp: 60 for tp in tps}, 10_000)
    assert first.committed(sorted(tps), 10_000) == {tp: 60 for tp in tps}

    # A second member joins.  The first is told of the revocation, commits for the partitions it
    # loses while it still owns them, and the second starts them from exactly those offsets.
    second = backend.consumer()
    second.subscribe([topic])
    second_owns: set[TopicPartition] = set()
    second_got: dict[TopicPartition, list[Record]] = {}

    def both_step() -> bool:
        _drain(first, {}, 100)
        act()
        _drain(second, second_got, 100)
        for e in second.rebalances():
            if e.kind is RebalanceKind.ASSIGNED:
                second_owns.update(e.partitions)
        return bool(second_owns) and all(tp in second_got for tp in second_owns)

    _until("the second member owns a partition and reads it", both_step)
    assert handed, "the first member was told of the revocation"
    for tp in second_owns:
        assert second_got[tp][0].offset == handed[tp], "resumed where the old owner committed"
    second.close(5000)
    first.close(5000)

"""The confluent backend's seek when librdkafka answers ``_OUTDATED``: it drops a seek that a newer
operation on the partition superseded (a rebalance pausing its fetcher).  Raised, that crashed a
score worker in the middle of a rebalance, and the embedded broker's group then never settled
(docs/broker-notes.md, "A seek that races a rebalance").  The race itself cannot be timed from
a test; the consumer, the broker and the fetches are real, only librdkafka's answer to a seek is
replaced by the one it gives in that race."""

from __future__ import annotations

import time
from typing import Any

import pytest

from stream_influence.config import KafkaSettings
from stream_influence.io.broker import Record, TopicPartition, open_broker
from tests.fixtures.broker import Broker, fresh_topic
from tests.fixtures.service_events import produce

pytestmark = pytest.mark.integration

TIMEOUT = 30.0  # generous: the machine may be loaded

ck = pytest.importorskip("confluent_kafka")


class _RacingSeek:
    """The librdkafka consumer, except that its next ``outdated`` seeks answer ``_OUTDATED``."""

    def __init__(self, consumer: Any, outdated: int) -> None:
        self._consumer, self.outdated, self.seeks = consumer, outdated, 0

    def seek(self, partition: Any) -> None:
        self.seeks += 1
        if self.outdated:
            self.outdated -= 1
            raise ck.KafkaException(ck.KafkaError(ck.KafkaError._OUTDATED))
        self._consumer.seek(partition)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)


def _poll_until(consumer: Any, tp: TopicPartition, n: int) -> list[Record]:
    got: list[Record] = []
    deadline = time.monotonic() + TIMEOUT
    while len(got) < n and time.monotonic() < deadline:
        got += consumer.poll(200, 1000).get(tp, [])
    return got


def test_a_seek_outdated_by_a_rebalance_is_made_again_not_raised(broker: Broker) -> None:
    topic = fresh_topic(broker, "seek")
    produce(broker.bootstrap, topic, [b"%d" % i for i in range(30)])
    k = KafkaSettings(
        client="confluent",
        bootstrap_servers=broker.bootstrap,
        topic=topic,
        group_id=f"{topic}-g",
        session_timeout_ms=2000,
        heartbeat_interval_ms=500,
    )
    consumer = open_broker(k).consumer()
    real = consumer._c  # the librdkafka consumer: the seam the race is injected at
    tp = TopicPartition(topic, 0)
    try:
        consumer.assign([tp])
        assert [r.offset for r in _poll_until(consumer, tp, 30)] == list(range(30))

        # Outdated once: the seek is made again and the partition is read from there.
        consumer._c = racing = _RacingSeek(real, outdated=1)
        consumer.seek(tp, 5)
        assert racing.seeks == 2
        assert consumer.position(tp) == 5
        assert [r.offset for r in _poll_until(consumer, tp, 25)] == list(range(5, 30))

        # Outdated every time: the seek is deferred to the next poll, which starts the partition there.
        consumer._c = racing = _RacingSeek(real, outdated=10)
        consumer.seek(tp, 12)
        consumer._c = real
        assert racing.seeks >= 2
        assert [r.offset for r in _poll_until(consumer, tp, 18)] == list(range(12, 30))
    finally:
        consumer._c = real
        consumer.close(1000)

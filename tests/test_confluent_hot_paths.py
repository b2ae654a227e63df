"""The confluent backend's hot paths: consumed records (the batch fast path builds exactly what
the per-message loop builds, and leaves every other batch to that loop) and ``produce_many``
(records librdkafka does not take at once go through ``produce``'s waiting and refusals)."""

from __future__ import annotations

from typing import Any

import pytest

from stream_influence.config import KafkaSettings
from stream_influence.io.broker import BrokerTrouble, OutputRecord, Record, open_broker
from tests.fixtures.broker import Broker, free_port, fresh_topic
from tests.fixtures.service_events import read_topic

TIMEOUT = 30.0  # generous: the machine may be loaded

ck = pytest.importorskip("confluent_kafka")
from stream_influence.io.confluent import _one_partition  # noqa: E402


def _msgs(n: int = 5, **over: Any) -> list[Any]:
    out = []
    for i in range(n):
        kw: dict[str, Any] = {
            "topic": "events",
            "partition": 3,
            "offset": 100 + i,
            "key": None if i % 2 else f"k{i}".encode(),
            "value": f"v{i}".encode(),
            "headers": None,
            "timestamp": (ck.TIMESTAMP_CREATE_TIME, 1_700_000_000_000 + i),
        }
        kw.update({k: v(i) if callable(v) else v for k, v in over.items()})
        out.append(ck.Message(**kw))
    return out


def test_one_partition_batch_is_built_as_the_loop_builds_it() -> None:
    msgs = _msgs()
    got = _one_partition(msgs, ck.Message)
    want = [
        Record(m.topic(), m.partition(), m.offset(), m.key(), m.value(), (), m.timestamp()[1]) for m in msgs
    ]
    assert got == want
    assert all(type(r) is Record for r in got)  # type: ignore[union-attr]
    assert got[1].key is None and got[0].key == b"k0" and got[4].timestamp == 1_700_000_000_004  # type: ignore[index]


@pytest.mark.parametrize(
    "over",
    [
        {"partition": lambda i: i % 2},  # two partitions
        {"topic": lambda i: "events" if i else "other"},  # two topics
        {"headers": lambda i: [("h", b"1")] if i == 2 else None},  # a message with headers
        {"timestamp": lambda i: (ck.TIMESTAMP_NOT_AVAILABLE, 0) if i == 4 else (1, i)},  # no timestamp
        {"error": lambda i: ck.KafkaError(ck.KafkaError._PARTITION_EOF) if i == 1 else None},  # an error
    ],
)
def test_any_other_batch_is_left_to_the_per_message_loop(over: dict[str, Any]) -> None:
    assert _one_partition(_msgs(**over), ck.Message) is None


def test_produce_many_waits_for_a_full_queue_and_keeps_order(broker: Broker) -> None:
    """A local queue of 4 messages: ``produce_many`` of 25 records fills it again and again; each
    record librdkafka refuses for a full queue is queued by ``produce`` once deliveries drain it,
    so all 25 land, in order, each delivery answered."""
    topic = fresh_topic(broker, "ck-full-queue")
    k = KafkaSettings(
        client="confluent",
        bootstrap_servers=broker.bootstrap,
        client_options={"queue.buffering.max.messages": 4, "linger.ms": 0},
    )
    p = open_broker(k).producer()
    recs = [OutputRecord(topic, f"k{i}".encode(), f"v{i}".encode(), [("n", b"%d" % i)]) for i in range(25)]
    q = p.produce_many(recs)
    assert q.refused is None and [d.record for d in q.deliveries] == recs
    p.flush(TIMEOUT)
    assert all(d.done and d.error is None for d in q.deliveries)
    p.close(5)
    landed = read_topic(broker.bootstrap, topic, at_least=25, timeout=TIMEOUT)
    assert [(m.key, m.value, list(m.headers)) for m in landed] == [
        (r.key, r.value, list(r.headers)) for r in recs
    ]


def test_produce_many_raises_broker_trouble_when_the_queue_stays_full() -> None:
    """No broker answers, so the queue of 2 never drains: the third record waits
    ``producer_max_block_ms`` in ``produce`` and the call raises :class:`BrokerTrouble`."""
    k = KafkaSettings(
        client="confluent",
        bootstrap_servers=f"127.0.0.1:{free_port()}",  # nothing listens there
        producer_max_block_ms=300,
        client_options={"queue.buffering.max.messages": 2},
    )
    p = open_broker(k).producer()
    recs = [OutputRecord("t", None, b"v", []) for _ in range(3)]
    with pytest.raises(BrokerTrouble, match="queue stayed full"):
        p.produce_many(recs)
    p.close(0.1)

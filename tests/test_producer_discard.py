"""A discarded producer (a rolled-back window) never publishes what it still held, on either backend."""

from __future__ import annotations

import gc
import time

from stream_influence.config import KafkaSettings
from stream_influence.io.broker import OutputRecord, open_broker
from tests.fixtures.broker import Broker, fresh_topic
from tests.fixtures.service_events import read_topic


def test_close_zero_discards_buffered_outputs_for_good(broker: Broker, kafka_client: str) -> None:
    topic = fresh_topic(broker, "discard")
    k = KafkaSettings(
        client=kafka_client,
        bootstrap_servers=broker.bootstrap,
        producer_linger_ms=1_000,  # held in the accumulator for a second, then sent unless aborted
        producer_batch_bytes=1 << 20,
    )
    producer = open_broker(k).producer()
    sent = [
        producer.produce(OutputRecord(topic=topic, key=f"k{i}".encode(), value=b"rolled back", headers=[]))
        for i in range(50)
    ]
    try:
        producer.close(0)  # a rollback: discard
        raised = None
    except Exception as exc:  # the emitter suppresses this; what matters is what happens next
        raised = exc
    # kafka-python's close(0) used to raise before aborting anything, leaving its sender thread to
    # publish the rolled-back outputs when the linger ran out or the broker came back.
    del producer
    gc.collect()
    time.sleep(3.0)  # past the linger: a sender left running would have sent them by now
    assert read_topic(broker.bootstrap, topic, timeout=3.0) == []
    assert raised is None
    # No delivery reports success for an output that was discarded.
    assert not [d for d in sent if d.done and d.error is None]

"""The broker goes away mid-run and comes back: the service keeps running and resumes by itself.

The test broker keeps everything in memory, so a restart wipes topics, offsets and groups: the
test produces a second batch after the restart and checks that the service processes it.  (A
real Kafka cluster keeps its data; the resumption path is the same.)
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
from kafka.errors import TopicAlreadyExistsError

from tests.fixtures.broker import Broker
from tests.fixtures.service_events import (
    consumed,
    events,
    produce,
    read_topic,
    start_service,
    wait_for,
    write_config,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Lines one logger may write over the restart test: the service's own ~20, or a client's few
# connection failures per kind and minute (repeats are held back, observability/logs.py).
MAX_LINES_PER_LOGGER = 40


def test_service_survives_a_broker_restart(tmp_path: Path, kafka_client: str) -> None:
    broker = Broker(log_dir=tmp_path).start()
    topic = "restart-events"
    outputs = [f"{topic}.quarantine", f"{topic}.dead-letter", f"{topic}.decisions"]
    proc = None
    try:
        broker.create_topic(topic)
        produce(broker.bootstrap, topic, events(2_000, seed=21, prefix="before")[0])
        cfg = write_config(
            tmp_path / "cfg.yaml",
            broker.bootstrap,
            topic,
            tmp_path / "ck",
            kafka={"client": kafka_client, "decisions_topic": outputs[2]},
            checkpoint={"every_seconds": 0.5},
        )
        log = tmp_path / "svc.log"
        proc = start_service(cfg, log)
        wait_for(lambda: consumed(tmp_path / "ck") >= 2_000, 60, what="first batch")

        broker.stop()
        time.sleep(4)  # down for a while: clients must neither hang nor crash
        assert proc.poll() is None, "the service exits when the broker goes away"
        broker.start()
        for name in [topic, *outputs]:  # the restarted broker is empty
            with contextlib.suppress(TopicAlreadyExistsError):
                broker.create_topic(name)
        produce(broker.bootstrap, topic, events(1_000, seed=22, prefix="after")[0])

        wait_for(lambda: consumed(tmp_path / "ck") >= 3_000, 90, what="second batch after the restart")
        assert proc.poll() is None
        ids = {json.loads(m.value)["id"] for m in read_topic(broker.bootstrap, outputs[2], at_least=1_000)}
        assert {f"after-{i}" for i in range(1_000)} <= ids
        text = log.read_text(errors="replace")
        assert "broker unreachable" in text and "reachable again" in text
        # The outage is a few lines and a count, not a line per retry (librdkafka retries every
        # ~50 ms per client: 86 lines of one logger in this test before they were held back).
        per_logger = Counter(m.group(1) for m in re.finditer(r"^\S+ \S+ \w+ (\S+):", text, re.M))
        assert per_logger and max(per_logger.values()) <= MAX_LINES_PER_LOGGER, per_logger.most_common(3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        broker.stop()


def test_outputs_that_cannot_be_flushed_roll_the_model_back(tmp_path: Path, kafka_client: str) -> None:
    """The broker dies after a window was processed but before its outputs were flushed: the
    window must not reach a checkpoint (the model rolls back) and is replayed later."""
    broker = Broker(log_dir=tmp_path).start()
    topic = "rollback-events"
    outputs = [f"{topic}.quarantine", f"{topic}.dead-letter", f"{topic}.decisions"]
    ckdir = tmp_path / "ck"
    proc = None
    n_before = 6000
    try:
        broker.create_topic(topic)
        produce(broker.bootstrap, topic, events(n_before, d=16, k=4, seed=31, prefix="before")[0])
        cfg = write_config(
            tmp_path / "cfg.yaml",
            broker.bootstrap,
            topic,
            ckdir,
            # Every decision is an output the checkpoint must flush; a huge linger keeps them all
            # in the producer until that flush, so the outage deterministically hits unsent outputs.
            kafka={
                "client": kafka_client,
                "decisions_topic": outputs[2],
                "flush_timeout_seconds": 3,
                "producer_linger_ms": 60_000,
                "producer_batch_bytes": 64 << 20,
            },
            checkpoint={"every_seconds": 6, "every_events": 1_000_000},
            logging={"level": "DEBUG"},
        )
        log = tmp_path / "svc.log"
        proc = start_service(cfg, log)
        batches = n_before // 500  # process_batch_size of write_config
        wait_for(
            lambda: log.read_text(errors="replace").count(" batch of ") >= batches,
            60,
            interval=0.05,
            what="the whole backlog processed",
        )
        assert consumed(ckdir) == 0  # processed, not yet checkpointed
        broker.stop()
        wait_for(lambda: "rolled back" in log.read_text(errors="replace"), 60, what="a rollback")
        assert consumed(ckdir) == 0  # the window never reached a checkpoint
        broker.start()
        for name in [topic, *outputs]:
            with contextlib.suppress(TopicAlreadyExistsError):
                broker.create_topic(name)
        # Fewer new events than the old position: the service must notice that its position is
        # past the end of the re-created partition.
        produce(broker.bootstrap, topic, events(300, d=16, k=4, seed=32, prefix="after")[0])
        wait_for(lambda: consumed(ckdir) >= 300, 90, what="new events after the rollback")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        # The rolled-back window was not applied: the model holds exactly the new events.
        assert consumed(ckdir) == 300
        ids = [json.loads(m.value)["id"] for m in read_topic(broker.bootstrap, outputs[2], at_least=300)]
        assert sorted(i for i in ids if i.startswith("after-")) == sorted(f"after-{i}" for i in range(300))
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        broker.stop()


def test_sigterm_while_the_broker_is_down_still_exits_zero_within_the_grace_period(
    tmp_path: Path, kafka_client: str
) -> None:
    broker = Broker(log_dir=tmp_path).start()
    proc = None
    grace = 8.0
    try:
        topic = broker.create_topic("down-term-events")
        produce(broker.bootstrap, topic, events(3_000, seed=41)[0])
        cfg = write_config(
            tmp_path / "cfg.yaml",
            broker.bootstrap,
            topic,
            tmp_path / "ck",
            kafka={"client": kafka_client},
            shutdown_grace_seconds=grace,
        )
        proc = start_service(cfg, tmp_path / "svc.log")
        wait_for(lambda: consumed(tmp_path / "ck") >= 3_000, 60, what="consumed")
        broker.stop()
        time.sleep(1)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(grace + 10)
        assert rc == 0 and time.monotonic() - t0 < grace
        assert consumed(tmp_path / "ck") == 3_000  # the model on disk is complete
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        broker.stop()

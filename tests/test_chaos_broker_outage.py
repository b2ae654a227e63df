"""A 30-second broker outage mid-stream, with the broker's data kept (S3 storage on moto).

The memory broker of the other restart tests forgets everything, so those tests cannot show the
service resuming from what it committed.  Here the broker keeps topics, records and committed
offsets across a SIGKILL and a restart on the same port, as a real Kafka broker does.  The whole
input is in the topic before the service starts (one partition, offset-aligned batches), so the
final model must equal one uninterrupted run over the same events — any event learned twice or
skipped would show — and every input offset must end in exactly one place.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from stream_influence.config import load_config
from stream_influence.core.engine import InfluenceEngine
from stream_influence.io.records import header_dict
from tests.fixtures.persistent_broker import PersistentBroker
from tests.fixtures.service_events import (
    consumed,
    events,
    latest_checkpoint,
    malformed,
    max_abs_diff,
    produce,
    read_topic,
    start_service,
    wait_for,
    write_config,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OUTAGE_SECONDS = 30.0  # issue 10: "a 30-second outage mid-stream"
N_EVENTS = 30_000
N_BAD = 200
BATCH = 500
STOP_AFTER = 6_000  # checkpointed events before the broker goes down: the middle of the stream
TIMEOUT = 90.0  # generous: the machine is shared


def _committed(bootstrap: str, group: str, topic: str) -> int | None:
    """The group's committed offset of partition 0, as the broker reports it."""
    from kafka import KafkaAdminClient, TopicPartition

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    try:
        got = admin.list_group_offsets({group: [TopicPartition(topic, 0)]})[group].get(
            TopicPartition(topic, 0)
        )
    finally:
        admin.close()
    return None if got is None or got.offset < 0 else got.offset


def _source_offsets(messages: list[Any]) -> Counter[int]:
    return Counter(int(header_dict(m.headers)["source_offset"]) for m in messages)


def test_service_resumes_by_itself_after_a_30s_outage_nothing_lost_nothing_learned_twice(
    persistent_broker: PersistentBroker, tmp_path: Path, kafka_client: str
) -> None:
    broker = persistent_broker
    topic = broker.create_topic("outage")
    ref = broker.create_topic("outage-ref")
    refs, _ = events(300, seed=27, prefix="ref")
    produce(broker.bootstrap, ref, refs)
    good, _ = events(N_EVENTS, noise=0.3, seed=28)
    messages = list(good)
    step = len(messages) // N_BAD
    for i, bad in enumerate(malformed(N_BAD, seed=29)):
        messages.insert(i * (step + 1) + 7, bad)
    produce(broker.bootstrap, topic, messages)
    total = len(messages)
    outputs = {"quarantine": f"{topic}.quarantine", "dead": f"{topic}.dead-letter"}
    decisions = f"{topic}.decisions"

    ckdir = tmp_path / "ck"
    cfg_path = write_config(
        tmp_path / "cfg.yaml",
        broker.bootstrap,
        topic,
        ckdir,
        kafka={
            "client": kafka_client,
            "reference_topic": ref,
            "decisions_topic": decisions,
            "process_batch_size": BATCH,
        },
        checkpoint={"every_events": 2000, "every_seconds": 1.0},
        logging={"level": "DEBUG"},  # one line per processed batch
    )
    log = tmp_path / "svc.log"
    proc = start_service(cfg_path, log)
    try:
        # Stop while batches processed after the last checkpoint are in flight (their outputs
        # unflushed), so the outage hits an open window that must be rolled back and replayed.
        def in_window() -> bool:
            done = consumed(ckdir)
            return done >= STOP_AFTER and log.read_text(errors="replace").count(" batch of ") * BATCH > done

        wait_for(in_window, TIMEOUT, interval=0.01, what="mid-stream, past a checkpoint")
        # The service rolls back to its latest checkpoint, which holds at least this many events.
        checkpointed = consumed(ckdir)
        broker.stop()  # SIGKILL: the data stays in S3
        at_stop = consumed(ckdir)
        assert at_stop < total, "the stream ended before the outage: raise N_EVENTS"
        t_down = time.monotonic()
        while time.monotonic() - t_down < OUTAGE_SECONDS:
            assert proc.poll() is None, f"the service exited during the outage: {proc.returncode}"
            time.sleep(0.5)
        broker.start()
        t_up = time.monotonic()
        kept = _committed(broker.bootstrap, f"{topic}-group", topic)
        assert kept is not None and 0 < kept <= at_stop, f"the broker lost the group's commit: {kept}"
        # No restart of the service: it must re-join and go on from its committed offsets.
        wait_for(lambda: consumed(ckdir) >= total, TIMEOUT, what="the whole stream after the outage")
        resumed_s = time.monotonic() - t_up
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = log.read_text(errors="replace")
    assert "broker unreachable" in text and "reachable again" in text

    # One uninterrupted run over the same events, same batches, no Kafka.
    cfg = load_config(cfg_path)
    engine = InfluenceEngine(cfg.engine)
    engine.add_reference(refs)
    expected: dict[int, dict[str, Any]] = {}
    for start in range(0, total, BATCH):
        for i, rec in enumerate(engine.process(messages[start : start + BATCH]).records()):
            expected[start + i] = rec

    ck = latest_checkpoint(ckdir)
    assert ck.offsets == {(topic, 0): total}
    c = ck.engine.counters
    assert c.consumed == total
    assert c.accepted + c.quarantined + c.dead_lettered == total
    assert ck.engine.events_seen == N_EVENTS, "each valid event learned once"
    assert ck.engine.counters.as_dict() == engine.counters.as_dict()
    assert max_abs_diff(ck.engine.state_dict(), engine.state_dict()) <= 1e-9, "model = uninterrupted run"

    # Per offset, exactly one place.  Replayed windows may repeat an output, as identical copies.
    by_offset: dict[int, set[tuple[bytes | None, bytes]]] = {}
    n_copies: Counter[int] = Counter()
    for m in read_topic(broker.bootstrap, decisions, at_least=total):
        off = json.loads(m.value)["source_offset"]
        by_offset.setdefault(off, set()).add((m.key, m.value))
        n_copies[off] += 1
    assert set(by_offset) == set(range(total)), "every input offset has a decision"
    assert all(len(v) == 1 for v in by_offset.values()), "a replayed decision differs from the first"
    replayed = sorted(o for o, n in n_copies.items() if n > 1)
    # Resumed from what was committed: only the window after the last checkpoint was replayed.
    assert not replayed or replayed[0] >= checkpointed, f"replayed from {replayed[0]} < {checkpointed}"
    decided = {off: json.loads(next(iter(v))[1])["decision"] for off, v in by_offset.items()}
    assert decided == {off: r["decision"] for off, r in expected.items()}
    quarantined = _source_offsets(read_topic(broker.bootstrap, outputs["quarantine"], at_least=c.quarantined))
    dead = read_topic(broker.bootstrap, outputs["dead"], at_least=c.dead_lettered)
    assert set(quarantined) == {o for o, d in decided.items() if d == "quarantine"}
    assert set(_source_offsets(dead)) == {o for o, d in decided.items() if d == "dead_letter"}
    assert all(header_dict(m.headers).get("reason") for m in dead), "a dead letter without a reason"
    assert {o for o, d in decided.items() if d == "accept"} == set(range(total)) - set(quarantined) - set(
        _source_offsets(dead)
    )
    assert (len(quarantined), len(set(_source_offsets(dead)))) == (c.quarantined, c.dead_lettered)
    print(
        f"outage at consumed={at_stop}; all {total} consumed {resumed_s:.1f} s after the broker was back; "
        f"{len(replayed)} offsets replayed; {text.count('rolled back')} rollbacks"
    )

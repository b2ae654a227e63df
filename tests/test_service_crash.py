"""Crash safety: ``kill -9`` at random points, restart, and the model equals an uninterrupted run.

One input partition, so that the order in which events reach the model is the offset order;
batches are aligned to offsets (``kafka.process_batch_size``), so a replay after a crash cuts the
same batches as the uninterrupted run and the comparison is exact (see docs/architecture.md).
"""

from __future__ import annotations

import json
import random
import signal
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from stream_influence.config import load_config
from stream_influence.core.engine import InfluenceEngine
from tests.fixtures.broker import Broker, fresh_topic
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

N_EVENTS = 50_000
N_BAD = 100
BATCH = 500
KILLS = 5


def test_kill_minus_nine_five_times_equals_one_uninterrupted_run(
    broker: Broker, tmp_path: Path, kafka_client: str
) -> None:
    rng = random.Random(42)
    topic = fresh_topic(broker, "crash")
    ref = fresh_topic(broker, "crash-ref")
    refs, _ = events(300, seed=17, prefix="ref")
    produce(broker.bootstrap, ref, refs)
    good, _ = events(N_EVENTS, noise=0.3, seed=11)
    messages = list(good)
    for b in malformed(N_BAD, seed=12):
        messages.insert(rng.randrange(len(messages) + 1), b)
    produce(broker.bootstrap, topic, messages)
    total = len(messages)

    ckdir = tmp_path / "ck"
    cfg_path = write_config(
        tmp_path / "cfg.yaml",
        broker.bootstrap,
        topic,
        ckdir,
        kafka={
            "client": kafka_client,
            "reference_topic": ref,
            "decisions_topic": f"{topic}.decisions",
            "process_batch_size": BATCH,
        },
        checkpoint={"every_events": 3000, "every_seconds": 1.0},
    )
    log = tmp_path / "svc.log"
    # Five kill points spread over the stream, each a random moment after the checkpoint that
    # passed a random target: the window since that checkpoint is lost and must be replayed.
    targets = sorted(rng.sample(range(total // 10, total * 8 // 10), KILLS))
    kills = []
    last = 0
    for target in targets:
        proc = start_service(cfg_path, log)
        goal = max(target, last + 1)
        try:
            wait_for(lambda goal=goal: consumed(ckdir) >= goal, 60, interval=0.02, what=f"{goal} consumed")
            time.sleep(rng.uniform(0.0, 0.2))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        last = consumed(ckdir)
        kills.append(last)
        assert last < total, f"the stream ended before kill {len(kills)}: {kills}"
    proc = start_service(cfg_path, log)
    try:
        wait_for(lambda: consumed(ckdir) >= total, 120, what="all consumed after restarts")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert len(set(kills)) == KILLS, f"each kill after new progress: {kills}"

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
    got, want = ck.engine.state_dict(), engine.state_dict()
    for part in ("routed", "shadow", "curvature"):
        assert max_abs_diff(got[part], want[part], part) <= 1e-9, part
    assert max_abs_diff(got, want) <= 1e-9, "the whole engine state"
    assert ck.engine.counters.as_dict() == engine.counters.as_dict()

    # No event missing from the outputs; duplicates only as identical copies (same key, same
    # decision and scores: the replay of an un-checkpointed window).
    by_offset: dict[int, list[Any]] = defaultdict(list)
    for m in read_topic(broker.bootstrap, f"{topic}.decisions", at_least=total):
        by_offset[json.loads(m.value)["source_offset"]].append(m)
    assert set(by_offset) == set(range(total)), "every input offset has a decision"
    dupes = 0
    for off, copies in by_offset.items():
        rec = json.loads(copies[0].value)
        assert {k: rec[k] for k in ("decision", "reason", "id")} == {
            k: expected[off][k] for k in ("decision", "reason", "id")
        }
        for c in copies[1:]:
            assert (c.key, c.value) == (copies[0].key, copies[0].value)
            dupes += 1
    assert dupes > 0, "no kill fell into an un-checkpointed window: the replay was not exercised"
    want_q = {r["id"] for r in expected.values() if r["decision"] == "quarantine"}
    quarantine = read_topic(broker.bootstrap, f"{topic}.quarantine", at_least=len(want_q))
    assert {m.key.decode() for m in quarantine} == want_q
    dead = read_topic(broker.bootstrap, f"{topic}.dead-letter", at_least=N_BAD)
    assert {int(dict(m.headers)["source_offset"]) for m in dead} == {
        o for o, r in expected.items() if r["decision"] == "dead_letter"
    }
    print(f"kills at consumed={kills}; {dupes} duplicate decision messages from replayed windows")

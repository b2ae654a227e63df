"""Fuzz through a running service: ≥ 10,000 generated bad messages, valid events, two kill -9.

The bad messages come from Hypothesis strategies (tests/fixtures/bad_events.py: random bytes,
invalid UTF-8, wrong types, missing fields, NaN/Infinity, lone surrogates in ids, huge integers,
deep nesting, values near the 1 MiB producer limit, wrong width, unknown labels, …), generated
once up front and deterministically (:func:`tests.fixtures.bad_events.generate`), then mixed with
valid events at seeded random positions of one partition and produced before the service
starts.  The service (``stream-influence run``, a subprocess) is killed with SIGKILL twice at
seeded random moments and restarted.  The contract checked:

* the service never exits on its own;
* every input offset gets exactly one decision (replayed windows may repeat it, identically);
* every bad message is dead-lettered with a machine-readable reason, and nothing else is;
* each valid event is learned exactly once: the final checkpoint's model equals one
  uninterrupted run over the same batches, and its ``events_seen`` is the number of valid events.

The label space and the width come from the trusted reference topic (no ``schema`` settings),
as issue 10 says they must.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from hypothesis import strategies as st

from stream_influence.config import load_config
from stream_influence.core.events import RejectReason
from stream_influence.io.records import header_dict
from tests.fixtures.bad_events import CLASSES, WIDTH, bad_message, generate, oversized_message
from tests.fixtures.broker import Broker, fresh_topic
from tests.fixtures.service_events import (
    consumed,
    events,
    latest_checkpoint,
    max_abs_diff,
    produce,
    read_topic,
    start_service,
    uninterrupted,
    wait_for,
    write_config,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_BAD = 10_000
PER_EXAMPLE = 20  # bad messages per Hypothesis example: one example per message is 3x slower
N_OVERSIZED = 8  # ~1 MiB each
N_GOOD = 10_000
BATCH = 500
KILLS = 2
TIMEOUT = 120.0  # per wait; generous because the machine is shared


def _alive_until(proc: subprocess.Popen[bytes], goal: int, ckdir: Path, log: Path) -> None:
    """Wait until ``goal`` events are checkpointed; fail at once if the service exits by itself."""
    wait_for(lambda: proc.poll() is not None or consumed(ckdir) >= goal, TIMEOUT, 0.02, f"{goal} consumed")
    if proc.poll() is not None:
        tail = log.read_text(errors="replace")[-3000:]
        pytest.fail(f"the service exited by itself (code {proc.returncode}) before {goal} consumed:\n{tail}")


def test_fuzzed_bad_messages_and_two_kill_minus_nine_each_offset_decided_once(
    broker: Broker, tmp_path: Path, kafka_client: str
) -> None:
    bad: list[bytes | None] = [
        m
        for chunk in generate(
            st.lists(bad_message, min_size=PER_EXAMPLE, max_size=PER_EXAMPLE), N_BAD // PER_EXAMPLE
        )
        for m in chunk
    ]
    bad += generate(oversized_message, N_OVERSIZED)
    assert len(bad) >= N_BAD
    good, _ = events(N_GOOD, d=WIDTH, k=len(CLASSES), noise=0.3, seed=61)
    rng = random.Random(62)
    is_bad = [True] * len(bad) + [False] * len(good)
    rng.shuffle(is_bad)
    bad_it, good_it = iter(bad), iter(good)
    messages = [next(bad_it) if b else next(good_it) for b in is_bad]
    total = len(messages)
    bad_offsets = {o for o, b in enumerate(is_bad) if b}

    topic = fresh_topic(broker, "fuzz")
    ref = fresh_topic(broker, "fuzz-ref")
    refs, _ = events(300, d=WIDTH, k=len(CLASSES), seed=63, prefix="ref")
    produce(broker.bootstrap, ref, refs)
    keys = [b"tombstone-%d" % o if m is None else None for o, m in enumerate(messages)]  # Kafka needs one
    produce(broker.bootstrap, topic, messages, keys, max_request_size=4 << 20)

    ckdir = tmp_path / "ck"
    decisions = f"{topic}.decisions"
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
    )
    log = tmp_path / "svc.log"
    targets = sorted(rng.sample(range(total // 10, total * 7 // 10), KILLS))
    kills: list[int] = []
    for target in targets:
        proc = start_service(cfg_path, log)
        try:
            _alive_until(proc, max(target, (kills or [0])[-1] + 1), ckdir, log)
            time.sleep(rng.uniform(0.0, 0.3))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        kills.append(consumed(ckdir))
    proc = start_service(cfg_path, log)
    try:
        _alive_until(proc, total, ckdir, log)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert all(k < total for k in kills), f"the stream ended before a kill: {kills}"

    # Every offset: exactly one decision; bad ⇔ dead-lettered.
    copies: dict[int, set[tuple[bytes | None, bytes]]] = defaultdict(set)
    decided_msgs = read_topic(broker.bootstrap, decisions, at_least=total, timeout=60)
    for m in decided_msgs:
        copies[json.loads(m.value)["source_offset"]].add((m.key, m.value))
    assert set(copies) == set(range(total)), "an input offset without a decision"
    n_copies = Counter(json.loads(m.value)["source_offset"] for m in decided_msgs)
    differing = sorted(o for o, c in copies.items() if len(c) > 1)
    assert not differing, f"replayed decisions differ from the first at offsets {differing[:10]}"
    decided = {o: json.loads(next(iter(c))[1])["decision"] for o, c in copies.items()}
    wrongly_valid = sorted(o for o in bad_offsets if decided[o] != "dead_letter")
    assert not wrongly_valid, "bad messages not dead-lettered: " + "; ".join(
        f"{o}: {messages[o]!r:.120}" for o in wrongly_valid[:10]
    )
    assert {o for o, d in decided.items() if d == "dead_letter"} == bad_offsets, "a valid event dead-lettered"

    reasons = {r.value for r in RejectReason}
    dead_by_offset: dict[int, set[str]] = defaultdict(set)
    for m in read_topic(broker.bootstrap, f"{topic}.dead-letter", at_least=len(bad_offsets), timeout=60):
        h = header_dict(m.headers)
        dead_by_offset[int(h["source_offset"])].add(h.get("reason", ""))
    assert set(dead_by_offset) == bad_offsets
    unexplained = {o: r for o, r in dead_by_offset.items() if len(r) != 1 or not r <= reasons}
    assert not unexplained, f"dead letters without one known reason: {list(unexplained.items())[:10]}"
    quarantined = {
        int(header_dict(m.headers)["source_offset"])
        for m in read_topic(broker.bootstrap, f"{topic}.quarantine", timeout=60)
    }
    assert quarantined == {o for o, d in decided.items() if d == "quarantine"}

    # Each valid event learned exactly once: the model of one uninterrupted run, no Kafka.
    engine = uninterrupted(load_config(cfg_path), refs, messages, BATCH)
    ck = latest_checkpoint(ckdir)
    assert ck.offsets == {(topic, 0): total}
    assert ck.engine.events_seen == N_GOOD
    c = ck.engine.counters
    assert (c.consumed, c.dead_lettered, c.accepted + c.quarantined) == (total, len(bad_offsets), N_GOOD)
    assert c.as_dict() == engine.counters.as_dict()
    assert max_abs_diff(ck.engine.state_dict(), engine.state_dict()) <= 1e-9
    replayed = sum(1 for n in n_copies.values() if n > 1)
    print(f"{len(bad)} bad + {N_GOOD} valid; kills at consumed={kills}; {replayed} offsets decided again")

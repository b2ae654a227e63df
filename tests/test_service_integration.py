"""`stream-influence run` against the real broker: accounting, headers, groups, SIGTERM, requeue.

Every test uses fresh topics and runs the service as a subprocess (signals are real).
"""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kafka import KafkaConsumer, TopicPartition

from stream_influence.core.events import RejectReason
from tests.fixtures.broker import Broker, fresh_topic
from tests.fixtures.service_events import (
    consumed,
    events,
    latest_checkpoint,
    malformed,
    produce,
    read_topic,
    start_service,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.integration


def _stop(proc: subprocess.Popen[bytes], timeout: float = 20) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout)


def _log(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _metrics_port(log: Path) -> int:
    m = wait_for(
        lambda: re.search(r"metrics on http://[\d.]+:(\d+)/metrics", _log(log)), 30, what="metrics port"
    )
    return int(m.group(1))


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_every_input_offset_is_accounted_for(broker: Broker, tmp_path: Path, kafka_client: str) -> None:
    """20 000 events, 30 % label noise, 200 malformed: accepted + quarantined + dead = consumed."""
    topic = fresh_topic(broker, "acct", partitions=2)
    ref = fresh_topic(broker, "acct-ref")
    produce(broker.bootstrap, ref, events(300, seed=7, prefix="ref")[0])
    good, flipped = events(20_000, noise=0.3, seed=1)
    bad = malformed(200, seed=2)
    rng = random.Random(3)
    messages = list(good)
    for b in bad:
        messages.insert(rng.randrange(len(messages) + 1), b)
    keys = [b"k%d" % i for i in range(len(messages))]  # dead letters must keep the original key
    produce(broker.bootstrap, topic, messages, keys)
    cfg = write_config(
        tmp_path / "cfg.yaml",
        broker.bootstrap,
        topic,
        tmp_path / "ck",
        kafka={
            "client": kafka_client,
            "reference_topic": ref,
            "decisions_topic": f"{topic}.decisions",
            "accepted_topic": f"{topic}.accepted",
        },
    )
    log = tmp_path / "svc.log"
    proc = start_service(cfg, log)
    try:
        wait_for(lambda: consumed(tmp_path / "ck") >= len(messages), 120, what="all consumed")
    finally:
        rc = _stop(proc)
    assert rc == 0, _log(log)[-3000:]

    ck = latest_checkpoint(tmp_path / "ck")
    c = ck.engine.counters
    assert c.consumed == 20_200
    assert c.accepted + c.quarantined + c.dead_lettered == c.consumed
    assert c.dead_lettered == 200
    assert c.quarantined > 0

    # The input, by (partition, offset), to compare the outputs against.
    inputs = {(m.partition, m.offset): m for m in read_topic(broker.bootstrap, topic, at_least=20_200)}
    assert len(inputs) == 20_200

    decisions = read_topic(broker.bootstrap, f"{topic}.decisions", at_least=20_200)
    seen = {}
    for m in decisions:
        rec = json.loads(m.value)
        seen[(rec["source_partition"], rec["source_offset"])] = rec["decision"]
    assert set(seen) == set(inputs), "every input offset has exactly one decision"
    counts = {d: list(seen.values()).count(d) for d in ("accept", "quarantine", "dead_letter")}
    assert counts == {"accept": c.accepted, "quarantine": c.quarantined, "dead_letter": c.dead_lettered}

    dead = read_topic(broker.bootstrap, f"{topic}.dead-letter", at_least=200)
    assert len(dead) == 200
    reasons = {r.value for r in RejectReason}
    for m in dead:
        h = dict(m.headers)
        src = inputs[(int(h["source_partition"]), int(h["source_offset"]))]
        assert h["source_topic"].decode() == topic
        assert h["reason"].decode() in reasons and h["detail"]
        assert (m.key, m.value) == (src.key, src.value), "original key and bytes"
        assert seen[(src.partition, src.offset)] == "dead_letter"

    accepted = read_topic(broker.bootstrap, f"{topic}.accepted", at_least=c.accepted)
    assert len(accepted) == c.accepted
    assert {
        (int(dict(m.headers)["source_partition"]), int(dict(m.headers)["source_offset"])) for m in accepted
    } == {po for po, d in seen.items() if d == "accept"}

    quarantined = read_topic(broker.bootstrap, f"{topic}.quarantine", at_least=c.quarantined)
    assert len(quarantined) == c.quarantined
    flipped_ids = {f"e-{i}" for i in np.flatnonzero(flipped)}
    hits = 0
    for m in quarantined:
        h = {k: v.decode() for k, v in m.headers}
        src = inputs[(int(h["source_partition"]), int(h["source_offset"]))]
        assert m.value == src.value and m.key.decode() == json.loads(src.value)["id"]
        for name in ("influence", "relative_influence", "cosine_influence", "threshold"):
            assert np.isfinite(float(h[name])), name
        # Quarantined for its score, or by the reference-loss test's strong evidence although the
        # score is helpful (policy.floor_yield_fdr): the reason says which.
        assert h["reason"] in ("harmful", "surprising_label"), h["reason"]
        if h["reason"] == "harmful":
            assert float(h["cosine_influence"]) > float(h["threshold"])
        else:
            assert float(h["cosine_influence"]) <= float(h["threshold"])
        assert int(h["policy_version"]) >= 1 and int(h["model_version"]) >= 0
        hits += m.key.decode() in flipped_ids
    # The scores mean something: most quarantined events carry a flipped label.
    assert hits / len(quarantined) > 0.7


def test_two_instances_split_partitions_and_account_for_everything(
    broker: Broker, tmp_path: Path, kafka_client: str
) -> None:
    topic = fresh_topic(broker, "group", partitions=4)
    decisions = f"{topic}.decisions"
    cfgs, logs, procs = [], [], []
    for name in ("a", "b"):
        cfgs.append(
            write_config(
                tmp_path / f"{name}.yaml",
                broker.bootstrap,
                topic,
                tmp_path / f"ck-{name}",
                kafka={"client": kafka_client, "decisions_topic": decisions},
                checkpoint={"every_seconds": 0.5},
            )
        )
        logs.append(tmp_path / f"{name}.log")
    try:
        procs.append(start_service(cfgs[0], logs[0]))
        wait_for(lambda: "partitions assigned" in _log(logs[0]), 30, what="a joined")
        procs.append(start_service(cfgs[1], logs[1]))

        def split() -> bool:
            last = [re.findall(r"partitions assigned: (\[.*\])", _log(p)) for p in logs]
            return all(last) and all(len(eval(x[-1])) == 2 for x in last)  # 2 + 2 of 4

        wait_for(split, 60, what="2 + 2 partitions")
        first, _ = events(8_000, seed=5)
        produce(broker.bootstrap, topic, first)
        wait_for(
            lambda: consumed(tmp_path / "ck-a") + consumed(tmp_path / "ck-b") >= 8_000,
            60,
            what="8000 consumed",
        )
        n_a, n_b = consumed(tmp_path / "ck-a"), consumed(tmp_path / "ck-b")
        assert n_a > 0 and n_b > 0 and n_a + n_b == 8_000
        offsets_a = latest_checkpoint(tmp_path / "ck-a").offsets
        offsets_b = latest_checkpoint(tmp_path / "ck-b").offsets
        assert not set(offsets_a) & set(offsets_b), "each partition was processed by one instance"

        # B leaves: A takes its partitions over from B's committed offsets.
        assert _stop(procs[1]) == 0
        second, _ = events(2_000, seed=6, prefix="late")
        produce(broker.bootstrap, topic, second)
        wait_for(
            lambda: consumed(tmp_path / "ck-a") + consumed(tmp_path / "ck-b") >= 10_000,
            60,
            what="handover consumed",
        )
        assert _stop(procs[0]) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert consumed(tmp_path / "ck-a") + consumed(tmp_path / "ck-b") == 10_000, "no event twice"
    recs = read_topic(broker.bootstrap, decisions, at_least=10_000)
    ids = [json.loads(m.value)["id"] for m in recs]
    assert set(ids) == {f"e-{i}" for i in range(8_000)} | {f"late-{i}" for i in range(2_000)}
    assert len(ids) == 10_000


def test_sigterm_exits_zero_with_final_checkpoint_and_commit(
    broker: Broker, tmp_path: Path, kafka_client: str
) -> None:
    topic = fresh_topic(broker, "term")
    ref = fresh_topic(broker, "term-ref")
    produce(broker.bootstrap, ref, events(300, seed=7, prefix="ref")[0])
    produce(broker.bootstrap, topic, events(40_000, noise=0.2, seed=8)[0])
    grace = 10.0

    def config(**engine: Any) -> Path:
        return write_config(
            tmp_path / "cfg.yaml",
            broker.bootstrap,
            topic,
            tmp_path / "ck",
            kafka={"client": kafka_client, "reference_topic": ref},
            # Long intervals: the only checkpoint after the first seconds is the one SIGTERM writes.
            checkpoint={"every_events": 10_000_000, "every_seconds": 3600},
            shutdown_grace_seconds=grace,
            **engine,
        )

    cfg = config()
    log = tmp_path / "svc.log"
    proc = start_service(cfg, log)
    try:
        port = _metrics_port(log)
        assert _get(f"http://127.0.0.1:{port}/healthz")[0] == 200
        status, _body = wait_for(
            lambda: (r := _get(f"http://127.0.0.1:{port}/readyz"))[0] == 200 and r, 60, what="ready"
        )
        assert status == 200
        # SIGHUP reloads engine.policy from the (edited) file while the stream runs.
        config(engine={"policy": {"warmup_events": 300, "quarantine_threshold": 0.05}})
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "routing policy version 2 in force" in _log(log), 10, what="policy reload")
        metrics = _get(f"http://127.0.0.1:{port}/metrics")[1]
        assert re.search(r"^stream_influence_events_consumed_total [1-9]", metrics, re.M)
        assert re.search(rf'^stream_influence_consumer_lag_messages{{.*topic="{topic}".*}} \d', metrics, re.M)
        assert re.search(r"^stream_influence_broker_up 1", metrics, re.M)
        before = latest_checkpoint(tmp_path / "ck")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(grace + 5)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, _log(log)[-3000:]
    assert elapsed < grace
    ck = latest_checkpoint(tmp_path / "ck")
    assert ck is not None and (before is None or ck.seq > before.seq), "final checkpoint written"
    assert ck.extra.get("reason") == "shutdown"
    assert ck.engine.policy.settings.quarantine_threshold == 0.05 and ck.engine.policy.version == 2
    done = ck.offsets[(topic, 0)]
    assert ck.engine.counters.consumed == done > 0
    c = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=f"{topic}-group", enable_auto_commit=False)
    try:
        assert c.committed(TopicPartition(topic, 0)) == done, "offsets committed = checkpoint"
    finally:
        c.close()


def test_requeue_republishes_what_passes_once(broker: Broker, tmp_path: Path, kafka_client: str) -> None:
    topic = fresh_topic(broker, "rq")
    ref = fresh_topic(broker, "rq-ref")
    target = fresh_topic(broker, "rq-out")
    produce(broker.bootstrap, ref, events(300, seed=7, prefix="ref")[0])
    produce(broker.bootstrap, topic, events(4_000, noise=0.3, seed=9)[0])
    cfg = write_config(
        tmp_path / "cfg.yaml",
        broker.bootstrap,
        topic,
        tmp_path / "ck",
        kafka={"client": kafka_client, "reference_topic": ref},
    )
    proc = start_service(cfg, tmp_path / "svc.log")
    try:
        wait_for(lambda: consumed(tmp_path / "ck") >= 4_000, 60, what="consumed")
    finally:
        assert _stop(proc) == 0
    n_q = latest_checkpoint(tmp_path / "ck").engine.counters.quarantined
    assert n_q > 0

    def requeue(threshold: float) -> str:
        lenient = write_config(
            tmp_path / "requeue.yaml",
            broker.bootstrap,
            topic,
            tmp_path / "ck",
            kafka={"client": kafka_client, "reference_topic": ref},
            engine={  # floor_yield_fdr and self_loss_fdr 0: no evidence overrides the floor, so the threshold decides
                "policy": {
                    "warmup_events": 300,
                    "accept_threshold": -2.0,
                    "quarantine_threshold": threshold,
                    "floor_yield_fdr": 0.0,
                    "self_loss_fdr": 0.0,
                }
            },
        )
        out = subprocess.run(
            [sys.executable, "-m", "stream_influence", "requeue", "--from-quarantine", "--config", str(lenient),
             "--to", target],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        return out.stdout

    # Nothing passes a threshold below every cosine (they lie in [-1, 1]): nothing is published.
    assert "0 now pass" in requeue(-2.0)
    # Everything passes cosine ≤ 1: all of the quarantine is re-published, once.
    first = requeue(1.0)
    assert f"{n_q} now pass" in first and f"re-published {n_q}" in first
    again = requeue(1.0)
    assert "0 now pass" in again and f"{n_q} requeued before" in again
    out = read_topic(broker.bootstrap, target, at_least=n_q)
    assert len(out) == n_q
    assert all(dict(m.headers)["requeued_from"].startswith(f"{topic}.quarantine:".encode()) for m in out)


def test_produce_cli_loads_a_jsonl_file(broker: Broker, tmp_path: Path, kafka_client: str) -> None:
    topic = fresh_topic(broker, "cli-produce")
    raws = events(3_000, seed=4)[0] + [b"not json"]
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(raws) + b"\n\n")  # a blank line is skipped, not sent
    cfg = write_config(
        tmp_path / "cfg.yaml", broker.bootstrap, topic, tmp_path / "ck", kafka={"client": kafka_client}
    )
    out = subprocess.run(
        [sys.executable, "-m", "stream_influence", "produce", str(path), "--topic", topic, "--config", str(cfg),
         "--bootstrap", broker.bootstrap, "--key-from-id", "--quiet"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert f"3001 of 3001 events produced to {topic}" in out.stdout
    got = read_topic(broker.bootstrap, topic, at_least=3_001)
    assert [m.value for m in got] == raws
    assert got[0].key == b"e-0" and got[-1].key is None

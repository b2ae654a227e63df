"""Scale-out on the embedded broker: 3 score workers + 1 updater over a 6-partition topic.

The must-show of issue 12, one scenario in phases (each phase asserts what it proves):

1. 30,000 events of the bundled Hyperplane stream (2 classes, d=10) with 30 % label noise and 200 bad
   messages; one worker is killed with
   ``kill -9`` at about a third of the stream and restarted, then the updater at about two thirds.
2. A second updater is started against the same topics: the first is fenced (exit status 3), the
   second continues from the first's last snapshot and learns 3,000 more events.
3. Every input offset has exactly one decision (the updates topic — first record per source
   offset, which is what the updater learned — or the dead-letter topic, never both); the updater
   learned each valid event exactly once (its per-partition high-water marks, an order-free
   checksum of the learned offsets, and its event count); routing quality and clean accuracy
   compared with the single-process engine on the same stream (quarantine precision and recall of
   the label flips; clean test accuracy within 1 point).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from stream_influence.config import load_config
from stream_influence.core.engine import InfluenceEngine
from stream_influence.io.records import header_dict
from stream_influence.offline.datasets import Stream, load_stream
from stream_influence.service.roles import FENCED_EXIT, applied_checksum
from tests.fixtures.broker import Broker, fresh_topic
from tests.fixtures.service_events import (
    latest_checkpoint,
    malformed,
    produce,
    read_topic,
    start_service,
    wait_for,
    write_config,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_EVENTS = 30_000
N_BAD = 200
N_MORE = 3_000
PARTITIONS = 6
SCORERS = 3
# Generous: 5 Python processes share 2 cores with other work on the development machines.
TIMEOUT = float(os.environ.get("SCALEOUT_TEST_TIMEOUT", "240"))


def _start(config: Path, role: str, log: Path) -> subprocess.Popen[bytes]:
    return start_service(config, log, role=role)


def _check_running(running: dict[str, tuple[subprocess.Popen[bytes], Path]]) -> None:
    """Fail at once, with the end of its log, when a process that must be running has exited
    (a crashed score worker otherwise shows only as the updater waiting for records that never
    come, until the deadline)."""
    for name, (p, log) in running.items():
        if p.poll() is not None:
            lines = log.read_text(errors="replace").splitlines()
            tail = "\n".join([ln for ln in lines if not ln.startswith("%7|")][-40:])  # not librdkafka debug
            raise AssertionError(
                f"{name} exited with status {p.returncode} while it had to run; its log ends:\n{tail}"
            )


def _learned(ckdir: Path) -> int:
    ck = latest_checkpoint(ckdir)
    return 0 if ck is None else int(ck.engine.events_seen)


def _config(tmp: Path, name: str, broker: Broker, topic: str, ref: str, ckdir: Path, client: str) -> Path:
    return write_config(
        tmp / f"{name}.yaml",
        broker.bootstrap,
        topic,
        ckdir,
        # A small SGD step: the final head then measures what routing let through, not the last
        # few hundred steps (at the default 0.1 it moves by ±1.5 points with the learning order).
        engine={"reference": {"min_size": 100}, "learner": {"learning_rate": 0.02}},
        kafka={"client": client, "reference_topic": ref, "process_batch_size": 500},
        # Staleness: a worker scores at most 2 × 256 events on one snapshot, and the updater
        # publishes one per 256 events learned (or per 0.5 s).
        checkpoint={"every_events": 256, "every_seconds": 0.5},
        scaleout={
            "updates_topic": f"{topic}.updates",
            "model_topic": f"{topic}.model",
            "updater_group_id": f"{topic}.updater",
            "updates_partitions": 3,
            "max_model_lag_versions": 2,
            "snapshot_every_seconds": 0,  # one snapshot per checkpoint
        },
    )


def _accuracy(engine: InfluenceEngine, X: np.ndarray, y: np.ndarray, *, shadow: bool = False) -> float:
    classes = np.array([str(c) for c in engine.schema.classes])  # head rows are in this order
    predicted = classes[engine.predict_proba(X, shadow=shadow).argmax(1)]
    return float((predicted == y.astype(str)).mean())


def test_three_scorers_and_one_updater_kill_nine_and_a_fenced_second_updater(
    broker: Broker, tmp_path: Path, kafka_client: str
) -> None:
    rng = random.Random(7)
    topic = fresh_topic(broker, "scale", partitions=PARTITIONS)
    ref = fresh_topic(broker, "scale-ref")
    stream = load_stream("hyperplane", noise=0.3, seed=22, n_events=N_EVENTS + N_MORE)
    refs = Stream.encode(stream.reference_dicts())
    produce(broker.bootstrap, ref, refs)
    good = Stream.encode(stream.event_dicts())
    messages, more = list(good[:N_EVENTS]), good[N_EVENTS:]
    for b in malformed(N_BAD, seed=23):
        messages.insert(rng.randrange(len(messages) + 1), b)
    # What the trusted schema rejects (the bad messages; a label the trusted set lacked would be too).
    probe = InfluenceEngine(
        load_config(_config(tmp_path, "probe", broker, topic, ref, tmp_path, kafka_client)).engine
    )
    probe.add_reference(refs)
    everything = messages + more
    bad_at = {r.index for r in probe.decode(everything, learn=False)[1]}
    rejected = {everything[i] for i in bad_at}  # some bad messages repeat: count by index
    assert set(malformed(N_BAD, seed=23)) <= rejected

    upd_dir = tmp_path / "updater"
    upd_cfg = _config(tmp_path, "updater", broker, topic, ref, upd_dir, kafka_client)
    score_cfgs = [
        _config(tmp_path, f"scorer{i}", broker, topic, ref, tmp_path / f"scorer{i}", kafka_client)
        for i in range(SCORERS)
    ]
    logs = tmp_path / "logs"
    logs.mkdir()
    updater = _start(upd_cfg, "update", logs / "updater.log")
    scorers = [_start(c, "score", logs / f"scorer{i}.log") for i, c in enumerate(score_cfgs)]
    procs: list[subprocess.Popen[bytes]] = [updater, *scorers]
    running = {"updater": (updater, logs / "updater.log")}
    running.update({f"scorer{i}": (p, logs / f"scorer{i}.log") for i, p in enumerate(scorers)})
    t0 = time.monotonic()
    try:
        produce(broker.bootstrap, topic, messages)
        n_valid = len(messages) - sum(i < len(messages) for i in bad_at)

        # -- phase 1: kill -9 a worker at ~1/3, the updater at ~2/3 --------------------------
        wait_for(
            lambda: _check_running(running) or _learned(upd_dir) >= n_valid // 3,
            TIMEOUT,
            what="a third learned",
        )
        scorers[0].send_signal(signal.SIGKILL)
        scorers[0].wait(10)
        scorers[0] = _start(score_cfgs[0], "score", logs / "scorer0.log")
        procs.append(scorers[0])
        running["scorer0"] = (scorers[0], logs / "scorer0.log")
        at_worker_kill = _learned(upd_dir)

        wait_for(
            lambda: _check_running(running) or _learned(upd_dir) >= 2 * n_valid // 3,
            TIMEOUT,
            what="two thirds learned",
        )
        updater.send_signal(signal.SIGKILL)
        updater.wait(10)
        at_updater_kill = _learned(upd_dir)
        assert at_updater_kill < n_valid, "the stream was learned before the kill: nothing tested"
        updater = _start(upd_cfg, "update", logs / "updater.log")
        procs.append(updater)
        running["updater"] = (updater, logs / "updater.log")
        wait_for(
            lambda: _check_running(running) or _learned(upd_dir) >= n_valid,
            TIMEOUT,
            what="every valid event learned",
        )
        phase1 = time.monotonic() - t0

        # -- phase 2: a second updater fences the first, then learns more ---------------------
        upd2_dir = tmp_path / "updater2"
        upd2_cfg = _config(tmp_path, "updater2", broker, topic, ref, upd2_dir, kafka_client)
        second = _start(upd2_cfg, "update", logs / "updater2.log")
        procs.append(second)
        del running["updater"]  # fenced: it must stop
        running["second updater"] = (second, logs / "updater2.log")
        assert updater.wait(TIMEOUT) == FENCED_EXIT, "the first updater was not fenced"
        produce(broker.bootstrap, topic, more)
        messages += more
        n_valid += N_MORE - sum(i >= len(messages) - N_MORE for i in bad_at)
        wait_for(
            lambda: _check_running(running) or _learned(upd2_dir) >= n_valid,
            TIMEOUT,
            what="the second updater learned the rest",
        )
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = [p.wait(60) for p in procs]
    assert second.returncode == 0 and all(p.returncode == 0 for p in scorers), codes

    # -- every input offset: exactly one decision ------------------------------------------------
    by_partition: dict[int, int] = defaultdict(int)  # records per partition (offsets 0..n-1)
    inputs = read_topic(broker.bootstrap, topic, at_least=len(messages))
    assert len(inputs) == len(messages)
    for m in inputs:
        by_partition[m.partition] = max(by_partition[m.partition], m.offset + 1)
    all_offsets = {(p, o) for p, n in by_partition.items() for o in range(n)}
    invalid = {(m.partition, m.offset) for m in inputs if m.value in rejected}

    first: dict[tuple[int, int], dict[str, str]] = {}
    split_quarantined_ids: set[str] = set()
    copies = 0
    for m in read_topic(broker.bootstrap, f"{topic}.updates", at_least=n_valid):
        h = header_dict(m.headers)
        key = (int(h["source_partition"]), int(h["source_offset"]))
        copies += key in first
        if key not in first and h["decision"] == "quarantine":
            split_quarantined_ids.add(json.loads(m.value)["id"])
        first.setdefault(key, h)
    dead = {
        (int(header_dict(m.headers)["source_partition"]), int(header_dict(m.headers)["source_offset"]))
        for m in read_topic(broker.bootstrap, f"{topic}.dead-letter", at_least=N_BAD)
    }
    assert not set(first) & dead, "an offset is both decided and dead-lettered"
    assert set(first) | dead == all_offsets, "an offset has no decision"
    assert dead == invalid, "dead letters are exactly the invalid messages"
    quarantined = {k for k, h in first.items() if h["decision"] == "quarantine"}
    in_quarantine = {
        (int(header_dict(m.headers)["source_partition"]), int(header_dict(m.headers)["source_offset"]))
        for m in read_topic(broker.bootstrap, f"{topic}.quarantine", at_least=len(quarantined))
    }
    assert quarantined <= in_quarantine, "a quarantine decision without its quarantine copy"
    # ...and no copy without one: a window replayed after the kill -9 may be scored differently
    # by a newer snapshot, but the updater makes the copies from the records it learns.
    assert in_quarantine == quarantined, "a quarantine copy of an event learned as accepted"

    # -- the updater learned each valid event exactly once -----------------------------------------
    ck = latest_checkpoint(upd2_dir)
    valid = all_offsets - dead
    want_hw = {f"{topic}:{p}": max(o for q, o in valid if q == p) + 1 for p in by_partition}
    assert ck.extra["applied"] == want_hw
    assert int(ck.extra["applied_checksum"]) == applied_checksum((topic, p, o) for p, o in valid)
    assert ck.engine.events_seen == len(valid) == n_valid

    # -- routing quality and accuracy against the single process on the same stream -------------
    # One process consuming the 6 partitions sees them interleaved in whatever order its polls
    # return: the baseline is a few such interleavings (chunks of 500 per partition, in order).
    parts = defaultdict(list)
    for m in sorted(inputs, key=lambda m: (m.partition, m.offset)):
        parts[m.partition].append(m.value)
    corrupted = {f"{stream.name}-e{i}" for i in np.flatnonzero(stream.corrupted)}
    single_accs, single_pr = [], []
    for seed in range(3):
        order_rng, cursor = random.Random(seed), dict.fromkeys(parts, 0)
        single = InfluenceEngine(load_config(upd_cfg).engine)
        single.add_reference(refs)
        q_ids: set[str] = set()
        while live := [p for p in parts if cursor[p] < len(parts[p])]:
            p = order_rng.choice(live)
            r = single.process(parts[p][cursor[p] : cursor[p] + 500])
            q_ids.update(rec["id"] for rec in r.records() if rec["decision"] == "quarantine")
            cursor[p] += 500
        single_accs.append(_accuracy(single, stream.X_test, stream.y_test))
        single_pr.append(_precision_recall(q_ids, corrupted))
    split_pr = _precision_recall(split_quarantined_ids, corrupted)
    acc_split = _accuracy(ck.engine, stream.X_test, stream.y_test)
    acc_unfiltered = _accuracy(ck.engine, stream.X_test, stream.y_test, shadow=True)
    print(
        f"phase 1 {phase1:.0f}s; kills at {at_worker_kill} and {at_updater_kill} learned; "
        f"{copies} duplicate updates records skipped ({ck.extra['duplicates']} by the updater); "
        f"accuracy split {acc_split:.4f}, single {single_accs}, unfiltered {acc_unfiltered:.4f}; "
        f"quarantine precision/recall of label flips: split {split_pr}, single {single_pr}"
    )
    assert len(quarantined) > 0.1 * n_valid, "routing quarantined (almost) nothing"
    assert min(single_accs) > acc_unfiltered, "routing does not help on this stream: a vacuous comparison"
    # Staleness must not ruin routing.  What it quarantines: as precise, and at most 10 points
    # less recall (measured: 1-2 points less, from scoring with a snapshot up to about
    # scorers x max_model_lag_versions x checkpoint.every_events events behind).
    assert split_pr[0] >= min(p for p, _ in single_pr) - 0.02
    assert split_pr[1] >= min(r for _, r in single_pr) - 0.10
    # Accuracy: within 1 point of the single process (issue 12).  It held once workers also bound
    # the events they scored that their snapshot has not learned (before, versions alone let them
    # run ahead by the updater's whole backlog: split 0.914-0.967 against 0.945-0.977).
    assert acc_split >= min(single_accs) - 0.01


def _precision_recall(quarantined: set[str], corrupted: set[str]) -> tuple[float, float]:
    hit = len(quarantined & corrupted)
    return round(hit / max(1, len(quarantined)), 4), round(hit / max(1, len(corrupted)), 4)

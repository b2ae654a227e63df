"""Exactly-once effect on the model on every crash path, and the order of the checkpoint steps.

The service runs in a thread of the test process against the real embedded broker, so a fault can
be injected at one stage — decode, score, learn, emit, flush, checkpoint write, commit — by
making that stage raise :class:`InjectedCrash` (a ``BaseException``: like the process dying
there, nothing in the service may swallow it) once, in the middle of an un-checkpointed window.
The engine and service stages are patched on their classes; the broker stages (flush, commit) are
injected at the broker seam (:class:`tests.fixtures.seam.Seam`), so every test runs on both
backends (``kafka_client``).  The crashed service then closes its consumer (the path where
kafka-python runs the revocation hook); a second service restarts from the checkpoint directory,
and its final model must equal one uninterrupted run over the same events (≤ 1e-9), with every
event counted once.

One subprocess test crashes a real ``stream-influence run`` process the same way.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from stream_influence.config import load_config
from stream_influence.core.engine import InfluenceEngine
from stream_influence.core.influence import InfluenceScorer
from stream_influence.core.learner import HeadLearner
from stream_influence.io.broker import TopicPartition, open_broker
from stream_influence.service.checkpoint import CheckpointStore
from stream_influence.service.loop import Service
from tests.fixtures.broker import Broker, fresh_topic
from tests.fixtures.seam import Call, Seam
from tests.fixtures.service_events import (
    ServiceThread,
    consumed,
    events,
    latest_checkpoint,
    malformed,
    max_abs_diff,
    produce,
    read_topic,
    start_service,
    uninterrupted,
    wait_for,
    write_config,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BATCH = 250


class InjectedCrash(BaseException):
    """The process dying at the patched instruction."""


# stage → (owner, method) patched at class level (every call goes through it), or (role, method)
# of the broker seam (every call of the service's own backend goes through it).
STAGES: dict[str, tuple[Any, str]] = {
    "decode": (InfluenceEngine, "decode"),
    "score": (InfluenceScorer, "score"),
    "learn": (HeadLearner, "learn"),
    "emit": (Service, "_emit"),
    "flush": ("producer", "flush"),
    "checkpoint write": (CheckpointStore, "save"),
    "commit": ("consumer", "commit"),
}


def _inject(monkeypatch: pytest.MonkeyPatch, seam: Seam, stage: str, armed: Callable[[], bool]) -> list[str]:
    """Make ``stage`` raise once, the first time it runs while ``armed()``; returns a list that
    holds the stage's name once it fired."""
    owner, name = STAGES[stage]
    fired: list[str] = []
    if isinstance(owner, str):  # a broker stage: at the seam, on either backend

        def crash(_call: Call) -> Any:
            fired.append(stage)
            raise InjectedCrash(stage)

        seam.inject(owner, name, crash, when=lambda _call: armed())
        return fired
    original = getattr(owner, name)

    def faulty(*args: Any, **kwargs: Any) -> Any:
        if not fired and armed():
            fired.append(stage)
            raise InjectedCrash(stage)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, faulty)
    return fired


def _stream(broker: Broker, name: str) -> tuple[str, str, list[bytes], list[bytes]]:
    topic = fresh_topic(broker, name)
    ref = fresh_topic(broker, f"{name}-ref")
    refs, _ = events(200, seed=5, prefix="ref")
    produce(broker.bootstrap, ref, refs)
    good, _ = events(3000, noise=0.3, seed=6)
    messages = list(good)
    for i, bad in enumerate(malformed(30, seed=7)):
        messages.insert(97 * i + 13, bad)
    produce(broker.bootstrap, topic, messages)
    return topic, ref, refs, messages


def _config(broker: Broker, tmp_path: Path, topic: str, ref: str, client: str, **kafka: Any) -> Path:
    # 100 records a poll and 750 events a checkpoint: chunk 4 is processed in a window that is
    # not checkpointed yet, so the crash falls where a checkpoint would be wrong.
    return write_config(
        tmp_path / "cfg.yaml",
        broker.bootstrap,
        topic,
        tmp_path / "ck",
        kafka={
            "client": client,
            "reference_topic": ref,
            "process_batch_size": BATCH,
            "max_poll_records": 100,
            "decisions_topic": f"{topic}.decisions",
            **kafka,
        },
        checkpoint={"every_events": 750, "every_seconds": 600},
        metrics={"enabled": False},
    )


def _assert_equals_uninterrupted(cfg_path: Path, refs: list[bytes], messages: list[bytes]) -> None:
    cfg = load_config(cfg_path)
    want = uninterrupted(cfg, refs, messages, BATCH)
    ck = latest_checkpoint(cfg.checkpoint.directory)
    assert ck.offsets == {(cfg.kafka.topic, 0): len(messages)}
    # Counters first: an event applied twice shows up here as a count above the input.
    assert ck.engine.counters.as_dict() == want.counters.as_dict()
    assert ck.engine.counters.consumed == len(messages)
    got, exp = ck.engine.state_dict(), want.state_dict()
    for part in ("routed", "shadow", "curvature"):
        assert max_abs_diff(got[part], exp[part], part) <= 1e-9, part
    assert max_abs_diff(got, exp) <= 1e-9, "the whole engine state"


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_crash_at_any_stage_applies_every_event_once(
    stage: str, broker: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kafka_client: str
) -> None:
    topic, ref, refs, messages = _stream(broker, f"fault-{stage.replace(' ', '-')}")
    cfg_path = _config(broker, tmp_path, topic, ref, kafka_client)
    cfg = load_config(cfg_path)

    holder: list[ServiceThread] = []
    seam = Seam(open_broker(cfg.kafka))
    fired = _inject(monkeypatch, seam, stage, lambda: bool(holder) and holder[0].service.batches >= 4)
    first = ServiceThread(cfg, broker=seam)
    holder.append(first)
    first.wait_done(90)
    assert fired == [stage], f"the fault at {stage} never fired"
    assert isinstance(first.error, InjectedCrash), first.error
    crashed_at = consumed(cfg.checkpoint.directory)
    assert crashed_at < len(messages)

    second = ServiceThread(cfg)
    wait_for(lambda: second.consumed() >= len(messages), 90, what="the restarted service caught up")
    assert second.stop() == 0, second.error
    _assert_equals_uninterrupted(cfg_path, refs, messages)


def test_commit_follows_flush_and_checkpoint(broker: Broker, tmp_path: Path, kafka_client: str) -> None:
    """Every offset the service commits is already in a checkpoint on disk, and every output of
    the events below it is acknowledged: committing first (then crashing) would lose them."""
    topic, ref, _, messages = _stream(broker, "commit-order")
    cfg = load_config(_config(broker, tmp_path, topic, ref, kafka_client))
    holder: list[ServiceThread] = []
    checked: list[int] = []
    # Recorded, not asserted in the hook: the service logs and survives a failing commit.
    violations: list[str] = []

    def checked_commit(call: Call) -> Any:
        offsets: dict[TopicPartition, int] = dict(call.args[0])
        if holder and offsets:
            service = holder[0].service
            ck = CheckpointStore(cfg.checkpoint.directory).latest()
            for tp, offset in offsets.items():
                stored = ck.offsets.get((tp.topic, tp.partition)) if ck is not None else None
                if stored is None or stored < offset:
                    violations.append(
                        f"commit of {tp.topic}-{tp.partition}@{offset} before a checkpoint "
                        f"holds it (latest checkpoint: {stored})"
                    )
            # Backend-neutral "every output acknowledged": each delivery answered, none failed.
            unacked = [d for d in deliveries if not d.done or d.error is not None]
            if service.inflight or unacked:
                violations.append(
                    f"commit at {offsets} while outputs are unacknowledged "
                    f"({len(service.inflight)} in flight, {len(unacked)} unanswered or failed)"
                )
            checked.append(max(offsets.values()))
        return call.proceed()

    seam = Seam(open_broker(cfg.kafka))
    deliveries = seam.deliveries()  # every output the service produced, in order
    seam.on("consumer", "commit", checked_commit)
    svc = ServiceThread(cfg, broker=seam)
    holder.append(svc)
    wait_for(lambda: svc.consumed() >= len(messages), 90, what="all consumed")
    assert svc.stop() == 0, svc.error
    assert violations == []
    assert len(checked) >= 3, f"too few commits checked: {checked}"
    assert checked[-1] == len(messages)
    assert deliveries, "the seam saw no outputs"
    # The decisions of every committed offset are in their topic.
    decisions = read_topic(broker.bootstrap, f"{topic}.decisions", at_least=len(messages))
    assert {json.loads(m.value)["source_offset"] for m in decisions} == set(range(len(messages)))


FAULTY_RUN = """
import sys
from stream_influence.cli import main
from stream_influence.service.loop import Service

calls = 0
original = Service._emit


def faulty(self, *args, **kwargs):
    global calls
    calls += 1
    if calls == int(sys.argv[2]):
        raise RuntimeError("injected fault in _emit")
    return original(self, *args, **kwargs)


Service._emit = faulty
sys.exit(main(["run", "--config", sys.argv[1]]))
"""


def test_a_real_process_crashing_in_emit_applies_every_event_once(
    broker: Broker, tmp_path: Path, kafka_client: str
) -> None:
    """Defect 2 with a real process: an exception in ``_emit`` ends the process (exit 1) and
    ``consumer.close()`` must not checkpoint the half-processed engine on the way out."""
    topic, ref, refs, messages = _stream(broker, "fault-process")
    cfg_path = _config(broker, tmp_path, topic, ref, kafka_client)
    log = tmp_path / "svc.log"
    script = tmp_path / "faulty_run.py"
    script.write_text(FAULTY_RUN)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, str(script), str(cfg_path), "5"],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[1],
        )
    try:
        assert proc.wait(90) == 1, log.read_text(errors="replace")[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "injected fault in _emit" in log.read_text(errors="replace")
    assert consumed(tmp_path / "ck") < len(messages)

    proc = start_service(cfg_path, log)
    try:
        wait_for(lambda: consumed(tmp_path / "ck") >= len(messages), 90, what="caught up after restart")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    _assert_equals_uninterrupted(cfg_path, refs, messages)

"""One thread owns Kafka and the engine, through real rebalances on the real broker.

Every call into the broker backend (the :class:`~stream_influence.io.broker.Broker`, its consumers
and producers) is recorded with the calling thread at the broker seam (:class:`tests.fixtures.seam.Seam`
around the real backend, kafka-python or confluent); two in-process services on the embedded broker go through a member joining and a
member leaving (each an eager rebalance that revokes partitions holding un-checkpointed work).
Every broker call and every checkpoint write must come from the calling service's loop thread —
the old design wrote the revocation checkpoint on kafka-python's I/O thread — and the hand-over
must still give each event to exactly one model.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from stream_influence.config import load_config
from stream_influence.io.broker import open_broker
from stream_influence.service.checkpoint import CheckpointStore
from tests.fixtures.broker import Broker, fresh_topic
from tests.fixtures.seam import Call, Seam
from tests.fixtures.service_events import (
    ServiceThread,
    events,
    latest_checkpoint,
    produce,
    read_topic,
    wait_for,
    write_config,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Generous: group joins and rebalances are slower on a loaded 2-core machine.
TIMEOUT = 90


class CallLog:
    """``(who, thread name, method)`` of every call, from whichever thread made it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()

    def record(self, who: str, call: Call) -> None:
        with self._lock:
            self.calls.append((who, call.thread, call.method))


def _service(cfg_path: Path, log: CallLog, who: str) -> ServiceThread:
    cfg = load_config(cfg_path)
    seam = Seam(open_broker(cfg.kafka))  # every backend call, of the clients it builds too
    seam.observe(lambda call: log.record(who, call))
    return ServiceThread(cfg, broker=seam, name=f"loop-{who}")


def test_every_broker_call_and_checkpoint_comes_from_the_loop_thread_through_rebalances(
    broker: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kafka_client: str
) -> None:
    topic = fresh_topic(broker, "threads", partitions=4)
    decisions = f"{topic}.decisions"
    # No interval checkpoints: the rebalances find un-checkpointed work to hand over.
    cfgs = [
        write_config(
            tmp_path / f"{who}.yaml",
            broker.bootstrap,
            topic,
            tmp_path / f"ck-{who}",
            kafka={"client": kafka_client, "decisions_topic": decisions, "process_batch_size": 100},
            checkpoint={"every_events": 1_000_000, "every_seconds": 600},
            metrics={"enabled": False},
        )
        for who in ("a", "b")
    ]
    saves: list[tuple[str, str]] = []  # (thread name, checkpoint reason)
    original_save = CheckpointStore.save

    def recorded_save(self: CheckpointStore, *args: Any, **kwargs: Any) -> Any:
        saves.append((threading.current_thread().name, kwargs.get("extra", {}).get("reason", "?")))
        return original_save(self, *args, **kwargs)

    monkeypatch.setattr(CheckpointStore, "save", recorded_save)
    log = CallLog()
    a = _service(cfgs[0], log, "a")
    b: ServiceThread | None = None
    consumed: Callable[[], int] = lambda: a.consumed() + (b.consumed() if b is not None else 0)  # noqa: E731
    try:
        wait_for(lambda: len(a.service.owned) == 4, TIMEOUT, what="a owns all 4 partitions")
        first, _ = events(3_000, seed=11)
        produce(broker.bootstrap, topic, first)
        wait_for(lambda: a.consumed() >= 3_000, TIMEOUT, what="a consumed the first 3000")

        b = _service(cfgs[1], log, "b")  # joins: a hands its 4 partitions over, then gets 2
        wait_for(
            lambda: len(a.service.owned) == 2 and len(b.service.owned) == 2, TIMEOUT, what="2 + 2 partitions"
        )
        second, _ = events(2_000, seed=12, prefix="mid")
        produce(broker.bootstrap, topic, second)
        wait_for(lambda: consumed() >= 5_000, TIMEOUT, what="5000 consumed by a and b")
        assert b.consumed() > 0, "b got partitions with events"

        assert b.stop() == 0, b.error  # leaves: a hands its 2 over again and gets all 4
        wait_for(lambda: len(a.service.owned) == 4, TIMEOUT, what="a owns all 4 again")
        third, _ = events(1_000, seed=13, prefix="late")
        produce(broker.bootstrap, topic, third)
        wait_for(lambda: consumed() >= 6_000, TIMEOUT, what="6000 consumed")
        assert a.stop() == 0, a.error
    finally:
        for svc in (a, b):
            if svc is not None and svc.thread.is_alive():
                svc.stop()

    # Every backend call, from each service's own loop thread only.
    assert log.calls, "the wrapper saw no calls"
    off_loop = [(who, thread, method) for who, thread, method in log.calls if thread != f"loop-{who}"]
    assert off_loop == [], off_loop[:10]
    methods = {method for _, _, method in log.calls}
    assert {"poll", "rebalances", "commit", "committed", "seek", "produce_many", "flush"} <= methods, methods
    # Checkpoints (including those at revocation) are written by the loop threads only.
    assert {reason for _, reason in saves} >= {"revocation", "shutdown"}, saves
    assert {thread for thread, _ in saves} <= {"loop-a", "loop-b"}, saves
    # The hand-over kept every event in exactly one model (each commit preceded the move).
    n_a = int(latest_checkpoint(tmp_path / "ck-a").engine.counters.consumed)
    n_b = int(latest_checkpoint(tmp_path / "ck-b").engine.counters.consumed)
    assert n_a + n_b == 6_000, (n_a, n_b)
    ids = {m.key for m in read_topic(broker.bootstrap, decisions, at_least=6_000)}
    assert len(ids) == 6_000

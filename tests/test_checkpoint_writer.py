"""Checkpoints off the hot path: the state is captured on the caller's (loop) thread, the files are
written on the store's writer thread, and nothing reads or commits past what is durable.

Unit tests on the store (a write held back by a gate), and one service on the embedded broker:
with the default cadence its offsets are committed soon after the poll, not after
``checkpoint.every_events`` events or a long timer.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import stream_influence.service.checkpoint as checkpoint_module
from stream_influence.config import CheckpointSettings, load_config
from stream_influence.core.engine import InfluenceEngine
from stream_influence.service.checkpoint import CheckpointStore, PendingCheckpoint
from tests.fixtures.broker import Broker, fresh_topic
from tests.fixtures.service_events import ServiceThread, events, produce, wait_for, write_config

TIMEOUT = float(os.environ.get("STREAM_INFLUENCE_TEST_TIMEOUT", "120"))


def _engine() -> InfluenceEngine:
    e = InfluenceEngine()
    e.process([b'{"id": "a", "features": [1.0, 2.0], "label": 0}'])
    return e


class _Gate:
    """Holds every ``atomic_write`` until released, recording the writing thread."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.open = threading.Event()
        self.threads: list[str] = []
        original = checkpoint_module.atomic_write

        def gated(path: Path, data: bytes) -> None:
            self.threads.append(threading.current_thread().name)
            assert self.open.wait(TIMEOUT), "the gate was never opened"
            original(path, data)

        monkeypatch.setattr(checkpoint_module, "atomic_write", gated)


def test_a_background_save_is_written_on_the_writer_thread_and_durable_when_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CheckpointStore(tmp_path)
    gate = _Gate(monkeypatch)
    pending = store.save(_engine(), {("t", 0): 7}, {0: 3}, {"quarantine": 1}, background=True)
    assert isinstance(pending, PendingCheckpoint)
    wait_for(lambda: bool(gate.threads), 10, what="the write started")
    # The state was captured; the file is not there until the writer thread has written it.
    assert not pending.done()
    assert not pending.path.exists()
    gate.open.set()
    assert pending.result(TIMEOUT) == pending.path
    assert pending.path.exists()
    assert gate.threads and all(t.startswith("checkpoint-writer") for t in gate.threads), gate.threads
    assert threading.current_thread().name not in gate.threads
    ck = store.latest()
    assert ck is not None and ck.seq == 1 and ck.offsets == {("t", 0): 7}


def test_latest_and_the_next_save_wait_for_the_write_in_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CheckpointStore(tmp_path)
    store.save(_engine(), {("t", 0): 1}, {}, {})  # a durable previous checkpoint
    gate = _Gate(monkeypatch)
    store.save(_engine(), {("t", 0): 2}, {}, {}, background=True)
    wait_for(lambda: bool(gate.threads), 10, what="the write started")
    threading.Timer(0.3, gate.open.set).start()
    # Reading now must not see the previous checkpoint as the newest (nor the new one torn).
    ck = store.latest()
    assert ck is not None and ck.offsets == {("t", 0): 2} and ck.seq == 2
    path = store.save(_engine(), {("t", 0): 3}, {}, {})
    assert path.name == "checkpoint-000000000003.safetensors"


def test_a_failed_background_write_is_raised_not_swallowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CheckpointStore(tmp_path)

    def broken(path: Path, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "atomic_write", broken)
    pending = store.save(_engine(), {("t", 0): 1}, {}, {}, background=True)
    with pytest.raises(OSError, match="No space"):
        pending.result(TIMEOUT)
    with pytest.raises(OSError, match="No space"):
        store.save(_engine(), {("t", 0): 2}, {}, {}, background=True)  # the previous write's error


@pytest.mark.integration
def test_with_the_default_cadence_offsets_are_committed_soon_after_the_poll(
    broker: Broker, tmp_path: Path, kafka_client: str
) -> None:
    """The default ``checkpoint.every_seconds`` commits a small, idle-after stream's offsets without
    waiting for ``every_events`` events or a long timer (the previous default waited 30 s)."""
    from kafka import KafkaConsumer, TopicPartition

    topic = fresh_topic(broker, "cadence")
    default = CheckpointSettings()
    cfg = load_config(
        write_config(
            tmp_path / "cfg.yaml",
            broker.bootstrap,
            topic,
            tmp_path / "ck",
            kafka={"client": kafka_client},
            checkpoint={"every_events": default.every_events, "every_seconds": default.every_seconds},
            metrics={"enabled": False},
        )
    )
    n = 300
    assert n < default.every_events
    svc = ServiceThread(cfg)
    reader = KafkaConsumer(
        bootstrap_servers=broker.bootstrap, group_id=cfg.kafka.group_id, enable_auto_commit=False
    )
    tp = TopicPartition(topic, 0)
    try:
        wait_for(lambda: bool(svc.service.owned), TIMEOUT, what="the service joined")
        values, _ = events(n, seed=3)
        produce(broker.bootstrap, topic, values)
        t0 = time.monotonic()
        wait_for(lambda: svc.consumed() >= n, TIMEOUT, what="all consumed")
        committed: list[Any] = []

        def done() -> bool:
            committed.append(reader.committed(tp))
            return committed[-1] == n

        # Far below the old 30 s timer, generous for two shared cores.
        wait_for(done, 20, what=f"offset {n} committed")
        assert time.monotonic() - t0 < 20
        assert svc.stop() == 0, svc.error
    finally:
        reader.close()
        if svc.thread.is_alive():
            svc.stop()

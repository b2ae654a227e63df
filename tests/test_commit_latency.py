"""What keeps poll → commit short (issue 11; docs/benchmarks.md, section ``service_stages``).

- A checkpoint whose write is done is committed between chunks and right after a poll, not once
  per loop step (a chunk takes tens of milliseconds on a loaded machine).
- Caught up (the last poll returned less than a full batch) with a write in progress, the loop
  waits for the write — at most one ``checkpoint.every_seconds`` — and commits before it polls.
- The objects start-up made are frozen out of the garbage collector while the service runs (full
  collections took 60-250 ms on the loop thread) and unfrozen when it stops.
- ``kafka.fetch_max_wait_ms`` reaches both backends' consumers.

The order of the guarantees is unchanged: a commit still follows a durable checkpoint and an
acknowledged flush (tests/test_service_faults.py checks that at every commit).
"""

from __future__ import annotations

import gc
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import stream_influence.service.checkpoint as checkpoint_module
from stream_influence.config import AppSettings, KafkaSettings, load_config
from stream_influence.io import confluent, kafka_python
from stream_influence.io.broker import TopicPartition
from stream_influence.service.loop import Service
from tests.fixtures.broker import Broker, fresh_topic
from tests.fixtures.service_events import ServiceThread, events, produce, wait_for, write_config

TIMEOUT = float(os.environ.get("STREAM_INFLUENCE_TEST_TIMEOUT", "120"))
TP = TopicPartition("events", 0)


class _Consumer:
    """Records polls and commits in one log shared with the chunks processed."""

    def __init__(self, log: list[tuple[str, Any]], records: int = 0) -> None:
        self.log, self.records = log, records

    def poll(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Any]]:
        self.log.append(("poll", None))
        return (
            {TP: [SimpleNamespace(offset=o, value=b"") for o in range(self.records)]} if self.records else {}
        )

    def commit(self, offsets: dict[TopicPartition, int], timeout_ms: int) -> None:
        self.log.append(("commit", dict(offsets)))

    def rebalances(self) -> list[Any]:
        return []

    def highwater(self, _tp: TopicPartition) -> int:
        return 16

    def position(self, _tp: TopicPartition) -> int:
        return 16


class _Producer:
    def flush(self, *args: object, **kwargs: object) -> None:
        pass


class _Gate:
    """Holds the checkpoint's file writes until opened."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.open = threading.Event()
        original = checkpoint_module.atomic_write

        def gated(path: Path, data: bytes) -> None:
            assert self.open.wait(TIMEOUT), "the gate was never opened"
            original(path, data)

        monkeypatch.setattr(checkpoint_module, "atomic_write", gated)


def _service(tmp_path: Path, log: list[tuple[str, Any]], every_seconds: float, records: int = 0) -> Service:
    cfg = AppSettings.model_validate(
        {
            "kafka": {"topic": TP.topic, "process_batch_size": 8, "max_poll_records": 8},
            "checkpoint": {"directory": str(tmp_path / "ck"), "every_seconds": every_seconds},
            "metrics": {"enabled": False},
        }
    )
    service = Service(cfg, install_signals=False)
    service.consumer = _Consumer(log, records)
    service.producer = _Producer()  # type: ignore[assignment]
    service._on_assigned({TP})
    service.newly_assigned.clear()
    service._last_housekeeping = float("inf")  # no lag or reachability checks in these steps

    def process(tp: TopicPartition, msgs: list[Any], _t: float) -> None:
        log.append(("process", (msgs[0].offset, msgs[-1].offset + 1)))
        service.next_offsets[(tp.topic, tp.partition)] = msgs[-1].offset + 1
        service.uncommitted_polls.append(_t)
        service.dirty = True

    service._process = process  # type: ignore[method-assign]
    return service


def _write_in_progress(service: Service, log: list[tuple[str, Any]], offset: int) -> None:
    """An interval checkpoint of offsets [0, offset) handed to the (gated) writer thread."""
    service.pending[TP].extend(SimpleNamespace(offset=o, value=b"") for o in range(offset))
    service._drain(TP, time.monotonic())
    service._checkpoint_in_background()
    assert service.writing is not None
    log.clear()


def test_a_durable_checkpoint_is_committed_between_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, the loop looked at the write once per step, after every ready chunk: the commit
    waited for all of them."""
    log: list[tuple[str, Any]] = []
    service = _service(tmp_path, log, every_seconds=60)
    gate = _Gate(monkeypatch)
    _write_in_progress(service, log, 8)
    gate.open.set()
    service.writing.pending.result(TIMEOUT)  # type: ignore[union-attr]
    # Two more chunks are ready: [8, 16) and [16, 24).
    service.pending[TP].extend(SimpleNamespace(offset=o, value=b"") for o in range(8, 24))
    service._drain(TP, time.monotonic())
    assert log == [("process", (8, 16)), ("commit", {TP: 8}), ("process", (16, 24))]
    assert service.writing is None


def test_caught_up_the_loop_commits_a_finishing_write_before_it_polls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log: list[tuple[str, Any]] = []
    service = _service(tmp_path, log, every_seconds=60)
    gate = _Gate(monkeypatch)
    _write_in_progress(service, log, 8)
    service.caught_up = True  # the last poll returned less than max_poll_records
    threading.Timer(0.2, gate.open.set).start()
    service._step()
    # Before, the step polled first (5 ms) and found the write still running: no commit.
    assert log[:2] == [("commit", {TP: 8}), ("poll", None)]


def test_a_stalled_write_holds_the_loop_back_at_most_one_cadence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log: list[tuple[str, Any]] = []
    service = _service(tmp_path, log, every_seconds=0.3)
    gate = _Gate(monkeypatch)
    _write_in_progress(service, log, 8)
    service.caught_up = True
    t0 = time.monotonic()
    service._step()
    assert time.monotonic() - t0 >= 0.3
    assert log == [("poll", None)]  # it went on polling; the write is committed once it is done
    gate.open.set()
    service.writing.pending.result(TIMEOUT)  # type: ignore[union-attr]
    service._step()
    assert ("commit", {TP: 8}) in log


def test_behind_the_loop_does_not_wait_for_the_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a full batch polled last there is work waiting: the loop polls and processes while
    the write goes on (waiting would cost throughput when the service has a backlog)."""
    log: list[tuple[str, Any]] = []
    service = _service(tmp_path, log, every_seconds=60, records=0)
    gate = _Gate(monkeypatch)
    _write_in_progress(service, log, 8)
    service.caught_up = False
    t0 = time.monotonic()
    service._step()
    assert log[0] == ("poll", None) and ("commit", {TP: 8}) not in log
    assert time.monotonic() - t0 < 30  # it did not wait the cadence (60 s) for the write
    gate.open.set()
    service._await_write()


def test_fetch_max_wait_reaches_both_backends() -> None:
    k = KafkaSettings(fetch_max_wait_ms=7)
    assert kafka_python.consumer_options(k)["fetch_max_wait_ms"] == 7
    assert kafka_python.consumer_options(k, group=False)["fetch_max_wait_ms"] == 7
    assert confluent.consumer_config(k)["fetch.wait.max.ms"] == 7
    assert KafkaSettings().fetch_max_wait_ms < 500  # below both clients' default (see its description)
    # client_options still have the last word.
    assert (
        kafka_python.consumer_options(KafkaSettings(client_options={"fetch_max_wait_ms": 300}))[
            "fetch_max_wait_ms"
        ]
        == 300
    )


@pytest.mark.integration
def test_start_up_objects_are_frozen_while_the_service_runs(broker: Broker, tmp_path: Path) -> None:
    topic = fresh_topic(broker, "gcfreeze")
    cfg = load_config(
        write_config(
            tmp_path / "cfg.yaml", broker.bootstrap, topic, tmp_path / "ck", metrics={"enabled": False}
        )
    )
    assert gc.get_freeze_count() == 0
    svc = ServiceThread(cfg)
    try:
        wait_for(lambda: bool(svc.service.owned), TIMEOUT, what="the service joined")
        produce(broker.bootstrap, topic, events(50, seed=4)[0])
        wait_for(lambda: svc.consumed() >= 50, TIMEOUT, what="all consumed")
        assert gc.get_freeze_count() > 10_000  # modules, settings, the engine: all of start-up
        assert svc.stop() == 0, svc.error
        assert gc.get_freeze_count() == 0  # collectable again once the service is gone
    finally:
        if svc.thread.is_alive():
            svc.stop()
        gc.unfreeze()

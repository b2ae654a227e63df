"""The updater makes the quarantine copies, from the one updates record it learns per offset.

A score worker that dies after sending a window but before committing has that window replayed
by another worker, possibly under a newer snapshot that decides differently.  The updater learns
the first updates record per source offset; because it also makes the quarantine copy from that
same record, an event is never both learned as accepted and copied to quarantine.
"""

from __future__ import annotations

import json
from pathlib import Path

from stream_influence.config import AppSettings
from stream_influence.io.broker import Record, TopicPartition
from stream_influence.io.model_topic import SnapshotId, update_record
from stream_influence.io.records import ChunkHeaders, header_dict
from stream_influence.service.roles import UpdateService
from tests.test_emitter import MemoryProducer

SOURCE = "events"


def _updater(tmp_path: Path) -> tuple[UpdateService, MemoryProducer]:
    cfg = AppSettings(
        checkpoint={"directory": str(tmp_path / "ck")},
        metrics={"enabled": False},
        engine={"schema": {"classes": [0, 1], "n_features": 2}},
    )
    svc = UpdateService(cfg, install_signals=False)
    producer = MemoryProducer()
    svc.emitter.producer = producer  # type: ignore[assignment]
    return svc, producer


def _update(offset_in_updates: int, source_offset: int, quarantine: bool, snapshot: int) -> Record:
    value = json.dumps({"id": f"e{source_offset}", "features": [0.5, -1.0], "label": 1}).encode()
    h = ChunkHeaders(SOURCE, 0, 1, snapshot).quarantine(
        [("trace", b"abc")],
        source_offset,
        reason="influence" if quarantine else "accept",
        influence=0.1,
        relative_influence=0.2,
        cosine_influence=0.3,
        threshold=0.05,
    )
    rec = update_record("events.updates", value, h, SOURCE, 0, quarantine, SnapshotId(1, snapshot))
    return Record("events.updates", 0, offset_in_updates, rec.key, rec.value, rec.headers, None)


def _copies(svc: UpdateService, producer: MemoryProducer) -> list:
    svc.emitter.settle(1.0)
    return [r for r in producer.sent if r.topic == svc.k.quarantine_topic]


def test_a_replay_decided_differently_leaves_no_copy_of_a_learned_event(tmp_path: Path) -> None:
    svc, producer = _updater(tmp_path)
    tp = TopicPartition("events.updates", 0)
    # Accepted under snapshot 3, then (the worker died, the window was replayed) quarantined
    # under snapshot 4: the first is learned, the second is a duplicate.
    svc._apply_chunk(tp, [_update(0, 7, False, 3), _update(1, 7, True, 4)])
    assert svc.duplicates == 1
    assert _copies(svc, producer) == []


def test_the_learned_quarantine_decision_gets_exactly_one_copy_with_the_workers_headers(
    tmp_path: Path,
) -> None:
    svc, producer = _updater(tmp_path)
    tp = TopicPartition("events.updates", 0)
    first, replay = _update(0, 7, True, 3), _update(1, 7, False, 4)
    svc._apply_chunk(tp, [first, replay])
    (copy,) = _copies(svc, producer)
    assert copy.key == b"e7" and copy.value == first.value
    h = header_dict(copy.headers)
    assert h["source_topic"] == SOURCE and h["source_offset"] == "7" and h["trace"] == "abc"
    assert h["reason"] == "influence" and h["model_version"] == "3"
    assert "decision" not in h and "snapshot_epoch" not in h  # the updates topic's own headers
    # A replay of the updater's own window (after a crash) re-sends the identical keyed copy.
    svc2, producer2 = _updater(tmp_path / "again")
    svc2._apply_chunk(tp, [first])
    assert _copies(svc2, producer2) == [copy]

"""The updater publishes snapshots at most every ``scaleout.snapshot_every_seconds`` (and a held-back
one once the interval is over, even when nothing more is learned); a score worker's staleness bound
counts what its snapshot has not learned."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stream_influence.config import AppSettings
from stream_influence.io.broker import TopicPartition
from stream_influence.io.model_topic import Snapshot, SnapshotId
from stream_influence.service.checkpoint import CheckpointStore
from stream_influence.service.roles import ScoreService, UpdateService


class _Models:
    """In-memory model topic: no newer lease (never fenced)."""

    lease = None
    lease_epoch = 0

    def poll(self, timeout: float) -> None:
        return None


class _Writer:
    max_bytes = 1 << 30

    def __init__(self) -> None:
        self.published: list[Any] = []

    def publish(self, sid: Any, data: bytes) -> None:
        self.published.append(sid)


def _updater(tmp_path: Path, every: float) -> tuple[UpdateService, _Writer, Path]:
    ck = tmp_path / f"ck-{every}"
    cfg = AppSettings(
        checkpoint={"directory": str(ck)},
        metrics={"enabled": False},
        scaleout={"snapshot_every_seconds": every},
    )
    svc = UpdateService(cfg, install_signals=False)
    writer = _Writer()
    svc.models, svc.writer = _Models(), writer  # type: ignore[assignment]
    return svc, writer, ck


def _checkpoints(svc: UpdateService, ck: Path, n: int) -> None:
    store = CheckpointStore(ck, keep=3)
    svc.store = store
    for _ in range(n):
        store.install(b"state")  # the bytes are not read back by the publisher's cadence
        svc._after_checkpoint()


def test_checkpoints_faster_than_the_cadence_publish_once(tmp_path: Path) -> None:
    svc, writer, ck = _updater(tmp_path, every=60.0)
    _checkpoints(svc, ck, 5)
    assert len(writer.published) == 1  # the first; the next four fall inside the minute


def test_zero_publishes_every_checkpoint_and_stopping_always_publishes(tmp_path: Path) -> None:
    svc, writer, ck = _updater(tmp_path, every=0.0)
    _checkpoints(svc, ck, 4)
    assert len(writer.published) == 4

    svc2, writer2, ck2 = _updater(tmp_path, every=60.0)
    _checkpoints(svc2, ck2, 2)
    svc2.stop_event.set()  # the final checkpoint at shutdown
    _checkpoints(svc2, ck2, 1)
    assert len(writer2.published) == 2


class _Consumer:
    def reachable(self) -> bool:
        return True


def test_a_held_back_checkpoint_is_published_once_the_interval_is_over_with_nothing_more_learned(
    tmp_path: Path,
) -> None:
    svc, writer, ck = _updater(tmp_path, every=60.0)
    svc.consumer = _Consumer()  # type: ignore[assignment]
    _checkpoints(svc, ck, 2)
    assert len(writer.published) == 1  # the second is held back by the interval
    svc._housekeeping()
    assert len(writer.published) == 1  # still inside the interval
    svc._last_publish -= 61.0
    svc._housekeeping()  # no checkpoint comes after it (the updater is idle): housekeeping publishes
    assert len(writer.published) == 2
    svc._last_publish -= 61.0
    svc._housekeeping()
    assert len(writer.published) == 2  # nothing newer: not published twice


def test_a_score_worker_holds_back_once_its_snapshot_lags_what_it_sent_on(tmp_path: Path) -> None:
    cfg = AppSettings(
        kafka={"topic": "t"},
        checkpoint={"directory": str(tmp_path / "ck"), "every_events": 256},
        metrics={"enabled": False},
        scaleout={"max_model_lag_versions": 2},  # at most 512 events
    )
    svc = ScoreService(cfg, install_signals=False)
    svc.snapshot = Snapshot(SnapshotId(1, 7), b"", 0.0, "updater")
    svc.owned = frozenset({TopicPartition("t", 0), TopicPartition("t", 1)})
    svc.learned = {("t", 0): 100, ("t", 1): 50}  # the snapshot's high-water marks
    svc.emitted = {("t", 0): 300, ("t", 1): 200, ("t", 2): 5_000}  # partition 2 moved away
    assert svc.unlearned == 200 + 150 and svc._fresh()
    svc.emitted[("t", 0)] = 463  # 363 + 150 = 513 sent on that the snapshot has not learned
    assert svc.events_on_snapshot == 0  # a fresh snapshot by version, a stale one by events
    assert svc.unlearned == 513 and not svc._fresh()
    svc.learned = {("t", 0): 463, ("t", 1): 200}  # a newer snapshot learned all of it
    assert svc.unlearned == 0 and svc._fresh()

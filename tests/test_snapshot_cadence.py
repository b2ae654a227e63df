"""The updater publishes snapshots at most every ``scaleout.snapshot_every_seconds``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stream_influence.config import AppSettings
from stream_influence.service.checkpoint import CheckpointStore
from stream_influence.service.roles import UpdateService


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

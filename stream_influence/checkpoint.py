"""Durable checkpoints: engine state together with the input offsets it includes.

A checkpoint is one safetensors file written by :func:`stream_influence.state.save_engine`
(temporary file, fsync, rename, fsync of the directory) whose ``extra`` metadata holds

- ``offsets``: ``{topic: {partition: next_offset}}`` — the first input offset *not* yet applied
  to the model in this file, for every partition this instance has processed;
- ``reference_offsets``: ``{partition: next_offset}`` of the reference topic;
- ``outputs``: counts of messages produced per output kind;
- ``seq`` and ``written_at``.

Files are named ``checkpoint-<seq>.safetensors``; the newest ``keep`` (default 2: the latest and
one previous) are kept.  :meth:`CheckpointStore.latest` falls back to the previous file when
the newest is unreadable.

>>> import tempfile
>>> from stream_influence.engine import InfluenceEngine
>>> store = CheckpointStore(Path(tempfile.mkdtemp()))
>>> engine = InfluenceEngine()
>>> _ = engine.process([b'{"id": "a", "features": [1.0], "label": 0}'])
>>> _ = store.save(engine, {("events", 0): 1}, {}, {"quarantine": 0})
>>> ck = store.latest()
>>> ck.offsets, ck.engine.events_seen, ck.seq
({('events', 0): 1}, 1, 1)
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .engine import InfluenceEngine
from .errors import CheckpointError
from .settings import EngineSettings
from .state import load_engine, save_engine

__all__ = ["Checkpoint", "CheckpointStore"]

log = logging.getLogger(__name__)

_NAME = re.compile(r"^checkpoint-(\d+)\.safetensors$")
TopicPartitionKey = tuple[str, int]


@dataclass
class Checkpoint:
    """A restored checkpoint."""

    engine: InfluenceEngine
    offsets: dict[TopicPartitionKey, int]
    reference_offsets: dict[int, int]
    outputs: dict[str, int]
    seq: int
    path: Path
    written_at: float
    extra: dict[str, Any] = field(default_factory=dict)


def _offsets_to_json(offsets: dict[TopicPartitionKey, int]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for (topic, partition), off in sorted(offsets.items()):
        out.setdefault(topic, {})[str(partition)] = int(off)
    return out


def _offsets_from_json(data: dict[str, dict[str, int]]) -> dict[TopicPartitionKey, int]:
    return {(t, int(p)): int(o) for t, parts in data.items() for p, o in parts.items()}


class CheckpointStore:
    """The checkpoint directory of one service instance."""

    def __init__(self, directory: Path, keep: int = 2) -> None:
        self.directory = Path(directory)
        self.keep = max(1, keep)

    def paths(self) -> list[tuple[int, Path]]:
        """``(seq, path)`` of every checkpoint file, oldest first."""
        if not self.directory.is_dir():
            return []
        found = []
        for p in self.directory.iterdir():
            m = _NAME.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
        return sorted(found)

    def save(
        self,
        engine: InfluenceEngine,
        offsets: dict[TopicPartitionKey, int],
        reference_offsets: dict[int, int],
        outputs: dict[str, int],
        extra: dict[str, Any] | None = None,
    ) -> Path:
        """Write the next checkpoint atomically, then prune old ones; returns its path."""
        existing = self.paths()
        seq = (existing[-1][0] if existing else 0) + 1
        path = self.directory / f"checkpoint-{seq:012d}.safetensors"
        meta = {
            **(extra or {}),
            "seq": seq,
            "written_at": time.time(),
            "offsets": _offsets_to_json(offsets),
            "reference_offsets": {str(p): int(o) for p, o in sorted(reference_offsets.items())},
            "outputs": dict(outputs),
        }
        save_engine(engine, path, extra=meta)  # atomic: temp file + fsync + rename + dir fsync
        for _, old in [*existing, (seq, path)][: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    def load(self, path: Path, settings: EngineSettings | None = None) -> Checkpoint:
        engine, extra = load_engine(path, settings)
        try:
            return Checkpoint(
                engine=engine,
                offsets=_offsets_from_json(extra.get("offsets", {})),
                reference_offsets={int(p): int(o) for p, o in extra.get("reference_offsets", {}).items()},
                outputs={str(k): int(v) for k, v in extra.get("outputs", {}).items()},
                seq=int(extra.get("seq", 0)),
                path=Path(path),
                written_at=float(extra.get("written_at", 0.0)),
                extra=extra,
            )
        except (TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{path}: checkpoint metadata is unreadable: {exc}") from exc

    def latest(self, settings: EngineSettings | None = None) -> Checkpoint | None:
        """The newest readable checkpoint (falling back to older ones), or None if there is none.

        Settings that make a checkpoint unusable (a different schema, model or curvature) raise:
        silently starting from scratch would re-apply every event.
        """
        last_error: CheckpointError | None = None
        for _, path in reversed(self.paths()):
            try:
                return self.load(path, settings)
            except CheckpointError as exc:
                if "different" in str(exc):
                    raise
                log.error("checkpoint %s is unreadable (%s); trying the previous one", path, exc)
                last_error = exc
        if last_error is not None:
            raise CheckpointError(f"no readable checkpoint in {self.directory}: {last_error}")
        return None

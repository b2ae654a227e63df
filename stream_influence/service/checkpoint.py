"""Durable, verified checkpoints: engine state together with the input offsets it includes.

A checkpoint is two files in the checkpoint directory:

- ``checkpoint-<seq>.safetensors``, written by :func:`stream_influence.core.state.encode_engine`
  (temporary file, fsync, rename, fsync of the directory), whose ``extra`` metadata holds
  ``offsets`` (``{topic: {partition: next_offset}}``: the first input offset *not* yet applied
  to the model in this file), ``reference_offsets`` (``{partition: next_offset}`` of the
  reference topic), ``outputs`` (messages produced per output kind), ``seq``, ``written_at``
  and ``format`` (:data:`FORMAT`);
- ``checkpoint-<seq>.manifest.json``, written atomically *after* it: the size and SHA-256 of
  every file of the checkpoint.  A checkpoint without a valid manifest was never completed.

:meth:`CheckpointStore.load` verifies a checkpoint: the manifest (size and SHA-256, which catch
truncation and flipped bits), then the structure (header JSON valid and of the expected types,
every array present, float64/int64 dtypes, finite float arrays, shapes consistent with the
settings and the schema, offsets non-negative integers).  Any failure is one
:class:`~stream_influence.errors.CheckpointCorrupt` naming the file and the reason.
:meth:`CheckpointStore.latest` falls back from a corrupt checkpoint to the previous one (logging
one line per skipped file and counting it by reason), and raises
:class:`~stream_influence.errors.NoUsableCheckpoint` if none passes.  Files from the release
before manifests (no manifest, no ``format``) are accepted with a warning when the structural
checks pass.

The newest ``keep`` (default 2) checkpoints are kept; checkpoints this store found corrupt do not
count towards ``keep`` (they are renamed ``*.corrupt`` at the next save), so the newest good
checkpoint is never deleted in favour of a corrupt one.

>>> import tempfile
>>> from stream_influence.core.engine import InfluenceEngine
>>> store = CheckpointStore(Path(tempfile.mkdtemp()))
>>> engine = InfluenceEngine()
>>> _ = engine.process([b'{"id": "a", "features": [1.0], "label": 0}'])
>>> _ = store.save(engine, {("events", 0): 1}, {}, {"quarantine": 0})
>>> ck = store.latest()
>>> ck.offsets, ck.engine.events_seen, ck.seq, ck.skipped
({('events', 0): 1}, 1, 1, [])
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, overload

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stream_influence.core.engine import InfluenceEngine
from stream_influence.core.settings import EngineSettings
from stream_influence.core.state import atomic_write, decode_state, encode_engine, read_file, restore_engine
from stream_influence.errors import CheckpointCorrupt, CorruptReason, NoUsableCheckpoint

__all__ = ["FORMAT", "Checkpoint", "CheckpointStore", "PendingCheckpoint"]

log = logging.getLogger(__name__)

FORMAT = "stream-influence/checkpoint/2"  # /1 (previous release): no manifest, no format key
_MANIFEST_FORMAT = "stream-influence/manifest/1"
_NAME = re.compile(r"^checkpoint-(\d+)\.safetensors$")
_ANY_SEQ = re.compile(r"^checkpoint-(\d+)\.")
TopicPartitionKey = tuple[str, int]

_Offset = Annotated[int, Field(ge=0, strict=True)]
_Partition = Annotated[int, Field(ge=0)]  # JSON object keys are strings: "3" → 3


class _Offsets(BaseModel):
    """The offset metadata of a checkpoint, validated on load (negative or non-integer offsets,
    partitions that are not non-negative integers, and missing fields are corruption)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    offsets: dict[str, dict[_Partition, _Offset]]
    reference_offsets: dict[_Partition, _Offset]
    outputs: dict[str, _Offset]
    seq: Annotated[int, Field(ge=1, strict=True)]
    written_at: float = Field(allow_inf_nan=False)


class _FileEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    bytes: Annotated[int, Field(ge=0, strict=True)]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class _Manifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    format: str = Field(pattern=f"^{re.escape(_MANIFEST_FORMAT)}$")
    seq: Annotated[int, Field(ge=1, strict=True)]
    files: dict[str, _FileEntry]


@dataclass
class Checkpoint:
    """A restored, verified checkpoint; ``skipped`` lists newer files that failed verification."""

    engine: InfluenceEngine
    offsets: dict[TopicPartitionKey, int]
    reference_offsets: dict[int, int]
    outputs: dict[str, int]
    seq: int
    path: Path
    written_at: float
    extra: dict[str, Any] = field(default_factory=dict)
    skipped: list[CheckpointCorrupt] = field(default_factory=list)


def _offsets_to_json(offsets: dict[TopicPartitionKey, int]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for (topic, partition), off in sorted(offsets.items()):
        out.setdefault(topic, {})[str(partition)] = int(off)
    return out


class PendingCheckpoint:
    """A checkpoint whose state was captured on the caller's thread and whose files are being
    written (fsync, rename, manifest) on the store's writer thread."""

    __slots__ = ("_future", "path")

    def __init__(self, path: Path, future: Future[Path]) -> None:
        self.path, self._future = path, future

    def done(self) -> bool:
        """True once the checkpoint is durable, or its write failed (:meth:`result` raises)."""
        return self._future.done()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds for the write to end; True if it has (errors are
        raised by :meth:`result`)."""
        try:
            self._future.exception(timeout)
        except TimeoutError:
            return False
        return True

    def result(self, timeout: float | None = None) -> Path:
        """Wait until the checkpoint is durable; raises the write's error."""
        return self._future.result(timeout)


def manifest_path(path: Path) -> Path:
    """The manifest of checkpoint file ``path``."""
    return path.with_name(path.name.removesuffix(".safetensors") + ".manifest.json")


class CheckpointStore:
    """The checkpoint directory of one service instance."""

    def __init__(self, directory: Path, keep: int = 2) -> None:
        self.directory = Path(directory)
        self.keep = max(1, keep)
        # Checkpoints this store found corrupt (path → reason), and fallbacks by reason since
        # the store was created (the service exports them as a metric).
        self.corrupt: dict[Path, CorruptReason] = {}
        self.fallbacks: Counter[str] = Counter()
        # One writer thread, one write at a time: files and sequence numbers stay in order.
        self._writer: ThreadPoolExecutor | None = None
        self._pending: PendingCheckpoint | None = None

    def wait(self) -> None:
        """Wait for the write in progress (if any) to end; raises its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

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

    def fallback_counts(self) -> dict[str, int]:
        """Checkpoints skipped as corrupt since this store was created, by reason."""
        return dict(self.fallbacks)

    @overload
    def save(
        self,
        engine: InfluenceEngine,
        offsets: dict[TopicPartitionKey, int],
        reference_offsets: dict[int, int],
        outputs: dict[str, int],
        extra: dict[str, Any] | None = None,
        *,
        background: Literal[False] = False,
    ) -> Path: ...

    @overload
    def save(
        self,
        engine: InfluenceEngine,
        offsets: dict[TopicPartitionKey, int],
        reference_offsets: dict[int, int],
        outputs: dict[str, int],
        extra: dict[str, Any] | None = None,
        *,
        background: Literal[True],
    ) -> PendingCheckpoint: ...

    def save(
        self,
        engine: InfluenceEngine,
        offsets: dict[TopicPartitionKey, int],
        reference_offsets: dict[int, int],
        outputs: dict[str, int],
        extra: dict[str, Any] | None = None,
        *,
        background: bool = False,
    ) -> Path | PendingCheckpoint:
        """Write the next checkpoint (state file, then its manifest, each atomically), then
        prune old ones; returns the state file's path.

        The state is serialised here, on the caller's thread (the engine must not change while
        it is read).  With ``background`` the files are written on the store's writer thread and
        a :class:`PendingCheckpoint` is returned at once; the checkpoint is durable when it is
        done.  A save first waits for the previous background write."""
        self.wait()
        existing = self.paths()
        # Past every seq in the directory, set-aside corrupt ones included: a name is never reused.
        seqs = [int(m.group(1)) for p in self._listing() if (m := _ANY_SEQ.match(p.name))]
        seq = max(seqs, default=0) + 1
        path = self.directory / f"checkpoint-{seq:012d}.safetensors"
        meta = {
            **(extra or {}),
            "format": FORMAT,
            "seq": seq,
            "written_at": time.time(),
            "offsets": _offsets_to_json(offsets),
            "reference_offsets": {str(p): int(o) for p, o in sorted(reference_offsets.items())},
            "outputs": dict(outputs),
        }
        data = encode_engine(engine, meta)
        if not background:
            return self._write(path, seq, data, existing)
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-writer")
        self._pending = PendingCheckpoint(path, self._writer.submit(self._write, path, seq, data, existing))
        return self._pending

    def install(self, data: bytes) -> Path:
        """Write checkpoint bytes made elsewhere (a model snapshot, which is a checkpoint file of
        the updater) as the next checkpoint, with its manifest.  Verified when loaded."""
        self.wait()
        existing = self.paths()
        seqs = [int(m.group(1)) for p in self._listing() if (m := _ANY_SEQ.match(p.name))]
        seq = max(seqs, default=0) + 1
        return self._write(self.directory / f"checkpoint-{seq:012d}.safetensors", seq, data, existing)

    def _write(self, path: Path, seq: int, data: bytes, existing: list[tuple[int, Path]]) -> Path:
        """The state file, then its manifest (last: it completes the checkpoint), then pruning."""
        atomic_write(path, data)
        manifest = {
            "format": _MANIFEST_FORMAT,
            "seq": seq,
            "files": {path.name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}},
        }
        atomic_write(manifest_path(path), json.dumps(manifest, indent=1).encode())
        self._prune(existing)
        return path

    def _listing(self) -> list[Path]:
        return list(self.directory.iterdir()) if self.directory.is_dir() else []

    def _prune(self, existing: list[tuple[int, Path]]) -> None:
        # Known-corrupt files are set aside (kept for inspection, never loaded, not counted), so
        # `keep` counts good checkpoints and a corrupt newest never pushes out the last good one.
        for _, p in existing:
            if p in self.corrupt:
                for f in (p, manifest_path(p)):
                    if f.exists():
                        f.replace(f.with_name(f.name + ".corrupt"))
                self.corrupt.pop(p)
        good = [p for _, p in self.paths()]
        for old in good[: -self.keep]:
            old.unlink(missing_ok=True)
            manifest_path(old).unlink(missing_ok=True)
        # A crash between the two unlinks above leaves a manifest without its file.
        for m in self.directory.glob("checkpoint-*.manifest.json"):
            if not m.with_name(m.name.removesuffix(".manifest.json") + ".safetensors").exists():
                m.unlink(missing_ok=True)

    def load(self, path: Path, settings: EngineSettings | None = None) -> Checkpoint:
        """Read and verify one checkpoint (see the module docstring).

        Raises :class:`CheckpointCorrupt` if it fails verification and
        :class:`~stream_influence.errors.CheckpointIncompatible` if it was written with other
        schema, model or curvature settings.
        """
        path = Path(path)
        data = read_file(path)
        manifest = self._verify_manifest(path, data)
        state, meta, tensors = decode_state(data, path)
        extra = meta.get("extra")
        if not isinstance(extra, dict):
            raise CheckpointCorrupt(path, CorruptReason.METADATA, "extra metadata is not a JSON object")
        if manifest is None and extra.get("format") is not None:
            raise CheckpointCorrupt(
                path, CorruptReason.MANIFEST, "no manifest: the checkpoint was never completed"
            )
        try:
            info = _Offsets.model_validate(extra)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first["loc"])
            reason = CorruptReason.OFFSETS if "offsets" in where else CorruptReason.METADATA
            raise CheckpointCorrupt(
                path, reason, f"{where}: {first['msg']} (got {first.get('input')!r})"
            ) from exc
        engine, _ = restore_engine(state, meta, tensors, path, settings)
        if manifest is None:
            log.warning(
                "checkpoint %s has no manifest (written by a release before manifests): accepted "
                "because its structure checks passed, but it carries no checksum",
                path,
            )
        return Checkpoint(
            engine=engine,
            offsets={(t, p): o for t, parts in info.offsets.items() for p, o in parts.items()},
            reference_offsets=dict(info.reference_offsets),
            outputs=dict(info.outputs),
            seq=info.seq,
            path=path,
            written_at=info.written_at,
            extra=extra,
        )

    @staticmethod
    def _verify_manifest(path: Path, data: bytes) -> _Manifest | None:
        mpath = manifest_path(path)
        if not mpath.exists():
            return None
        try:
            manifest = _Manifest.model_validate_json(mpath.read_bytes())
        except (OSError, ValidationError) as exc:
            raise CheckpointCorrupt(
                path, CorruptReason.MANIFEST, f"{mpath.name} is unreadable: {exc}"
            ) from exc
        entry = manifest.files.get(path.name)
        if entry is None:
            raise CheckpointCorrupt(path, CorruptReason.MANIFEST, f"{mpath.name} does not list the file")
        if entry.bytes != len(data):
            raise CheckpointCorrupt(
                path,
                CorruptReason.MANIFEST,
                f"{len(data)} bytes, the manifest says {entry.bytes} (truncated?)",
            )
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise CheckpointCorrupt(
                path,
                CorruptReason.MANIFEST,
                "SHA-256 differs from the manifest: the file changed after it was written",
            )
        return manifest

    def latest(self, settings: EngineSettings | None = None) -> Checkpoint | None:
        """The newest checkpoint that passes verification, falling back to older ones.

        Returns None if the directory holds no checkpoint.  Raises :class:`NoUsableCheckpoint`
        if there are checkpoints but none passes, and
        :class:`~stream_influence.errors.CheckpointIncompatible` at once for one written with
        other schema, model or curvature settings (silently starting from an older or empty
        model would re-apply every event).
        """
        self.wait()  # never read a checkpoint this store is still writing
        skipped: list[CheckpointCorrupt] = []
        for _, path in reversed(self.paths()):
            try:
                ck = self.load(path, settings)
            except CheckpointCorrupt as exc:
                log.error(
                    "checkpoint %s is corrupt (%s: %s); trying the previous one",
                    path.name,
                    exc.reason.value,
                    exc.detail,
                    extra={"checkpoint": str(path), "reason": exc.reason.value},
                )
                self.corrupt[path] = exc.reason
                self.fallbacks[exc.reason.value] += 1
                skipped.append(exc)
                continue
            ck.skipped = skipped
            if skipped:
                log.warning(
                    "restored the previous good checkpoint %s after skipping %d", path.name, len(skipped)
                )
            return ck
        if skipped:
            files = "; ".join(f"{e.path.name}: {e.reason.value}: {e.detail}" for e in skipped)
            raise NoUsableCheckpoint(
                f"no usable checkpoint in {self.directory} ({files}). Restore a good checkpoint, or "
                "start with an empty model with `stream-influence run --fresh` (the corrupt files "
                "are then set aside as *.corrupt)"
            )
        return None

    def set_aside(self) -> list[Path]:
        """Rename every checkpoint file (and manifest) to ``*.corrupt``; returns the new names.
        What ``run --fresh`` does when no checkpoint is usable."""
        moved = []
        for _, p in self.paths():
            for f in (p, manifest_path(p)):
                if f.exists():
                    target = f.with_name(f.name + ".corrupt")
                    f.replace(target)
                    moved.append(target)
            self.corrupt.pop(p, None)
        return moved

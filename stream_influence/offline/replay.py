"""Offline replay: run a JSON Lines file of events through the same engine as the Kafka service.

The file is read lazily, ``batch_size`` lines at a time (a "poll"), and the decisions are
written as they are made, so memory stays bounded however long the stream is: what is kept
per batch for the report and the plots is a handful of integers (``O(n / batch_size)``) and
fixed-bin histograms.

Every input line yields exactly one decision line, in input order — an empty or malformed line
included (it is dead-lettered with its reason) — so ``wc -l`` of the input and of the decisions
agree.  With the same seed, settings, batch size and input, the decisions file is byte-identical.

>>> import json, tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> lines = [json.dumps({"id": f"e{i}", "features": [i % 2, 1.0], "label": i % 2}) for i in range(6)]
>>> _ = (d / "ev.jsonl").write_text("\\n".join(lines[:3] + ["", "{oops"] + lines[3:]) + "\\n")
>>> out = replay(d / "ev.jsonl", EngineSettings(), decisions=d / "dec.jsonl")
>>> out.report["events"], out.report["accepted"], out.report["dead_lettered"]
(8, 6, 2)
>>> [json.loads(x)["decision"] for x in (d / "dec.jsonl").read_text().splitlines()][2:5]
['accept', 'dead_letter', 'dead_letter']
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from stream_influence.core.engine import BatchResult, InfluenceEngine
from stream_influence.core.settings import EngineSettings
from stream_influence.errors import StreamInfluenceError
from stream_influence.offline.jsonl import iter_batches, iter_lines

__all__ = [
    "DEFAULT_SEED_REFERENCE",
    "ReplayResult",
    "ReplayTrace",
    "evaluate_test_set",
    "iter_batches",
    "iter_lines",
    "replay",
]

# Without a reference file, the first N valid events seed the reference buffer.  300 clears the
# reference min_size (100) with margin and is the order of what the early measurements needed
# (100–200 clean points), while being a small slice of any realistic stream.
DEFAULT_SEED_REFERENCE = 300
HIST_BINS = np.linspace(-1.0, 1.0, 81)  # cosine_influence lives in [−1, 1]


@dataclass
class ReplayTrace:
    """Bounded per-batch series and fixed-bin score histograms, for the report and plots."""

    valid: list[int] = field(default_factory=list)
    quarantined: list[int] = field(default_factory=list)
    routed_correct: list[int] = field(default_factory=list)
    shadow_correct: list[int] = field(default_factory=list)
    hist_edges: np.ndarray = field(default_factory=lambda: HIST_BINS.copy())
    hist_accept: np.ndarray = field(default_factory=lambda: np.zeros(len(HIST_BINS) - 1, np.int64))
    hist_quarantine: np.ndarray = field(default_factory=lambda: np.zeros(len(HIST_BINS) - 1, np.int64))
    hist_warmup: np.ndarray = field(default_factory=lambda: np.zeros(len(HIST_BINS) - 1, np.int64))
    reasons: dict[str, int] = field(default_factory=dict)
    alarm_batches: int = 0
    drift_batches: int = 0

    def add(self, result: BatchResult, routed_correct: int, shadow_correct: int) -> None:
        n = len(result.events)
        q = int(result.quarantine.sum())
        self.valid.append(n)
        self.quarantined.append(q)
        self.routed_correct.append(routed_correct)
        self.shadow_correct.append(shadow_correct)
        for r in result.reasons:
            self.reasons[r] = self.reasons.get(r, 0) + 1
        cos = result.scores.cosine_influence
        if n:
            ok = np.isfinite(cos)
            qm = result.quarantine.astype(bool)
            wm = np.array([r == "warmup" for r in result.reasons], dtype=bool)
            self.hist_warmup += np.histogram(np.clip(cos[ok & wm], -1, 1), self.hist_edges)[0]
            self.hist_accept += np.histogram(np.clip(cos[ok & ~qm & ~wm], -1, 1), self.hist_edges)[0]
            self.hist_quarantine += np.histogram(np.clip(cos[ok & qm], -1, 1), self.hist_edges)[0]
        self.alarm_batches += int(result.alarm)
        self.drift_batches += int(result.drift)


@dataclass
class ReplayResult:
    report: dict[str, Any]
    trace: ReplayTrace
    engine: InfluenceEngine


ProgressFn = Callable[[int, dict[str, Any]], None]


def _correct(learner: Any) -> int:
    """Cumulative number of correct prequential predictions of a head learner."""
    m = learner.metrics
    return round(m.cumulative_accuracy * m.n) if m.n else 0


def _dead_letter_id(raw: bytes) -> str | None:
    """Best-effort id of a dead-lettered line, so an operator can find it (never trusted)."""
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    eid = obj.get("id") if isinstance(obj, dict) else None
    if not isinstance(eid, str) or not eid:
        return None
    try:
        eid.encode("utf-8")  # a lone surrogate is not text an operator (or jq) can match
    except UnicodeEncodeError:
        return None
    return eid


def _clean(x: Any) -> Any:
    """JSON-safe copy: NaN/inf → None, numpy scalars → Python."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def evaluate_test_set(engine: InfluenceEngine, path: Path, batch_size: int = 4096) -> dict[str, Any]:
    """Accuracy of the routed and shadow heads on a clean test file (read in batches)."""
    n = routed = shadow = rejected = 0
    if engine.routed is None:
        return {"test_events": 0, "test_rejected": 0, "test_accuracy": None, "shadow_test_accuracy": None}
    for lines, _ in iter_batches(path, batch_size):
        batch, rejects = engine.schema.decode_batch(lines, learn=False)
        rejected += len(rejects)
        if len(batch) == 0:
            continue
        routed += int((engine.predict_proba(batch.features).argmax(1) == batch.labels).sum())
        shadow += int((engine.predict_proba(batch.features, shadow=True).argmax(1) == batch.labels).sum())
        n += len(batch)
    return {
        "test_events": n,
        "test_rejected": rejected,
        "test_accuracy": routed / n if n else None,
        "shadow_test_accuracy": shadow / n if n else None,
    }


def replay(
    events: Path,
    settings: EngineSettings,
    *,
    reference: Path | None = None,
    test: Path | None = None,
    decisions: Path | None = None,
    batch_size: int = 512,
    seed_reference: int = DEFAULT_SEED_REFERENCE,
    progress: ProgressFn | None = None,
) -> ReplayResult:
    """Replay ``events`` through a fresh engine; see the module docstring.

    Without ``reference``, ``settings.reference.seed_from_stream`` is raised to
    ``seed_reference`` when it is 0, and the report says the reference came from the stream.
    """
    events = Path(events)
    if not events.is_file():
        raise StreamInfluenceError(f"events file not found: {events}")
    if batch_size < 1:
        raise StreamInfluenceError("batch size must be ≥ 1")
    ref_info: dict[str, Any]
    if reference is None:
        seeded = settings.reference.seed_from_stream or seed_reference
        if seeded != settings.reference.seed_from_stream:
            settings = settings.model_copy(
                update={"reference": settings.reference.model_copy(update={"seed_from_stream": seeded})}
            )
        ref_info = {
            "source": "stream",
            "seed_from_stream": seeded,
            "note": f"no --reference given: up to the first {seeded} valid events seeded the reference "
            "buffer (unverified: label noise among them weakens routing)",
        }
    else:
        ref_info = {"source": "file", "path": str(reference)}
    engine = InfluenceEngine(settings)

    if reference is not None:
        if not Path(reference).is_file():
            raise StreamInfluenceError(f"reference file not found: {reference}")
        n_ref = rejected = 0
        engine.trust_reference_labels()  # stream labels outside the reference's are unknown_label
        for lines, _ in iter_batches(Path(reference), 4096):
            rej = engine.add_reference(lines)
            rejected += len(rej)
            n_ref += len(lines) - len(rej)
        ref_info.update({"events": n_ref, "rejected": rejected, "buffer_size": engine.reference.size})

    trace = ReplayTrace()
    tmp: Path | None = None
    n_input = 0
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        out: IO[str] | None = None
        if decisions is not None:
            decisions = Path(decisions)
            decisions.parent.mkdir(parents=True, exist_ok=True)
            # Written under a temporary name and renamed at the end: a crash never leaves a
            # decisions file that looks complete.
            tmp = decisions.with_name(decisions.name + ".partial")
            out = stack.enter_context(open(tmp, "w", encoding="utf-8"))
        for lines, pos in iter_batches(events, batch_size):
            before_r = _correct(engine.routed) if engine.routed is not None else 0
            before_s = _correct(engine.shadow) if engine.shadow is not None else 0
            result = engine.process(lines)
            n_input += len(lines)
            after_r = _correct(engine.routed) if engine.routed is not None else 0
            after_s = _correct(engine.shadow) if engine.shadow is not None else 0
            trace.add(result, after_r - before_r, after_s - before_s)
            if out is not None:
                for rec, raw in zip(result.decisions(), lines, strict=True):
                    if rec.decision == "dead_letter":
                        rec = rec.replace(id=_dead_letter_id(raw))
                    out.write(rec.to_json())
                    out.write("\n")
            if progress is not None:
                c = engine.counters
                progress(
                    pos,
                    {
                        "events": n_input,
                        "accepted": c.accepted,
                        "quarantined": c.quarantined,
                        "dead_lettered": c.dead_lettered,
                        "elapsed": time.perf_counter() - t0,
                    },
                )
    elapsed = time.perf_counter() - t0
    if tmp is not None and decisions is not None:
        tmp.replace(decisions)

    summary = engine.summary()
    c = engine.counters
    report: dict[str, Any] = {
        "events": n_input,
        "valid": c.accepted + c.quarantined,
        "accepted": c.accepted,
        "quarantined": c.quarantined,
        "dead_lettered": c.dead_lettered,
        "dead_letter_reasons": dict(sorted(c.dead_letter_reasons.items())),
        "decision_reasons": dict(sorted(trace.reasons.items())),
        "prequential_accuracy": summary.prequential_accuracy,
        "shadow_prequential_accuracy": summary.shadow_prequential_accuracy,
        "updates_applied": summary.updates_applied or 0,
        "shadow_updates_applied": summary.shadow_updates_applied or 0,
        "events_per_second": n_input / elapsed if elapsed > 0 else None,
        "elapsed_seconds": elapsed,
        "batch_size": batch_size,
        "warm": engine.warm,
        "not_warm_reason": engine.not_warm_reason(),
        "alarm_batches": trace.alarm_batches,
        "drift_resets": c.drift_resets,
        "reference": {**ref_info, "buffer_size": engine.reference.size},
        "input": str(events),
        "decisions": str(decisions) if decisions is not None else None,
    }
    if test is not None:
        if not Path(test).is_file():
            raise StreamInfluenceError(f"test file not found: {test}")
        report.update(evaluate_test_set(engine, Path(test)))
    report["engine"] = {
        "classes": summary.classes,
        "n_features": summary.n_features,
        "reference_size": summary.reference_size,
        "reference_loss": summary.reference_loss,
        "quarantine_rate": summary.quarantine_rate,
        "threshold": summary.threshold,
        "damping_in_use": summary.damping_in_use,
        "condition_number": summary.condition_number,
        "refactorizations": summary.refactorizations,
    }
    report["settings"] = engine.settings.model_dump(mode="json", by_alias=True)
    return ReplayResult(_clean(report), trace, engine)

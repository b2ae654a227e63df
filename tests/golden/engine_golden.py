"""Recorded engine outputs: the reference the engine's speed work is held to (issue 11).

Every configuration below streams the same synthetic events through :class:`InfluenceEngine` —
decoding, scoring, routing and learning, with dead letters, weights, timestamps and chunk sizes
that are not multiples of the micro-batch mixed in — and records what it decided and what it
learned: per event the decision, the reason, the four scores and the threshold; per dead letter
its position and reason; at the end every array and number of ``state_dict()``.

``tests/test_engine_golden.py`` runs the same configurations on the tree under test and compares
with the recording made from the package *before* the speed work.  Regenerate it (only when the
engine's behaviour is meant to change) from that revision's package::

    git archive REV stream_influence | tar -x -C /tmp/golden-rev
    PYTHONPATH=/tmp/golden-rev:. .venv/bin/python tests/golden/engine_golden.py tests/golden/engine.json.gz

This module imports only the package's public API, so it runs against either tree.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from stream_influence.core.engine import BatchResult, InfluenceEngine
from stream_influence.core.settings import (
    CurvatureSettings,
    DriftSettings,
    EngineSettings,
    LearnerSettings,
    PolicySettings,
    ReferenceSettings,
    SchemaSettings,
)

D, K = 12, 4
SCORE_FIELDS = ("influence", "relative_influence", "cosine_influence", "self_influence")


def _stream(seed: int, n: int, shift_at: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian classes with unequal raw feature scales and 25 % label noise; from ``shift_at``
    on the classes are permuted (abrupt drift)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=2.0, size=(K, D))
    scale = np.exp(rng.uniform(-1.5, 2.5, D))
    y = rng.integers(0, K, n)
    X = (centers[y] + rng.normal(size=(n, D))) * scale
    noisy = rng.random(n) < 0.25
    y = np.where(noisy, rng.integers(0, K, n), y)
    if shift_at is not None:
        y[shift_at:] = (y[shift_at:] + 1) % K
    return X, y


def _encode(X: np.ndarray, y: np.ndarray, prefix: str, labels: list[Any], extras: bool) -> list[bytes | None]:
    """JSON events; with ``extras`` every 7th carries a weight, every 11th a timestamp, every 13th
    a ``meta`` object, and bad messages are mixed in (dead letters)."""
    out: list[bytes | None] = []
    for i, (x, c) in enumerate(zip(X, y, strict=True)):
        event: dict[str, Any] = {"id": f"{prefix}{i}", "features": x.tolist(), "label": labels[int(c)]}
        if extras and i % 7 == 3:
            event["weight"] = 0.5 + (i % 5) * 0.25
        if extras and i % 11 == 5:
            event["ts"] = 1_700_000_000 + i
        if extras and i % 13 == 6:
            event["meta"] = {"source": "golden", "n": i}
        out.append(json.dumps(event).encode())
        if extras and i % 97 == 50:
            out.append(b"not json")
        if extras and i % 89 == 20:
            out.append(
                json.dumps({"id": f"bad{i}", "features": x.tolist()[:-1], "label": labels[0]}).encode()
            )
        if extras and i % 101 == 30:
            out.append(None)
    return out


def _chunks(n: int, sizes: tuple[int, ...]) -> list[tuple[int, int]]:
    out, start, j = [], 0, 0
    while start < n:
        stop = min(n, start + sizes[j % len(sizes)])
        out.append((start, stop))
        start, j = stop, j + 1
    return out


class Case:
    """One configuration: settings, its events and how they are fed."""

    def __init__(
        self,
        name: str,
        settings: EngineSettings,
        *,
        seed: int,
        events: int = 1000,
        reference: int = 160,
        labels: list[Any] | None = None,
        chunk_sizes: tuple[int, ...] = (200, 512, 77, 130),
        shift_at: int | None = None,
        extras: bool = True,
    ) -> None:
        self.name, self.settings, self.seed = name, settings, seed
        self.events, self.reference, self.labels = events, reference, labels or list(range(K))
        self.chunk_sizes, self.shift_at, self.extras = chunk_sizes, shift_at, extras


# Micro-batches of 64 (the default when this was recorded; now 512): chunks that are not
# multiples of the micro-batch keep exercising the learn-then-score order inside a chunk.
MICRO_BATCH = 64
# Policy settings added after the recording, at the values that reproduce it (issue 9's routed-loss
# evidence: off, as recorded).
PINNED = {"self_loss_fdr": 0.0, "contradiction_rate": 0.0}


def pinned_settings(pinned: dict[str, Any], micro_batch: int = MICRO_BATCH, **parts: Any) -> EngineSettings:
    """A recording's settings: the synthetic streams' label space and width, micro-batches of
    ``micro_batch``, ``parts``, and the policy settings added after the recording at the values
    that reproduce it (``pinned``)."""
    base: dict[str, Any] = {
        "schema": SchemaSettings(classes=list(range(K)), n_features=D),
        "influence": {"micro_batch": micro_batch},
    }
    base.update(parts)
    return _pinned(EngineSettings(**base), pinned)


def _settings(**parts: Any) -> EngineSettings:
    return pinned_settings(PINNED, **parts)


def _pinned(s: EngineSettings, pinned: dict[str, Any] = PINNED) -> EngineSettings:
    """``s`` with the settings added after the recording at the values that reproduce it (and
    the curvature's ``refine``, the default since, off: every case was recorded without it; the
    learner's numpy kernel, the reference the recordings are bitwise: the compiled default rounds
    its sums differently in the last bits — tests/test_kernels.py holds it to the numpy one)."""
    return s.model_copy(
        update={
            "policy": s.policy.model_copy(update=pinned),
            "curvature": s.curvature.model_copy(update={"refine": False}),
            "learner": s.learner.model_copy(update={"kernel": "numpy"}),
        }
    )


CASES = [
    # The defaults (kfac, hybrid calibrated policy) with the label space and width configured
    # (micro-batches of 64, as every case here: MICRO_BATCH).
    Case("default_kfac", _settings(), seed=1),
    # Drift: the classes are permuted mid-stream, so the detector fires and the curvature forgets.
    Case("kfac_drift", _settings(drift=DriftSettings(delta=0.05)), seed=2, shift_at=700),
    Case(
        "ekfac_influence",
        _settings(
            curvature=CurvatureSettings(kind="ekfac"),
            policy=PolicySettings(evidence="influence", score="relative_influence"),
        ),
        seed=3,
    ),
    Case(
        "exact_margin_reference_loss",
        _settings(
            curvature=CurvatureSettings(kind="exact", refactor_every=300),
            policy=PolicySettings(evidence="reference_loss", require_disagreement=False),
            influence={"objective": "margin", "refresh_every": 100, "micro_batch": 50},
        ),
        seed=4,
        events=700,
    ),
    Case(
        "classblock_adam",
        _settings(
            curvature=CurvatureSettings(kind="classblock"),
            learner=LearnerSettings(optimizer="adam", learning_rate=0.01, minibatch=5),
        ),
        seed=5,
        events=700,
    ),
    Case(
        "diagonal_newton_quantile",
        _settings(
            curvature=CurvatureSettings(kind="diagonal"),
            learner=LearnerSettings(optimizer="newton", learning_rate=0.2),
            policy=PolicySettings(mode="quantile", quantile=0.15, max_quarantine_rate=0.12),
        ),
        seed=6,
        events=700,
    ),
    # No trusted source: string labels learned from the stream, the reference seeded from it.
    Case(
        "seeded_learned_labels",
        _pinned(
            EngineSettings(
                influence={"micro_batch": MICRO_BATCH},
                reference=ReferenceSettings(seed_from_stream=150),
                policy=PolicySettings(warmup_events=300, mode="absolute", quarantine_threshold=0.01),
            )
        ),
        seed=7,
        reference=0,
        labels=["ant", "bee", "cat", "dog"],
        chunk_sizes=(64, 300, 512),
    ),
]


def _record(out: dict[str, np.ndarray], key: str, value: Any) -> None:
    out[key] = np.asarray(value)


# Inputs kept as they came (the trusted points' features, the policy's window of the very scores
# recorded per event): left out of the recording to keep it small.
_NOT_RECORDED = (".reference.features", ".policy.scores_data")
# Settings added after the recording, which every case pins (PINNED): their keys in the saved
# settings are not part of the recording.
_ADDED_SETTINGS = (
    ".policy_settings.self_loss_fdr",
    ".policy_settings.self_loss_folds",
    ".policy_settings.contradiction_rate",
    ".policy_settings.contradiction_calibration",
    ".policy_settings.self_loss_calibrate_every",
    ".policy_settings.self_loss_fold_every",
)


def _flatten_state(prefix: str, value: Any, out: dict[str, np.ndarray]) -> None:
    if prefix.endswith(_NOT_RECORDED + _ADDED_SETTINGS):
        return
    if isinstance(value, dict):
        for k in sorted(value):
            _flatten_state(f"{prefix}.{k}", value[k], out)
    elif isinstance(value, list | tuple) and value and all(isinstance(v, str) for v in value):
        out[prefix] = np.asarray(value, dtype=str)
    elif value is None:
        out[prefix] = np.asarray("None")
    else:
        arr = np.asarray(value)
        out[prefix] = arr.astype(str) if arr.dtype == object else arr


def _results(results: list[BatchResult]) -> dict[str, np.ndarray]:
    decisions = [r.decisions() for r in results]
    flat = [d for ds in decisions for d in ds]
    out = {
        "decision": np.asarray([d.decision for d in flat], dtype=str),
        "reason": np.asarray([d.reason for d in flat], dtype=str),
        "thresholds": np.concatenate([r.thresholds for r in results]),
        "alarm": np.asarray([r.alarm for r in results]),
        "drift": np.asarray([r.drift for r in results]),
        "model_version": np.asarray([r.model_version for r in results]),
    }
    for f in SCORE_FIELDS:
        out[f] = np.concatenate([r.scores.get(f) for r in results])
    return out


def run_case(case: Case) -> dict[str, np.ndarray]:
    """Everything the case's engine decided and learned, as named arrays."""
    n_ref = case.reference
    X, y = _stream(case.seed, n_ref + case.events, case.shift_at)
    engine = InfluenceEngine(case.settings)
    if n_ref:
        ref = _encode(X[:n_ref], y[:n_ref], "r", case.labels, extras=False)
        engine.add_reference(ref)  # type: ignore[arg-type]
    raws = _encode(X[n_ref:], y[n_ref:], "e", case.labels, case.extras)
    results = [engine.process(raws[a:b]) for a, b in _chunks(len(raws), case.chunk_sizes)]
    out = {f"{case.name}/{k}": v for k, v in _results(results).items()}
    state: dict[str, np.ndarray] = {}
    _flatten_state(f"{case.name}/state", engine.state_dict(), state)
    out.update(state)
    return out


def run_split(name: str, seed: int, settings: EngineSettings | None = None) -> dict[str, np.ndarray]:
    """Scale-out: a score worker (``score_events`` on snapshots) and one updater (``learn_events``)."""
    X, y = _stream(seed, 160 + 900)
    s = _settings() if settings is None else settings
    ref = _encode(X[:160], y[:160], "r", list(range(K)), extras=False)
    updater = InfluenceEngine(s)
    updater.add_reference(ref)  # type: ignore[arg-type]
    raws = _encode(X[160:], y[160:], "e", list(range(K)), extras=True)
    results: list[BatchResult] = []
    for a, b in _chunks(len(raws), (256, 190)):
        updater.prepare_snapshot()
        worker = InfluenceEngine(s)
        worker.load_state_dict(updater.state_dict())
        batch, rejects = worker.decode(raws[a:b])
        scored = worker.score_events(batch, rejects)
        results.append(scored)
        updater.learn_events(batch, scored.quarantine)
    out = {f"{name}/{k}": v for k, v in _results(results).items()}
    state: dict[str, np.ndarray] = {}
    _flatten_state(f"{name}/state", updater.state_dict(), state)
    out.update(state)
    return out


RUNS: list[tuple[str, Callable[[], dict[str, np.ndarray]]]] = [
    *((c.name, (lambda c=c: run_case(c))) for c in CASES),
    ("split_score_learn", lambda: run_split("split_score_learn", 8)),
]


def run_all() -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for _, run in RUNS:
        out.update(run())
    return out


SAMPLE = 96  # values of a long float array kept in the recording (plus its digest and sums)


def digest(arr: np.ndarray) -> str:
    """SHA-256 of a float array's float64 bytes: equal digests mean bitwise-equal arrays."""
    return hashlib.sha256(np.ascontiguousarray(arr, dtype=np.float64).tobytes()).hexdigest()


def summary(arr: np.ndarray) -> np.ndarray:
    """What a long float array is compared by when it is not bitwise equal: its size, NaN count,
    sum, sum of magnitudes, sum of squares, extremes (NaN left out) and an evenly strided sample."""
    x = np.asarray(arr, dtype=np.float64).ravel()
    finite = x[~np.isnan(x)]
    stats = [
        float(x.size),
        float(x.size - finite.size),
        float(finite.sum()),
        float(np.abs(finite).sum()),
        float(np.square(finite).sum()),
        float(finite.max(initial=-np.inf)),
        float(finite.min(initial=np.inf)),
    ]
    step = max(1, -(-x.size // SAMPLE))
    return np.concatenate([stats, x[::step]])


def compact(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """The recording, JSON-ready: long float arrays as ``{"sha256", "summary", "shape"}``, the
    rest as ``{"dtype", "shape", "values"}`` (Python floats print exactly: repr round-trips)."""
    out: dict[str, Any] = {}
    for key, arr in arrays.items():
        if arr.dtype.kind == "f" and arr.size > SAMPLE:
            out[key] = {"sha256": digest(arr), "summary": summary(arr).tolist(), "shape": list(arr.shape)}
        else:
            out[key] = {"dtype": arr.dtype.kind, "shape": list(arr.shape), "values": arr.ravel().tolist()}
    return out


def load(path: Path) -> dict[str, Any]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return json.load(f)  # type: ignore[no-any-return]


if __name__ == "__main__":
    import stream_influence

    target = Path(sys.argv[1])
    recording = {"package": str(Path(stream_influence.__file__).parent), "arrays": compact(run_all())}
    # mtime=0: the same recording gives the same bytes.
    with gzip.GzipFile(target, "wb", mtime=0) as raw, io.TextIOWrapper(raw, "utf-8") as f:
        json.dump(recording, f, sort_keys=True)
    print(f"wrote {len(recording['arrays'])} arrays to {target} from {recording['package']}")

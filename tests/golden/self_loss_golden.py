"""Recorded engine outputs with the routed-loss evidence on (``policy.self_loss_fdr`` > 0): the
reference the fold heads' speed work is held to (issues 9 and 11).

The configurations of :mod:`tests.golden.engine_golden` pin ``self_loss_fdr`` to 0; these run the
same synthetic streams with it on, so the cross-fitted fold heads are made at the warm start, learn
every accepted event alongside the routed head, and calibrate the routed-loss test before every
micro-batch.  Recorded per event: decision, reason, scores, threshold; at the end every array of
``state_dict()`` — the fold heads' (``cross_fit.head*``) and the policy's routed-loss calibration
and window included.  Recorded from main's package at ``0aa009d`` (before the speed work)::

    git archive 0aa009d stream_influence | tar -x -C /tmp/golden-rev
    PYTHONPATH=/tmp/golden-rev:. .venv/bin/python tests/golden/self_loss_golden.py tests/golden/self_loss.json.gz
"""

from __future__ import annotations

import gzip
import io
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from stream_influence.core.settings import (
    CurvatureSettings,
    EngineSettings,
    LearnerSettings,
    PolicySettings,
)
from tests.golden.engine_golden import Case, compact, pinned_settings, run_case, run_split


def _settings(micro_batch: int = 64, **parts: Any) -> EngineSettings:
    # Settings added after the recording, at the values that reproduce it (round q11's margin gate).
    return pinned_settings({"contradiction_rate": 0.0}, micro_batch, **parts)


CASES = [
    # The defaults (self_loss_fdr 0.2, two folds, sgd), micro-batches of 64.
    Case("self_loss_default", _settings(), seed=11),
    # Micro-batches of the default size (512) with chunks smaller and larger than it.
    Case("self_loss_mb512", _settings(micro_batch=512), seed=12, events=1500),
    # Three folds, a looser test and an sgd step of 3 events (more steps per micro-batch).
    Case(
        "self_loss_3folds",
        _settings(
            policy=PolicySettings(self_loss_fdr=0.4, self_loss_folds=3),
            learner=LearnerSettings(minibatch=3),
        ),
        seed=13,
        events=800,
    ),
    # adam (per-learner steps after the shared product) and the exact curvature.
    Case(
        "self_loss_adam_exact",
        _settings(
            curvature=CurvatureSettings(kind="exact"),
            learner=LearnerSettings(optimizer="adam", learning_rate=0.01, minibatch=5),
        ),
        seed=14,
        events=700,
    ),
    # newton (steps through the curvature's solve) with the diagonal estimator.
    Case(
        "self_loss_newton",
        _settings(
            curvature=CurvatureSettings(kind="diagonal"),
            learner=LearnerSettings(optimizer="newton", learning_rate=0.2),
        ),
        seed=15,
        events=600,
    ),
]

RUNS: list[tuple[str, Callable[[], dict[str, np.ndarray]]]] = [
    *((c.name, (lambda c=c: run_case(c))) for c in CASES),
    # Scale-out with the routed-loss test: the updater observes the score workers' decisions.
    ("self_loss_split", lambda: run_split("self_loss_split", 16, _settings())),
]


def run_all() -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for _, run in RUNS:
        out.update(run())
    return out


if __name__ == "__main__":
    import stream_influence

    target = Path(sys.argv[1])
    recording = {"package": str(Path(stream_influence.__file__).parent), "arrays": compact(run_all())}
    with gzip.GzipFile(target, "wb", mtime=0) as raw, io.TextIOWrapper(raw, "utf-8") as f:
        json.dump(recording, f, sort_keys=True)
    print(f"wrote {len(recording['arrays'])} arrays to {target} from {recording['package']}")

"""The engine decides, scores and learns what it did before the speed work of issue 11.

``tests/golden/engine.json.gz`` was recorded from main's package at ``dc98d8e`` (without the
speed work), and re-recorded from branch quality2 at ``1d873e5`` (the same, plus issue 9's
``policy.floor_yield_fdr`` default, a meant change of behaviour) by ``tests/golden/engine_golden.py``: seven configurations (every curvature estimator, the
sgd/adam/newton optimizers, calibrated/absolute/quantile policies with each evidence, the margin
objective, drift, labels learned from the stream with a seeded reference, dead letters, weights,
timestamps and ``meta`` in the input, chunks that are not multiples of the micro-batch) and the
scale-out pair ``score_events``/``learn_events``.

Decisions, reasons, alarms, drift flags, model versions and every integer and string of the final
state must be equal.  Float arrays must be *bitwise* equal where the recording's digest matches —
on the machine that recorded it they are (``GOLDEN_BITWISE=1`` makes that a requirement);
elsewhere numpy may pick other SIMD kernels for ``exp`` and sums, whose last bits differ, so the
fallback compares the array's sums, extremes and a strided sample within a relative 1e-12 (the
curvature's eigenvectors excepted: their signs are arbitrary).  Checked by hand: a change of the
curvature's batch weight by a factor 1 + 1e-10 fails it (scores); softmax without its max shift
(a rounding-level change) passes the fallback and fails only the bitwise check.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.golden.engine_golden import RUNS, SAMPLE, digest, load, summary
from tests.golden.self_loss_golden import RUNS as SELF_LOSS_RUNS

RECORDING = Path(__file__).parent / "golden" / "engine.json.gz"
SELF_LOSS_RECORDING = Path(__file__).parent / "golden" / "self_loss.json.gz"
RTOL = 1e-12
# Eigenvectors are defined up to sign (and, for repeated eigenvalues, up to a rotation), so off the
# bitwise path they are not compared element by element; everything computed from them (scores,
# the served inverse) still is.
EIGENVECTORS = (".QA", ".QG")


@pytest.fixture(scope="module")
def recorded() -> dict[str, Any]:
    return load(RECORDING)["arrays"]  # type: ignore[no-any-return]


def _close(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    # Absolute slack relative to the array's own scale: a value near zero next to large ones
    # carries the rounding of the large ones.
    scale = float(np.nanmax(np.abs(expected), initial=0.0))
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=RTOL * scale, equal_nan=True, err_msg=what)


@pytest.mark.parametrize("name", [name for name, _ in RUNS])
def test_engine_reproduces_the_recorded_run(name: str, recorded: dict[str, Any]) -> None:
    _check(name, dict(RUNS)[name](), recorded)


@pytest.fixture(scope="module")
def recorded_self_loss() -> dict[str, Any]:
    return load(SELF_LOSS_RECORDING)["arrays"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("name", [name for name, _ in SELF_LOSS_RUNS])
def test_engine_reproduces_the_recorded_routed_loss_run(
    name: str, recorded_self_loss: dict[str, Any]
) -> None:
    """The same, with the routed-loss evidence on (``tests/golden/self_loss_golden.py``, recorded
    at ``0aa009d`` before the fold heads' speed work): decisions, scores, the routed-loss
    calibration and window, and the fold heads' learned state must not change."""
    _check(name, dict(SELF_LOSS_RUNS)[name](), recorded_self_loss)


def _check(name: str, arrays: dict[str, np.ndarray], recorded: dict[str, Any]) -> None:
    mine = {k for k in recorded if k.split("/", 1)[0] == name}
    assert mine, f"nothing recorded for {name}"
    assert set(arrays) == mine, f"state keys changed: {sorted(set(arrays) ^ mine)}"
    not_bitwise = []
    for key in sorted(mine):
        rec, actual = recorded[key], arrays[key]
        assert list(actual.shape) == rec["shape"], key
        if "sha256" in rec:
            if digest(actual) != rec["sha256"]:
                not_bitwise.append(key)
                if not key.endswith(EIGENVECTORS):
                    _close(summary(actual), np.asarray(rec["summary"]), key)
            continue
        expected = np.asarray(rec["values"]).reshape(rec["shape"])
        if rec["dtype"] == "f":
            if not np.array_equal(actual.ravel(), expected.ravel(), equal_nan=True):
                not_bitwise.append(key)
                if not key.endswith(EIGENVECTORS):
                    _close(actual.ravel(), expected.ravel(), key)
        else:
            assert actual.ravel().tolist() == rec["values"], key
    if os.environ.get("GOLDEN_BITWISE") == "1":
        assert not not_bitwise, f"not bitwise equal: {not_bitwise}"


def test_the_recording_covers_what_it_claims(recorded: dict[str, Any]) -> None:
    """The recorded runs route and learn (a recording of warm-up accepts would prove little)."""
    harmful = 0
    for name, _ in RUNS:
        reasons = recorded[f"{name}/reason"]["values"]
        harmful += reasons.count("harmful")
        assert {"helpful", "within_band"} & set(reasons), name
        assert {"invalid_json", "wrong_dimension", "empty"} <= set(reasons), name
    assert harmful >= 50  # quarantines in most configurations, not a stream of accepts
    assert sum(recorded["kfac_drift/drift"]["values"]) >= 1  # the drift reset path ran
    assert recorded["default_kfac/influence"]["summary"][0] > SAMPLE  # digest + summary form


def test_the_routed_loss_recording_covers_what_it_claims(recorded_self_loss: dict[str, Any]) -> None:
    """The routed-loss runs made fold heads, calibrated the test, and the test quarantined."""
    surprising = 0
    for name, _ in SELF_LOSS_RUNS:
        assert f"{name}/state.cross_fit.head1.theta" in recorded_self_loss, name
        assert recorded_self_loss[f"{name}/state.policy.self_loss_calibration"]["shape"][0] > 0, name
        surprising += recorded_self_loss[f"{name}/reason"]["values"].count("surprising_label")
    assert "self_loss_3folds/state.cross_fit.head2.theta" in recorded_self_loss
    assert surprising >= 10

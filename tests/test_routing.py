"""Routing behaviour: held-out calibration, routing from the first event, per-class false
quarantine bounds, class balance and the part the inverse Hessian plays."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from stream_influence.curvature import Curvature, make_curvature
from stream_influence.datasets import load_stream
from stream_influence.engine import InfluenceEngine
from stream_influence.events import EventBatch
from stream_influence.influence import InfluenceScorer, reference_gradient
from stream_influence.model import augment, softmax
from stream_influence.policy import RoutingPolicy, conformal_quantile
from stream_influence.settings import (
    CurvatureSettings,
    EngineSettings,
    InfluenceSettings,
    PolicySettings,
    SchemaSettings,
)


def batch_of(X: np.ndarray, y: np.ndarray) -> EventBatch:
    n = len(y)
    return EventBatch(
        ids=[str(i) for i in range(n)],
        features=np.asarray(X, dtype=np.float64),
        labels=np.asarray(y, dtype=np.int64),
        weights=np.ones(n),
        timestamps=np.full(n, np.nan),
        index=np.arange(n),
    )


def engine_for(K: int, d: int, **parts: Any) -> InfluenceEngine:
    base = EngineSettings(schema=SchemaSettings(classes=list(range(K)), n_features=d))
    update = {k: getattr(base, k).model_copy(update=v) for k, v in parts.items()}
    return InfluenceEngine(base.model_copy(update=update))


def run(
    engine: InfluenceEngine, X: np.ndarray, y: np.ndarray, poll: int = 512
) -> tuple[np.ndarray, list[str]]:
    q, reasons = [], []
    for i in range(0, len(y), poll):
        r = engine.process_events(batch_of(X[i : i + poll], y[i : i + poll]))
        q.append(r.quarantine)
        reasons += r.reasons
    return np.concatenate(q), reasons


# -- the held-out calibration scores -----------------------------------------------------------
@pytest.mark.parametrize("objective", ["loss", "margin"])
def test_held_out_reference_scores_match_explicit_leave_one_out(objective: str) -> None:
    """Closed form vs. recomputing ∇L_R without point i, for every reference point (dense H⁻¹)."""
    rng = np.random.default_rng(0)
    K, d, n = 3, 4, 25
    Xr = augment(rng.normal(size=(n, d)))
    yr = rng.integers(0, K, n)
    theta = rng.normal(size=(K, d + 1))
    curv = make_curvature(CurvatureSettings(kind="exact"), K, d + 1)
    curv.update(Xr, softmax(Xr @ theta.T))
    scorer = InfluenceScorer(InfluenceSettings(objective=objective))  # type: ignore[arg-type]
    scorer.refresh(theta, curv, Xr, yr)
    assert scorer.calibration is not None
    Hinv = curv.dense_inverse()
    P = softmax(Xr @ theta.T)
    for i in range(n):
        keep = np.arange(n) != i
        grad = reference_gradient(theta, Xr[keep], yr[keep], objective).ravel()
        R = P[i].copy()
        R[yr[i]] -= 1.0
        g = np.outer(R, Xr[i]).ravel()
        influence = -grad @ Hinv @ g
        relative = influence / np.sqrt(g @ Hinv @ g)
        cosine = relative / np.sqrt(grad @ Hinv @ grad)
        cal = scorer.calibration.scores
        assert cal.influence[i] == pytest.approx(influence, rel=1e-8, abs=1e-12)
        assert cal.relative_influence[i] == pytest.approx(relative, rel=1e-8, abs=1e-12)
        assert cal.cosine_influence[i] == pytest.approx(cosine, rel=1e-8, abs=1e-12)


def test_conformal_quantile_is_the_rank_ceil_n_plus_1_times_1_minus_alpha() -> None:
    x = np.arange(1.0, 20.0)  # 19 points
    assert conformal_quantile(x, 0.1) == 18.0  # ⌈20 · 0.9⌉ = 18th smallest
    assert conformal_quantile(x, 0.05) == 19.0
    assert conformal_quantile(x[:5], 0.1) == 5.0  # rank beyond n: the largest
    policy = RoutingPolicy(PolicySettings(min_class_calibration=3))
    scores = np.array([0.1, 0.2, 0.3, 0.4, -1.0, 5.0])
    policy.calibrate(scores, np.array([0, 0, 0, 0, 1, 1]), n_classes=3)
    # class 0 its own, class 1 (2 points) and class 2 (none) the pooled quantile
    assert policy.class_thresholds.tolist() == [0.4, 5.0, 5.0]


# -- must show ---------------------------------------------------------------------------------
def test_a_30_point_trusted_set_routes_from_the_first_batch_and_quarantines_flips() -> None:
    rng = np.random.default_rng(1)
    K, d = 3, 5
    centers = rng.normal(scale=2.5, size=(K, d))
    yr = np.repeat(np.arange(K), 10)  # 30 trusted points
    Xr = centers[yr] + rng.normal(size=(30, d))
    y_true = rng.integers(0, K, 400)
    X = centers[y_true] + rng.normal(size=(400, d))
    flip = rng.random(400) < 0.3
    y = np.where(flip, (y_true + rng.integers(1, K, 400)) % K, y_true)
    engine = engine_for(K, d)
    engine.add_reference_events(batch_of(Xr, yr))
    result = engine.process_events(batch_of(X, y))  # the first batch
    assert "warmup" not in result.reasons and np.isfinite(result.scores.cosine_influence).all()
    q = result.quarantine
    assert flip[q].mean() >= 0.9, "the quarantine route is the flipped events"
    assert q[flip].mean() >= 0.6, "most flips are caught in the first batch"
    assert q[~flip].mean() <= 0.05


def _per_class_clean_rates(alpha: float, gate: bool) -> np.ndarray:
    s = load_stream("digits", seed=0)  # clean labels; 200 trusted points (~20 per class)
    engine = engine_for(
        s.n_classes,
        s.n_features,
        policy={"false_quarantine_rate": alpha, "require_disagreement": gate},
    )
    engine.add_reference_events(batch_of(s.X_ref, s.y_ref))
    q, _ = run(engine, s.X_events, s.y_events)
    return np.array([q[s.y_events == c].mean() for c in range(s.n_classes)])


@pytest.mark.parametrize("alpha", [0.05, 0.1])
def test_calibrated_mode_bounds_clean_quarantine_per_class(alpha: float) -> None:
    """The default routing quarantines ≤ α + 2 points of every clean class.

    (A fixed threshold at 0 with the same gate quarantines up to 8.4 % of a clean class here.)
    """
    gated = _per_class_clean_rates(alpha, gate=True)
    assert gated.max() <= alpha + 0.02, gated.round(3).tolist()
    # The calibration alone (no gate) holds α on average over the classes; per class it is
    # noisier, as the thresholds come from ~20 reference points per class.
    ungated = _per_class_clean_rates(alpha, gate=False)
    assert ungated.mean() <= alpha and ungated.max() <= alpha + 0.04, ungated.round(3).tolist()
    assert (gated <= ungated + 1e-12).all()


def _imbalanced_rates(gate: bool, min_class_calibration: int = 10) -> np.ndarray:
    """Class 0 twice as frequent as class 1, overlapping, all labels correct."""
    rng = np.random.default_rng(3)
    d = 6
    centers = np.array([np.zeros(d), np.full(d, 0.8)])

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = (rng.random(n) < 1 / 3).astype(np.int64)
        return centers[y] + rng.normal(size=(n, d)), y

    Xr, yr = draw(300)
    X, y = draw(6000)
    engine = engine_for(
        2, d, policy={"require_disagreement": gate, "min_class_calibration": min_class_calibration}
    )
    engine.add_reference_events(batch_of(Xr, yr))
    q, _ = run(engine, X, y)
    return np.array([q[y == 0].mean(), q[y == 1].mean()])


def test_imbalanced_clean_classes_are_quarantined_at_similar_rates() -> None:
    rates = _imbalanced_rates(gate=True)  # the default routing
    assert abs(rates[0] - rates[1]) <= 0.02, rates.round(3).tolist()
    ungated = _imbalanced_rates(gate=False)  # the calibration alone
    assert abs(ungated[0] - ungated[1]) <= 0.02 and ungated.max() <= 0.1 + 0.02, ungated.round(3).tolist()
    # The per-class thresholds are what does it: one pooled threshold (the majority class's)
    # quarantines the minority class far more often.
    pooled = _imbalanced_rates(gate=False, min_class_calibration=10_000)
    assert pooled[1] - pooled[0] > 0.1, pooled.round(3).tolist()


class IdentityCurvature(Curvature):
    """``H = I``: influence becomes plain gradient alignment with the reference."""

    kind = "identity"

    def _reset_state(self) -> None:
        pass

    def _update(self, X: np.ndarray, P: np.ndarray, w: np.ndarray, beta: float) -> None:
        pass

    def refactorize(self) -> None:
        pass

    def solve(self, V: np.ndarray) -> np.ndarray:
        return np.array(V, dtype=np.float64, copy=True)

    def quad(self, R: np.ndarray, X: np.ndarray) -> np.ndarray:
        return np.square(R).sum(1) * np.square(X).sum(1)

    def dense_hessian(self) -> np.ndarray:
        return np.eye(self.n_classes * self.dim)

    def condition_number(self) -> float:
        return 1.0

    def _arrays(self) -> dict[str, Any]:
        return {}

    def _load_arrays(self, state: dict[str, Any]) -> None:
        pass


def _correlated_routing(noise: float, kind: str, identity: bool) -> tuple[float, float]:
    """(precision, recall) of the quarantine route on correlated, unscaled features."""
    s = load_stream("digits_correlated", noise=noise, noise_kind=kind, seed=0)  # type: ignore[arg-type]
    engine = engine_for(s.n_classes, s.n_features)  # default curvature
    engine.add_reference_events(batch_of(s.X_ref, s.y_ref))
    if identity:
        engine.curvature = IdentityCurvature(engine.settings.curvature, s.n_classes, s.n_features + 1)
    q, _ = run(engine, s.X_events, s.y_events)
    return float(s.corrupted[q].mean()), float(q[s.corrupted].mean())


@pytest.mark.parametrize(("noise", "kind"), [(0.3, "pairflip"), (0.4, "symmetric")])
def test_routing_on_correlated_features_needs_the_inverse_hessian(noise: float, kind: str) -> None:
    """digits through an ill-conditioned mixing: with H = I routing catches fewer flips, less precisely.

    (Measured over seeds 0–3 and both noises: the curvature raised precision by 1–6 points and
    recall by 1–8 points in every run; seed 0 is asserted.)
    """
    precision, recall = _correlated_routing(noise, kind, identity=False)
    assert precision >= 0.85 and recall >= 0.45, (precision, recall)
    p_id, r_id = _correlated_routing(noise, kind, identity=True)
    assert precision > p_id and recall >= r_id + 0.03, (precision, recall, p_id, r_id)

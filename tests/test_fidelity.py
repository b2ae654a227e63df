"""Influence scores against reality on sklearn's digits.

* offline fidelity: the exact influence predicts the change of the reference loss after
  leave-one-out retraining (removing z from n points changes L_R by about −I(z)/n);
* K-FAC agrees with exact;
* every estimator (exact, kfac, ekfac, classblock, diagonal, identity) against leave-one-out
  refits and exact on a 16×10 and a 64×10 head; EK-FAC (and K-FAC) equal exact on binary heads;
* with ``refine`` (the default: the reference direction corrected against the exact Hessian on
  the stream), K-FAC and EK-FAC as a stream leaves them at the optimum reach issue 9's target
  (Spearman ≥ 0.95 vs leave-one-out), which both miss without it;
* streaming: routing by influence on a 30 % label-noise stream quarantines mostly corrupted
  events and the routed learner beats the unfiltered shadow on a clean test split.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from sklearn.datasets import load_digits

from stream_influence.cli import main
from stream_influence.core.engine import InfluenceEngine
from stream_influence.core.influence import InfluenceScorer, reference_gradient
from stream_influence.core.model import one_hot, softmax
from stream_influence.core.settings import (
    CurvatureSettings,
    EngineSettings,
    InfluenceSettings,
    SchemaSettings,
)
from stream_influence.offline.audit import (
    CURVATURE_AT_OPTIMUM,
    DEFAULT_L2,
    HeadFit,
    exact_curvature,
    fit_head,
    leave_one_out_changes,
    mean_hessian,
    objective,
    prepare_inputs,
    score_dataset,
)
from stream_influence.offline.stationary import settle_on_stream


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    X, y = load_digits(return_X_y=True)
    return X.astype(np.float64), y.astype(np.int64)


def _split(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(len(y))
    return perm[:1200], perm[1200:1500], perm[1500:]


def _reference_loss(theta: np.ndarray, Xr: np.ndarray, yr: np.ndarray) -> float:
    P = softmax(Xr @ theta.T)
    return float(-np.log(P[np.arange(len(yr)), yr]).mean())


def test_exact_influence_predicts_leave_one_out(digits: tuple[np.ndarray, np.ndarray]) -> None:
    X_all, y_all = digits
    train, ref, _ = _split(y_all, 0)
    l2 = DEFAULT_L2
    audit = score_dataset(X_all[train], y_all[train], X_all[ref], y_all[ref], n_classes=10, l2=l2)
    assert audit.fit.grad_norm <= 1e-10

    # Independent oracle: the same objective, retrained without z from the optimum, each refit
    # to a leave-one-out gradient ≤ 1e-10 (‖Δθ‖ ≤ 1e-10 / l2: far below the LOO effects).
    X, (Xr,) = prepare_inputs(X_all[train], [X_all[ref]], standardize=True)
    y, yr = y_all[train], y_all[ref]
    n = len(X)
    assert _reference_loss(audit.fit.theta, Xr, yr) == pytest.approx(audit.reference_loss, rel=1e-12)
    influence = audit.scores.influence
    picked = np.argsort(influence)[np.linspace(0, n - 1, 60).astype(int)]  # the whole range
    actual_arr = leave_one_out_changes(audit.fit, X, y, Xr, yr, picked, tol=1e-11)
    predicted = -influence[picked] / n
    rho = stats.spearmanr(predicted, actual_arr)[0]
    same_sign = float(np.mean(np.sign(predicted) == np.sign(actual_arr)))
    assert rho >= 0.9, rho
    assert same_sign >= 0.9, same_sign
    # Not a degenerate pick: the LOO effects span both signs.
    assert (actual_arr > 0).sum() >= 5 and (actual_arr < 0).sum() >= 5  # most clean points help


@pytest.mark.parametrize("seed", [0, 1])
def test_kfac_influence_agrees_with_exact(digits: tuple[np.ndarray, np.ndarray], seed: int) -> None:
    X_all, y_all = digits
    train, ref, _ = _split(y_all, seed)
    args = (X_all[train], y_all[train], X_all[ref], y_all[ref])
    exact = score_dataset(*args, n_classes=10)
    kfac = score_dataset(*args, n_classes=10, curvature="kfac")
    assert np.array_equal(exact.fit.theta, kfac.fit.theta)
    rho = stats.spearmanr(exact.scores.influence, kfac.scores.influence)[0]
    assert rho >= 0.8, rho


ESTIMATORS = tuple(CURVATURE_AT_OPTIMUM)  # exact, kfac, ekfac, classblock, diagonal, identity


def _influence(
    kind: str, fit: HeadFit, X: np.ndarray, y: np.ndarray, Xr: np.ndarray, yr: np.ndarray
) -> np.ndarray:
    """I(z) of every row with estimator ``kind`` built at the optimum, through the engine's scorer."""
    P = softmax(X @ fit.theta.T)
    est = CURVATURE_AT_OPTIMUM[kind](X, P, np.ones(len(X)), fit.l2)
    scorer = InfluenceScorer(InfluenceSettings(objective="loss"))
    scorer.refresh(fit.theta, est, Xr, yr)
    return scorer.score(P, one_hot(y, fit.theta.shape[0]), X, est).influence


# Head name → digits feature columns.  Seed 0 measured (vs LOO): 16×10 exact 0.999, classblock 0.994,
# kfac 0.943, ekfac 0.941, diagonal 0.869, identity 0.868; 64×10 exact 0.999, classblock 0.945,
# kfac 0.868, ekfac 0.864, diagonal 0.691, identity 0.668 (benchmarks/fidelity.py: more seeds).
HEADS = {"16x10": slice(None, None, 4), "64x10": slice(None)}


@pytest.fixture(scope="module", params=list(HEADS))
def ten_class_head(request: pytest.FixtureRequest, digits: tuple[np.ndarray, np.ndarray]) -> dict:
    """A 10-class head at its optimum: every estimator's influence and 60 leave-one-out refits."""
    X_all, y_all = digits
    train, ref, _ = _split(y_all, 0)
    cols = HEADS[request.param]
    X, (Xr,) = prepare_inputs(X_all[train][:, cols], [X_all[ref][:, cols]], standardize=True)
    y, yr = y_all[train], y_all[ref]
    fit = fit_head(X, y, 10, DEFAULT_L2, augmented=True)
    scores = {k: _influence(k, fit, X, y, Xr, yr) for k in ESTIMATORS}
    refined = {k: _refined_influence(fit, X, y, Xr, yr, 10, k) for k in ("kfac", "ekfac")}
    picked = np.argsort(scores["exact"])[np.linspace(0, len(X) - 1, 60).astype(int)]
    actual = leave_one_out_changes(fit, X, y, Xr, yr, picked)
    vs_loo = {k: float(stats.spearmanr(-s[picked], actual)[0]) for k, s in scores.items()}
    vs_exact = {k: float(stats.spearmanr(s, scores["exact"])[0]) for k, s in scores.items()}
    refined_loo = {k: float(stats.spearmanr(-s[picked], actual)[0]) for k, s in refined.items()}
    refined_exact = {k: float(stats.spearmanr(s, scores["exact"])[0]) for k, s in refined.items()}
    return {
        "head": request.param,
        "vs_loo": vs_loo,
        "vs_exact": vs_exact,
        "actual": actual,
        "refined_loo": refined_loo,
        "refined_exact": refined_exact,
    }


def _refined_influence(
    fit: HeadFit, X: np.ndarray, y: np.ndarray, Xr: np.ndarray, yr: np.ndarray, passes: int, kind: str
) -> np.ndarray:
    """I(z) with estimator ``kind`` and ``refine`` on as a stream leaves it at the optimum: the
    training points arriving ``passes`` times in micro-batches of 512, the reference direction
    refreshed before each."""
    P = softmax(X @ fit.theta.T)
    grad = reference_gradient(fit.theta, Xr, yr, "loss")
    settings = CurvatureSettings(kind=kind, refine=True, damping=fit.l2, forgetting=1.0)
    est = settle_on_stream(settings, X, P, grad, passes=passes)
    scorer = InfluenceScorer(InfluenceSettings(objective="loss"))
    scorer.refresh(fit.theta, est, Xr, yr)
    return scorer.score(P, one_hot(y, fit.theta.shape[0]), X, est).influence


def test_every_estimator_against_leave_one_out(ten_class_head: dict) -> None:
    """Each estimator's influence against real refits: bounds a few points under the measurement,
    and the order that says which approximation loses what."""
    loo, ex = ten_class_head["vs_loo"], ten_class_head["vs_exact"]
    actual = ten_class_head["actual"]
    assert (actual > 0).sum() >= 5 and (actual < 0).sum() >= 5  # both signs in the picked range
    assert loo["exact"] >= 0.99, loo
    assert loo["classblock"] >= 0.93 and ex["classblock"] >= 0.95, (loo, ex)
    assert min(loo["kfac"], loo["ekfac"]) >= 0.84, loo
    assert min(ex["kfac"], ex["ekfac"]) >= 0.87, ex
    assert loo["diagonal"] >= 0.65, loo
    # Curvature pays: every curvature-aware estimator beats H = λI by a margin; the per-class
    # blocks beat both Kronecker forms; exact beats everything.
    for kind in ("kfac", "ekfac", "classblock"):
        assert loo[kind] >= loo["identity"] + 0.05, loo
    assert loo["classblock"] >= max(loo["kfac"], loo["ekfac"]) + 0.03, loo
    assert loo["exact"] >= max(v for k, v in loo.items() if k != "exact"), loo


def test_ekfac_reaches_the_leave_one_out_target(ten_class_head: dict) -> None:
    """issue 9's must-show: EK-FAC as the engine runs it by default (``refine`` on: its reference
    direction refined on the stream against the exact Hessian) reaches Spearman ≥ 0.95 vs
    leave-one-out on the 10-class heads, after the training points arrived ten times as a stream
    at the optimum (seed 0 measured: 0.999 / 0.998 vs leave-one-out, 0.9998 / 0.9997 vs exact;
    plain EK-FAC 0.941 / 0.864)."""
    loo, ex = ten_class_head["refined_loo"], ten_class_head["refined_exact"]
    vs_loo = ten_class_head["vs_loo"]
    assert loo["ekfac"] >= 0.95 and ex["ekfac"] >= 0.99, (loo, ex)
    assert loo["ekfac"] >= vs_loo["exact"] - 0.02, (loo, vs_loo)


def test_plain_ekfac_is_what_misses_the_target(ten_class_head: dict) -> None:
    """Without the refinement EK-FAC (its eigenvalues exact in K-FAC's eigenbasis) misses the
    target on both 10-class heads, like K-FAC: on softmax heads the Kronecker eigenbasis, not its
    eigenvalues, is what is wrong (seed 0 measured: 0.941 / 0.864; three seeds in
    benchmarks/fidelity.py).  The refinement is what closes the gap."""
    vs_loo, refined = ten_class_head["vs_loo"], ten_class_head["refined_loo"]
    assert vs_loo["ekfac"] < 0.95, vs_loo
    assert refined["ekfac"] >= vs_loo["ekfac"] + 0.01, (refined, vs_loo)


def test_refined_reaches_the_leave_one_out_target(ten_class_head: dict) -> None:
    """issue 9's fidelity target, met by the default estimator (K-FAC with ``refine`` on: the
    reference direction corrected against the exact Hessian on the stream): after the training
    points arrived ten times as a stream at the optimum, its influence ranks like exact's (seed 0
    measured: 0.999 / 0.998 vs leave-one-out, plain K-FAC 0.943 / 0.868; three seeds in
    benchmarks/fidelity.py)."""
    loo, ex = ten_class_head["refined_loo"], ten_class_head["refined_exact"]
    vs_loo = ten_class_head["vs_loo"]
    assert loo["kfac"] >= 0.95 and ex["kfac"] >= 0.99, (loo, ex)
    assert loo["kfac"] >= vs_loo["exact"] - 0.02, (loo, vs_loo)
    assert loo["kfac"] >= max(vs_loo["kfac"], vs_loo["ekfac"], vs_loo["classblock"]), (loo, vs_loo)


def test_ekfac_equals_exact_on_binary_heads(digits: tuple[np.ndarray, np.ndarray]) -> None:
    """K = 2: diag p − ppᵀ is rank one, the τ-weighted G ⊗ A is the Hessian, and EK-FAC's
    eigenvalues are its exact eigenvalues — influence agrees with exact to rounding."""
    X_all, y_all = digits
    train, ref, _ = _split(y_all, 2)
    y = y_all % 2
    X, (Xr,) = prepare_inputs(X_all[train], [X_all[ref]], standardize=True)
    fit = fit_head(X, y[train], 2, DEFAULT_L2, augmented=True)
    exact = _influence("exact", fit, X, y[train], Xr, y[ref])
    for kind in ("ekfac", "kfac"):
        np.testing.assert_allclose(
            _influence(kind, fit, X, y[train], Xr, y[ref]), exact, rtol=1e-7, atol=1e-12
        )
    # Not vacuous: the diagonal and the class blocks are not exact on the same head.
    for kind in ("diagonal", "classblock"):
        other = _influence(kind, fit, X, y[train], Xr, y[ref])
        assert np.abs(other - exact).max() > 1e-3 * np.abs(exact).max(), kind


def _event(i: int, x: np.ndarray, y: int) -> bytes:
    return json.dumps({"id": str(i), "features": x.tolist(), "label": int(y)}).encode()


def test_routing_on_noisy_stream_beats_shadow(digits: tuple[np.ndarray, np.ndarray]) -> None:
    """30 % symmetric label noise, default settings except the class list; five seeds.

    Measured (seeds 0-4): precision 0.83-0.92 (pooled ≈ 0.87, recall ≈ 0.43), routed 0.913 vs
    shadow 0.890 mean clean test accuracy; routed wins 4 of 5 seeds.
    """
    X_all, y_all = digits
    settings = EngineSettings(schema=SchemaSettings(classes=list(range(10))))
    tp = fp = 0
    routed_acc, shadow_acc, precisions = [], [], []
    for seed in range(5):
        rng = np.random.default_rng(seed)
        perm = rng.permutation(len(y_all))
        ref, test, stream = perm[:200], perm[200:600], perm[600:]
        labels = y_all[stream].copy()
        noisy = rng.random(len(stream)) < 0.3
        labels[noisy] = (labels[noisy] + rng.integers(1, 10, noisy.sum())) % 10  # always a wrong class
        engine = InfluenceEngine(settings)
        assert engine.add_reference([_event(i, X_all[i], y_all[i]) for i in ref]) == []
        quarantined = []
        for s in range(0, len(stream), 64):
            rows = range(s, min(s + 64, len(stream)))
            result = engine.process([_event(int(stream[k]), X_all[stream[k]], labels[k]) for k in rows])
            quarantined.extend(result.quarantine.tolist())
        q = np.array(quarantined)
        assert len(q) == len(stream)
        tp += int((q & noisy).sum())
        fp += int((q & ~noisy).sum())
        precisions.append(float(noisy[q].mean()))
        routed_acc.append(float((engine.predict_proba(X_all[test]).argmax(1) == y_all[test]).mean()))
        shadow_acc.append(
            float((engine.predict_proba(X_all[test], shadow=True).argmax(1) == y_all[test]).mean())
        )
    assert tp + fp >= 500  # routing really happened (≈ 180 quarantines per seed)
    assert tp / (tp + fp) >= 0.8, precisions
    assert min(precisions) >= 0.8, precisions  # every seed, not only pooled
    assert np.mean(routed_acc) > np.mean(shadow_acc), (routed_acc, shadow_acc)
    assert sum(r > s for r, s in zip(routed_acc, shadow_acc, strict=True)) >= 3, (routed_acc, shadow_acc)


def test_offline_fit_and_hessian_against_independent_oracles(digits: tuple[np.ndarray, np.ndarray]) -> None:
    """Newton agrees with L-BFGS; the analytic Hessian with finite differences of the gradient."""
    X_all, y_all = digits
    rng = np.random.default_rng(3)
    rows = rng.choice(len(y_all), 400, replace=False)
    X, _ = prepare_inputs(X_all[rows][:, ::4], [], standardize=True)  # 16 features + bias
    y = y_all[rows] % 4  # K = 4: 68 parameters
    newton = fit_head(X, y, 4, 0.01, augmented=True)
    lbfgs = fit_head(X, y, 4, 0.01, augmented=True, method="lbfgs", tol=1e-9)
    assert newton.grad_norm <= 1e-10 and lbfgs.grad_norm <= 1e-8
    np.testing.assert_allclose(newton.theta, lbfgs.theta, atol=1e-6)
    w = np.ones(len(X))
    H = mean_hessian(X, softmax(X @ newton.theta.T), w) + 0.01 * np.eye(newton.theta.size)
    eps = 1e-6
    fd = np.empty_like(H)
    for j in range(newton.theta.size):
        e = np.zeros(newton.theta.size)
        e[j] = eps
        gp = objective(newton.theta + e.reshape(newton.theta.shape), X, y, w, 0.01)[1]
        gm = objective(newton.theta - e.reshape(newton.theta.shape), X, y, w, 0.01)[1]
        fd[:, j] = (gp - gm).ravel() / (2 * eps)
    np.testing.assert_allclose(H, fd, atol=1e-7)
    # The engine's exact estimator built from it serves exactly H⁻¹.
    est = exact_curvature(X, softmax(X @ newton.theta.T), w, 0.01)
    np.testing.assert_allclose(est.dense_inverse() @ H, np.eye(len(H)), atol=1e-9)


def test_score_cli_writes_one_line_per_training_line(
    digits: tuple[np.ndarray, np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    X_all, y_all = digits
    train, ref, _ = _split(y_all, 4)
    train = train[:400]
    lines = [_event(int(i), X_all[i], y_all[i]).decode() for i in train]
    lines[10] = '{"id": "bad", "features": [1, 2], "label": 3}'
    lines[20] = "not json"
    lines[30] = '{"id": "nan", "features": [NaN' + ", 0" * 63 + '], "label": 3}'
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "ref.jsonl").write_text(
        "\n".join(_event(int(i), X_all[i], y_all[i]).decode() for i in ref) + "\n{oops\n"
    )
    out = tmp_path / "scores.jsonl"
    argv = [
        "score",
        "--train",
        str(tmp_path / "train.jsonl"),
        "--reference",
        str(tmp_path / "ref.jsonl"),
        "--out",
        str(out),
        "--l2",
        "0.05",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert "l2=0.05" in printed.out and "gradient_norm=" in printed.out and "converged=True" in printed.out
    assert "invalid line(s)" in printed.err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == len(lines)
    bad = {10: "wrong_dimension", 20: "invalid_json", 30: "non_finite"}
    assert {i: r["reason"] for i, r in enumerate(records) if r["decision"] == "dead_letter"} == bad
    good = [i for i in range(len(lines)) if i not in bad]
    # Same numbers as the library call (the CLI learns the class order from the reference; the
    # scores do not depend on the order of the classes).
    keep = np.array([k for k in range(len(train)) if k not in (10, 20, 30)])
    audit = score_dataset(
        X_all[train[keep]], y_all[train[keep]], X_all[ref], y_all[ref], n_classes=10, l2=0.05
    )
    got = np.array([records[i]["influence"] for i in good])
    assert all(records[i]["id"] == str(train[i]) for i in good)
    np.testing.assert_allclose(got, audit.scores.influence, rtol=1e-6, atol=1e-12)
    for k, r in enumerate(records[i] for i in good):
        assert set(r) == {
            "id",
            "influence",
            "relative_influence",
            "cosine_influence",
            "self_influence",
            "corrected_loss",
            "decision",
            "reason",
        }
        # The default (calibrated) policy: the CLI decides as the library does, and never
        # quarantines below the floor quarantine_threshold = 0.
        assert r["decision"] == ("quarantine" if audit.quarantine[k] else "accept")
        assert r["decision"] == "accept" or r["cosine_influence"] > 0.0
        assert np.sign(r["influence"]) == np.sign(r["relative_influence"]) and r["self_influence"] < 0


def test_engine_serves_refined_direction_close_to_exact(digits: tuple[np.ndarray, np.ndarray]) -> None:
    """Through the engine (refresh before each micro-batch, curvature update after it): with routing
    that never quarantines, three engines learn the same head from the same digits stream, so their
    cached ``s = H⁻¹∇L_R`` differ only by the estimator — refined's (K-FAC's or EK-FAC's) is several
    times closer to exact's than plain K-FAC's.  Measured: relative error 0.073 (EK-FAC refined
    0.080) against plain K-FAC's 0.29 (64 features + bias, K = 10,
    ~4 800 events; it keeps closing, 0.06 after 6 passes: each micro-batch's exact product is only
    its share 1 − γᵐ of the running Hessian, so the correction follows at that pace)."""
    X_all, y_all = digits
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(y_all))
    ref, stream = perm[:200], perm[200:]
    never = {"mode": "absolute", "evidence": "influence", "quarantine_threshold": 1e9}
    served = {}
    curvatures = {
        "exact": CurvatureSettings(kind="exact"),
        "kfac": CurvatureSettings(kind="kfac", refine=False),  # plain K-FAC (refine is the default)
        "refined": CurvatureSettings(kind="kfac", refine=True),
        "ekfac refined": CurvatureSettings(kind="ekfac", refine=True),
    }
    for kind, curvature in curvatures.items():
        settings = EngineSettings(
            schema=SchemaSettings(classes=list(range(10))),
            curvature=curvature,
            policy=never,
        )
        engine = InfluenceEngine(settings)
        assert engine.add_reference([_event(int(i), X_all[i], y_all[i]) for i in ref]) == []
        for _ in range(3):  # the stream three times over, in the default micro-batches of 512
            for s in range(0, len(stream), 512):
                rows = stream[s : s + 512]
                result = engine.process([_event(int(i), X_all[i], y_all[i]) for i in rows])
                assert not result.quarantine.any()
        engine.updater.refresh_direction(force=True)
        served[kind] = (engine.routed.theta.copy(), engine.updater.direction.s.copy())  # type: ignore[union-attr]
    assert np.array_equal(served["exact"][0], served["refined"][0])  # the same head learned
    exact = served["exact"][1]
    err = {
        k: float(np.linalg.norm(served[k][1] - exact) / np.linalg.norm(exact))
        for k in ("kfac", "refined", "ekfac refined")
    }
    assert err["kfac"] >= 0.1, err  # not vacuous: K-FAC's direction is visibly off
    assert err["refined"] <= 0.12 and err["refined"] <= err["kfac"] / 3, err
    assert err["ekfac refined"] <= 0.12 and err["ekfac refined"] <= err["kfac"] / 3, err

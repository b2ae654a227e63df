"""Offline audit of a data set: full-batch fit of the softmax head, exact (or approximate) influence.

This is the oracle for the streaming scores.  The head is the engine's: ``Θ = [W b]``
(``K × D``), augmented features ``x̃ = [φ(x); 1]`` (standardised with the training set's
mean/variance when the engine settings say ``standardize``), class-major flattening.  It is fit
in float64 to convergence on the explicitly regularised objective

    f(Θ) = (1/n) Σᵢ wᵢ ℓ(zᵢ; Θ) + (l2/2) ‖Θ‖²        (n = number of training rows)

by Newton's method with the exact Hessian and a backtracking line search (L-BFGS with a tight
tolerance when ``K·D`` is too large for a dense Hessian).  At the optimum the curvature is

    H = (1/n) Σᵢ wᵢ (diag pᵢ − pᵢpᵢᵀ) ⊗ x̃ᵢx̃ᵢᵀ + l2·I      (``exact``)
    H ≈ G ⊗ A + l2·I,  A = mean τx̃x̃ᵀ / mean τ,  G = mean (diag p − ppᵀ)  (``kfac``)
    H ≈ Q (diag Λ + l2) Qᵀ, Q = Q_G ⊗ Q_A, Λ = diag(Qᵀ H Q) exactly   (``ekfac``)
    H ≈ blockdiag_k (mean (p_k − p_k²) x̃x̃ᵀ) + l2·I                       (``classblock``)
    H ≈ diag(H) + l2·I                                                    (``diagonal``)
    H ≈ l2·I                                                              (``identity``)

served through the engine's own curvature estimators, and the scores come from
:class:`~stream_influence.core.influence.InfluenceScorer` — the one statement of the math and its
sign convention (positive influence = learning the point raises the reference loss).  The
decision uses the routing policy's sign rule and thresholds, without warm-up or rate cap (an
offline audit sees the whole data set at once).

To *rank* events by how likely their label is wrong, the audit adds :func:`corrected_loss`: the
event's own held-out loss with the influence added (see there).  The cosine influence alone,
which the routing policy thresholds, discards how wrong a label looks (it normalises the
gradient away) and missed flips on a misspecified head (``docs/benchmarks.md``, quality,
"score audit").

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> X = rng.normal(size=(200, 3)); y = (X[:, 0] > 0).astype(int)
>>> audit = score_dataset(X, y, X[:50], y[:50], n_classes=2, l2=1e-2)
>>> bool((audit.scores.self_influence < 0).all())
True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import linalg

from stream_influence.core.curvature import (
    ClassBlockCurvature,
    Curvature,
    DiagonalCurvature,
    EKFACCurvature,
    ExactCurvature,
    KFACCurvature,
    softmax_hessian,
)
from stream_influence.core.fit import (
    MAX_EXACT_PARAMS,
    HeadFit,
    fit_head,
    mean_hessian,
    objective,
    prepare_inputs,
)
from stream_influence.core.influence import InfluenceScorer, Scores
from stream_influence.core.model import label_loss, one_hot, softmax
from stream_influence.core.policy import RoutingPolicy
from stream_influence.core.settings import CurvatureSettings, InfluenceSettings, PolicySettings
from stream_influence.errors import StreamInfluenceError

__all__ = [
    "CURVATURE_AT_OPTIMUM",
    "DEFAULT_L2",
    "MAX_EXACT_PARAMS",
    "SCORE_L2",
    "Audit",
    "HeadFit",
    "classblock_curvature",
    "corrected_loss",
    "diagonal_curvature",
    "ekfac_curvature",
    "exact_curvature",
    "fit_head",
    "identity_curvature",
    "kfac_curvature",
    "leave_one_out_changes",
    "mean_hessian",
    "objective",
    "prepare_inputs",
    "reference_loss",
    "score_dataset",
]

# Default L2 on standardised features: LOO fidelity of the exact influence is ≥ 0.99 (Spearman) from
# 1e-3 to 3e-2 on digits, while K-FAC agrees with exact only as the damping grows (≈0.75–0.83 at
# 1e-2, 0.84–0.91 at 3e-2; see tests/test_fidelity.py).  The `score` audit defaults to SCORE_L2.
DEFAULT_L2 = 0.03
# The `score` audit's default L2, chosen by measurement (benchmarks/quality.py, "score audit" in
# docs/benchmarks.md) for its ranking score `corrected_loss`: over every bundled stream at 20/40 %
# symmetric and 30 % pair noise, the rule "most streams at flipped-label ROC-AUC ≥ 0.9, then the best
# mean, among L2s whose exact influence keeps leave-one-out Spearman ≥ 0.95" picks 0.1 (27 of 27,
# mean 0.9655; 0.03 next at 0.9649, 0.01–0.3 all 27 of 27; 1e-3 and 1 miss some).  The cosine
# influence alone picked 0.3 and missed unscaled_correlated at 20 and 40 % symmetric noise.
SCORE_L2 = 0.1


# The builders below set each estimator's own Hessian from all points at once (refine off): the
# stream refinement of the reference direction depends on the batches seen, and is measured as a
# stream leaves it (stream_influence.offline.stationary).
def exact_curvature(X: np.ndarray, P: np.ndarray, w: np.ndarray, l2: float) -> ExactCurvature:
    """The engine's ``exact`` estimator holding ``H = mean per-point Hessian + l2·I``."""
    K, D = P.shape[1], X.shape[1]
    if K * D > MAX_EXACT_PARAMS:
        raise StreamInfluenceError(
            f"exact curvature needs a dense {K * D}² Hessian (K·D > {MAX_EXACT_PARAMS}); use kfac"
        )
    est = ExactCurvature(CurvatureSettings(kind="exact", damping=l2, forgetting=1.0, refine=False), K, D)
    est.C = mean_hessian(X, P, w)
    est.n_seen = float(len(X))
    est.refactorize()
    return est


def kfac_curvature(X: np.ndarray, P: np.ndarray, w: np.ndarray, l2: float) -> KFACCurvature:
    """The engine's ``kfac`` estimator holding ``G ⊗ A + l2·I`` of the same data."""
    est = KFACCurvature(
        CurvatureSettings(kind="kfac", damping=l2, forgetting=1.0, refine=False), P.shape[1], X.shape[1]
    )
    _set_kfac_factors(est, X, P, w)
    est.refactorize()
    return est


def ekfac_curvature(X: np.ndarray, P: np.ndarray, w: np.ndarray, l2: float) -> EKFACCurvature:
    """The engine's ``ekfac`` estimator: K-FAC's eigenbasis of the same data, with the exact
    diagonal of the mean Hessian in that basis (every point re-projected: the buffer holds all)."""
    n = len(X)
    settings = CurvatureSettings(kind="ekfac", damping=l2, forgetting=1.0, ekfac_buffer=n, refine=False)
    est = EKFACCurvature(settings, P.shape[1], X.shape[1])
    _set_kfac_factors(est, X, P, w)
    est.buf_X, est.buf_P, est.buf_c = X.copy(), P.copy(), w / n
    est.refactorize()
    return est


def _set_kfac_factors(est: KFACCurvature, X: np.ndarray, P: np.ndarray, w: np.ndarray) -> None:
    n = len(X)
    tau = w * (1.0 - np.einsum("bk,bk->b", P, P))
    est.A = (X * tau[:, None]).T @ X / n
    est.tau = float(tau.sum()) / n
    est.G = np.einsum("b,bkl->kl", w, softmax_hessian(P)) / n
    est.n_seen = float(n)


def diagonal_curvature(X: np.ndarray, P: np.ndarray, w: np.ndarray, l2: float) -> DiagonalCurvature:
    """The engine's ``diagonal`` estimator: the exact diagonal of the mean Hessian, + l2."""
    est = DiagonalCurvature(
        CurvatureSettings(kind="diagonal", damping=l2, refine=False), P.shape[1], X.shape[1]
    )
    est.Dg = (P * (1.0 - P) * w[:, None]).T @ np.square(X) / len(X)
    est.n_seen = float(len(X))
    return est


def classblock_curvature(X: np.ndarray, P: np.ndarray, w: np.ndarray, l2: float) -> ClassBlockCurvature:
    """The engine's ``classblock`` estimator: the mean Hessian's ``K`` per-class blocks, + l2."""
    K, D = P.shape[1], X.shape[1]
    est = ClassBlockCurvature(CurvatureSettings(kind="classblock", damping=l2, refine=False), K, D)
    est.B = np.stack([(X * (w * P[:, k] * (1.0 - P[:, k]))[:, None]).T @ X for k in range(K)]) / len(X)
    est.n_seen = float(len(X))
    est.refactorize()
    return est


def identity_curvature(X: np.ndarray, P: np.ndarray, w: np.ndarray, l2: float) -> DiagonalCurvature:
    """``H = l2·I``: influence becomes plain gradient alignment (the no-curvature ablation)."""
    return DiagonalCurvature(
        CurvatureSettings(kind="diagonal", damping=l2, refine=False), P.shape[1], X.shape[1]
    )


CURVATURE_AT_OPTIMUM = {
    "exact": exact_curvature,
    "kfac": kfac_curvature,
    "ekfac": ekfac_curvature,
    "classblock": classblock_curvature,
    "diagonal": diagonal_curvature,
    "identity": identity_curvature,
}


@dataclass(slots=True)
class Audit:
    """Scores of every training point plus the fit and curvature they were computed with."""

    fit: HeadFit
    curvature: Curvature
    scores: Scores
    quarantine: np.ndarray
    reasons: list[str]
    reference_loss: float
    corrected_loss: np.ndarray  # the flipped-label ranking score (see corrected_loss())


def corrected_loss(loss: np.ndarray, scores: Scores, weights: np.ndarray) -> np.ndarray:
    """Each training point's label loss, held out and corrected toward the trusted set (nats).

    Estimates ``ℓ(zᵢ; Θ₋ᵢ − H⁻¹∇L_R)``: the cross-entropy of the point's own label under the head
    fitted *without* it and then moved one Newton step toward the trusted reference objective.  To
    first order in both moves (``Θ₋ᵢ ≈ Θ + wᵢH⁻¹gᵢ/n``, and ``−gᵢᵀH⁻¹∇L_R = I(zᵢ)``)

        corrected_loss(zᵢ) = ℓ(zᵢ; Θ) + wᵢ gᵢᵀH⁻¹gᵢ / n + I(zᵢ)
                           = loss − wᵢ · self_influence / n + influence.

    Higher = the label is more surprising to a model that did not learn the point and agrees with
    the trusted set: flipped labels rank high.  The influence enters with the project's sign
    (positive = learning the point raises the reference loss), so a harmful point scores higher;
    the held-out term removes the point's own pull toward its label (memorisation).  Why both: on
    a head that cannot separate the classes, how surprising a label is separates flips from
    correct events better than the direction of their gradient (the cosine influence) does, while
    the influence catches what the loss alone misses — flips the fit has partly learned because
    they are systematic (pair flips), which the trusted set pulls back.
    """
    return loss - weights * scores.self_influence / len(loss) + scores.influence


def score_dataset(
    F_train: np.ndarray,
    y_train: np.ndarray,
    F_ref: np.ndarray,
    y_ref: np.ndarray,
    *,
    n_classes: int,
    l2: float = SCORE_L2,
    weights: np.ndarray | None = None,
    curvature: Literal["exact", "kfac", "ekfac", "classblock", "diagonal", "identity"] = "exact",
    objective_kind: Literal["loss", "margin"] = "loss",
    standardize: bool = True,
    policy: PolicySettings | None = None,
    tol: float = 1e-10,
) -> Audit:
    """Fit on the training set, then score every training point against the reference set.

    ``F_*`` are φ-features (before standardisation and augmentation).
    """
    X, (Xr,) = prepare_inputs(F_train, [F_ref], standardize)
    w = np.ones(len(X)) if weights is None else np.asarray(weights, dtype=np.float64)
    fit = fit_head(X, y_train, n_classes, l2, weights=w, augmented=True, tol=tol)
    P = softmax(X @ fit.theta.T)
    est = CURVATURE_AT_OPTIMUM[curvature](X, P, w, l2)
    scorer = InfluenceScorer(InfluenceSettings(objective=objective_kind))
    scorer.refresh(fit.theta, est, Xr, y_ref)
    scores = scorer.score(P, one_hot(y_train, n_classes), X, est)
    # The policy's sign rule and thresholds; no warm-up and no rate cap offline.
    # Windows span the whole data set, so a quantile threshold is the data set's quantile.
    n = max(len(X), 10)
    policy = (policy or PolicySettings()).model_copy(
        update={"warmup_events": 0, "max_quarantine_rate": 1.0, "rate_window": n, "quantile_window": n}
    )
    router = RoutingPolicy(policy)
    if scorer.calibration is not None:  # calibrated mode: held-out scores of the reference points
        router.calibrate(scorer.calibration.scores.get(policy.score), scorer.calibration.labels, n_classes)
    score = scores.get(policy.score)
    if policy.mode == "quantile":
        router.decide(score, warm=False)  # fills the score window only
    decision = router.decide(score, warm=True, labels=y_train, disagree=P.argmax(axis=1) != y_train)
    loss = label_loss(P, y_train)
    return Audit(
        fit,
        est,
        scores,
        decision.quarantine,
        decision.reasons,
        scorer.reference_loss,
        corrected_loss(loss, scores, w),
    )


def reference_loss(theta: np.ndarray, Xr: np.ndarray, yr: np.ndarray) -> float:
    """Mean cross-entropy of the head ``theta`` on augmented reference inputs."""
    P = softmax(Xr @ theta.T)
    return float(-np.log(P[np.arange(len(yr)), yr]).mean())


def leave_one_out_changes(
    fit: HeadFit,
    X: np.ndarray,
    y: np.ndarray,
    Xr: np.ndarray,
    yr: np.ndarray,
    picked: np.ndarray,
    *,
    tol: float = 1e-11,
    max_iter: int = 100,
) -> np.ndarray:
    """``L_R(Θ₋ᵢ) − L_R(Θ)`` for every ``i`` in ``picked``: the head actually retrained without
    point ``i`` (the same objective, weight 0, still divided by ``n``), from the optimum.

    This is what ``−I(zᵢ)/n`` predicts.  Each refit preconditions with the leave-one-out Hessian
    at the full-data optimum (full Hessian minus the point's own term), which is a handful of cheap
    steps even for high-leverage points; convergence is judged by the leave-one-out gradient
    alone, and a refit that does not reach ``10·tol`` raises (its effect would be noise).
    """
    n, K = len(X), fit.theta.shape[0]
    P = softmax(X @ fit.theta.T)
    H = mean_hessian(X, P, np.ones(n))
    H[np.diag_indices_from(H)] += fit.l2
    S = softmax_hessian(P[picked])
    base = reference_loss(fit.theta, Xr, yr)
    out = np.empty(len(picked))
    for k, i in enumerate(picked):
        w = np.ones(n)
        w[i] = 0.0
        precond = linalg.cho_factor(H - np.kron(S[k], np.outer(X[i], X[i])) / n)
        th = fit.theta.copy()
        for _ in range(max_iter):
            _, g = objective(th, X, y, w, fit.l2)
            if np.linalg.norm(g) <= tol:
                break
            th -= linalg.cho_solve(precond, g.ravel()).reshape(K, -1)
        if np.linalg.norm(g) > 10 * tol:
            raise StreamInfluenceError(f"leave-one-out refit of point {i} did not converge")
        out[k] = reference_loss(th, Xr, yr) - base
    return out

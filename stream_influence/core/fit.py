"""Full-batch fit of the softmax head to a tight optimum: the oracle for every streaming estimate.

The head is the engine's: ``Θ = [W b]`` (``K × D``), augmented features ``x̃ = [φ(x); 1]``,
class-major flattening.  :func:`fit_head` minimises the explicitly regularised objective

    f(Θ) = (1/n) Σᵢ wᵢ ℓ(zᵢ; Θ) + (l2/2) ‖Θ‖²        (n = number of training rows)

in float64 by Newton's method with the exact Hessian and a backtracking line search (L-BFGS with
a tight tolerance when ``K·D`` is too large for a dense Hessian).  Pure numpy/scipy, no I/O: the
offline audit, the reference model and the benchmarks all fit heads through it.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> X = rng.normal(size=(200, 3)); y = (X[:, 0] > 0).astype(int)
>>> fit = fit_head(X, y, n_classes=2, l2=1e-2)
>>> bool(fit.grad_norm < 1e-9)
True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import linalg, optimize

from stream_influence.core.model import Standardizer, augment, one_hot, softmax
from stream_influence.errors import StreamInfluenceError

__all__ = ["MAX_EXACT_PARAMS", "HeadFit", "fit_head", "mean_hessian", "objective", "prepare_inputs"]

# Above this many head parameters a dense (K·D)² Hessian (and Newton) is not attempted.
MAX_EXACT_PARAMS = 8000


@dataclass(slots=True)
class HeadFit:
    """A converged head: ``theta`` (``K × D``), the final gradient norm and the method used."""

    theta: np.ndarray
    l2: float
    grad_norm: float
    iterations: int
    method: str
    loss: float


def prepare_inputs(
    F_train: np.ndarray, others: list[np.ndarray], standardize: bool
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Augmented head inputs; standardised with the *training* mean/variance, as the engine's
    running standardiser would be after the whole training set."""
    if standardize:
        st = Standardizer(F_train.shape[1])
        st.update(F_train)
        return augment(st.transform(F_train)), [augment(st.transform(F)) for F in others]
    return augment(F_train), [augment(F) for F in others]


def objective(
    theta: np.ndarray, X: np.ndarray, y: np.ndarray, w: np.ndarray, l2: float
) -> tuple[float, np.ndarray]:
    """``f(Θ)`` and its gradient (``K × D``); ``X`` augmented, mean over all ``len(X)`` rows."""
    n, K = len(X), theta.shape[0]
    Z = X @ theta.T
    Z -= Z.max(axis=1, keepdims=True)
    logsum = np.log(np.exp(Z).sum(axis=1))
    nll = logsum - Z[np.arange(n), y]
    P = softmax(Z)
    R = (P - one_hot(y, K)) * w[:, None]
    f = float(w @ nll) / n + 0.5 * l2 * float(np.vdot(theta, theta))
    return f, R.T @ X / n + l2 * theta


def mean_hessian(X: np.ndarray, P: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``(1/n) Σ wᵢ (diag pᵢ − pᵢpᵢᵀ) ⊗ x̃ᵢx̃ᵢᵀ`` (``KD × KD``, class-major), no damping."""
    n, D = X.shape
    K = P.shape[1]
    # Block (k, l) = Xᵀ diag(w p_k δ_kl) X − (p_k x)ᵀ diag(w) (p_l x): one GEMM for the ppᵀ part.
    Z = (P[:, :, None] * X[:, None, :]).reshape(n, K * D) * np.sqrt(w)[:, None]
    H = -(Z.T @ Z)
    H4 = H.reshape(K, D, K, D)
    for k in range(K):
        H4[k, :, k, :] += (X * (w * P[:, k])[:, None]).T @ X
    H /= n
    return 0.5 * (H + H.T)


def fit_head(
    X: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    l2: float,
    *,
    weights: np.ndarray | None = None,
    theta0: np.ndarray | None = None,
    augmented: bool = False,
    tol: float = 1e-10,
    max_iter: int = 200,
    method: Literal["auto", "newton", "lbfgs"] = "auto",
) -> HeadFit:
    """Minimise ``f(Θ)`` to ``‖∇f‖ ≤ tol`` (Newton; L-BFGS for heads above ``MAX_EXACT_PARAMS``).

    ``X`` are head inputs (augmented when ``augmented``, else a column of ones is appended).
    """
    if l2 <= 0:
        raise StreamInfluenceError(f"l2 must be > 0 (it makes the optimum unique), got {l2}")
    X = X if augmented else augment(X)
    n, D = X.shape
    K = n_classes
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    theta = np.zeros((K, D)) if theta0 is None else np.array(theta0, dtype=np.float64)
    if method == "auto":
        method = "newton" if K * D <= MAX_EXACT_PARAMS else "lbfgs"

    if method == "lbfgs":

        def fun(v: np.ndarray) -> tuple[float, np.ndarray]:
            f, g = objective(v.reshape(K, D), X, y, w, l2)
            return f, g.ravel()

        res = optimize.minimize(
            fun,
            theta.ravel(),
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": 20 * max_iter, "gtol": tol, "ftol": 0.0, "maxcor": 30},
        )
        theta = res.x.reshape(K, D)
        f, g = objective(theta, X, y, w, l2)
        return HeadFit(theta, l2, float(np.linalg.norm(g)), int(res.nit), "lbfgs", f)

    f, g = objective(theta, X, y, w, l2)
    it = 0
    for it in range(1, max_iter + 1):
        if np.linalg.norm(g) <= tol:
            it -= 1
            break
        P = softmax(X @ theta.T)
        H = mean_hessian(X, P, w)
        H[np.diag_indices_from(H)] += l2
        step = linalg.cho_solve(linalg.cho_factor(H), g.ravel()).reshape(K, D)
        # Backtracking (Armijo) keeps Newton globally convergent on this convex objective.
        slope = float(np.vdot(g, step))
        t = 1.0
        while True:
            f_new, g_new = objective(theta - t * step, X, y, w, l2)
            if f_new <= f - 1e-4 * t * slope or t < 1e-10:
                break
            t *= 0.5
        if f_new > f and np.linalg.norm(g_new) >= np.linalg.norm(g):
            break  # rounding floor reached: no further progress possible
        theta, f, g = theta - t * step, f_new, g_new
    return HeadFit(theta, l2, float(np.linalg.norm(g)), it, "newton", f)

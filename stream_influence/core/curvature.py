"""Running estimates of the output-layer Hessian and of its (damped) inverse.

Parameters are ``Θ = [W b]`` (``K × D``, ``D = d + 1``), flattened class-major, so the
per-point Hessian of the cross-entropy is ``h = (diag p − ppᵀ) ⊗ x̃x̃ᵀ`` with ``x̃ = [φ(x); 1]``.
All estimators keep a running mean ``C`` of ``h`` with exponential forgetting and serve
``H⁻¹ = (C + λI)⁻¹`` in float64:

* a batch of total weight ``m`` enters with weight ``α = max(1 − γᵐ, m / (n + m))`` where ``n``
  is the evidence seen so far, i.e. ``C ← (1 − α) C + α h̄``.  The second term makes the first
  points a plain running mean instead of a biased-towards-zero EMA;
* ``exact`` keeps ``M = C + λ_t I`` and its inverse, updated by a rank-``bK`` Woodbury identity
  for small batches.  The scalar forgetting applies to the whole of ``M``, so the damping in
  force ``λ_t`` decays with the data between re-factorisations (as in recursive least squares
  with exponential forgetting); every ``refactor_every`` events, or as soon as ``λ_t`` falls below
  ``damping_floor · λ``, or when a batch is too large for Woodbury to pay off, ``M⁻¹`` is rebuilt
  from ``C + λI`` by Cholesky, which also stops numerical drift;
* ``kfac`` keeps ``G = E[diag p − ppᵀ]`` and the *curvature-weighted* input factor
  ``A = E[τ x̃x̃ᵀ] / E[τ]`` with ``τ = tr(diag p − ppᵀ) = 1 − ‖p‖²``, and serves ``(G ⊗ A + λI)⁻¹``
  exactly through the eigenbases of both factors.  Weighting by ``τ`` keeps what the plain
  ``E[x̃x̃ᵀ]`` loses — confidently predicted points carry little curvature — and makes ``G ⊗ A``
  the *exact* Hessian for binary heads, where ``diag p − ppᵀ = τ/2 · [1 −1; −1 1]``.  The
  eigenbases are refreshed every ``refactor_every`` events (and whenever the evidence doubled,
  so the start is not stuck on a tiny sample);
* ``ekfac`` (eigenvalue-corrected K-FAC, George et al. 2018) keeps K-FAC's factors and
  eigenbases ``Q_G``, ``Q_A`` and, in that Kronecker eigenbasis, the *exact* diagonal of ``C``:
  ``Λ[k, j] = E[(Q_Gᵀ S Q_G)_kk · (Q_Aᵀ x̃)_j²]`` with ``S = diag p − ppᵀ``, so
  ``(Q_Gᵀ S Q_G)_kk = p·Q_G[:, k]² − (p·Q_G[:, k])²`` — two matrix products per batch.  It serves
  ``H⁻¹ V = Q_G ((Q_Gᵀ V Q_A) / (Λ + λ)) Q_Aᵀ``: K-FAC's basis with eigenvalues fitted to the
  data rather than to the Kronecker product (with Λ exact, never further from ``C`` in Frobenius
  norm than K-FAC; exact whenever the basis diagonalises ``C``, e.g. binary heads).  Λ follows
  every batch; the basis is refreshed on K-FAC's schedule.  A refreshed basis needs a new Λ, but
  the points are gone on a stream, so ``C`` is split by the weight each point still carries in
  it: the most recent ``ekfac_buffer`` points (their ``x̃``, ``p`` and current weight, a bounded
  ring) are re-projected exactly, and only the older remainder — whose K-FAC factors are the
  totals minus the buffer's — is estimated by the diagonal of its own ``G_old ⊗ A_old`` in the
  new basis.  With ``ekfac_buffer = 0`` this is the plain alternative (K-FAC eigenvalues as the
  prior, re-accumulated from there).  Measured against
  the exact running estimator (docs/benchmarks.md, *fidelity*), the buffer is more faithful but
  only just (Spearman +0.001 at 256 points, +0.004 at 4 096), so the default keeps it small.
  On 10-class heads EK-FAC is no closer to exact than K-FAC: the basis, not the eigenvalues,
  is what a Kronecker form gets wrong for softmax;
* ``classblock`` keeps the ``K`` diagonal ``D × D`` blocks of ``C`` exactly,
  ``E[(p_k − p_k²) x̃x̃ᵀ]``, drops the cross-class blocks ``−E[p_k p_l x̃x̃ᵀ]`` and inverts each
  block by Cholesky; measured far closer to exact and to leave-one-out than any Kronecker form on
  10-class heads (docs/benchmarks.md, *fidelity*), at ``K`` times K-FAC's cost per event;
* ``diagonal`` keeps the exact diagonal of ``C``.

With ``refine`` (``CurvatureSettings.refine``, the default; every estimator but ``exact``, which
solves exactly already) one solve differs: the reference direction ``s = H⁻¹∇L_R``
(:meth:`Curvature.direction`, the only solve scoring needs) is corrected against the *exact*
running Hessian by a :class:`DirectionRefiner`.  It keeps an anchor ``a`` and ``u = C a``,
maintained like ``C`` itself: every batch adds its exact Hessian-vector product
``Σ wᵢ (Sᵢ a x̃ᵢ) ⊗ x̃ᵢ`` (two products over the batch, no ``(KD)²`` matrix) and the old part
decays with ``C``.  The direction served is one step from the anchor preconditioned by the
estimator's own damped Hessian ``M`` (``G ⊗ A + λI`` for ``kfac``), ``a + ω M⁻¹(∇L_R − u − λa)``;
after each batch the anchor moves to that point and ``u`` follows by the estimator's own
:meth:`Curvature.hessian_product` of the step ``δ`` — the only approximation, applied to the step
(not to the whole direction), and washed out as the batches that carry the exact products
replace the old evidence.  When the anchor stops moving ``u = C a`` exactly, so the fixed point
is the exact solve ``(C + λI)⁻¹∇L_R`` whatever the estimator.  It gets there at the pace exact
products replace old evidence in ``C`` (a micro-batch's share, ``1 − γᵐ``), the error along each
eigenvector of ``M⁻¹H`` shrinking by about ``ω · b · (1 − γᵐ)`` per batch (``b`` its eigenvalue:
slowest where the estimator overestimates the curvature); how closely it tracks a moving head
and a drifting stream is measured (docs/benchmarks.md, *fidelity*).  This is iterative
refinement (a stationary, preconditioned Richardson iteration) spread over the stream, one exact
product per batch, rather than CG or LiSSA over a stored data set (torch-influence, pyDVL);
``ω < 1`` keeps it stable where the preconditioner's curvature is far too low (a stale eigenbasis
after a drift).  A new reference gradient (every refresh, as the head learns) moves that fixed
point by ``(C + λI)⁻¹Δ∇L_R``; the served step alone would take ``ω`` of the move and leave
``1 − ω`` lagging (the direction a blend of the solves of the last few gradients), so the anchor
first moves by ``ω M⁻¹Δ∇L_R`` and only ``(1 − ω)²`` lags.  Measured on hyperplane/200 at 40 %
noise (binary: K-FAC exact but for its refresh schedule), 1 − cos to the current exact solve 4e-4,
against 5e-3 without that move and K-FAC's own 2e-3 (issue 9's lost cell).  ``ω`` rather than a
full solve: along curvature the estimator underestimates more than 2× a full move overshoots
(10-class digits through the engine, relative error to exact 0.089 against 0.073).  The
self-terms ``gᵀH⁻¹g`` (relative and cosine influence, held-out calibration) keep the estimator's
own inverse.  ``kind: refined`` of earlier releases is ``kfac`` with ``refine`` on (its
checkpoints restore: the refinement keeps its state names).

>>> import numpy as np
>>> from stream_influence.core.settings import CurvatureSettings
>>> rng = np.random.default_rng(0)
>>> X = np.hstack([rng.normal(size=(64, 3)), np.ones((64, 1))])
>>> P = rng.dirichlet(np.ones(4), size=64)
>>> est = make_curvature(CurvatureSettings(kind="exact"), n_classes=4, dim=4)
>>> est.update(X, P)
>>> bool(np.allclose(est.dense_inverse() @ est.dense_hessian(), np.eye(16)))
True
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
from scipy import linalg

from stream_influence.core.settings import CurvatureSettings
from stream_influence.errors import CurvatureError

__all__ = [
    "ClassBlockCurvature",
    "Curvature",
    "DiagonalCurvature",
    "DirectionRefiner",
    "EKFACCurvature",
    "ExactCurvature",
    "KFACCurvature",
    "make_curvature",
]


def softmax_factor(P: np.ndarray) -> np.ndarray:
    """``L`` with ``L Lᵀ = diag(p) − ppᵀ`` for every row of ``P`` (shape ``b × K × K``)."""
    sq = np.sqrt(P)
    L = -P[:, :, None] * sq[:, None, :]
    idx = np.arange(P.shape[1])
    L[:, idx, idx] += sq
    return L


def softmax_hessian(P: np.ndarray) -> np.ndarray:
    """``diag(p) − ppᵀ`` for every row of ``P`` (shape ``b × K × K``)."""
    S = -P[:, :, None] * P[:, None, :]
    idx = np.arange(P.shape[1])
    S[:, idx, idx] += P
    return S


class Curvature(ABC):
    """One interface for every curvature estimator.

    Arrays: ``X`` is ``b × D`` (augmented features, last column 1), ``P`` is ``b × K`` (predicted
    probabilities), gradients are ``… × K × D``.  Constructors store parameters only; all
    learned state is in :meth:`state_dict`.
    """

    kind: str = ""
    exact: bool = False  # True when solve() is the inverse of dense_hessian() to rounding
    refinable: bool = True  # settings.refine applies (not to exact, whose solve is exact already)

    def __init__(self, settings: CurvatureSettings, n_classes: int, dim: int) -> None:
        self.settings = settings
        self.n_classes = n_classes
        self.dim = dim
        self.refiner = DirectionRefiner(self) if settings.refine and self.refinable else None
        self.reset()

    # -- state ---------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget all evidence: ``H = λI``."""
        self.n_seen = 0.0
        self.events_since_refactor = 0
        self.refactorizations = 0
        self._reset_state()
        if self.refiner is not None:
            self.refiner.reset()

    @abstractmethod
    def _reset_state(self) -> None: ...

    def forget(self, keep: float) -> None:
        """Keep only a fraction of the evidence (drift): later batches weigh ``1/keep`` more."""
        self.n_seen *= keep

    def batch_weight(self, m: float) -> float:
        """α for a batch of total weight ``m`` (see the module docstring)."""
        gamma = self.settings.forgetting
        return max(1.0 - gamma**m, m / (self.n_seen + m))

    def update(self, X: np.ndarray, P: np.ndarray, w: np.ndarray | None = None) -> None:
        """Add a batch of points to the running estimate (one rank-``b`` update)."""
        if len(X) == 0:
            return
        w = np.ones(len(X)) if w is None else w
        m = float(np.add.reduce(w))  # w.sum(), without its Python wrapper (once per micro-batch)
        if m <= 0:
            return
        alpha = self.batch_weight(m)
        self.n_seen += m
        self.events_since_refactor += len(X)
        w = w * (alpha / m)
        self._update(X, P, w, 1.0 - alpha)
        if self.refiner is not None:
            self.refiner.update(X, P, w, 1.0 - alpha)

    @abstractmethod
    def _update(self, X: np.ndarray, P: np.ndarray, w: np.ndarray, beta: float) -> None:
        """``C ← β C + Σ wᵢ hᵢ`` (w already holds α / m)."""

    @abstractmethod
    def refactorize(self) -> None:
        """Rebuild the inverse representation from the running Hessian."""

    @abstractmethod
    def solve(self, V: np.ndarray) -> np.ndarray:
        """``H⁻¹ v`` for every ``K × D`` matrix ``v`` in ``V`` (shape ``… × K × D``)."""

    @abstractmethod
    def hessian_product(self, V: np.ndarray) -> np.ndarray:
        """``C v`` with this estimator's own running Hessian ``C`` (no damping) for every ``K × D``
        matrix ``v`` in ``V`` (shape ``… × K × D``): ``dense_hessian() − λI`` applied to ``v``."""

    def direction(self, grad: np.ndarray) -> np.ndarray:
        """``H⁻¹∇L_R`` for the reference gradient ``grad`` (``K × D``): the one solve scoring
        needs, cached by the scorer.  With ``settings.refine`` the refined direction
        (:class:`DirectionRefiner`, converging to the exact solve), otherwise :meth:`solve`."""
        if self.refiner is not None:
            return self.refiner.direction(grad)
        return self.solve(grad)

    @abstractmethod
    def quad(self, R: np.ndarray, X: np.ndarray) -> np.ndarray:
        """``gᵢᵀ H⁻¹ gᵢ`` for the rank-one gradients ``gᵢ = Rᵢ ⊗ Xᵢ`` (shape ``b``)."""

    @abstractmethod
    def dense_hessian(self) -> np.ndarray:
        """The ``KD × KD`` damped Hessian this estimator inverts (tests, small heads)."""

    def dense_inverse(self) -> np.ndarray:
        """The ``KD × KD`` matrix :meth:`solve` applies, built column by column."""
        n = self.n_classes * self.dim
        eye = np.eye(n).reshape(n, self.n_classes, self.dim)
        return self.solve(eye).reshape(n, n).T

    @property
    def damping_in_use(self) -> float:
        return self.settings.damping

    @abstractmethod
    def condition_number(self) -> float:
        """An estimate of the condition number of the damped Hessian."""

    def state_dict(self) -> dict[str, Any]:
        return {
            "n_seen": self.n_seen,
            "events_since_refactor": self.events_since_refactor,
            "refactorizations": self.refactorizations,
            **self._arrays(),
            **(self.refiner.state_dict() if self.refiner is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n_seen = float(state["n_seen"])
        self.events_since_refactor = int(state["events_since_refactor"])
        self.refactorizations = int(state["refactorizations"])
        self._load_arrays(state)
        # The refinement is derived state: restored when the checkpoint has it, restarted from
        # this estimator's own solve when it was written with refine off (and ignored when off).
        if self.refiner is not None:
            self.refiner.load_state_dict(state)

    @abstractmethod
    def _arrays(self) -> dict[str, Any]: ...

    @abstractmethod
    def _load_arrays(self, state: dict[str, Any]) -> None: ...


class DirectionRefiner:
    """The reference direction ``H⁻¹∇L_R`` refined on the stream against the exact running Hessian.

    Held by an estimator whose ``settings.refine`` is on (see the module docstring, *refine*): it
    keeps an anchor ``a`` and ``u = C a`` and serves one step from the anchor preconditioned by
    the estimator's own inverse, ``a + ω M⁻¹(∇L_R − u − λa)``.  It needs from the estimator only
    :meth:`Curvature.solve` (``M⁻¹``) and :meth:`Curvature.hessian_product` (its approximate
    ``C``, applied to the anchor's moves).  Cost per event: one Hessian-vector product
    (``O(KD)``); per refresh one solve.  Its fixed point is the exact solve
    ``(C + λI)⁻¹∇L_R``, so the influence it serves estimates the same ``I(z) = −∇L_Rᵀ H⁻¹ g(z)``
    with the project's sign (negative: learning ``z`` lowers the reference loss).
    """

    # Names in the estimator's state_dict (those of the former ``kind: refined``, so its
    # checkpoints restore).
    STATE = ("anchor", "u", "grad", "has_grad", "restarts")

    def __init__(self, curvature: Curvature) -> None:
        self.curvature = curvature

    def reset(self) -> None:
        K, D = self.curvature.n_classes, self.curvature.dim
        self.anchor = np.zeros((K, D))
        self.u = np.zeros((K, D))  # C · anchor: exact for the batches, approximate for the moves
        self.grad = np.zeros((K, D))  # the last reference gradient served; anchor moves towards it
        self.has_grad = False
        self.restarts = 0

    def _step(self, grad: np.ndarray) -> np.ndarray:
        est = self.curvature
        residual = grad - self.u - est.settings.damping * self.anchor
        return self.anchor + est.settings.refine_step * est.solve(residual)

    def direction(self, grad: np.ndarray) -> np.ndarray:
        """The refined ``H⁻¹∇L_R``; the first one (no anchor yet) is the estimator's own solve."""
        if not self.has_grad:
            self._move_anchor_to(self.curvature.solve(grad), exact_u=False)
        else:
            # The change of ∇L_R first takes the iteration's own damped step, so the served
            # direction does not lag a moving reference (module docstring, *refine*).
            est = self.curvature
            self._move_anchor_to(self.anchor + est.settings.refine_step * est.solve(grad - self.grad))
        self.grad = np.array(grad, dtype=np.float64)
        self.has_grad = True
        return self._step(grad)

    def _move_anchor_to(self, new: np.ndarray, *, exact_u: bool = True) -> None:
        if exact_u:
            self.u += self.curvature.hessian_product(new - self.anchor)
        else:  # (re)start: the whole of C·a from the estimator's own Hessian
            self.u = self.curvature.hessian_product(new)
        self.anchor = new

    def update(self, X: np.ndarray, P: np.ndarray, w: np.ndarray, beta: float) -> None:
        """After the estimator took ``C ← β C + Σ wᵢ hᵢ``: the same for ``u``, then one step."""
        if beta == 0.0 and self.has_grad:
            # C is this batch alone (the first one, or all else forgotten): restart the anchor at
            # the estimator's solution, whose product below is then exact — not at a direction
            # served before this evidence existed (H = λI at the very start).
            self.anchor = self.curvature.solve(self.grad)
        # u ← β u + Σ wᵢ hᵢ a, the batch's exact product: with zᵢ = a x̃ᵢ (K logits' worth),
        # Sᵢ zᵢ = pᵢ ∘ (zᵢ − pᵢ·zᵢ), and the sum over i is one product with the batch.
        Z = X @ self.anchor.T
        Z -= np.add.reduce(P * Z, axis=1)[:, None]
        Z *= P
        Z *= w[:, None]
        self.u *= beta
        self.u += Z.T @ X
        if not self.has_grad:
            return
        new = self._step(self.grad)
        # A step longer than the direction itself is a correction running away (the estimator far
        # too flat somewhere) or a new reference: restart from the estimator's own solution.
        step = float(np.vdot(new - self.anchor, new - self.anchor))
        if not step <= float(np.vdot(self.anchor, self.anchor)):  # also catches NaN
            self.restarts += 1
            self._move_anchor_to(self.curvature.solve(self.grad), exact_u=False)
            return
        self._move_anchor_to(new)

    def state_dict(self) -> dict[str, Any]:
        return {
            "anchor": self.anchor,
            "u": self.u,
            "grad": self.grad,
            "has_grad": self.has_grad,
            "restarts": self.restarts,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore; a state without the refinement (written with refine off) restarts it."""
        if not all(name in state for name in self.STATE):
            self.reset()
            return
        for name in ("anchor", "u", "grad"):
            setattr(self, name, np.array(state[name], dtype=np.float64))
        self.has_grad = bool(state["has_grad"])
        self.restarts = int(state["restarts"])


class ExactCurvature(Curvature):
    """Full ``KD × KD`` Hessian and inverse; exact to rounding.  Cost ``O((KD)²)`` per event."""

    kind = "exact"
    exact = True
    refinable = False

    def _reset_state(self) -> None:
        n = self.n_classes * self.dim
        self.C = np.zeros((n, n))
        self.Minv = np.eye(n) / self.settings.damping
        self.damping = self.settings.damping

    @property
    def damping_in_use(self) -> float:
        return self.damping

    def _update(self, X: np.ndarray, P: np.ndarray, w: np.ndarray, beta: float) -> None:
        K, D = self.n_classes, self.dim
        rank = len(X) * K
        self.damping *= beta
        refactor = (
            beta == 0.0
            or 2 * rank >= K * D
            or self.damping < self.settings.damping_floor * self.settings.damping
            or self.events_since_refactor >= self.settings.refactor_every
        )
        if refactor:
            self.C *= beta
            self._add_blocks(X, P, w)
            self.refactorize()
            return
        # Columns U with U Uᵀ = Σ wᵢ (Lᵢ Lᵢᵀ) ⊗ xᵢxᵢᵀ.
        L = softmax_factor(P) * np.sqrt(w)[:, None, None]
        U = np.einsum("bkm,bj->kjbm", L, X).reshape(K * D, rank)
        self.C *= beta
        self.C += U @ U.T
        # Woodbury: (βM + UUᵀ)⁻¹ = (M⁻¹ − Z (βI + UᵀZ)⁻¹ Zᵀ) / β with Z = M⁻¹U.
        Z = self.Minv @ U
        S = U.T @ Z
        S[np.diag_indices_from(S)] += beta
        try:
            T = linalg.solve(S, Z.T, assume_a="pos")
        except (linalg.LinAlgError, ValueError):
            self.refactorize()
            return
        self.Minv -= Z @ T
        self.Minv /= beta
        self.Minv = 0.5 * (self.Minv + self.Minv.T)

    def _add_blocks(self, X: np.ndarray, P: np.ndarray, w: np.ndarray) -> None:
        # Block (k, l) of Σ wᵢ Sᵢ ⊗ xᵢxᵢᵀ is Xᵀ diag(wᵢ Sᵢ[k, l]) X: K GEMMs, no b·K columns.
        K, D = self.n_classes, self.dim
        S = softmax_hessian(P) * w[:, None, None]
        C4 = self.C.reshape(K, D, K, D)
        for k in range(K):
            Y = (S[:, :, k, None] * X[:, None, :]).reshape(len(X), K * D)
            C4[:, :, k, :] += (Y.T @ X).reshape(K, D, D)

    def refactorize(self) -> None:
        n = self.C.shape[0]
        M = self.C + self.settings.damping * np.eye(n)
        try:
            chol = linalg.cholesky(M, lower=True)
        except (linalg.LinAlgError, ValueError) as exc:  # ValueError: non-finite entries
            raise CurvatureError(f"exact curvature is not positive definite: {exc}") from exc
        Linv = linalg.solve_triangular(chol, np.eye(n), lower=True)
        self.Minv = Linv.T @ Linv
        self.damping = self.settings.damping
        diag = np.diag(chol)
        self._cond = float((diag.max() / diag.min()) ** 2)
        self.refactorizations += 1
        self.events_since_refactor = 0

    def solve(self, V: np.ndarray) -> np.ndarray:
        shape = V.shape
        return (V.reshape(-1, self.n_classes * self.dim) @ self.Minv).reshape(shape)

    def quad(self, R: np.ndarray, X: np.ndarray) -> np.ndarray:
        G = (R[:, :, None] * X[:, None, :]).reshape(len(X), -1)
        return np.einsum("bi,bi->b", G @ self.Minv, G)

    def hessian_product(self, V: np.ndarray) -> np.ndarray:
        shape = V.shape
        return (V.reshape(-1, self.n_classes * self.dim) @ self.C).reshape(shape)

    def dense_hessian(self) -> np.ndarray:
        return self.C + self.damping * np.eye(self.C.shape[0])

    def condition_number(self) -> float:
        return getattr(self, "_cond", 1.0)

    def _arrays(self) -> dict[str, Any]:
        return {"C": self.C, "Minv": self.Minv, "damping": self.damping, "cond": self.condition_number()}

    def _load_arrays(self, state: dict[str, Any]) -> None:
        self.C = np.array(state["C"], dtype=np.float64)
        self.Minv = np.array(state["Minv"], dtype=np.float64)
        self.damping = float(state["damping"])
        self._cond = float(state.get("cond", 1.0))  # health metric, restored with the rest


class KFACCurvature(Curvature):
    """Kronecker factors ``H ≈ G ⊗ A + λI``; exact inverse of that through eigenbases.

    Cost per event ``O(D² + K²)`` to update and ``O(KD + D² + K²)`` to score.
    """

    kind = "kfac"
    exact = True  # exact inverse of its own (G ⊗ A + λI) as of the last refresh

    def _reset_state(self) -> None:
        K, D = self.n_classes, self.dim
        self.A = np.zeros((D, D))  # E[τ x̃x̃ᵀ]; the factor served is A / tau
        self.tau = 0.0  # E[τ]
        self.G = np.zeros((K, K))
        self.QA, self.QG = np.eye(D), np.eye(K)
        self.eA, self.eG = np.zeros(D), np.zeros(K)
        self.n_at_refactor = 0.0
        self._inv = np.full((K, D), 1.0 / self.settings.damping)

    def _update(self, X: np.ndarray, P: np.ndarray, w: np.ndarray, beta: float) -> None:
        Pw = P * w[:, None]
        tau = w - np.einsum("bk,bk->b", Pw, P)  # wᵢ (1 − ‖pᵢ‖²)
        self.A *= beta
        self.A += (X * tau[:, None]).T @ X
        self.tau = beta * self.tau + float(np.add.reduce(tau))
        # Σ wᵢ (diag pᵢ − pᵢpᵢᵀ) without the b × K × K stack.
        self.G *= beta
        self.G -= Pw.T @ P
        self.G.flat[:: self.n_classes + 1] += np.add.reduce(Pw, axis=0)  # the diagonal
        # Refresh the eigenbases on schedule, and whenever the evidence doubled (early on).
        if (
            self.events_since_refactor >= self.settings.refactor_every
            or self.n_seen >= 2 * self.n_at_refactor
        ):
            self.refactorize()

    def refactorize(self) -> None:
        try:
            self.eA, self.QA = linalg.eigh(self.input_factor)
            self.eG, self.QG = linalg.eigh(self.G)
        except (linalg.LinAlgError, ValueError) as exc:  # ValueError: non-finite factors
            raise CurvatureError(f"K-FAC factor eigendecomposition failed: {exc}") from exc
        np.clip(self.eA, 0.0, None, out=self.eA)
        np.clip(self.eG, 0.0, None, out=self.eG)
        self._inv = 1.0 / (np.outer(self.eG, self.eA) + self.settings.damping)
        self.n_at_refactor = self.n_seen
        self.refactorizations += 1
        self.events_since_refactor = 0

    def solve(self, V: np.ndarray) -> np.ndarray:
        Vt = self.QG.T @ V @ self.QA
        return self.QG @ (Vt * self._inv) @ self.QA.T

    def quad(self, R: np.ndarray, X: np.ndarray) -> np.ndarray:
        r2 = np.square(R @ self.QG)
        x2 = np.square(X @ self.QA)
        return np.add.reduce((r2 @ self._inv) * x2, axis=1)

    def hessian_product(self, V: np.ndarray) -> np.ndarray:
        """``(G ⊗ A) v`` with the current factors (not the eigenbases of the last refresh)."""
        out = self.G @ V @ self.A
        return out / self.tau if self.tau > 0 else out

    def dense_hessian(self) -> np.ndarray:
        n = self.n_classes * self.dim
        return np.kron(self.G, self.input_factor) + self.settings.damping * np.eye(n)

    @property
    def input_factor(self) -> np.ndarray:
        """``A = E[τ x̃x̃ᵀ] / E[τ]`` (zero before any evidence)."""
        return self.A / self.tau if self.tau > 0 else self.A

    def condition_number(self) -> float:
        return float(1.0 / self._inv.min() / (1.0 / self._inv.max()))

    def _arrays(self) -> dict[str, Any]:
        return {
            "A": self.A,
            "G": self.G,
            "QA": self.QA,
            "QG": self.QG,
            "eA": self.eA,
            "eG": self.eG,
            "inv": self._inv,
            "tau": self.tau,
            "n_at_refactor": self.n_at_refactor,
        }

    def _load_arrays(self, state: dict[str, Any]) -> None:
        for name in ("A", "G", "QA", "QG", "eA", "eG"):
            setattr(self, name, np.array(state[name], dtype=np.float64))
        self._inv = np.array(state["inv"], dtype=np.float64)
        self.tau = float(state["tau"])
        self.n_at_refactor = float(state["n_at_refactor"])


def kronecker_eigen_moments(
    X: np.ndarray, P: np.ndarray, QG: np.ndarray, QA: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per point, the diagonal of ``hᵢ`` in the basis ``Q_G ⊗ Q_A`` is ``outer(sᵢ, aᵢ)``.

    ``sᵢ[k] = (Q_Gᵀ Sᵢ Q_G)_kk = pᵢ·Q_G[:, k]² − (pᵢ·Q_G[:, k])²`` (``b × K``) and
    ``aᵢ[j] = (Q_Aᵀ x̃ᵢ)_j²`` (``b × D``): matrix products over the batch, no ``K × K`` per point.
    """
    s = P @ np.square(QG) - np.square(P @ QG)
    np.clip(s, 0.0, None, out=s)  # the diagonal of a PSD matrix; clip rounding below zero
    return s, np.square(X @ QA)


class EKFACCurvature(KFACCurvature):
    """Eigenvalue-corrected K-FAC: K-FAC's eigenbasis, the data's own diagonal ``Λ`` in it.

    Serves ``(Q (diag Λ + λI) Qᵀ)⁻¹`` with ``Q = Q_G ⊗ Q_A`` exactly (see the module docstring for
    how Λ survives a basis refresh).  Cost per event ``O(D² + K²)`` to update, like K-FAC, plus
    ``O(ekfac_buffer · (D² + K²))`` per refresh.
    """

    kind = "ekfac"
    exact = True  # exact inverse of its own Q (Λ + λ) Qᵀ

    def _reset_state(self) -> None:
        super()._reset_state()
        K, D, n = self.n_classes, self.dim, self.settings.ekfac_buffer
        self.Lam = np.zeros((K, D))
        # Ring of the most recent points and the weight each still carries in C.
        self.buf_X, self.buf_P, self.buf_c = np.zeros((n, D)), np.zeros((n, K)), np.zeros(n)
        self.buf_next = 0

    def _update(self, X: np.ndarray, P: np.ndarray, w: np.ndarray, beta: float) -> None:
        self._remember(X, P, w, beta)
        self.Lam *= beta
        s, a = kronecker_eigen_moments(X, P, self.QG, self.QA)
        self.Lam += (s * w[:, None]).T @ a
        super()._update(X, P, w, beta)  # factors; refactorize() re-projects Λ on a refresh
        self._inv = 1.0 / (self.Lam + self.settings.damping)

    def _remember(self, X: np.ndarray, P: np.ndarray, w: np.ndarray, beta: float) -> None:
        n = len(self.buf_c)
        self.buf_c *= beta
        if n == 0:
            return
        keep = slice(max(0, len(X) - n), len(X))  # a batch larger than the ring keeps its tail
        idx = (self.buf_next + np.arange(keep.stop - keep.start)) % n
        self.buf_X[idx], self.buf_P[idx], self.buf_c[idx] = X[keep], P[keep], w[keep]
        self.buf_next = int((idx[-1] + 1) % n)

    def refactorize(self) -> None:
        super().refactorize()
        QG, QA = self.QG, self.QA
        c = self.buf_c
        # The buffer's exact share of C in the new basis ...
        s, a = kronecker_eigen_moments(self.buf_X, self.buf_P, QG, QA)
        lam = (s * c[:, None]).T @ a
        # ... plus the older remainder, estimated by the diagonal of its own K-FAC product.
        Pc = self.buf_P * c[:, None]
        tau_b = c - np.einsum("bk,bk->b", Pc, self.buf_P)
        G_old = self.G - (np.diag(Pc.sum(0)) - Pc.T @ self.buf_P)
        A_old = self.A - (self.buf_X * tau_b[:, None]).T @ self.buf_X
        tau_old = self.tau - float(tau_b.sum())
        if tau_old > 1e-9 * self.tau:  # below that the remainder is rounding, not evidence
            g_old = np.clip((QG * (G_old @ QG)).sum(0), 0.0, None)
            a_old = np.clip((QA * (A_old @ QA)).sum(0), 0.0, None) / tau_old
            lam += np.outer(g_old, a_old)
        self.Lam = lam
        self._inv = 1.0 / (self.Lam + self.settings.damping)

    def hessian_product(self, V: np.ndarray) -> np.ndarray:
        """``Q diag(Λ) Qᵀ v`` (the Hessian this estimator serves, without the damping)."""
        return self.QG @ ((self.QG.T @ V @ self.QA) * self.Lam) @ self.QA.T

    def dense_hessian(self) -> np.ndarray:
        Q = np.kron(self.QG, self.QA)
        return (Q * (self.Lam.ravel() + self.settings.damping)) @ Q.T

    def _arrays(self) -> dict[str, Any]:
        return {
            **super()._arrays(),
            "Lam": self.Lam,
            "buf_X": self.buf_X,
            "buf_P": self.buf_P,
            "buf_c": self.buf_c,
            "buf_next": self.buf_next,
        }

    def _load_arrays(self, state: dict[str, Any]) -> None:
        super()._load_arrays(state)
        for name in ("Lam", "buf_X", "buf_P", "buf_c"):
            setattr(self, name, np.array(state[name], dtype=np.float64))
        self.buf_next = int(state["buf_next"])


class ClassBlockCurvature(Curvature):
    """The exact Hessian without its cross-class blocks: ``H ≈ blockdiag_k E[S_kk x̃x̃ᵀ] + λI``.

    Keeps the ``K`` diagonal ``D × D`` blocks exactly (``S_kk = p_k − p_k²``) and drops the
    off-diagonal ``−E[p_k p_l x̃x̃ᵀ]``; each block is inverted on its own (Cholesky).  Cost per
    event ``O(K·D²)`` to update and to score — ``K`` times K-FAC's, ``K`` times less than exact.
    The inverses are rebuilt after every batch whose update costs at least as much as the
    inversion (``3·b ≥ D``), otherwise on K-FAC's schedule.
    """

    kind = "classblock"
    exact = True  # exact inverse of its own blocks as of the last rebuild

    def _reset_state(self) -> None:
        K, D = self.n_classes, self.dim
        self.B = np.zeros((K, D, D))
        self.Binv = np.broadcast_to(np.eye(D) / self.settings.damping, (K, D, D)).copy()
        self.n_at_refactor = 0.0
        self._cond = 1.0

    def _update(self, X: np.ndarray, P: np.ndarray, w: np.ndarray, beta: float) -> None:
        K, D = self.n_classes, self.dim
        Y = ((P * (1.0 - P) * w[:, None])[:, :, None] * X[:, None, :]).reshape(len(X), K * D)
        self.B *= beta
        self.B += (Y.T @ X).reshape(K, D, D)  # one GEMM for all K blocks
        if (
            3 * len(X) >= D
            or self.events_since_refactor >= self.settings.refactor_every
            or self.n_seen >= 2 * self.n_at_refactor
        ):
            self.refactorize()

    def refactorize(self) -> None:
        M = self.B + self.settings.damping * np.eye(self.dim)
        try:
            chol = np.linalg.cholesky(M)
        except np.linalg.LinAlgError as exc:
            raise CurvatureError(f"class-block curvature is not positive definite: {exc}") from exc
        if not np.isfinite(chol).all():
            raise CurvatureError("class-block curvature has non-finite entries")
        Linv = np.linalg.inv(chol)
        self.Binv = np.matmul(Linv.transpose(0, 2, 1), Linv)
        diag = np.diagonal(chol, axis1=1, axis2=2)
        self._cond = float((diag.max() / diag.min()) ** 2)
        self.n_at_refactor = self.n_seen
        self.refactorizations += 1
        self.events_since_refactor = 0

    def solve(self, V: np.ndarray) -> np.ndarray:
        return np.einsum("...kd,kde->...ke", V, self.Binv)

    def quad(self, R: np.ndarray, X: np.ndarray) -> np.ndarray:
        K, D = self.n_classes, self.dim
        T = (X @ self.Binv.transpose(1, 0, 2).reshape(D, K * D)).reshape(len(X), K, D)
        return (np.square(R) * np.einsum("bkd,bd->bk", T, X)).sum(1)

    def hessian_product(self, V: np.ndarray) -> np.ndarray:
        """The current blocks (not their inverses of the last rebuild) applied to ``v``."""
        return np.einsum("...kd,kde->...ke", V, self.B)

    def dense_hessian(self) -> np.ndarray:
        return linalg.block_diag(*self.B) + self.settings.damping * np.eye(self.n_classes * self.dim)

    def condition_number(self) -> float:
        return self._cond

    def _arrays(self) -> dict[str, Any]:
        return {"B": self.B, "Binv": self.Binv, "cond": self._cond, "n_at_refactor": self.n_at_refactor}

    def _load_arrays(self, state: dict[str, Any]) -> None:
        self.B = np.array(state["B"], dtype=np.float64)
        self.Binv = np.array(state["Binv"], dtype=np.float64)
        self._cond = float(state["cond"])
        self.n_at_refactor = float(state["n_at_refactor"])


class DiagonalCurvature(Curvature):
    """The exact diagonal of the running Hessian; cheapest, ignores all correlations."""

    kind = "diagonal"
    exact = False

    def _reset_state(self) -> None:
        self.Dg = np.zeros((self.n_classes, self.dim))

    def _update(self, X: np.ndarray, P: np.ndarray, w: np.ndarray, beta: float) -> None:
        self.Dg *= beta
        self.Dg += (P * (1.0 - P) * w[:, None]).T @ np.square(X)

    def refactorize(self) -> None:
        self.refactorizations += 1
        self.events_since_refactor = 0

    def solve(self, V: np.ndarray) -> np.ndarray:
        return V / (self.Dg + self.settings.damping)

    def quad(self, R: np.ndarray, X: np.ndarray) -> np.ndarray:
        return ((np.square(R) @ (1.0 / (self.Dg + self.settings.damping))) * np.square(X)).sum(1)

    def hessian_product(self, V: np.ndarray) -> np.ndarray:
        return V * self.Dg

    def dense_hessian(self) -> np.ndarray:
        return np.diag(self.Dg.ravel() + self.settings.damping)

    def condition_number(self) -> float:
        d = self.Dg + self.settings.damping
        return float(d.max() / d.min())

    def _arrays(self) -> dict[str, Any]:
        return {"Dg": self.Dg}

    def _load_arrays(self, state: dict[str, Any]) -> None:
        self.Dg = np.array(state["Dg"], dtype=np.float64)


_KINDS: dict[str, type[Curvature]] = {
    "exact": ExactCurvature,
    "kfac": KFACCurvature,
    "ekfac": EKFACCurvature,
    "classblock": ClassBlockCurvature,
    "diagonal": DiagonalCurvature,
}


def make_curvature(settings: CurvatureSettings, n_classes: int, dim: int) -> Curvature:
    """The estimator ``settings.kind`` for a head of ``n_classes × dim`` parameters."""
    return _KINDS[settings.kind](settings, n_classes, dim)

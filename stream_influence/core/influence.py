"""Influence of a training point on a trusted reference objective — the project's one statement
of the math and its sign convention.

For the softmax head ``Θ = [W b]`` (``K × D``) with cross-entropy ``ℓ`` and a training point
``z = (x, y)`` with gradient ``g(z) = (p − onehot(y)) ⊗ x̃``:

* **influence** ``I(z) = −∇L_R(Θ)ᵀ H⁻¹ g(z)``: the first-order change of the reference loss
  ``L_R`` if ``z`` is up-weighted by an infinitesimal ε, per unit ε (Koh & Liang's
  ``I_up,loss``).  Removing ``z`` from ``n`` points changes ``L_R`` by about ``−I(z) / n``.
* **sign**: ``I(z) < 0`` — learning ``z`` lowers the reference loss: the model *generalises*
  from it, accept.  ``I(z) > 0`` — learning ``z`` raises the loss on trusted data while lowering
  its own (self-influence ``−gᵀH⁻¹g ≤ 0``): the model would only *memorise* it, route away.
* **relative influence** ``I(z) / sqrt(gᵀ H⁻¹ g)``: the same sign, invariant to the scale of the
  point's gradient, so thresholds survive a Hessian refresh.
* **cosine influence** ``I(z) / (sqrt(gᵀH⁻¹g) · sqrt(∇L_Rᵀ H⁻¹ ∇L_R))``: the cosine, in the
  ``H⁻¹`` inner product, between the point's descent direction and the reference's; in
  ``[−1, 1]``, same sign again, and also invariant to the shrinking ``‖∇L_R‖`` as the model fits,
  so one threshold means the same early and late in a stream.
* **self influence** ``−g(z)ᵀ H⁻¹ g(z)`` (always ≤ 0): how much learning ``z`` lowers its own loss.
* objective ``margin`` (classification influence) replaces ``L_R`` by the mean *negative logit
  margin* ``−(z_y − max_{k≠y} z_k)`` of the reference points, which tracks accuracy rather than
  calibration (the log-probability of the correct class would be ``−ℓ`` again).  Same sign
  convention: positive = learning ``z`` shrinks the reference margins.

``s = H⁻¹∇L_R`` is cached and refreshed every ``refresh_every`` events, so scoring a batch is one
matrix product: ``I = −((R s) ∘ X̃)·1`` with ``R = P − Y``.

**Held-out scores of the reference points** (the calibration of the ``calibrated`` policy): each
trusted point ``i`` is scored as if it arrived on the stream, against the reference objective
with its own term removed, ``∇L_R^{(−i)} = (n ∇L_R − m_i) / (n − 1)`` (``m_i`` its term of the
objective's gradient: ``g_i`` for ``loss``, its margin gradient for ``margin``).  In closed form,
with ``q_i = g_iᵀH⁻¹g_i``, ``c_i = m_iᵀH⁻¹g_i``, ``e_i = m_iᵀH⁻¹m_i``, ``S = ∇L_Rᵀ H⁻¹ ∇L_R``:

* ``I^{(−i)} = −(n sᵀg_i − c_i) / (n − 1)`` (same quantity and sign as ``I(z)``);
* relative ``I^{(−i)} / sqrt(q_i)``; cosine divides further by
  ``sqrt(n² S − 2n sᵀm_i + e_i) / (n − 1)``, the held-out objective's ``H⁻¹`` norm.

Without the removal a point would partly score against itself (self-influence is negative), so
clean reference points would look more helpful than fresh clean events and the threshold would
sit too low.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from stream_influence.core.curvature import Curvature
from stream_influence.core.model import label_loss, one_hot, softmax
from stream_influence.core.ring import Ring
from stream_influence.core.settings import InfluenceSettings, ReferenceSettings

__all__ = ["Calibration", "InfluenceScorer", "ReferenceBuffer", "Scores", "reference_gradient"]


@dataclass(slots=True)
class Scores:
    """Per-point scores of one batch (NaN where no reference exists yet)."""

    influence: np.ndarray
    relative_influence: np.ndarray
    cosine_influence: np.ndarray
    self_influence: np.ndarray

    @classmethod
    def missing(cls, n: int) -> Scores:
        nan = np.full(n, np.nan)
        return cls(nan, nan.copy(), nan.copy(), nan.copy())

    def get(self, name: str) -> np.ndarray:
        return getattr(self, name)

    @classmethod
    def concat(cls, parts: list[Scores]) -> Scores:
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)))


@dataclass(slots=True)
class Calibration:
    """Held-out scores of the reference points (see the module docstring) and their classes."""

    scores: Scores
    labels: np.ndarray


class ReferenceBuffer:
    """Bounded ring buffer of trusted points ``(φ(x), y)``; the newest ``capacity`` are kept."""

    def __init__(self, settings: ReferenceSettings) -> None:
        self.capacity = settings.capacity
        self._features = Ring(self.capacity, vectors=True)
        self._labels = Ring(self.capacity, np.int64)
        self.version = 0  # bumps on every change, so cached gradients know they are stale

    @property
    def size(self) -> int:
        return self._labels.size

    @property
    def features(self) -> np.ndarray | None:
        return self._features.data

    @property
    def labels(self) -> np.ndarray:
        assert self._labels.data is not None
        return self._labels.data

    def add(self, F: np.ndarray, y: np.ndarray) -> None:
        if len(F) == 0:
            return
        self._features.push(F)
        self._labels.push(y)
        self.version += 1

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return self._features.values(), self._labels.values()

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "labels": self.labels,
            "size": self.size,
            "pos": self._labels.pos,
            "version": self.version,
        }
        if self.features is not None:
            state["features"] = self.features
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore; a buffer saved with another ``capacity`` keeps its newest points that fit."""
        labels = np.array(state["labels"], dtype=np.int64)
        size, pos, self.version = int(state["size"]), int(state["pos"]), int(state["version"])
        features = np.array(state["features"], dtype=np.float64) if "features" in state else None
        if len(labels) == self.capacity:  # same capacity: restore the exact layout (bit-for-bit)
            self._labels.restore(labels, size, pos)
            self._features.restore(features, size, pos)
            return
        saved = Ring(len(labels), np.int64)
        saved.restore(labels, size, pos)
        order = saved.order()[-self.capacity :]  # oldest first
        self._labels = Ring(self.capacity, np.int64)
        self._labels.push(labels[order])
        self._features = Ring(self.capacity, vectors=True)
        if features is not None:
            self._features.push(features[order])
        self.version += 1  # other points than the saved set: whatever was fitted on it is stale


def objective_residuals(theta: np.ndarray, Xr: np.ndarray, yr: np.ndarray, objective: str) -> np.ndarray:
    """Per-point ``M`` (``n × K``) with ``m_i = M_i ⊗ x̃_i`` the gradient of point i's objective term."""
    Z = Xr @ theta.T
    Y = one_hot(yr, theta.shape[0])
    return (softmax(Z) - Y) if objective == "loss" else _margin_residuals(Z, Y)


def _margin_residuals(Z: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """``M`` of the ``margin`` objective for logits ``Z`` and one-hot labels ``Y``."""
    rival = np.where(Y > 0, -np.inf, Z).argmax(axis=1)
    return one_hot(rival, Y.shape[1]) - Y


def reference_gradient(theta: np.ndarray, Xr: np.ndarray, yr: np.ndarray, objective: str) -> np.ndarray:
    """``∇L_R`` at ``Θ`` (``K × D``) for the mean reference ``loss`` or negative ``margin``."""
    return objective_residuals(theta, Xr, yr, objective).T @ Xr / len(Xr)


class InfluenceScorer:
    """The cached reference direction ``s = H⁻¹∇L_R`` (with its norm, the reference loss and the
    held-out calibration scores) and the scoring of a batch against it (see the module
    docstring).  The public, snapshot-level API is :class:`stream_influence.core.scorer.Scorer`."""

    def __init__(self, settings: InfluenceSettings) -> None:
        self.settings = settings
        self.s: np.ndarray | None = None
        self.s_norm = 1.0  # sqrt(∇L_Rᵀ H⁻¹ ∇L_R)
        self.events_since_refresh = 0
        self.refreshes = 0
        self.reference_loss = float("nan")
        self.calibration: Calibration | None = None

    def invalidate(self) -> None:
        self.s = None

    def needs_refresh(self) -> bool:
        return self.s is None or self.events_since_refresh >= self.settings.refresh_every

    def refresh(self, theta: np.ndarray, curvature: Curvature, Xr: np.ndarray, yr: np.ndarray) -> None:
        """Recompute ``s = H⁻¹∇L_R`` and the held-out reference scores (inputs augmented, standardised)."""
        # One forward pass serves the objective, the reference loss and the held-out scores.
        Z = Xr @ theta.T
        Y = one_hot(yr, theta.shape[0])
        P = softmax(Z)  # a new array: Z stays the logits
        R = P - Y
        M = R if self.settings.objective == "loss" else _margin_residuals(Z, Y)
        grad = M.T @ Xr / len(Xr)
        self.s = curvature.direction(grad)
        S = max(float(np.vdot(grad, self.s)), 1e-300)
        self.s_norm = float(np.sqrt(S))
        self.reference_loss = float(label_loss(P, yr).mean())
        self.calibration = self._held_out(R, M, Xr, yr, S, curvature)
        self.events_since_refresh = 0
        self.refreshes += 1

    def _held_out(
        self, R: np.ndarray, M: np.ndarray, Xr: np.ndarray, yr: np.ndarray, S: float, curvature: Curvature
    ) -> Calibration:
        """Scores of the reference points, each against the objective without its own term."""
        assert self.s is not None
        n = len(Xr)
        if n < 2:  # nothing is left once the point is removed: no held-out score (kept finite,
            # so the checkpoint loader's finiteness check accepts it)
            return Calibration(Scores.missing(0), yr[:0].copy())
        sg = np.einsum("bd,bd->b", R @ self.s, Xr)
        q = np.maximum(curvature.quad(R, Xr), 1e-300)
        if self.settings.objective == "loss":
            sm, c, e = sg, q, q
        else:  # cross term by polarisation: quad is a quadratic form in the residual
            sm = np.einsum("bd,bd->b", M @ self.s, Xr)
            c = (curvature.quad(R + M, Xr) - curvature.quad(R - M, Xr)) / 4.0
            e = curvature.quad(M, Xr)
        influence = -(n * sg - c) / (n - 1)
        relative = influence / np.sqrt(q)
        norm = np.sqrt(np.maximum(n * n * S - 2.0 * n * sm + e, 1e-300)) / (n - 1)
        return Calibration(Scores(influence, relative, relative / norm, -q), yr.copy())

    def score(self, P: np.ndarray, Y: np.ndarray, X: np.ndarray, curvature: Curvature) -> Scores:
        """Scores for points with probabilities ``P``, one-hot labels ``Y``, inputs ``X``.

        Read-only (the owner counts scored events towards ``refresh_every``)."""
        assert self.s is not None, "refresh() first"
        R = P - Y
        influence = -np.einsum("bd,bd->b", R @ self.s, X)
        quad = np.maximum(curvature.quad(R, X), 1e-300)
        relative = influence / np.sqrt(quad)
        return Scores(influence, relative, relative / self.s_norm, -quad)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "events_since_refresh": self.events_since_refresh,
            "refreshes": self.refreshes,
            "reference_loss": self.reference_loss,
            "s_norm": self.s_norm,
        }
        if self.s is not None:
            state["s"] = self.s
        if self.calibration is not None:
            cal = self.calibration.scores
            state["calibration_labels"] = self.calibration.labels
            state["calibration_scores"] = np.stack(
                [cal.influence, cal.relative_influence, cal.cosine_influence, cal.self_influence]
            )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.events_since_refresh = int(state["events_since_refresh"])
        self.refreshes = int(state["refreshes"])
        self.reference_loss = float(state["reference_loss"])
        self.s_norm = float(state["s_norm"])
        self.s = np.array(state["s"], dtype=np.float64) if "s" in state else None
        self.calibration = None
        if "calibration_scores" in state:
            rows = np.array(state["calibration_scores"], dtype=np.float64)
            labels = np.array(state["calibration_labels"], dtype=np.int64)
            self.calibration = Calibration(Scores(*rows), labels)
        elif self.s is not None:
            self.s = None  # saved before calibration existed: refresh on the next batch

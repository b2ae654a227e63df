"""The reference model: the softmax head fitted on the trusted set alone, and its cross-fitted
calibration — the second piece of evidence of the ``hybrid`` routing policy.

**Reference loss** ``ℓ_ref(z) = −log p_ref(y | φ(x))``: the cross-entropy of an event's label
under a head that never saw the stream (L2-regularised logistic regression on the trusted points,
standardised with the trusted points' own mean and variance).  It estimates how surprising the
label is to trusted knowledge alone; it is ≥ 0 and, like the influence scores, *larger means route
away* (a mislabeled event is one the trusted model finds unlikely).

**Calibration** (cross-fitting): the trusted points are split into ``reference_model_folds`` folds;
each fold's points get their loss under a head fitted *without* that fold, so the calibration
sample is scored the way fresh clean events are (a point scored by a head that learned it would
look less surprising than any fresh event, and the threshold would sit too low).  The head that
scores the stream is fitted on all trusted points; it is refitted only when the trusted set has
changed by ``reference_model_refit_fraction`` (:meth:`ReferenceModel.stale`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stream_influence.core.fit import fit_head
from stream_influence.core.model import label_loss, scaled_augmented, softmax
from stream_influence.core.settings import InfluenceSettings

__all__ = ["ReferenceModel"]


class ReferenceModel:
    """Head fitted on the trusted set, its cross-fitted held-out losses, and the buffer version it fits."""

    def __init__(self, settings: InfluenceSettings, seed: int = 0) -> None:
        self.settings = settings
        self.seed = seed
        self.version = 0  # the ReferenceBuffer version it was fitted on (0: never; a filled buffer's is ≥ 1)
        self.added = -1  # trusted points ever added when it was fitted (-1: unknown, older checkpoint)
        self.mean = np.zeros(0)
        self.scale = np.ones(0)
        self.theta = np.zeros((0, 0))
        self.calibration_losses = np.zeros(0)
        self.calibration_labels = np.zeros(0, dtype=np.int64)

    @property
    def fitted(self) -> bool:
        return self.theta.size > 0

    def _fit(self, X: np.ndarray, y: np.ndarray, n_classes: int) -> np.ndarray:
        return fit_head(
            X, y, n_classes, self.settings.reference_model_l2, augmented=True, tol=1e-6, method="lbfgs"
        ).theta

    def fit(self, F: np.ndarray, y: np.ndarray, n_classes: int, version: int, added: int = -1) -> None:
        """Fit on trusted φ-features ``F`` with labels ``y``; cross-fit the calibration losses.

        ``version`` is the buffer version and ``added`` the count of trusted points ever added
        at the time of the fit (what :meth:`stale` compares against)."""
        self.mean = F.mean(axis=0)
        var = F.var(axis=0)
        self.scale = np.where(var > 1e-12, 1.0 / np.sqrt(np.maximum(var, 1e-300)), 1.0)
        X = scaled_augmented(F, self.mean, self.scale)
        n = len(y)
        self.theta = self._fit(X, y, n_classes)
        k = min(self.settings.reference_model_folds, n)
        losses = np.full(n, np.nan)
        if k >= 2:
            fold = np.empty(n, dtype=np.int64)
            fold[np.random.default_rng(self.seed).permutation(n)] = np.arange(n) % k
            for f in range(k):
                out = fold == f
                theta = self._fit(X[~out], y[~out], n_classes)
                losses[out] = _nll(X[out] @ theta.T, y[out])
        self.calibration_losses = losses
        self.calibration_labels = y.copy()
        self.version = version
        self.added = added

    def stale(self, version: int, size: int, added: int, fraction: float) -> bool:
        """Whether to refit for a trusted set at buffer ``version`` of ``size`` points, ``added``
        points ever added: never fitted, or changed by at least ``fraction`` of the fitted set
        (points added since the fit, or the change of size, e.g. a smaller capacity).  A fit whose
        ``added`` is unknown (older checkpoints) refits on any change, as before."""
        if not self.fitted:
            return True
        if version == self.version:
            return False
        if self.added < 0:
            return True
        fitted = len(self.calibration_labels)
        changed = max(added - self.added, abs(size - fitted))
        return changed >= max(1.0, fraction * fitted)

    def loss(self, F: np.ndarray, y: np.ndarray) -> np.ndarray:
        """``ℓ_ref`` of events with φ-features ``F`` and class indices ``y`` (one matrix product)."""
        return _nll(scaled_augmented(F, self.mean, self.scale) @ self.theta.T, y)

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "mean": self.mean,
            "scale": self.scale,
            "theta": self.theta,
            "calibration_losses": self.calibration_losses,
            "calibration_labels": self.calibration_labels,
            "added": self.added,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.version = int(state["version"])
        self.mean = np.array(state["mean"], dtype=np.float64)
        self.scale = np.array(state["scale"], dtype=np.float64)
        self.theta = np.array(state["theta"], dtype=np.float64).reshape(np.shape(state["theta"]))
        self.calibration_losses = np.array(state["calibration_losses"], dtype=np.float64)
        self.calibration_labels = np.array(state["calibration_labels"], dtype=np.int64)
        self.added = int(state.get("added", -1))  # absent from checkpoints before the refit fraction


def _nll(Z: np.ndarray, y: np.ndarray) -> np.ndarray:
    return label_loss(softmax(Z), y)

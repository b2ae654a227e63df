"""Cross-fitted copies of the routed head: held-out losses of the trusted points under the model
that routes — the calibration of the *routed-loss* evidence (``policy.self_loss_fdr``).

**Routed loss** ``ℓ_θ(z) = −log p_θ(y | φ(x))``: the cross-entropy of an event's label under the
routed head *before it learns the event*.  Like the reference loss it is ≥ 0 and *larger means
route away*; unlike it, it comes from a head that has learned the whole (filtered) stream, so on
small trusted sets it separates flipped labels far better than a head fitted on 20–50 points.

Its calibration must be scored the same way, by a head that never learned the point: the routed
head learned every trusted point in its warm start.  So ``folds`` *fold heads* are kept: fold head
``f`` makes the warm start on the trusted points outside fold ``f`` and then learns exactly what the
routed head learns (the accepted events, in the same steps: one batched product with the routed
and shadow heads, see :meth:`~stream_influence.core.learner.HeadLearner.learn`).  The held-out loss
of a trusted point of fold ``f`` is its loss under fold head ``f`` — a fresh clean event's loss
under the routed head has (nearly) the same law: fold heads saw a fraction ``1/folds`` fewer trusted
points, so their held-out losses are if anything larger, and the test more cautious.  Trusted points
added after the warm start were learned by no head: the routed head's own loss is held out for them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from stream_influence.core.learner import HeadLearner
from stream_influence.core.model import row_max
from stream_influence.core.settings import LearnerSettings

__all__ = ["CrossFitHeads"]


class CrossFitHeads:
    """``folds`` heads, each warm-started without one fold of the trusted points, then learning
    what the routed head learns; :meth:`held_out_losses` scores every trusted point with the head
    that never saw it."""

    def __init__(self, settings: LearnerSettings, folds: int, seed: int = 0) -> None:
        self.settings = settings
        self.folds = folds
        self.seed = seed
        self.heads: list[HeadLearner] = []
        # The calibration points: φ-features, class indices and fold (−1: learned by no head,
        # scored by the routed head itself).
        self.features = np.zeros((0, 0))
        self.labels = np.zeros(0, dtype=np.int64)
        self.fold = np.zeros(0, dtype=np.int64)
        # _layout's and fold_ordered_features' caches, with the arrays they were made from
        # (identity: every change installs new ones).
        self._sorted: (
            tuple[
                tuple[np.ndarray, ...], tuple[np.ndarray, list[tuple[int, int, int]], np.ndarray, np.ndarray]
            ]
            | None
        ) = None
        self._ordered: tuple[tuple[np.ndarray, ...], np.ndarray] | None = None

    @property
    def ready(self) -> bool:
        return len(self.heads) > 0 and len(self.labels) > 0

    def warm_start(
        self,
        routed: HeadLearner,
        F: np.ndarray,
        X: np.ndarray,
        y: np.ndarray,
        epochs: int,
        solve: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        """Build the fold heads (shape and step scale of ``routed`` before its warm start) and
        make each one's warm start on the trusted points outside its fold (``F`` φ-features,
        ``X`` their head inputs, ``y`` class indices)."""
        K, D = routed.theta.shape
        n = len(y)
        fold = np.empty(n, dtype=np.int64)
        # Balanced per class, so a 10-point class keeps points in every fold's training half.
        order = np.random.default_rng(self.seed + 7).permutation(n)
        order = order[np.argsort(y[order], kind="stable")]
        fold[order] = np.arange(n) % self.folds
        self.features, self.labels, self.fold = F.copy(), y.copy(), fold
        self.heads = []
        rng = np.random.default_rng(self.seed)
        for f in range(self.folds):
            head = HeadLearner(routed.settings, K, D)  # the same object: they learn in lockstep
            head.theta = routed.theta.copy()
            head.sq_norm, head.updates, head.trusted_updates = (
                routed.sq_norm,
                routed.updates,
                routed.trusted_updates,
            )
            keep = np.flatnonzero(fold != f)
            w = np.ones(len(keep))
            for _ in range(epochs):
                o = keep[rng.permutation(len(keep))]
                head.learn(X[o], y[o], w, solve, trusted=True)
            self.heads.append(head)

    def add(self, F: np.ndarray, y: np.ndarray) -> None:
        """Trusted points arriving after the warm start (no head learned them: fold −1)."""
        if not self.heads or len(y) == 0:
            return
        self.features = np.vstack([self.features, F]) if len(self.features) else F.copy()
        self.labels = np.concatenate([self.labels, y])
        self.fold = np.concatenate([self.fold, np.full(len(y), -1, dtype=np.int64)])

    def resize(self, n_classes: int) -> None:
        for head in self.heads:
            head.resize(n_classes)

    def alongside(
        self, X: np.ndarray, y: np.ndarray, w: np.ndarray
    ) -> list[tuple[HeadLearner, np.ndarray, np.ndarray, np.ndarray]]:
        """The fold heads' jobs for :meth:`HeadLearner.learn`: the routed head's rows, learned in
        the same steps (the same dynamics; about +15 % of the engine's time at d = 64, K = 10)."""
        return [(head, X, y, w) for head in self.heads]

    def held_out(
        self, X: np.ndarray, routed_theta: np.ndarray, *, fold_order: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Held-out routed losses ``−log p(y)`` and margins against the label ``log p(predicted)
        − log p(y) = max_k z_k − z_y`` (≥ 0; 0 when the head predicts the label;
        ``policy.contradiction_rate``) of the calibration points (head inputs ``X``, in the order
        of :attr:`features`), each under the head that never learned it.  Runs before every
        micro-batch, so the rows are taken once in fold order: each head's logits are one product
        on a contiguous block, and both quantities come from one log-sum-exp over all rows (row
        for row the operations of a per-fold loop).

        ``fold_order``: ``X`` are the inputs of :meth:`fold_ordered_features` and both results
        stay in that order (for a caller that only sorts them: no gather, no scatter back)."""
        order, blocks, labels, rows = self._layout()
        if not fold_order:
            X = X[order]
        Z = np.empty((len(X), routed_theta.shape[0]))
        for f, a, b in blocks:
            np.matmul(X[a:b], (routed_theta if f < 0 else self.heads[f].theta).T, out=Z[a:b])
        Z -= row_max(Z)[:, None]
        zy = Z[rows, labels]  # z_y − max_k z_k (≤ 0)
        losses = np.log(np.exp(Z).sum(axis=1)) - zy
        margins = 0.0 - zy  # exactly max_k z_k − z_y: IEEE negation is exact
        if fold_order:
            return losses, margins
        out_losses, out_margins = np.empty(len(order)), np.empty(len(order))
        out_losses[order], out_margins[order] = losses, margins
        return out_losses, out_margins

    def held_out_losses(self, X: np.ndarray, routed_theta: np.ndarray) -> np.ndarray:
        """The losses of :meth:`held_out`."""
        return self.held_out(X, routed_theta)[0]

    def held_out_margins(self, X: np.ndarray, routed_theta: np.ndarray) -> np.ndarray:
        """The margins of :meth:`held_out`."""
        return self.held_out(X, routed_theta)[1]

    def fold_ordered_features(self) -> np.ndarray:
        """:attr:`features` sorted by fold (the rows :meth:`held_out` reads with ``fold_order``),
        made again only when the folds change."""
        key = (self.fold, self.features)
        if self._ordered is None or any(a is not b for a, b in zip(self._ordered[0], key, strict=True)):
            self._ordered = (key, self.features[self._layout()[0]])
        return self._ordered[1]

    def _layout(self) -> tuple[np.ndarray, list[tuple[int, int, int]], np.ndarray, np.ndarray]:
        """The points' order sorted by fold (stable), each fold's ``(fold, start, stop)`` block in
        it, the labels in that order and the row numbers; made again only when the folds change."""
        key = (self.fold, self.labels)
        if self._sorted is None or any(a is not b for a, b in zip(self._sorted[0], key, strict=True)):
            order = np.argsort(self.fold, kind="stable")
            folds, starts, counts = np.unique(self.fold[order], return_index=True, return_counts=True)
            blocks = [(int(f), int(a), int(a + c)) for f, a, c in zip(folds, starts, counts, strict=True)]
            self._sorted = (key, (order, blocks, self.labels[order], np.arange(len(order))))
        return self._sorted[1]

    def state_dict(self) -> dict[str, Any]:
        return {
            "features": self.features,
            "labels": self.labels,
            "fold": self.fold,
            **{f"head{f}": h.state_dict() for f, h in enumerate(self.heads)},
        }

    def load_state_dict(self, state: dict[str, Any], n_classes: int, dim: int) -> None:
        self.features = np.array(state["features"], dtype=np.float64).reshape(np.shape(state["features"]))
        self.labels = np.array(state["labels"], dtype=np.int64)
        self.fold = np.array(state["fold"], dtype=np.int64)
        self.heads = []
        for f in range(self.folds):
            if f"head{f}" not in state:
                break
            head = HeadLearner(self.settings, n_classes, dim)
            head.load_state_dict(state[f"head{f}"])
            self.heads.append(head)

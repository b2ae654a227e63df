"""A curvature estimator as a stream leaves it at a fixed head: the same points arriving again.

The at-optimum builders (:data:`stream_influence.offline.audit.CURVATURE_AT_OPTIMUM`) set an
estimator's state from all points at once.  That is what a stream leaves behind for every
estimator whose state is a running mean, but not for one with ``refine`` on, whose reference
direction is corrected a step per micro-batch against the exact Hessian and so depends on how many
batches it has seen.  :func:`settle_on_stream` feeds the points through the estimator the way the engine
does — the direction refreshed before every micro-batch, the batch then added — so fidelity
checks measure what the engine would serve.
"""

from __future__ import annotations

import numpy as np

from stream_influence.core.curvature import Curvature, make_curvature
from stream_influence.core.settings import CurvatureSettings

__all__ = ["settle_on_stream"]


def settle_on_stream(
    settings: CurvatureSettings,
    X: np.ndarray,
    P: np.ndarray,
    grad: np.ndarray,
    *,
    passes: int,
    batch: int = 512,
    seed: int = 0,
) -> Curvature:
    """The estimator ``settings`` describes after ``passes`` shuffled passes over the points.

    ``X`` are augmented inputs (``n × D``), ``P`` their probabilities under a fixed head
    (``n × K``), ``grad`` the reference gradient (``K × D``) whose direction
    ``H⁻¹∇L_R`` is refreshed before every micro-batch of ``batch`` points.  With
    ``settings.forgetting = 1`` and whole passes the running Hessian ends as the points' mean
    Hessian, the same as the at-optimum builders hold.
    """
    est = make_curvature(settings, P.shape[1], X.shape[1])
    rng = np.random.default_rng(seed)
    for _ in range(passes):
        order = rng.permutation(len(X))
        for start in range(0, len(X), batch):
            rows = order[start : start + batch]
            est.direction(grad)
            est.update(X[rows], P[rows])
    return est

"""Compiled (numba) loops of the hot path; each has a numpy reference it must match.

:func:`sgd_steps` is ``learner.kernel: compiled``: the sgd steps of :func:`~stream_influence.core.
learner._lockstep` (the numpy reference, ``learner.kernel: numpy``) as one compiled loop that reads
each learner's rows and weights in place, instead of ~10 numpy calls per step on a padded copy.
It computes the same quantities in the same order of steps; only the sums inside a step (the logits
``x̃ θᵀ``, the softmax normaliser, the gradient ``Σ (p − y) x̃ᵀ``) may round differently in the last
bits, because the compiler vectorises them.

Fastmath flags: ``reassoc`` (vectorised sums), ``contract`` (fused multiply-add), ``nsz`` and
``arcp`` — but not ``nnan``/``ninf`` (which ``fastmath=True`` implies): those would let the
compiler assume no inf/nan, so an overflowing logit or a nan feature could silently give a finite,
wrong step instead of the nan/inf the numpy reference produces.  The softmax keeps its max shift.

Compiled on first use (this module is imported lazily by the learner) with ``cache=True``: later
processes load the machine code from numba's cache (``__pycache__`` beside this file, else
``NUMBA_CACHE_DIR`` or the user cache directory).  Where no cache location is writable (a
read-only install without a home directory) the kernel is compiled in each process instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba
import numpy as np

__all__ = ["FASTMATH", "sgd_steps"]

FASTMATH = frozenset({"reassoc", "contract", "nsz", "arcp"})

# One explicit signature: every call hits the same (cached) specialisation; the caller passes
# C-contiguous float64 rows and int64 labels.
_SGD_SIGNATURE = numba.void(
    numba.float64[:, :, ::1],  # theta (L, K, D), updated in place
    numba.float64[:, ::1],  # X (N, D): every learner's rows, learner i at start[i]:start[i] + n[i]
    numba.int64[::1],  # y (N,)
    numba.float64[::1],  # w (N,)
    numba.int64[::1],  # start (L,)
    numba.int64[::1],  # n (L,)
    numba.float64[::1],  # eta (L,): step size
    numba.float64[::1],  # keep (L,): the l2 decay 1 − η l2 of the weights
    numba.int64,  # mb: rows per step
)


def _sgd_steps(
    theta: np.ndarray,
    X: np.ndarray,
    y: np.ndarray,
    w: np.ndarray,
    start: np.ndarray,
    n: np.ndarray,
    eta: np.ndarray,
    keep: np.ndarray,
    mb: int,
) -> None:
    """For each learner ``i``, steps of ``mb`` rows: ``θ_w ← θ_w keep − G_w``, ``θ_b ← θ_b − G_b``
    with ``G = Σᵣ (softmax(x̃ᵣ θᵀ) − onehot(yᵣ)) (x̃ᵣ wᵣ η / rows)ᵀ`` over the step's rows — the
    weighted mean cross-entropy gradient times the step size (the numpy reference's arithmetic)."""
    L, K, D = theta.shape
    z = np.empty(K)
    G = np.empty((K, D))
    xs = np.empty(D)
    for i in range(L):
        th = theta[i]
        first = start[i]
        for lo in range(0, n[i], mb):
            rows = min(mb, n[i] - lo)
            per_row = eta[i] / rows
            G[:] = 0.0
            for r in range(first + lo, first + lo + rows):
                m = -np.inf
                for k in range(K):
                    s = 0.0
                    for d in range(D):
                        s += X[r, d] * th[k, d]
                    z[k] = s
                    m = max(m, s)
                total = 0.0
                for k in range(K):
                    z[k] = np.exp(z[k] - m)
                    total += z[k]
                scale = w[r] * per_row
                for d in range(D):
                    xs[d] = X[r, d] * scale
                label = y[r]
                for k in range(K):
                    c = z[k] / total - (1.0 if k == label else 0.0)
                    for d in range(D):
                        G[k, d] += c * xs[d]
            for k in range(K):
                for d in range(D - 1):
                    th[k, d] = th[k, d] * keep[i] - G[k, d]
                th[k, D - 1] -= G[k, D - 1]


def _compile(fn: Callable[..., None], signature: Any) -> Any:
    try:
        return numba.njit(signature, cache=True, nogil=True, fastmath=set(FASTMATH))(fn)
    except RuntimeError:
        # numba found no writable cache location ("no locator available"): compile uncached.
        return numba.njit(signature, cache=False, nogil=True, fastmath=set(FASTMATH))(fn)


sgd_steps = _compile(_sgd_steps, _SGD_SIGNATURE)

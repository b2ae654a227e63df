"""Compiled (numba) loops of the hot path; each has a numpy reference it must match.

:func:`sgd_steps` is ``learner.kernel: compiled``: the sgd steps of :func:`~stream_influence.core.
learner._lockstep` (the numpy reference, ``learner.kernel: numpy``) as one compiled loop that reads
each learner's rows and weights in place, instead of ~10 numpy calls per step on a padded copy.
It computes the same quantities in the same order of steps; only the arithmetic inside a step may
round differently in the last bits: the sums (the logits ``x̃ θᵀ``, the softmax normaliser, the
gradient ``Σ (p − y) x̃ᵀ``), because the compiler vectorises them; a product and the sum or
difference it feeds (fused into one multiply-add, ``contract``: the gradient's terms, the update
``θ keep − G``); a division (by a reciprocal, ``arcp``: ``p = e / Σe``, ``η / rows``); and the
softmax's ``exp`` (an inlined polynomial, :func:`exp_nonpositive`, within about one ulp of
``np.exp``).

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

__all__ = ["FASTMATH", "exp_nonpositive", "sgd_steps"]

FASTMATH = frozenset({"reassoc", "contract", "nsz", "arcp"})

# exp by Cody–Waite reduction x = n ln2 + r, |r| ≤ ln2/2, and Taylor to r¹³ (truncation < 1e-17):
# an inlined polynomial instead of a libm call per logit (a third of the kernel's time).
_LN2_HI = 6.93147180369123816490e-01  # ln 2 to 32 bits: n · _LN2_HI is exact for |n| < 2²¹
_LN2_LO = 1.90821492927058770002e-10
_INV_LN2 = 1.44269504088896338700e00
_POW2_NEG = np.array([2.0**-i for i in range(1023)])  # 2⁻ⁱ, normal down to 2⁻¹⁰²²

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


def _exp_nonpositive(x: float) -> float:
    """``exp(x)`` for ``x ≤ 0`` (the max-shifted logits of a softmax) within about one ulp of
    ``np.exp``; ``nan`` for ``nan``, 0 below −708 (where ``exp`` is < 4e-308, next to a sum ≥ 1)."""
    if x != x:
        return x
    if x < -708.0:
        return 0.0
    n = np.floor(x * _INV_LN2 + 0.5)
    r = (x - n * _LN2_HI) - n * _LN2_LO
    p = 1.0 / 6227020800.0
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    return p * _POW2_NEG[int(-n)]


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
                    z[k] = exp_nonpositive(z[k] - m)
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


def _compile(fn: Callable[..., Any], signature: Any, fastmath: frozenset[str] = FASTMATH) -> Any:
    try:
        return numba.njit(signature, cache=True, nogil=True, fastmath=set(fastmath))(fn)
    except RuntimeError:
        # numba found no writable cache location ("no locator available"): compile uncached.
        return numba.njit(signature, cache=False, nogil=True, fastmath=set(fastmath))(fn)


# Fused multiply-adds only: reassociation could merge the two-part reduction and lose its accuracy.
exp_nonpositive = _compile(_exp_nonpositive, numba.float64(numba.float64), frozenset({"contract"}))
sgd_steps = _compile(_sgd_steps, _SGD_SIGNATURE)

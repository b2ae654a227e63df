"""The one ring buffer of the package: a fixed number of rows, the newest kept.

Used for the trusted reference set (:class:`~stream_influence.core.influence.ReferenceBuffer`),
the policy's rolling windows (:class:`~stream_influence.core.policy.RoutingPolicy`) and the
learners' rolling prequential metrics (:class:`~stream_influence.core.learner.Prequential`).

>>> r = Ring(3)
>>> r.push(np.array([1.0, 2.0])); r.push(np.array([3.0, 4.0]))
>>> r.values().tolist(), r.ordered().tolist(), r.newest(2).tolist(), r.oldest(1).tolist()
([4.0, 2.0, 3.0], [2.0, 3.0, 4.0], [4.0, 3.0], [2.0])
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["Ring"]


class Ring:
    """``capacity`` rows of ``dtype`` (scalars, or vectors whose width the first push sets).

    ``pos`` is where the next row goes; once the ring is full the oldest row sits at ``pos``.
    A push longer than the ring keeps its newest ``capacity`` rows.
    """

    def __init__(self, capacity: int, dtype: Any = np.float64, *, vectors: bool = False) -> None:
        self.capacity = capacity
        self.dtype = np.dtype(dtype)
        # Vectors are allocated on the first push (their width is not known before).
        self.data: np.ndarray | None = None if vectors else np.zeros(capacity, dtype=self.dtype)
        self.size = 0
        self.pos = 0

    @property
    def full(self) -> bool:
        return self.size == self.capacity

    def push(self, x: np.ndarray, *, aligned: bool = False) -> None:
        """Append rows.  A push longer than the ring keeps its newest ``capacity`` rows, written
        from ``pos`` — or, ``aligned``, where they would have landed row by row, so that a row's
        position stays (rows ever pushed) mod capacity (the prequential window's layout)."""
        n, cap = len(x), self.capacity
        if n == 0:
            return
        if self.data is None:
            self.data = np.zeros((cap, *x.shape[1:]), dtype=self.dtype)
        start = self.pos
        if n > cap:
            if aligned:
                start = (self.pos + n - cap) % cap
            x, n = x[-cap:], cap
        if start + n <= cap:  # no wrap: a slice, not an index array
            self.data[start : start + n] = x
        else:  # two slices
            head = cap - start
            self.data[start:] = x[:head]
            self.data[: n - head] = x[head:]
        self.pos = (start + n) % cap
        self.size = min(cap, self.size + n)

    def values(self) -> np.ndarray:
        """The rows held, in storage order (order-free statistics need no copy)."""
        assert self.data is not None
        return self.data[: self.size] if self.size < self.capacity else self.data

    def order(self) -> np.ndarray:
        """Storage indices of the rows held, oldest first."""
        if self.size < self.capacity:
            return np.arange(self.size)
        return (self.pos + np.arange(self.size)) % self.capacity

    def ordered(self) -> np.ndarray:
        """The rows held, oldest first."""
        assert self.data is not None
        return self.data[self.order()]

    def newest(self, k: int) -> np.ndarray:
        """The ``k`` newest rows (at most :attr:`size`), newest first."""
        assert self.data is not None
        k = min(k, self.size)
        return self.data[(self.pos - 1 - np.arange(k)) % self.capacity]

    def oldest(self, k: int) -> np.ndarray:
        """The rows the next ``k`` pushes would evict, oldest first."""
        assert self.data is not None
        k = max(0, min(k, self.size + k - self.capacity, self.size))
        if self.size < self.capacity:
            return self.data[:k]
        if self.pos + k <= self.capacity:  # no wrap: a slice, not an index array
            return self.data[self.pos : self.pos + k]
        return self.data[(self.pos + np.arange(k)) % self.capacity]

    def restore(self, data: np.ndarray | None, size: int, pos: int) -> None:
        """Install a saved layout (same capacity)."""
        self.data = None if data is None else np.array(data, dtype=self.dtype)
        self.size, self.pos = int(size), int(pos)

    def state(self, prefix: str) -> dict[str, Any]:
        return {f"{prefix}_data": self.data, f"{prefix}_n": self.size, f"{prefix}_pos": self.pos}

    def load(self, state: dict[str, Any], prefix: str) -> None:
        """Restore from :meth:`state`; a ring saved with another capacity starts afresh."""
        data = np.asarray(state[f"{prefix}_data"])
        if len(data) == self.capacity:
            self.restore(data, state[f"{prefix}_n"], state[f"{prefix}_pos"])

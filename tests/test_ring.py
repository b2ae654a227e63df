"""The one ring buffer (core/ring.py) against a plain list that keeps the newest items."""

from __future__ import annotations

import numpy as np
import pytest

from stream_influence.core.ring import Ring


@pytest.mark.parametrize("aligned", [False, True])
def test_ring_keeps_the_newest_rows_in_order(aligned: bool) -> None:
    rng = np.random.default_rng(0)
    ring, kept, pushed = Ring(7), [], 0
    for n in rng.integers(0, 12, 40).tolist():  # pushes shorter and longer than the ring
        x = np.arange(pushed, pushed + n, dtype=np.float64)
        evicted = ring.oldest(n).tolist() if ring.size else []
        ring.push(x, aligned=aligned)
        pushed += n
        kept = (kept + x.tolist())[-7:]
        assert ring.ordered().tolist() == kept
        assert ring.newest(3).tolist() == kept[::-1][:3]
        assert sorted(ring.values().tolist()) == sorted(kept)
        assert set(evicted).isdisjoint(kept)
        if aligned:  # a row sits at (rows ever pushed) mod capacity, the prequential layout
            assert all(ring.data[int(v) % 7] == v for v in kept)  # type: ignore[index]


def test_vector_rows_and_state_round_trip() -> None:
    ring = Ring(3, vectors=True)
    assert ring.data is None
    ring.push(np.arange(8.0).reshape(4, 2))
    assert ring.ordered().tolist() == [[2.0, 3.0], [4.0, 5.0], [6.0, 7.0]]
    other = Ring(3, vectors=True)
    other.load(ring.state("x"), "x")
    assert other.ordered().tolist() == ring.ordered().tolist() and other.pos == ring.pos
    smaller = Ring(2, vectors=True)
    smaller.load(ring.state("x"), "x")  # another capacity starts afresh
    assert smaller.size == 0

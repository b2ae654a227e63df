"""The offset-aligned chunker is a pure function, and a replay with the remembered cuts batches
a window exactly as the first try did."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from stream_influence.service.chunker import Chunk, plan_chunks


def _ranges(offsets: list[int], chunks: list[Chunk]) -> list[tuple[int, int]]:
    return [(offsets[c.start], offsets[c.stop - 1] + 1) for c in chunks]


# (offsets, B, cuts, position, highwater) → the offset ranges of the ready chunks
TABLE = [
    # whole slots are ready without looking at the fetch state
    (list(range(0, 16)), 8, (), None, 100, [(0, 8), (8, 16)]),
    # a partial tail waits while the partition is behind ...
    (list(range(0, 11)), 8, (), 11, 20, [(0, 8)]),
    # ... and is processed once caught up (position at the high watermark)
    (list(range(0, 11)), 8, (), 11, 11, [(0, 8), (8, 11)]),
    # unknown high watermark: nothing to wait for
    (list(range(0, 11)), 8, (), None, None, [(0, 8), (8, 11)]),
    # a remembered cut ends a chunk early, as in the first try
    (list(range(0, 16)), 8, (5, 11), None, 100, [(0, 5), (5, 8), (8, 11), (11, 16)]),
    # a gap (transaction marker) at the slot's end: the position, not the last record, decides
    ([0, 1, 2, 3, 4, 5, 6], 8, (), 8, 9, [(0, 7)]),
    ([0, 1, 2, 3, 4, 5, 6], 8, (), 7, 9, []),
    # a buffer starting mid-slot (resumed at a committed offset)
    (list(range(13, 20)), 8, (), 20, 20, [(13, 16), (16, 20)]),
    ([], 8, (), None, None, []),
]


def test_table() -> None:
    for offsets, b, cuts, pos, hw, want in TABLE:
        assert _ranges(offsets, plan_chunks(offsets, b, cuts, pos, hw)) == want, (offsets, b, cuts, pos, hw)


def test_short_marks_a_chunk_that_ends_before_its_slot() -> None:
    chunks = plan_chunks(list(range(0, 11)), 8, (), 11, 11)
    assert [c.short for c in chunks] == [False, True] and chunks[1].end == 16


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[int], int, list[int]]:
    """Ascending offsets with gaps, a batch size, and the sizes of the pieces they arrive in."""
    steps = draw(st.lists(st.integers(1, 3), min_size=1, max_size=120))
    start = draw(st.integers(0, 50))
    offsets = [start + sum(steps[:i]) for i in range(len(steps))]
    pieces = draw(st.lists(st.integers(1, 30), min_size=1, max_size=20))
    return offsets, draw(st.integers(1, 16)), pieces


@settings(max_examples=300, deadline=None)
@given(streams(), st.integers(0, 5))
def test_same_input_same_chunks(stream: tuple[list[int], int, list[int]], extra: int) -> None:
    offsets, b, _ = stream
    cuts = {offsets[0] + 3, offsets[-1]}
    hw = offsets[-1] + 1 + extra
    first = plan_chunks(offsets, b, cuts, hw, hw)
    assert plan_chunks(list(offsets), b, set(cuts), hw, hw) == first  # a pure function of its input
    assert plan_chunks(offsets, b, cuts, hw, hw) == first
    assert _ranges(offsets, first)[-1][1] == offsets[-1] + 1  # caught up: every record is chunked
    for (lo, hi), c in zip(_ranges(offsets, first), first, strict=True):
        assert lo // b == (hi - 1) // b, "a chunk never spans two slots"
        assert hi <= c.end


@settings(max_examples=300, deadline=None)
@given(streams())
def test_a_replay_with_the_remembered_cuts_batches_as_the_first_try(
    stream: tuple[list[int], int, list[int]],
) -> None:
    """First try: records arrive piece by piece, the partition caught up after each (the tail is
    processed, its cut remembered).  Replay: the whole window at once, with those cuts."""
    offsets, b, pieces = stream
    done: list[tuple[int, int]] = []
    cuts: set[int] = set()
    buf: list[int] = []
    i = 0
    for size in [*pieces, len(offsets)]:
        if i >= len(offsets):
            break
        buf.extend(offsets[i : i + size])
        i += size
        hw = buf[-1] + 1
        chunks = plan_chunks(buf, b, cuts, hw, hw)
        for c in chunks:
            if c.short:
                cuts.add(buf[c.stop - 1] + 1)
        done.extend(_ranges(buf, chunks))
        buf = buf[chunks[-1].stop :] if chunks else buf
    assert not buf
    hw = offsets[-1] + 1
    assert _ranges(offsets, plan_chunks(offsets, b, cuts, hw, hw)) == done

"""Offset-aligned chunking: which buffered records of one partition form the next chunks.

A pure function of its inputs (no clock, no broker, no state): the same buffered offsets, batch
size, remembered cuts and fetch state give the same chunks, so a replay of a window batches its
events as the first try did (docs/architecture.md, "Why offset-aligned chunks").
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Collection, Sequence
from dataclasses import dataclass

__all__ = ["Chunk", "plan_chunks"]


@dataclass(frozen=True, slots=True)
class Chunk:
    """Records ``[start, stop)`` of the buffer (indices, not offsets) form one chunk."""

    start: int
    stop: int
    #: The first offset of the next chunk slot: ``(first // B + 1) * B`` or an earlier remembered cut.
    end: int
    #: True when the chunk stops before ``end`` because the partition was caught up: its end is
    #: a cut to remember, so that a replay of the window cuts there again.
    short: bool


def plan_chunks(
    offsets: Sequence[int],
    batch_size: int,
    cuts: Collection[int] = (),
    position: int | None = None,
    highwater: int | None = None,
) -> list[Chunk]:
    """The ready chunks of a partition whose buffered records have ``offsets`` (ascending).

    A chunk covers the offsets of one slot ``[s·B, (s+1)·B)`` (``B = batch_size``), ended early at
    a remembered cut.  It is ready when a record at or past its end is buffered, its last offset
    is the slot's last, or the partition is caught up: the consumer's ``position`` (at least one
    past the last buffered record; an offset may hold no record) has reached the slot's end or
    the ``highwater`` — or the high watermark is unknown.  Chunks come in offset order; planning
    stops at the first chunk that is not ready.
    """
    chunks: list[Chunk] = []
    n = len(offsets)
    i = 0
    while i < n:
        first = offsets[i]
        end = (first // batch_size + 1) * batch_size
        for c in cuts:
            if first < c < end:
                end = c
        k = bisect_left(offsets, end, i)  # the first record at or past the slot's end
        ready = k < n or offsets[k - 1] == end - 1
        if not ready:
            pos = offsets[-1] + 1 if position is None else max(position, offsets[-1] + 1)
            ready = highwater is None or pos >= end or pos >= highwater
        if not ready:
            break
        chunks.append(Chunk(i, k, end, offsets[k - 1] + 1 < end))
        i = k
    return chunks

"""The one JSON Lines reader: raw lines of an event file, without their line terminator.

One rule for blank lines, chosen by the caller and stated here: by default a blank line is kept
as ``b""`` — it is an input line, and offline replay and ``score`` give every input line exactly
one decision (an empty one is dead-lettered ``empty``), so line numbers and ``wc -l`` agree.
``skip_blank`` drops blank (or whitespace-only) lines instead, for ``produce``: a blank line is
not an event, and there is no decision to keep aligned with it.

Lines are read lazily (memory bounded by one batch).  ``"-"`` reads standard input.

>>> import tempfile, pathlib
>>> p = pathlib.Path(tempfile.mkdtemp()) / "ev.jsonl"
>>> _ = p.write_bytes(b'{"id": "a"}\\r\\n\\n  \\n{"id": "b"}')
>>> list(iter_lines(p)), list(iter_lines(p, skip_blank=True))
([b'{"id": "a"}', b'', b'  ', b'{"id": "b"}'], [b'{"id": "a"}', b'{"id": "b"}'])
>>> [(lines, pos) for lines, pos in iter_batches(p, 3)]
[([b'{"id": "a"}', b'', b'  '], 17), ([b'{"id": "b"}'], 28)]
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

__all__ = ["iter_batches", "iter_lines"]


def _raw_lines(path: Path | str) -> Iterator[bytes]:
    """Every line with its terminator (``"-"``: standard input)."""
    if str(path) == "-":
        yield from sys.stdin.buffer
        return
    with open(path, "rb") as f:
        yield from f


def iter_batches(
    path: Path | str, batch_size: int, *, skip_blank: bool = False
) -> Iterator[tuple[list[bytes], int]]:
    """``(lines, bytes_read_so_far)`` in batches of at most ``batch_size`` lines."""
    batch: list[bytes] = []
    pos = 0
    for line in _raw_lines(path):
        pos += len(line)
        line = line.rstrip(b"\r\n")
        if skip_blank and not line.strip():
            continue
        batch.append(line)
        if len(batch) >= batch_size:
            yield batch, pos
            batch = []
    if batch:
        yield batch, pos


def iter_lines(path: Path | str, *, skip_blank: bool = False) -> Iterator[bytes]:
    """The lines one by one (see the module docstring for blank lines)."""
    for lines, _ in iter_batches(path, 4096, skip_blank=skip_blank):
        yield from lines

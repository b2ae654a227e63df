"""Column-wise output headers: score headers are written as ``repr`` writes each float64, whoever
formats the column, and the size bound a chunk is checked with holds for each of its records.

``records._nums`` formats a column with orjson where orjson writes what ``repr`` writes, and with
``repr`` elsewhere; here both are compared on a million values of every magnitude, the boundaries
of the ranges and the special values (so an orjson release that writes floats another way fails
this test rather than change the bytes of the quarantine headers)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from stream_influence.io.broker import OutputRecord
from stream_influence.io.records import ChunkHeaders, _nums, fit_record, fit_records, header_dict, record_size


def _repr_column(values: list[float | None]) -> list[bytes]:
    return [b"nan" if v is None or math.isnan(v) else repr(float(v)).encode() for v in values]


def test_every_magnitude_is_written_as_repr_writes_it() -> None:
    rng = np.random.default_rng(20261130)
    n = 250_000
    exponents = rng.uniform(-330, 309, n)
    mantissas = rng.uniform(1, 10, n) * rng.choice([-1.0, 1.0], n)
    with np.errstate(all="ignore"):
        log_uniform = mantissas * 10.0**exponents
        bits = rng.integers(0, 2**63, n, dtype=np.int64).view(np.float64) * rng.choice([-1.0, 1.0], n)
    ranges = np.concatenate(
        [
            rng.normal(0, s, n // 10)
            for s in (1e-6, 1e-5, 3e-5, 1e-4, 1e-3, 1e-1, 1.0, 1e3, 1e8, 1e15, 1e16, 1e17)
        ]
    )
    edges = []
    for edge in (1e-4, 1e-5, 1e16, 1e15, 1.0, 0.0, 5e-324, 2.2250738585072014e-308, 1.7976931348623157e308):
        x = np.float64(edge)
        for _ in range(4):
            edges += [x, -x]
            with np.errstate(all="ignore"):
                x = np.nextafter(x, np.inf)
        x = np.float64(edge)
        for _ in range(4):
            x = np.nextafter(x, -np.inf)
            edges += [x, -x]
    special = [0.0, -0.0, np.nan, -np.nan, np.inf, -np.inf, 1.0, 100.0, 1 / 3, 0.1, 9999999999999998.0]
    column = np.concatenate([log_uniform, bits, ranges, np.array(edges), np.array(special)])
    assert _nums(column) == _repr_column(column.tolist())


def test_columns_of_every_input_type() -> None:
    assert _nums([]) == []
    assert _nums(np.zeros(0)) == []
    assert _nums([None, 1.5, float("nan")]) == [b"nan", b"1.5", b"nan"]
    assert _nums(np.array([1e-05, 2.5e-06], dtype=np.float32)) == _repr_column(
        np.array([1e-05, 2.5e-06], dtype=np.float32).astype(np.float64).tolist()
    )
    strided = np.arange(12, dtype=np.float64).reshape(3, 4)[:, 1] / 7  # not contiguous
    assert _nums(strided) == _repr_column(strided.tolist())


def test_the_quarantine_bound_holds_for_every_message_of_a_chunk() -> None:
    rng = np.random.default_rng(7)
    n = 300
    originals: list[Any] = [
        None,
        (),
        [("trace", b"x" * 40)],
        [("ünï", "é".encode() * 30), ("reason", b"theirs"), ("nil", None)],
        [(f"h{i}", b"v" * i) for i in range(25)],
    ]
    originals = [originals[i % len(originals)] for i in range(n)]
    reasons = [["influence", "reference_loss", "self_loss"][i % 3] for i in range(n)]
    offsets = rng.integers(0, 2**63 - 1, n).tolist()
    extremes = np.array([-2.2250738585072014e-308, -1.7976931348623157e308, np.nan, -np.inf, 5e-324])
    cols = [
        np.concatenate(
            [extremes, rng.normal(size=n - len(extremes)) * 10.0 ** rng.integers(-300, 300, n - 5)]
        )
        for _ in range(4)
    ]
    h = ChunkHeaders("a-source-topic", 2_147_483_647, 123456789, 987654321)
    headers = h.quarantine_many(
        originals,
        offsets,
        reasons=reasons,
        influence=cols[0],
        relative_influence=cols[1],
        cosine_influence=cols[2],
        threshold=cols[3],
    )
    chars, count = h.quarantine_bound(originals, reasons)
    for hs in headers:
        assert sum(len(name) + len(v or b"") for name, v in hs) <= chars
        assert len(hs) <= count
    assert max(len(hs) for hs in headers) == count  # tight in the count


def test_a_chunk_with_a_value_too_large_is_cut_record_by_record() -> None:
    h = ChunkHeaders("events", 0, 1, 2)
    headers = h.quarantine_many(
        [None] * 3,
        [1, 2, 3],
        reasons=["influence"] * 3,
        influence=[0.5] * 3,
        relative_influence=[0.5] * 3,
        cosine_influence=[0.5] * 3,
        threshold=[0.0] * 3,
    )
    bound = h.quarantine_bound([None] * 3, ["influence"] * 3)
    recs = [
        OutputRecord("q", b"k%d" % i, b"v" * size, hs)
        for i, (size, hs) in enumerate(zip((10, 5000, 10), headers, strict=True))
    ]
    assert fit_records([recs[0], recs[2]], 2000, bound)
    assert not fit_records(recs, 2000, bound)
    assert not fit_records(recs, 2000)  # the bound of all the chunk's headers, summed
    cut = fit_record(recs[1], 2000)
    assert record_size(cut.key, cut.value, cut.headers) <= 2000 and "original_sha256" in header_dict(
        cut.headers
    )

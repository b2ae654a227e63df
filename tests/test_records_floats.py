"""Score headers are written as ``repr`` writes each float64, whoever formats the column.

``records._nums`` formats a column with orjson where orjson writes what ``repr`` writes, and with
``repr`` elsewhere; here both are compared on a million values of every magnitude, the boundaries
of the ranges and the special values (so an orjson release that writes floats another way fails
this test rather than change the bytes of the quarantine headers)."""

from __future__ import annotations

import math

import numpy as np

from stream_influence.io.records import _nums


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

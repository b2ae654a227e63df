"""The service limits BLAS threads at start-up (``blas_threads``), and routing does not depend on it.

With the libraries' default (one thread per core) the engine's small per-batch products spent
5-7× the CPU per event on a 2-core machine (docs/benchmarks.md, section ``service``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from stream_influence.config import AppSettings
from stream_influence.core.engine import InfluenceEngine
from stream_influence.service.loop import Service
from tests.fixtures.service_events import events

D, K = 16, 4


class _Started(Exception):
    """Raised by the broker's first call: run() got past its start-up settings."""


class _RefusingBroker:
    def check(self) -> None:
        raise _Started


def _blas_threads() -> set[int]:
    return {int(i["num_threads"]) for i in threadpool_info() if i["user_api"] == "blas"}


def _start(tmp_path: Path, **settings: object) -> None:
    cfg = AppSettings(checkpoint={"directory": str(tmp_path / "ck")}, metrics={"enabled": False}, **settings)
    with pytest.raises(_Started):
        Service(cfg, install_signals=False, broker=_RefusingBroker()).run()  # type: ignore[arg-type]


@pytest.mark.parametrize(("setting", "expected"), [(None, {1}), (1, {1}), (0, {2})])
def test_run_sets_the_configured_blas_threads(
    tmp_path: Path, setting: int | None, expected: set[int]
) -> None:
    """The default (None: not configured) is one thread; 0 leaves the libraries alone."""
    if not _blas_threads():
        pytest.skip("no BLAS library loaded")
    with threadpool_limits(limits=2, user_api="blas"):  # restored on exit
        if _blas_threads() != {2}:
            pytest.skip("BLAS cannot run 2 threads here")
        _start(tmp_path, **({} if setting is None else {"blas_threads": setting}))
        assert _blas_threads() == expected


def test_routing_and_scores_do_not_depend_on_blas_threads() -> None:
    refs = events(200, d=D, k=K, seed=1, prefix="ref")[0]
    raws = events(3_000, d=D, k=K, noise=0.3, seed=2)[0]
    settings = AppSettings(engine={"schema": {"classes": list(range(K)), "n_features": D}}).engine

    def run(threads: int) -> tuple[list[bool], np.ndarray, np.ndarray]:
        with threadpool_limits(limits=threads, user_api="blas"):
            engine = InfluenceEngine(settings)
            engine.add_reference(refs)
            quarantined: list[bool] = []
            scores: list[np.ndarray] = []
            for i in range(0, len(raws), 512):
                result = engine.process(raws[i : i + 512])
                quarantined += result.quarantine.tolist()
                scores.append(result.scores.relative_influence)
            assert engine.routed is not None
            return quarantined, np.concatenate(scores), engine.routed.theta.copy()

    one, many = run(1), run(4)
    assert one[0] == many[0]
    assert any(one[0])  # routing was live, not warm-up
    np.testing.assert_allclose(one[1], many[1], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(one[2], many[2], rtol=1e-9, atol=1e-12)

"""Real engine batches for the metrics tests: a noisy stream through a real InfluenceEngine."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from stream_influence.core.engine import BatchResult, EngineSummary, InfluenceEngine
from stream_influence.core.settings import EngineSettings, PolicySettings
from stream_influence.observability.metrics import ServiceMetrics

# Malformed messages of several kinds, so dead letters carry several reasons.
BAD = [b"not json", b"", b'{"id": "x", "features": [1, 2], "label": 0}', b"[1, 2]", b'{"id": "y"}']


def _event(rng: np.random.Generator, i: int, noise: float, d: int = 6) -> bytes:
    x = rng.normal(size=d)
    y = int(x[0] + 0.5 * x[1] > 0)
    if rng.random() < noise:
        y = 1 - y
    return json.dumps({"id": f"e{i}", "features": x.round(6).tolist(), "label": y}).encode()


@dataclass
class Stream:
    engine: InfluenceEngine
    results: list[BatchResult] = field(default_factory=list)
    summaries: list[EngineSummary] = field(default_factory=list)

    def totals(self) -> dict[str, int]:
        out = {"accepted": 0, "quarantined": 0, "dead_lettered": 0}
        for r in self.results:
            for k, v in r.counts().items():
                out[k] += v
        return out

    def by_reason(self) -> dict[tuple[str, str], int]:
        names = {"accept": "accepted", "quarantine": "quarantined", "dead_letter": "dead_lettered"}
        out: dict[tuple[str, str], int] = {}
        for r in self.results:
            for rec in r.records():
                key = (names[rec["decision"]], rec["reason"])
                out[key] = out.get(key, 0) + 1
        return out


def run_stream(
    metrics: ServiceMetrics | None = None,
    *,
    batches: int = 12,
    batch_size: int = 100,
    noise: float = 0.3,
    seed: int = 0,
    on_batch: Callable[[int, BatchResult], None] | None = None,
) -> Stream:
    """Process a noisy stream batch by batch, feeding ``metrics`` like the service does."""
    rng = np.random.default_rng(seed)
    # A fixed threshold on a histogram bucket bound, so a test can read "nothing quarantined at or
    # below it" straight off the buckets (the calibrated default sets per-class thresholds).
    policy = PolicySettings(mode="absolute", quarantine_threshold=0.02)
    engine = InfluenceEngine(EngineSettings(policy=policy))
    engine.add_reference([_event(rng, -i - 1, 0.0) for i in range(300)])
    stream = Stream(engine)
    n = 0
    for b in range(batches):
        raws = [_event(rng, n + i, noise) for i in range(batch_size)]
        n += batch_size
        raws[b % batch_size] = BAD[b % len(BAD)]  # one dead letter per batch
        t0 = time.perf_counter()
        result = engine.process(raws)
        duration = time.perf_counter() - t0
        summary = engine.summary()
        stream.results.append(result)
        stream.summaries.append(summary)
        if metrics is not None:
            metrics.observe_batch(result, summary, duration)
        if on_batch is not None:
            on_batch(b, result)
    return stream

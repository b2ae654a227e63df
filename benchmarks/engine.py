"""Throughput of the influence engine (score + route + update) next to River's learn_one.

For every d ∈ {64, 256}, K ∈ {2, 10}, estimator (exact only where K·(d+1) ≤ 3000) and batch size
∈ {1, 64, 512}: events/s of ``InfluenceEngine.process_events`` on pre-decoded batches and of
``InfluenceEngine.process`` on raw JSON bytes (decode included), after an untimed warm-up so the
engine is routing (reference set full, warm-up over).  In the same run, on the same events,
River's ``linear_model.LogisticRegression`` (K=2) / ``SoftmaxRegression`` (K=10) ``learn_one``.
Each cell runs until it has seen ``--events`` events (``--events-b1`` at batch 1) or ``--budget``
seconds passed, whichever is first.

    .venv/bin/python benchmarks/engine.py            # writes the `engine` section of docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from docs_section import write_section  # benchmarks/ is on sys.path as the script directory
from threadpoolctl import threadpool_limits

from stream_influence.core.engine import InfluenceEngine
from stream_influence.core.settings import CurvatureSettings, EngineSettings, SchemaSettings

ROOT = Path(__file__).resolve().parents[1]
TARGET = (64, 10, EngineSettings().curvature.kind, 512)  # d, K, default estimator, batch: ≥ 10× River
RAW_TARGET = 150_000  # issue 11: events/s with decoding at d=64, K=10, batch 512
KINDS = ("exact", "kfac", "ekfac", "classblock", "diagonal")
EXACT_MAX = 3000


def make_events(rng: np.random.Generator, n: int, d: int, K: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian classes with unequal feature scales and 20 % label noise."""
    centers = rng.normal(size=(K, d))
    y = rng.integers(0, K, n)
    scale = np.exp(rng.uniform(-2, 3, d))  # raw, unscaled features: 0.1 … 20
    X = (centers[y] + rng.normal(size=(n, d))) * scale
    noisy = rng.random(n) < 0.2
    y = np.where(noisy, rng.integers(0, K, n), y)
    return X, y


def encode(X: np.ndarray, y: np.ndarray, start: int = 0) -> list[bytes]:
    return [
        json.dumps({"id": str(start + i), "features": x.tolist(), "label": int(c)}).encode()
        for i, (x, c) in enumerate(zip(X, y, strict=True))
    ]


def new_engine(d: int, K: int, kind: str, X: np.ndarray, y: np.ndarray) -> InfluenceEngine:
    settings = EngineSettings(
        schema=SchemaSettings(classes=list(range(K)), n_features=d),
        curvature=CurvatureSettings(kind=kind),
    )
    engine = InfluenceEngine(settings)
    engine.add_reference(encode(X[:300], y[:300]))
    warm = settings.policy.warmup_events + 100
    raws = encode(X[300 : 300 + warm], y[300 : 300 + warm])
    for s in range(0, len(raws), 256):  # untimed warm-up: afterwards every event is routed
        engine.process(raws[s : s + 256])
    assert engine.warm, engine.not_warm_reason()
    return engine


def time_cell(run_batch, n_events: int, b: int, budget: float) -> tuple[float, int]:
    """events/s of ``run_batch(start, stop)`` over consecutive batches of ``b``."""
    done = 0
    t0 = time.perf_counter()
    while done < n_events:
        stop = min(done + b, n_events)
        run_batch(done, stop)
        done = stop
        if time.perf_counter() - t0 > budget:
            break
    return done / (time.perf_counter() - t0), done


def river_rate(X: np.ndarray, y: np.ndarray, K: int, n: int, budget: float) -> tuple[float, int]:
    from river import linear_model

    model = linear_model.LogisticRegression() if K == 2 else linear_model.SoftmaxRegression()
    rows = [dict(enumerate(x.tolist())) for x in X[:n]]
    labels = [bool(c) for c in y[:n]] if K == 2 else y[:n].tolist()
    done = 0
    t0 = time.perf_counter()
    for x, c in zip(rows, labels, strict=True):
        model.learn_one(x, c)
        done += 1
        if done % 256 == 0 and time.perf_counter() - t0 > budget:
            break
    return done / (time.perf_counter() - t0), done


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=20_000, help="cap per cell (batch 64 and 512)")
    ap.add_argument("--events-b1", type=int, default=2_000, help="cap per cell at batch 1")
    ap.add_argument("--budget", type=float, default=3.0, help="seconds per cell at most")
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads (River is single-threaded)")
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--classes", type=int, nargs="+", default=[2, 10])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 512])
    ap.add_argument("--no-write", action="store_true", help="print only, leave docs/benchmarks.md")
    args = ap.parse_args()

    rows: list[dict] = []
    t_start = time.perf_counter()
    with threadpool_limits(args.threads):
        for d in args.dims:
            for K in args.classes:
                rng = np.random.default_rng(d * 100 + K)
                n_total = 300 + 600 + max(args.events, args.events_b1)
                X, y = make_events(rng, n_total, d, K)
                Xs, ys = X[900:], y[900:]
                raws = encode(Xs, ys, 900)
                r_rate, r_n = river_rate(Xs, ys, K, args.events, args.budget)
                print(f"d={d} K={K}: River learn_one {r_rate:,.0f} ev/s ({r_n} events)", flush=True)
                kinds = [k for k in KINDS if k != "exact" or K * (d + 1) <= EXACT_MAX]
                for kind in kinds:
                    for b in args.batches:
                        cap = args.events_b1 if b == 1 else args.events
                        # Pre-decoded path: decode once, untimed.
                        eng = new_engine(d, K, kind, X, y)
                        decoded, _ = eng.decode(raws[:cap])
                        assert len(decoded) == cap
                        parts = [decoded.subset(np.arange(s, min(s + b, cap))) for s in range(0, cap, b)]

                        def run_events(s: int, e: int, eng=eng, parts=parts, b=b) -> None:
                            eng.process_events(parts[s // b])

                        ev_rate, ev_n = time_cell(run_events, cap, b, args.budget)
                        quarantined = eng.counters.quarantined
                        eng2 = new_engine(d, K, kind, X, y)

                        def run_raw(s: int, e: int, eng2=eng2, raws=raws) -> None:
                            eng2.process(raws[s:e])

                        raw_rate, raw_n = time_cell(run_raw, cap, b, args.budget)
                        row = {
                            "d": d,
                            "K": K,
                            "kind": kind,
                            "batch": b,
                            "events_rate": ev_rate,
                            "events_n": ev_n,
                            "raw_rate": raw_rate,
                            "raw_n": raw_n,
                            "river_rate": r_rate,
                            "river_n": r_n,
                            "quarantined": quarantined,
                        }
                        rows.append(row)
                        print(
                            f"  {kind:8s} b={b:4d}: engine {ev_rate:10,.0f} ev/s ({ev_n}) "
                            f"raw {raw_rate:10,.0f} ev/s ({raw_n})  ×River {ev_rate / r_rate:6.1f} "
                            f"/ {raw_rate / r_rate:5.1f}",
                            flush=True,
                        )
    elapsed = time.perf_counter() - t_start
    section = render(rows, args, elapsed)
    print(section)
    if not args.no_write:
        write_section("engine", section)
    return 0


def render(rows: list[dict], args: argparse.Namespace, elapsed: float) -> str:
    import numpy as _np
    import river

    cmd = "nice .venv/bin/python benchmarks/engine.py" + (
        "" if sys.argv[1:] == [] else " " + " ".join(a for a in sys.argv[1:] if a != "--no-write")
    )
    lines = [
        "## engine: events/s of score + route + update",
        "",
        "Command (writes this section):",
        "",
        f"    {cmd}",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (1-minute load "
        f"average {os.getloadavg()[0]:.1f} at the end of the run: above the CPU count, other work shared "
        f"the machine and absolute rates are depressed and noisy), BLAS limited to {args.threads} "
        f"thread(s); Python {platform.python_version()}, numpy {_np.__version__}, River "
        f"{river.__version__}. Total run {elapsed:.0f} s.",
        "",
        "Events: Gaussian classes, raw feature scales 0.1–20, 20 % label noise; default engine settings "
        "(standardise, refresh s every 256, re-factorise every 4096, cosine_influence policy) with the "
        "class list and width configured, after an untimed warm-up (300 reference points, 600 events) "
        "so every timed event is scored and routed. *engine* = `process_events` on pre-decoded batches; "
        "*raw* = `process` on JSON bytes (decode included). *River* = `learn_one` on the same events "
        f"(dicts built untimed; `LogisticRegression` for K=2, `SoftmaxRegression` for K=10). Each cell "
        f"stops at {args.events:,} events ({args.events_b1:,} at batch 1) or {args.budget:g} s; *n* is "
        "the number timed. `exact` only where K·(d+1) ≤ 3000. Fidelity of each estimator: the *fidelity* "
        "section.",
        "",
        "| d | K | estimator | batch | engine ev/s | n | raw ev/s | n | River ev/s | engine / River | raw / River |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['d']} | {r['K']} | {r['kind']} | {r['batch']} | {r['events_rate']:,.0f} | {r['events_n']:,} "
            f"| {r['raw_rate']:,.0f} | {r['raw_n']:,} | {r['river_rate']:,.0f} "
            f"| {r['events_rate'] / r['river_rate']:.1f}× | {r['raw_rate'] / r['river_rate']:.1f}× |"
        )
    d, K, kind, b = TARGET
    hit = [r for r in rows if (r["d"], r["K"], r["kind"], r["batch"]) == TARGET]
    lines.append("")
    if hit:
        r = hit[0]
        ratio, raw_ratio = r["events_rate"] / r["river_rate"], r["raw_rate"] / r["river_rate"]
        verdict = "**met**" if ratio >= 10 else "**missed**"
        lines.append(
            f"Target: `{kind}`, d={d}, K={K}, batch {b} processes ≥ 10× River's learn_one rate — {verdict}: "
            f"{ratio:.1f}× on pre-decoded events ({r['events_rate']:,.0f} vs {r['river_rate']:,.0f} ev/s); "
            f"{raw_ratio:.1f}× including JSON decoding."
        )
    else:
        lines.append("Target cell not run in this invocation.")
    at_target = [r for r in rows if (r["d"], r["K"], r["batch"]) == (d, K, b)]
    if at_target:
        lines += [
            "",
            f"Target (issue 11): ≥ {RAW_TARGET:,} events/s *with decoding* at d={d}, K={K}, batch {b}. "
            "Where each estimator stands (raw ev/s, share of the target, speed relative to `kfac`):",
            "",
        ]
        kfac_raw = next((r["raw_rate"] for r in at_target if r["kind"] == "kfac"), None)
        for r in at_target:
            rel = f", {r['raw_rate'] / kfac_raw:.2f}× kfac" if kfac_raw else ""
            verdict = "**met**" if r["raw_rate"] >= RAW_TARGET else "**missed**"
            lines.append(
                f"- `{r['kind']}`: {r['raw_rate']:,.0f} ev/s = {r['raw_rate'] / RAW_TARGET:.0%} — {verdict}{rel}"
            )
    lines += [
        "",
        "Where the engine does not beat River, and why (structural, not noise): batch 1 pays the "
        "per-call Python overhead of a whole batch (prequential metrics, ADWIN, policy, two learners: "
        "a few hundred µs); `exact` costs O((K·D)²) per event and re-factorises (Cholesky) on every "
        "batch once 2·b·K ≥ K·D; River's binary `LogisticRegression` (K=2) is a tight dict loop with "
        "nothing to route, so the engine's fixed per-batch costs weigh more there. *raw* adds decoding "
        "(`orjson.loads` + validation + building the feature matrix) of every event: at batch ≥ 64 it "
        "runs at roughly 0.4–0.6 of the pre-decoded rate for d=64 with K-FAC/diagonal and 0.2–0.5 for "
        "d=256 (4× wider feature lists); for `exact` 0.5–0.8 at K=2 and ≥ 0.9 at K=10, where its own "
        "math dominates. Each cell "
        "is one timed measurement, not repeated.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""Throughput of the influence engine (score + route + update) next to River's learn_one.

For every d ∈ {64, 256}, K ∈ {2, 10}, estimator (exact only where K·(d+1) ≤ 3000) and batch size
∈ {1, 64, 512}: events/s of ``InfluenceEngine.process_events`` on pre-decoded batches and of
``InfluenceEngine.process`` on raw JSON bytes (decode included), after an untimed warm-up so the
engine is routing (reference set full, warm-up over).  In the same run, on the same events,
River's ``linear_model.LogisticRegression`` (K=2) / ``SoftmaxRegression`` (K=10) ``learn_one``.
Each cell runs until it has seen ``--events`` events (``--events-b1`` at batch 1) or ``--budget``
seconds passed, whichever is first.  Rates are events per wall-clock second and per CPU-second of
this process (``time.process_time``: what one core delivers, less what other work on a shared
machine takes from the wall clock).

``--baseline REF`` also measures the issue-11 cell (d=64, K=10, batch 512, decoding included,
every estimator) on the package as it was at git revision REF, in the same run: the same cell
script runs in subprocesses alternately against REF's package (extracted with ``git archive``)
and this tree's, ``--repeats`` times each, so load on a shared machine hits both alike.  A stage
profile of the default estimator at that cell (µs per event in decoding, learning, curvature,
scoring, …) shows where the time goes.

    .venv/bin/python benchmarks/engine.py --baseline cfe56c7   # writes the `engine` section of docs/benchmarks.md
    .venv/bin/python benchmarks/engine.py --dims 64 --classes 10 --batches 512 --baseline cfe56c7   # the issue-11 cell only
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from docs_section import write_section  # benchmarks/ is on sys.path as the script directory
from threadpoolctl import threadpool_limits

from stream_influence.core.engine import InfluenceEngine
from stream_influence.core.settings import CurvatureSettings, EngineSettings, SchemaSettings

ROOT = Path(__file__).resolve().parents[1]
TARGET = (64, 10, EngineSettings().curvature.kind, 512)  # d, K, default estimator, batch: ≥ 10× River
RAW_TARGET = 150_000  # issue 11: events/s with decoding at d=64, K=10, batch 512
KINDS = ("exact", "kfac", "ekfac", "classblock", "diagonal")
# ``KIND:plain``: the estimator with ``refine`` off (exact has no refinement to turn off).
PLAIN = tuple(f"{k}:plain" for k in KINDS if k != "exact")
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


def curvature_settings(kind: str) -> CurvatureSettings:
    """``KIND`` as the command line spells it: an estimator with ``refine`` at its default, or
    ``KIND:plain`` with ``refine`` off."""
    name, _, variant = kind.partition(":")
    return CurvatureSettings(kind=name, **({"refine": False} if variant == "plain" else {}))


def new_engine(d: int, K: int, kind: str, X: np.ndarray, y: np.ndarray, **overrides: dict) -> InfluenceEngine:
    settings = EngineSettings(
        schema=SchemaSettings(classes=list(range(K)), n_features=d),
        curvature=curvature_settings(kind),
        **overrides,
    )
    engine = InfluenceEngine(settings)
    engine.add_reference(encode(X[:300], y[:300]))
    warm = settings.policy.warmup_events + 100
    raws = encode(X[300 : 300 + warm], y[300 : 300 + warm])
    for s in range(0, len(raws), 256):  # untimed warm-up: afterwards every event is routed
        engine.process(raws[s : s + 256])
    assert engine.warm, engine.not_warm_reason()
    return engine


def time_cell(run_batch, n_events: int, b: int, budget: float) -> tuple[float, int, float]:
    """events/s of ``run_batch(start, stop)`` over consecutive batches of ``b``: per wall-clock
    second, the number timed, per CPU-second of this process."""
    done = 0
    t0, c0 = time.perf_counter(), time.process_time()
    while done < n_events:
        stop = min(done + b, n_events)
        run_batch(done, stop)
        done = stop
        if time.perf_counter() - t0 > budget:
            break
    return done / (time.perf_counter() - t0), done, done / max(time.process_time() - c0, 1e-9)


def raw_cell(d: int, K: int, kind: str, b: int, events: int, budget: float) -> dict[str, float]:
    """The *raw* measurement of one cell (decode included) on the package on ``sys.path``."""
    rng = np.random.default_rng(d * 100 + K)
    X, y = make_events(rng, 900 + events, d, K)
    raws = encode(X[900:], y[900:], 900)
    eng = new_engine(d, K, kind, X, y)
    rate, n, cpu_rate = time_cell(lambda s, e: eng.process(raws[s:e]), events, b, budget)
    return {"raw_rate": rate, "raw_n": n, "raw_cpu_rate": cpu_rate}


# Stages of the hot path, timed by wrapping these methods (owner module, class, method).
STAGES = [
    ("decode", "stream_influence.core.engine", "InfluenceEngine", "decode"),
    ("learn (routed + shadow)", "stream_influence.core.learner", "HeadLearner", "learn"),
    ("predict (routed + shadow)", "stream_influence.core.learner", "HeadLearner", "predict_proba"),
    ("prequential metrics", "stream_influence.core.learner", "Prequential", "update"),
    ("prequential metrics", "stream_influence.core.learner", "Prequential", "defer"),
    ("prequential metrics", "stream_influence.core.learner", "Prequential", "_settle"),
    ("drift (ADWIN)", "stream_influence.core.learner", "DriftMonitor", "update"),
    ("curvature update", "stream_influence.core.curvature", "Curvature", "update"),
    ("score", "stream_influence.core.influence", "InfluenceScorer", "score"),
    ("refresh H⁻¹∇L_R + held-out scores", "stream_influence.core.influence", "InfluenceScorer", "refresh"),
    ("calibrate thresholds", "stream_influence.core.policy", "RoutingPolicy", "calibrate"),
    ("route (policy.decide)", "stream_influence.core.policy", "RoutingPolicy", "decide"),
    ("standardise", "stream_influence.core.model", "Standardizer", "update"),
]


def stage_profile(events: int, budget: float) -> tuple[list[tuple[str, float]], float]:
    """µs per event in each stage of the issue-11 cell (default estimator), and the total.

    Each stage's method is wrapped with a CPU-time clock; a stage called inside another counts
    for itself only (exclusive times); what no stage covers (the engine's own glue, micro-batch
    slicing, result assembly, the clocks themselves) is the remainder.
    """
    import importlib

    d, K, kind, b = TARGET
    rng = np.random.default_rng(d * 100 + K)
    X, y = make_events(rng, 900 + events, d, K)
    raws = encode(X[900:], y[900:], 900)
    eng = new_engine(d, K, kind, X, y)
    spent: dict[str, float] = {}
    undo: list[Callable[[], None]] = []
    inner: list[float] = []  # per active stage: CPU time of the stages called inside it

    def wrap(label: str, owner: type, name: str) -> None:
        original = owner.__dict__[name]

        @functools.wraps(original)
        def timed(*args, **kwargs):
            c = time.process_time()
            inner.append(0.0)
            try:
                return original(*args, **kwargs)
            finally:
                took = time.process_time() - c
                spent[label] = spent.get(label, 0.0) + took - inner.pop()
                if inner:
                    inner[-1] += took

        setattr(owner, name, timed)
        undo.append(lambda: setattr(owner, name, original))

    for label, module, cls, name in STAGES:
        owner = getattr(importlib.import_module(module), cls, None)
        if owner is not None and name in owner.__dict__:  # a stage the package no longer has is left out
            wrap(label, owner, name)
    try:
        c0, done = time.process_time(), 0
        while done < events and time.process_time() - c0 < budget:
            eng.process(raws[done : done + b])
            done = min(done + b, events)
        total = time.process_time() - c0
    finally:
        for u in undo:
            u()
    rows = sorted(((k, v / done * 1e6) for k, v in spent.items()), key=lambda kv: -kv[1])
    return [
        *rows,
        ("rest (engine glue, clocks)", total / done * 1e6 - sum(v for _, v in rows)),
    ], total / done * 1e6


# The issue-11 cell under settings that make fewer numpy calls per event: each changes what the
# engine computes (coarser micro-batches: standardiser, curvature, scores and routing move once
# per micro-batch; larger SGD steps: another learner), so they are alternatives for an operator,
# not optimisations.
ALTERNATIVES: list[tuple[str, dict]] = [
    ("defaults (micro-batches of 512, SGD steps of 8)", {}),
    # The same engine on the numpy reference kernel (issue 11's compiled learner: the plain path).
    ("`learner.kernel: numpy` (the reference sgd kernel)", {"learner": {"kernel": "numpy"}}),
    ("`influence.micro_batch: 64` (the default before 0867a73)", {"influence": {"micro_batch": 64}}),
    ("`learner.minibatch: 64`", {"learner": {"minibatch": 64}}),
    (
        "both: micro-batches of 64 and `learner.minibatch: 64`",
        {"influence": {"micro_batch": 64}, "learner": {"minibatch": 64}},
    ),
]


def settings_alternatives(events: int, budget: float) -> list[tuple[str, float]]:
    """Raw ev per CPU-second of the issue-11 cell (default estimator) under :data:`ALTERNATIVES`."""
    d, K, kind, b = TARGET
    rng = np.random.default_rng(d * 100 + K)
    X, y = make_events(rng, 900 + events, d, K)
    raws = encode(X[900:], y[900:], 900)
    out = []
    for label, overrides in ALTERNATIVES:
        eng = new_engine(d, K, kind, X, y, **overrides)
        out.append((label, time_cell(lambda s, e, eng=eng: eng.process(raws[s:e]), events, b, budget)[2]))
    return out


def parse_floor(events: int) -> float:
    """µs of CPU per event for simdjson's parse alone of the issue-11 cell's messages (no field
    read, no check): the floor under the *decode* stage."""
    import simdjson

    d, K, _, _ = TARGET
    rng = np.random.default_rng(d * 100 + K)
    X, y = make_events(rng, 900 + events, d, K)
    raws = encode(X[900:], y[900:], 900)
    parse = simdjson.Parser().parse
    best = float("inf")
    for _ in range(3):
        c0 = time.process_time()
        for raw in raws:
            doc = parse(raw)
            del doc  # the parser serves one document at a time
        best = min(best, time.process_time() - c0)
    return best / len(raws) * 1e6


def baseline_cells(
    ref: str, kinds: list[str], events: int, budget: float, repeats: int, threads: int
) -> list[dict]:
    """The issue-11 cell for each estimator on REF's package and on this tree's, alternately."""
    d, K, _, b = TARGET
    tmp = Path(tempfile.mkdtemp(prefix="engine-baseline-"))
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref, "stream_influence"], check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tmp, filter="data")
    trees = {"before": tmp, "after": ROOT}
    out = []
    for kind in kinds:
        runs: dict[str, list[dict]] = {"before": [], "after": []}
        for _ in range(repeats):
            for side, tree in trees.items():
                cmd = [sys.executable, __file__, "--cell", str(d), str(K), kind, str(b)]
                cmd += ["--events", str(events), "--budget", str(budget), "--threads", str(threads)]
                env = {**os.environ, "PYTHONPATH": str(tree)}
                res = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
                runs[side].append(json.loads(res.stdout.strip().splitlines()[-1]))
        row = {"kind": kind}
        for side, cells in runs.items():
            for key in ("raw_rate", "raw_cpu_rate"):
                row[f"{side}_{key}"] = statistics.median(c[key] for c in cells)
            row[f"{side}_tree"] = cells[0]["package"]
        out.append(row)
        print(
            f"  {kind:10s} before {row['before_raw_cpu_rate']:10,.0f} after {row['after_raw_cpu_rate']:10,.0f} "
            f"ev/CPU-s (×{row['after_raw_cpu_rate'] / row['before_raw_cpu_rate']:.2f})",
            flush=True,
        )
    return out


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
    ap.add_argument(
        "--kinds",
        nargs="+",
        choices=KINDS + PLAIN,
        default=list(KINDS),
        help="curvature estimators (grid and --baseline)",
    )
    ap.add_argument("--no-write", action="store_true", help="print only, leave docs/benchmarks.md")
    ap.add_argument("--baseline", metavar="REF", help="also measure the issue-11 cell at git revision REF")
    ap.add_argument("--repeats", type=int, default=3, help="--baseline: runs per side (median)")
    ap.add_argument("--cell", nargs=4, metavar=("D", "K", "KIND", "B"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.cell:  # one raw cell, as JSON (the --baseline subprocesses)
        import stream_influence

        d, K, kind, b = int(args.cell[0]), int(args.cell[1]), args.cell[2], int(args.cell[3])
        with threadpool_limits(args.threads):
            cell = raw_cell(d, K, kind, b, args.events, args.budget)
        print(json.dumps({**cell, "package": str(Path(stream_influence.__file__).parent)}))
        return 0

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
                kinds = [k for k in args.kinds if k != "exact" or K * (d + 1) <= EXACT_MAX]
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

                        ev_rate, ev_n, ev_cpu = time_cell(run_events, cap, b, args.budget)
                        quarantined = eng.counters.quarantined
                        eng2 = new_engine(d, K, kind, X, y)

                        def run_raw(s: int, e: int, eng2=eng2, raws=raws) -> None:
                            eng2.process(raws[s:e])

                        raw_rate, raw_n, raw_cpu = time_cell(run_raw, cap, b, args.budget)
                        row = {
                            "d": d,
                            "K": K,
                            "kind": kind,
                            "batch": b,
                            "events_rate": ev_rate,
                            "events_n": ev_n,
                            "raw_rate": raw_rate,
                            "raw_n": raw_n,
                            "events_cpu_rate": ev_cpu,
                            "raw_cpu_rate": raw_cpu,
                            "river_rate": r_rate,
                            "river_n": r_n,
                            "quarantined": quarantined,
                        }
                        rows.append(row)
                        print(
                            f"  {kind:8s} b={b:4d}: engine {ev_rate:10,.0f} ev/s ({ev_n}) "
                            f"raw {raw_rate:10,.0f} ev/s ({raw_n}, {raw_cpu:,.0f}/CPU-s)  ×River {ev_rate / r_rate:6.1f} "
                            f"/ {raw_rate / r_rate:5.1f}",
                            flush=True,
                        )
        at_target = TARGET[:2] in {(d, K) for d in args.dims for K in args.classes}
        profile = (*stage_profile(args.events, args.budget), parse_floor(args.events)) if at_target else None
        alternatives = settings_alternatives(args.events, args.budget) if at_target else []
        if args.baseline:
            print(
                f"baseline {args.baseline} vs this tree, d={TARGET[0]} K={TARGET[1]} batch {TARGET[3]}:",
                flush=True,
            )
            kinds = [k for k in args.kinds if k != "exact" or TARGET[1] * (TARGET[0] + 1) <= EXACT_MAX]
            before_after = baseline_cells(
                args.baseline, kinds, args.events, args.budget, args.repeats, args.threads
            )
        else:
            before_after = []
    elapsed = time.perf_counter() - t_start
    section = render(rows, args, elapsed, profile, before_after, alternatives)
    print(section)
    if not args.no_write:
        write_section("engine", section)
    return 0


def render(
    rows: list[dict],
    args: argparse.Namespace,
    elapsed: float,
    profile: tuple[list[tuple[str, float]], float, float] | None,
    before_after: list[dict],
    alternatives: list[tuple[str, float]] | None = None,
) -> str:
    from importlib.metadata import version

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
        f"average {os.getloadavg()[0]:.1f} at the end of the run"
        + (
            ": above the CPU count, other work shared the machine and wall-clock rates are depressed "
            "and noisy — the per-CPU-second rates are what one core delivers"
            if os.getloadavg()[0] > (os.cpu_count() or 1)
            else ""
        )
        + f"), BLAS limited to {args.threads} thread(s); Python {platform.python_version()}, "
        f"numpy {_np.__version__}, River {river.__version__}, pysimdjson {version('pysimdjson')}. "
        f"Total run {elapsed:.0f} s.",
        "",
        "Events: Gaussian classes, raw feature scales 0.1–20, 20 % label noise, features written by "
        "`json.dumps` (17 significant digits, ~1.3 kB per event at d=64); default engine settings "
        "(standardise, micro-batches of 512, refresh s every 256, re-factorise every 4096, calibrated "
        "cosine_influence policy) with the class list and width configured, after an untimed warm-up "
        "(300 reference points, 600 events) so every timed event is scored and routed. *engine* = "
        "`process_events` on pre-decoded batches; *raw* = `process` on JSON bytes (decode included), per "
        "wall-clock second and per CPU-second of the process. *River* = `learn_one` on the same events "
        f"(dicts built untimed; `LogisticRegression` for K=2, `SoftmaxRegression` for K=10), the plainest "
        f"alternative. Each cell stops at {args.events:,} events ({args.events_b1:,} at batch 1) or "
        f"{args.budget:g} s; *n* is the number timed. `exact` only where K·(d+1) ≤ 3000. Fidelity of each "
        "estimator: the *fidelity* section.",
        "",
        "| d | K | estimator | batch | engine ev/s | n | raw ev/s | n | raw ev/CPU-s | River ev/s "
        "| engine / River | raw / River |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['d']} | {r['K']} | {r['kind']} | {r['batch']} | {r['events_rate']:,.0f} | {r['events_n']:,} "
            f"| {r['raw_rate']:,.0f} | {r['raw_n']:,} | {r['raw_cpu_rate']:,.0f} | {r['river_rate']:,.0f} "
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
            f"Target (issue 11): ≥ {RAW_TARGET:,} events/s *with decoding* at d={d}, K={K}, batch {b}, one "
            "core. Where each estimator stands (raw ev per CPU-second, share of the target; wall-clock "
            "rate; speed relative to `kfac`):",
            "",
        ]
        kfac_cpu = next((r["raw_cpu_rate"] for r in at_target if r["kind"] == "kfac"), None)
        for r in at_target:
            rel = f", {r['raw_cpu_rate'] / kfac_cpu:.2f}× kfac" if kfac_cpu else ""
            rate, source = _verdict_rate(r, before_after, args.repeats)
            verdict = "**met**" if rate >= RAW_TARGET else "**missed**"
            lines.append(
                f"- `{r['kind']}`: {rate:,.0f} ev/CPU-s = {rate / RAW_TARGET:.0%} — {verdict} ({source}; "
                f"the grid cell: {r['raw_cpu_rate']:,.0f} ev/CPU-s, {r['raw_rate']:,.0f} ev/s wall){rel}"
            )
    if before_after:
        lines += [
            "",
            f"Before/after (issue 11's speed work): the same cell, decoding included, on the package at "
            f"`{args.baseline}` (*before*) and on this tree (*after*), alternately in subprocesses of this "
            f"run, median of {args.repeats} each:",
            "",
            "| estimator | before ev/CPU-s | after ev/CPU-s | after / before | before ev/s wall | after ev/s wall "
            "| after / River |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        # The trees' defaults may differ: the comparison is of what each ships, not of one change.
        lines[-4] = lines[-4].removesuffix(":") + (
            " (each tree with its own defaults, so a default that adds work since *before* — e.g. "
            "`curvature.refine` — is inside the ratio):"
        )
        river_rate = next((r["river_rate"] for r in rows if (r["d"], r["K"]) == (d, K)), float("nan"))
        for r in before_after:
            lines.append(
                f"| {r['kind']} | {r['before_raw_cpu_rate']:,.0f} | {r['after_raw_cpu_rate']:,.0f} "
                f"| {r['after_raw_cpu_rate'] / r['before_raw_cpu_rate']:.2f}× | {r['before_raw_rate']:,.0f} "
                f"| {r['after_raw_rate']:,.0f} | {r['after_raw_rate'] / river_rate:.1f}× |"
            )
    if profile:
        stages, total, floor = profile
        lines += [
            "",
            f"Where the time goes (`{kind}`, d={d}, K={K}, batch {b}, decoding included): µs of CPU per event "
            f"in each stage, {total:.2f} µs in all = {1e6 / total:,.0f} ev/CPU-s under the stage clocks "
            f"(the target needs ≤ {1e6 / RAW_TARGET:.2f} µs):",
            "",
            "| stage | µs / event | share |",
            "|---|---:|---:|",
        ]
        lines += [f"| {name} | {us:.2f} | {us / total:.0%} |" for name, us in stages]
        decode = dict(stages).get("decode")
        lines += [
            "",
            f"Floor under *decode*: simdjson's parse alone of the same messages (no field read, no "
            f"check) takes {floor:.2f} µs per event in this run (~1.3 kB each)"
            + (
                f"; the other {decode - floor:.2f} µs of *decode* are the per-message loop that parses "
                "and reads the three fields, the checks run once per batch (label classes, one `[` per "
                "message: the flat feature list) and the batch's arrays."
                if decode is not None
                else "."
            ),
        ]
    if alternatives:
        lines += [
            "",
            f"The same cell (`{kind}`, decoding included) under settings that make fewer numpy calls per "
            "event — each changes what the engine computes (coarser micro-batches: the standardiser, "
            "curvature, scores and routing move once per micro-batch; larger SGD steps: another "
            "learner), so they are an operator's trade-off, not optimisations; their routing quality is "
            "not measured here:",
            "",
            "| settings | raw ev/CPU-s | share of the target |",
            "|---|---:|---:|",
        ]
        lines += [f"| {label} | {rate:,.0f} | {rate / RAW_TARGET:.0%} |" for label, rate in alternatives]
    kfac_row = next((r for r in rows if (r["d"], r["K"], r["kind"], r["batch"]) == TARGET), None)
    target_rate = _verdict_rate(kfac_row, before_after, args.repeats)[0] if kfac_row is not None else 0.0
    met = kfac_row is not None and target_rate >= RAW_TARGET
    why = (
        f"What bounds the rate (the target is met, {target_rate / RAW_TARGET - 1:.0%} above it; the "
        "before/after medians and the stage clocks above show how much of that margin is noise)"
        if met and kfac_row is not None
        else (
            f"Why the target is missed in this run ({target_rate / RAW_TARGET:.0%} of it, on a "
            "machine other work shared: the before/after table measures both trees under the same "
            "load)"
            if kfac_row is not None and os.getloadavg()[0] > (os.cpu_count() or 1)
            else f"Why the target is missed ({target_rate / RAW_TARGET:.0%} of it: a gap of "
            "the order of the run-to-run spread, but no margin)"
            if kfac_row is not None and target_rate >= 0.97 * RAW_TARGET
            else "Why the target is missed (structural, not noise)"
        )
    )
    lines += [
        "",
        f"{why}: at d=64, K=10 the arithmetic is small (a few "
        "×10k flops per event) and every stage is a handful of numpy calls of ~1 µs each on arrays of "
        "8–64 rows, so cost follows the number of calls, not the flops. The speed work kept results "
        "unchanged (`tests/test_engine_golden.py`: decisions, scores and learned state of eight "
        "configurations equal to a recording made before it, bitwise on this machine, with the numpy "
        "learner kernel they pin) and cut calls where that allows: the calibration's per-class "
        "quantiles from one sort; the SGD steps as one compiled loop over the rows in place "
        "(`learner.kernel: compiled`, the default; its sums round differently in the last bits, held "
        "to the numpy kernel by `tests/test_kernels.py`: the same decisions, weights within 1e-9; the "
        "numpy kernel is a row of the settings table); the reference-model loss once "
        "per chunk and fit instead of per micro-batch; the prequential metrics counted once per many "
        "micro-batches (only the errors the drift detector needs are computed per micro-batch); the "
        "reference set's readiness cached per buffer version; the adaptive reference-loss test's "
        "conformal p-values from one comparison against a table of the trusted statistics instead of "
        "a search per class; reductions through the ufuncs, without ndarray's Python wrappers; ring "
        "writes as slices; decoding's label lookup and flat-list proof once per batch instead of per "
        "message. What is left is sequential by construction: "
        "micro-batch j+1 is standardised with the running moments that include micro-batch j, scored "
        "and predicted by the head that learned it, under the curvature that absorbed it, and the drift "
        "detector can reset that curvature between micro-batches, so nothing more can be hoisted out of "
        "the micro-batch loop without changing results. The floors: decoding is simdjson's parse (above) "
        "plus one Python-level iteration per message that parses it and reads its three fields (the "
        "label lookup and the proof of a flat feature list — one `[` counted per message over the "
        "batch's joined bytes — run once per batch); learning takes 8 "
        "sequential SGD steps per 64 events (`learner.minibatch` 8), one compiled call per "
        "micro-batch for routed and shadow; the reference set is re-scored for the held-out "
        "calibration every 256 events (`influence.refresh_every`); the adaptive test's "
        "Benjamini–Hochberg threshold sorts the window of recent p-values (`policy.rate_window`, 2,000) "
        "once per micro-batch. "
        + ("A wider margin" if met else "Reaching the target")
        + " needs fewer calls "
        "per event, which changes results — larger `influence.micro_batch` or `learner.minibatch` "
        "(the settings table above) — or more of the micro-batch loop in compiled code, held to "
        "its numpy reference as the learner kernel is. Batch 1 pays the per-call overhead of a "
        "whole batch; `exact` costs O((K·D)²) per event. Each grid cell is one timed measurement, not "
        "repeated; the before/after table is the median of alternating runs.",
    ]
    return "\n".join(lines)


def _verdict_rate(row: dict[str, Any], before_after: list[dict[str, Any]], repeats: int) -> tuple[float, str]:
    """The rate a target verdict reads: the median of the alternating *after* runs where this
    invocation has them (a grid cell is one short timed run, noisy on a shared machine), else the
    grid cell itself; and the words that say which."""
    after = next((a for a in before_after if a["kind"] == row["kind"]), None)
    if after is None:
        return float(row["raw_cpu_rate"]), "one timed run: the grid cell"
    return float(after["after_raw_cpu_rate"]), f"median of {repeats} alternating runs, the table below"


if __name__ == "__main__":
    sys.exit(main())

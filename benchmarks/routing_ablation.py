"""Routing design decisions, measured: which parts of the default routing earn their place.

Each bundled stream (digits, phishing, hyperplane, MNIST sample) at 0 %/20 %/40 % symmetric noise
and 30 % pair flips, with a clean trusted set of 10 points per class or of 200 points, is run
through the engine with the default routing and with one part changed at a time:

* ``default``: calibrated policy (α = 0.10), warm start on the trusted set, disagreement gate,
  micro-batches of 64 inside polls of 512;
* ``cold``: no warm start (the learners start at zero);
* ``no_gate``: quarantine on the calibrated threshold alone;
* ``mb512``: one micro-batch per poll (the old granularity);
* ``alpha05``: α = 0.05;
* ``absolute``: the old rule (absolute cosine threshold 0.02, no gate, cold start, a warm-up of
  min(500, events / 3) events, micro-batch 512);

beside the plain alternatives a user with the same trusted set has (all use the engine's own
standardiser and head, polled in the same chunks):

* ``unfiltered``: every event, cold start (the shadow of the ``cold`` run);
* ``unfiltered_warm``: the trusted set first (warm start), then every event (``default``'s shadow);
* ``ref_only``: the trusted set alone, as many SGD updates as the stream has events;
* ``loss_filter``: the reference-model loss filter — fit a model on the trusted set alone
  (L2-regularised logistic regression on standardised features), drop the same number of events
  ``default`` quarantined, those it finds most surprising (highest loss), warm-start on the trusted
  set and learn the rest.

Reported per cell: clean test accuracy, the share of clean events quarantined, precision and
recall of the quarantine route.  ``--throughput`` also times ``process_events`` at micro-batch 64
against 512 (same run, same events).

Run: ``OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/routing_ablation.py --write-docs``
(writes the ``routing_ablation`` section of docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import numpy as np  # noqa: E402

from stream_influence.datasets import Stream, load_stream  # noqa: E402
from stream_influence.engine import InfluenceEngine  # noqa: E402
from stream_influence.events import EventBatch  # noqa: E402
from stream_influence.learner import HeadLearner  # noqa: E402
from stream_influence.model import Standardizer, augment, softmax  # noqa: E402
from stream_influence.offline import fit_head  # noqa: E402
from stream_influence.settings import EngineSettings, SchemaSettings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "benchmarks" / "results" / "routing_ablation.json"
START, END = "<!-- routing_ablation:start -->", "<!-- routing_ablation:end -->"
POLL = 512  # the service's default poll (kafka.max_poll_records)
NOISES = [(0.0, "symmetric"), (0.2, "symmetric"), (0.4, "symmetric"), (0.3, "pairflip")]
SIZES = {"hyperplane": 5000, "mnist": 3000}
DATASETS = ["digits", "phishing", "hyperplane", "mnist"]
TRUSTED = ["10/class", "200"]
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "default": {},
    "cold": {"learner": {"warm_start_epochs": 0}},
    "no_gate": {"policy": {"require_disagreement": False}},
    "mb512": {"influence": {"micro_batch": POLL}},
    "alpha05": {"policy": {"false_quarantine_rate": 0.05}},
    "absolute": {
        "policy": {"mode": "absolute", "quarantine_threshold": 0.02, "require_disagreement": False},
        "learner": {"warm_start_epochs": 0},
        "influence": {"micro_batch": POLL},
        "reference": {"seed_from_stream": 0},
    },
}
BASELINES = ["unfiltered", "unfiltered_warm", "ref_only", "loss_filter"]


def trusted_subset(stream: Stream, kind: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The trusted set: the stream's 200 clean reference points, or 10 of them per class."""
    if kind == "200":
        return stream.X_ref, stream.y_ref
    rng = np.random.default_rng(seed)
    idx = np.concatenate(
        [rng.permutation(np.flatnonzero(stream.y_ref == c))[:10] for c in range(stream.n_classes)]
    )
    return stream.X_ref[np.sort(idx)], stream.y_ref[np.sort(idx)]


def batch_of(X: np.ndarray, y: np.ndarray) -> EventBatch:
    n = len(y)
    return EventBatch(
        ids=[str(i) for i in range(n)],
        features=np.asarray(X, dtype=np.float64),
        labels=np.asarray(y, dtype=np.int64),
        weights=np.ones(n),
        timestamps=np.full(n, np.nan),
        index=np.arange(n),
    )


def settings_for(stream: Stream, variant: str) -> EngineSettings:
    base = EngineSettings(
        schema=SchemaSettings(classes=list(range(stream.n_classes)), n_features=stream.n_features)
    )
    parts = {k: getattr(base, k).model_copy(update=v) for k, v in VARIANTS[variant].items()}
    if variant == "absolute":  # the old behaviour also waited for an event warm-up
        warm = min(500, len(stream.y_events) // 3)
        parts["policy"] = parts["policy"].model_copy(update={"warmup_events": warm})
    return base.model_copy(update=parts)


class _WarmupRule(InfluenceEngine):
    """The pre-calibration engine: an event warm-up even with a trusted reference."""

    @property
    def trusted_reference(self) -> bool:
        return False


def run_engine(stream: Stream, Xr: np.ndarray, yr: np.ndarray, variant: str) -> dict[str, Any]:
    cls = _WarmupRule if variant == "absolute" else InfluenceEngine
    eng = cls(settings_for(stream, variant))
    eng.add_reference_events(batch_of(Xr, yr))
    q = []
    t0 = time.perf_counter()
    for i in range(0, len(stream.y_events), POLL):
        r = eng.process_events(batch_of(stream.X_events[i : i + POLL], stream.y_events[i : i + POLL]))
        q.append(r.quarantine)
    seconds = time.perf_counter() - t0
    quarantine = np.concatenate(q)
    acc = float((eng.predict_proba(stream.X_test).argmax(1) == stream.y_test).mean())
    shadow = float((eng.predict_proba(stream.X_test, shadow=True).argmax(1) == stream.y_test).mean())
    c = stream.corrupted
    return {
        "acc": acc,
        "shadow": shadow,
        "quarantined": int(quarantine.sum()),
        "clean_q": float((quarantine & ~c).sum() / max((~c).sum(), 1)),
        "precision": float((quarantine & c).sum() / quarantine.sum())
        if quarantine.sum() and c.any()
        else None,
        "recall": float((quarantine & c).sum() / c.sum()) if c.any() else None,
        "seconds": seconds,
    }


def plain(
    stream: Stream,
    Xr: np.ndarray,
    yr: np.ndarray,
    *,
    keep: np.ndarray | None = None,
    warm: bool = True,
    ref_only: bool = False,
) -> float:
    """The engine's learner without routing: optional warm start, then the kept events."""
    s = EngineSettings().learner
    std = Standardizer(stream.n_features)
    head = HeadLearner(s, stream.n_classes, stream.n_features + 1)
    rng = np.random.default_rng(0)
    if warm or ref_only:
        std.update(Xr)
        Xa = augment(std.transform(Xr))
        epochs = s.warm_start_epochs if not ref_only else max(1, -(-len(stream.y_events) // len(yr)))
        for _ in range(epochs):
            o = rng.permutation(len(yr))
            head.learn(Xa[o], yr[o], np.ones(len(yr)))
    if not ref_only:
        keep = np.ones(len(stream.y_events), bool) if keep is None else keep
        for i in range(0, len(stream.y_events), POLL):
            F, y, k = stream.X_events[i : i + POLL], stream.y_events[i : i + POLL], keep[i : i + POLL]
            std.update(F)
            if k.any():
                head.learn(augment(std.transform(F[k])), y[k], np.ones(int(k.sum())))
    pred = head.predict_proba(augment(std.transform(stream.X_test))).argmax(1)
    return float((pred == stream.y_test).mean())


def loss_filter_keep(stream: Stream, Xr: np.ndarray, yr: np.ndarray, budget: int) -> np.ndarray:
    """Keep all but the ``budget`` events a model fitted on the trusted set alone finds most surprising."""
    std = Standardizer(stream.n_features)
    std.update(Xr)
    fit = fit_head(
        augment(std.transform(Xr)), yr, stream.n_classes, 1e-2, augmented=True, tol=1e-8, method="lbfgs"
    )
    P = softmax(augment(std.transform(stream.X_events)) @ fit.theta.T)
    loss = -np.log(np.clip(P[np.arange(len(P)), stream.y_events], 1e-300, None))
    keep = np.ones(len(loss), bool)
    if budget > 0:
        keep[np.argsort(-loss, kind="stable")[:budget]] = False
    return keep


def cell(name: str, noise: float, kind: str, trusted: str, seed: int) -> dict[str, Any]:
    stream = load_stream(name, noise=noise, noise_kind=kind, seed=seed, n_events=SIZES.get(name))  # type: ignore[arg-type]
    Xr, yr = trusted_subset(stream, trusted, seed)
    out: dict[str, Any] = {"dataset": name, "noise": noise, "kind": kind, "trusted": trusted, "seed": seed}
    out["events"] = len(stream.y_events)
    out["n_trusted"] = len(yr)
    for v in VARIANTS:
        out[v] = run_engine(stream, Xr, yr, v)
    out["unfiltered"] = out["cold"]["shadow"]
    out["unfiltered_warm"] = out["default"]["shadow"]
    out["ref_only"] = plain(stream, Xr, yr, ref_only=True)
    out["loss_filter"] = plain(
        stream, Xr, yr, keep=loss_filter_keep(stream, Xr, yr, out["default"]["quarantined"])
    )
    return out


def fmt(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "–"
    return f"{100 * x:.1f}" if pct else f"{x:.3f}"


def render(
    rows: list[dict[str, Any]], seconds: float, throughput: list[dict[str, Any]] | None, cmd: str
) -> str:
    lines = [
        "## Routing ablation (`routing_ablation`)",
        "",
        "Command (writes this section):",
        "",
        f"    {cmd}",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs shared with other sessions, 1 BLAS thread; "
        f"Python {platform.python_version()}, numpy {np.__version__}. Total run {seconds:.0f} s, one seed.",
        "",
        "Design decisions of the routing, each part changed alone (see the script's docstring for the "
        "variants and baselines). Streams: digits (1 198 events), phishing (788), hyperplane (5 000), MNIST "
        "sample (3 000); polls of 512; the trusted set is 10 points per class or 200 points (clean). Clean "
        "test accuracy; *cq* = clean events quarantined (%), *P/R* = precision/recall of the quarantine "
        "route. Bold: the best of the non-routing baselines.",
        "",
        "| dataset | trusted | noise | default | cq | P/R | cold | no gate | cq | mb 512 | α .05 | cq | old rule"
        " | cq | unfiltered | unfilt. warm | ref only | loss filter |",
        "|---|---|---|---|---:|---|---|---|---:|---|---|---:|---|---:|---|---|---|---|",
    ]
    for r in rows:
        d = r["default"]
        base = {b: r[b] for b in BASELINES}
        best = max(base.values())
        bl = [f"**{fmt(v)}**" if v == best else fmt(v) for v in base.values()]
        pr = f"{fmt(d['precision'])}/{fmt(d['recall'])}" if r["noise"] > 0 else "–"
        noise = f"{round(100 * r['noise'])} % {'pair' if r['kind'] == 'pairflip' else 'sym'}"
        lines.append(
            f"| {r['dataset']} | {r['trusted']} | {noise} | {fmt(d['acc'])} | {fmt(d['clean_q'], True)} | {pr} "
            f"| {fmt(r['cold']['acc'])} | {fmt(r['no_gate']['acc'])} | {fmt(r['no_gate']['clean_q'], True)} "
            f"| {fmt(r['mb512']['acc'])} | {fmt(r['alpha05']['acc'])} | {fmt(r['alpha05']['clean_q'], True)} "
            f"| {fmt(r['absolute']['acc'])} | {fmt(r['absolute']['clean_q'], True)} | "
            + " | ".join(bl)
            + " |"
        )
    lines += ["", *summary(rows), "", *decisions(rows, throughput)]
    if throughput:
        lines += [
            "",
            "Throughput cost of micro-batching (`--throughput`): `process_events` on pre-decoded polls of "
            "512, Gaussian classes, default settings otherwise (K-FAC), after an untimed warm-up; both "
            "micro-batch sizes timed in the same run on the same events.",
            "",
            "| d | K | micro-batch | events/s | events |",
            "|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {t['d']} | {t['K']} | {t['micro_batch']} | {t['rate']:,.0f} | {t['events']:,} |"
            for t in throughput
        ]
    return "\n".join(lines)


def summary(rows: list[dict[str, Any]]) -> list[str]:
    """Aggregate the decisions: mean accuracy per variant, and the issue's comparisons."""
    variants = list(VARIANTS)
    noisy = [r for r in rows if r["noise"] > 0]
    clean = [r for r in rows if r["noise"] == 0]
    out = ["Means over cells (accuracy; clean quarantined % at 0 % noise):", ""]
    out += [
        "| | " + " | ".join(variants + BASELINES) + " |",
        "|---|" + "---|" * (len(variants) + len(BASELINES)),
    ]
    for label, group in (("noisy cells", noisy), ("0 % noise", clean)):
        accs = [np.mean([r[v]["acc"] for r in group]) for v in variants] + [
            np.mean([r[b] for r in group]) for b in BASELINES
        ]
        out.append(f"| mean accuracy, {label} | " + " | ".join(f"{a:.3f}" for a in accs) + " |")
    cq = [np.mean([r[v]["clean_q"] for r in clean]) for v in variants]
    out.append(
        "| clean quarantined %, 0 % noise | "
        + " | ".join(f"{100 * c:.1f}" for c in cq)
        + " |"
        + " |" * len(BASELINES)
    )
    out.append("")

    def count(pred: Any, group: list[dict[str, Any]]) -> str:
        return f"{sum(bool(pred(r)) for r in group)}/{len(group)}"

    out.append("Each part against the default (mean over noisy cells / at 0 % noise, accuracy points):")
    out.append("")
    for v in ("cold", "no_gate", "mb512", "alpha05", "absolute"):
        dn = 100 * np.mean([r["default"]["acc"] - r[v]["acc"] for r in noisy])
        dc = 100 * np.mean([r["default"]["acc"] - r[v]["acc"] for r in clean])
        wins = sum(r["default"]["acc"] > r[v]["acc"] + 1e-12 for r in rows)
        losses = sum(r["default"]["acc"] < r[v]["acc"] - 1e-12 for r in rows)
        out.append(
            f"- default − `{v}`: {dn:+.1f} noisy, {dc:+.1f} clean; default better in {wins}, worse in {losses} "
            f"of {len(rows)} cells."
        )
    out.append("")
    out.append("Against the baselines:")
    out.append("")
    for v in ("default", "cold", "no_gate", "mb512", "alpha05", "absolute"):
        out.append(
            f"- `{v}`: beats unfiltered in {count(lambda r, v=v: r[v]['acc'] > r['unfiltered'], noisy)} noisy cells; "
            f"≥ loss filter − 0.5 pt in {count(lambda r, v=v: r[v]['acc'] >= r['loss_filter'] - 0.005, noisy)}; "
            f"≥ ref only in {count(lambda r, v=v: r[v]['acc'] >= r['ref_only'], rows)} cells; "
            f"0 % noise: ≥ unfiltered − 0.5 pt in {count(lambda r, v=v: r[v]['acc'] >= r['unfiltered'] - 0.005, clean)}, "
            f"max clean quarantined {100 * max(r[v]['clean_q'] for r in clean):.1f} %."
        )
    return out


def decisions(rows: list[dict[str, Any]], tp: list[dict[str, Any]] | None) -> list[str]:
    """What the defaults are and what this run says about them (numbers computed, not typed)."""
    noisy = [r for r in rows if r["noise"] > 0]
    clean = [r for r in rows if r["noise"] == 0]

    def mean(v: str, group: list[dict[str, Any]]) -> float:
        return float(np.mean([r[v]["acc"] if isinstance(r[v], dict) else r[v] for r in group]))

    lf_gap = 100 * (mean("default", noisy) - mean("loss_filter", noisy))
    worst_clean = min(clean, key=lambda r: r["default"]["acc"] - r["unfiltered"])
    worst_q = max(noisy, key=lambda r: r["default"]["clean_q"])
    out = [
        "**Decisions (defaults).** Warm start on the trusted set (`learner.warm_start_epochs: 10`; 3 and 30 "
        "were within half a point in a side run), the disagreement gate on (`policy.require_disagreement`), "
        "α = 0.10 (`policy.false_quarantine_rate`; 0.05 lower on noisy cells, 0.2/0.3 no better in a side run) "
        "and micro-batches of 64 (`influence.micro_batch`) are the defaults: of the routing variants, the "
        f"default has the best mean accuracy on noisy cells ({mean('default', noisy):.3f}) and the gate cuts "
        "clean quarantines about fourfold. The parts are each worth a fraction of a point on average here, "
        "not the clear wins the prototype reported.",
        "",
        "**Misses, plainly.** The reference-model loss filter (matched budget, also warm-started) beats the "
        f"default by {-lf_gap:.1f} points on average over the noisy cells; the default is within half a point "
        f"of it in {sum(r['default']['acc'] >= r['loss_filter'] - 0.005 for r in noisy)}/{len(noisy)} noisy "
        "cells (target: 80 %). At 0 % noise the default stays within half a point of unfiltered in "
        f"{sum(r['default']['acc'] >= r['unfiltered'] - 0.005 for r in clean)}/{len(clean)} cells; the worst "
        f"is {worst_clean['dataset']} with {worst_clean['trusted']} trusted "
        f"({100 * (worst_clean['default']['acc'] - worst_clean['unfiltered']):+.1f} points, of which the warm "
        f"start alone, *unfilt. warm*, costs {100 * (worst_clean['unfiltered_warm'] - worst_clean['unfiltered']):+.1f}). "
        "Clean events quarantined at 0 % noise stay under α + 1 point "
        f"(max {100 * max(r['default']['clean_q'] for r in clean):.1f} %); inside noisy streams the clean share "
        f"reaches {100 * worst_q['default']['clean_q']:.1f} % ({worst_q['dataset']}, {worst_q['trusted']} "
        "trusted, where the model itself is poor). The held-out reference scores sit above fresh clean scores, so the "
        "calibrated thresholds are conservative and recall is 0.3–0.75.",
    ]
    if tp:
        cost = [
            f"d={a['d']}: {a['rate']:,.0f} vs {b['rate']:,.0f} events/s ({100 * (1 - a['rate'] / b['rate']):.0f} % slower)"
            for a, b in zip(tp[::2], tp[1::2], strict=True)
        ]
        out += ["", "**Micro-batch 64 vs 512 throughput** (K = 10, table below): " + "; ".join(cost) + "."]
    return out


def throughput(seconds: float = 3.0) -> list[dict[str, Any]]:
    out = []
    for d, K in ((64, 10), (256, 10)):
        rng = np.random.default_rng(0)
        centers = rng.normal(scale=2.0, size=(K, d))
        n = 24_000
        y = rng.integers(0, K, n)
        X = (centers[y] + rng.normal(size=(n, d))) * np.logspace(-1, 1.3, d)
        for mb in (64, POLL):
            base = EngineSettings(schema=SchemaSettings(classes=list(range(K)), n_features=d))
            s = base.model_copy(update={"influence": base.influence.model_copy(update={"micro_batch": mb})})
            eng = InfluenceEngine(s)
            eng.add_reference_events(batch_of(X[:300], y[:300]))
            eng.process_events(batch_of(X[300:1324], y[300:1324]))  # untimed: warm start, first refresh
            done, t0 = 0, time.perf_counter()
            for i in range(1324, n, POLL):
                eng.process_events(batch_of(X[i : i + POLL], y[i : i + POLL]))
                done += len(y[i : i + POLL])
                if time.perf_counter() - t0 > seconds:
                    break
            out.append(
                {"d": d, "K": K, "micro_batch": mb, "events": done, "rate": done / (time.perf_counter() - t0)}
            )
            print(out[-1], flush=True)
    return out


def write_section(section: str) -> None:
    block = f"{START}\n{section}\n{END}"
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    text = (
        pattern.sub(lambda _: block, text)
        if pattern.search(text)
        else text.rstrip("\n") + "\n\n" + block + "\n"
    )
    DOC.write_text(text)
    print(f"wrote the routing_ablation section of {DOC}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", nargs="+", default=DATASETS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write-docs", action="store_true")
    p.add_argument("--throughput", action="store_true", help="also time micro-batch 64 against 512")
    p.add_argument("--from-json", type=Path, help="re-render the section from a saved run")
    a = p.parse_args(argv)
    cmd = "OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/routing_ablation.py --throughput --write-docs"
    if a.from_json:
        saved = json.loads(a.from_json.read_text())
        section = render(saved["rows"], saved.get("seconds", float("nan")), saved["throughput"], cmd)
        print(section)
        if a.write_docs:
            write_section(section)
        return 0
    t0 = time.perf_counter()
    rows = []
    for name in a.datasets:
        for trusted in TRUSTED:
            for noise, kind in NOISES:
                t = time.perf_counter()
                rows.append(cell(name, noise, kind, trusted, a.seed))
                r = rows[-1]
                print(
                    f"{name:10s} {trusted:8s} {noise:.1f} {kind:9s} "
                    + " ".join(f"{v}={r[v]['acc']:.3f}" for v in VARIANTS)
                    + " "
                    + " ".join(f"{b}={r[b]:.3f}" for b in BASELINES)
                    + f" cq={100 * r['default']['clean_q']:.1f}% ({time.perf_counter() - t:.0f}s)",
                    flush=True,
                )
    tp = throughput() if a.throughput else None
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    seconds = time.perf_counter() - t0
    RESULTS.write_text(json.dumps({"rows": rows, "throughput": tp, "seconds": seconds}, indent=1) + "\n")
    section = render(rows, seconds, tp, cmd)
    print(section)
    if a.write_docs:
        write_section(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())

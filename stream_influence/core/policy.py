"""Routing policy: accept a point for the online updater, or quarantine it.

Rules, in order, for a point with label ``y`` and score ``x`` (the configured score kind; positive =
learning it raises the trusted reference loss, i.e. the model would memorise it):

1. warm-up (no usable reference yet, or the ``warmup_events`` of a stream-seeded reference):
   accept, reason ``warmup``;
2. ``x ≤ accept_threshold``: accept, reason ``helpful``;
3. ``x > τ`` — quarantine, reason ``harmful`` — where ``τ`` is

   * ``calibrated`` (default): ``τ_y``, the split-conformal ``(1 − α)`` quantile (``α`` =
     ``false_quarantine_rate``) of the *held-out* scores of the clean reference points of class
     ``y`` (each scored against the reference objective with its own term left out, see
     :class:`~stream_influence.core.influence.Calibration`), so a clean event of class ``y`` scores
     above ``τ_y`` with probability ≤ α whatever the data set, dimension or score scale.  A class
     with fewer than ``min_class_calibration`` reference points uses the quantile pooled over all
     classes;
   * ``absolute``: ``quarantine_threshold``;
   * ``quantile``: the ``1 − quantile`` quantile of recent scores;

   calibrated and quantile never go below ``quarantine_threshold`` (default 0: an event whose
   learning lowers the reference loss is never quarantined, save on the strong evidence of
   ``floor_yield_fdr`` below).  In calibrated mode
   ``evidence`` picks what quarantines: the score (``influence``), the event's *reference loss*
   ``ℓ_ref`` (its label's loss under the head fitted on the trusted set alone, see
   :mod:`~stream_influence.core.reference_model`) above ``ρ_y``, the ``(1 − α)`` conformal quantile of
   the cross-fitted trusted losses of class ``y`` — calibrated jointly with the floor below: a
   trusted point whose held-out score does not pass the floor counts as loss 0 — (``reference_loss``),
   or ``hybrid``: either test, α split between them by ``hybrid_split`` (Bonferroni: the union still
   quarantines a clean event with probability ≤ α; a class too small for the conformal rank at its
   share of α uses the pooled quantile).  With every evidence the floor holds: the reference-loss test
   fires only for a score above ``quarantine_threshold`` (learning the event would raise the
   trusted loss; ``floor_reference_loss: false`` drops that condition for this test alone).
   With ``adaptive_fdr`` = q > 0 (default) the reference-loss test's threshold is set by the
   stream instead of ρ_y: each event gets the conformal p-value of its statistic among those of
   the trusted points of its class, and the test fires at or below the Benjamini–Hochberg threshold
   at level q over the last ``rate_window`` events — near 0 on a clean stream (its p-values are
   uniform), rising with the share of labels the trusted model finds surprising.  With
   ``floor_yield_fdr`` = q' > 0 the floor yields to strong evidence only: an event at or below it
   is still quarantined by this test when its p-value against the *plain* (unfloored) trusted
   losses of its class passes Benjamini–Hochberg at the stricter level q' over the same window —
   reason ``surprising_label`` (not ``harmful``: its influence score is helpful; also the reason of
   a loss-test quarantine at or below the floor with ``floor_reference_loss: false``);
4. with ``require_disagreement``, a point above ``τ`` whose label the model already predicts
   (argmax = label) is accepted, reason ``model_agrees``: hard-but-correct events are learned.  The gate passes a class-dependent share of the reference-loss test's firings (on
   clean data the model's prior waves a frequent class's surprising events through), so with
   the fixed threshold (``adaptive_fdr: 0``) and ``class_fair_gate`` (default) each class's share of α for that test is thinned by
   ``g_min / g_y``, ``g_y`` the share of class ``y``'s recent firings the gate let through:
   on clean data no class is quarantined more than another, and on a noisy stream, where flips
   pass the gate in every class, the test keeps its share.  With ``gate_reference_loss: false``
   only the influence test is gated: the reference-loss test quarantines by itself, each class
   at most at its share of α.  With ``contradiction_rate`` = a > 0 the loss tests (reference loss,
   ``floor_yield_fdr``, ``self_loss_fdr``) fire only where the routed head's margin against the
   label, ``log p(predicted) − log p(y)``, exceeds the ``(1 − a)`` conformal quantile of the
   trusted points' held-out margins (all of them, or with ``contradiction_calibration: errors``
   those the fold heads get wrong): a label the model confidently contradicts, not an event it
   finds merely hard;
5. otherwise accept, reason ``within_band``.

The quarantine-rate cap: when step 3 would push the rolling quarantine rate above
``max_quarantine_rate``, only the highest-scoring points up to the cap are quarantined, the rest
are accepted with reason ``rate_cap``, and the alarm is raised — a stream that suddenly looks half
harmful is drift or a broken reference, not noise, and an operator must look.  The alarm is also
raised when the rolling share of points scoring above ``τ`` — *before* the disagreement gate —
exceeds ``max_quarantine_rate``: after a whole-stream label flip the model soon agrees with the
flipped labels, so the gate would hide what the scores still say.

>>> import numpy as np
>>> policy = RoutingPolicy(
...     PolicySettings(mode="absolute", quarantine_threshold=0.02, max_quarantine_rate=0.5)
... )
>>> d = policy.decide(np.array([-1.0, 2.0, 3.0, 4.0]), warm=True)
>>> d.quarantine.tolist(), d.reasons, d.alarm
([False, False, True, True], ['helpful', 'rate_cap', 'harmful', 'harmful'], True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from stream_influence.core.ring import Ring
from stream_influence.core.settings import PolicySettings

__all__ = ["QUARANTINE_REASONS", "REASONS", "RoutingDecision", "RoutingPolicy", "conformal_quantile"]

REASONS = ("warmup", "helpful", "within_band", "model_agrees", "rate_cap", "harmful", "surprising_label")
#: The reasons that quarantine (every other reason accepts).
QUARANTINE_REASONS = ("harmful", "surprising_label")
_HELPFUL_OR_BAND = np.array(["within_band", "helpful"], dtype=object)  # indexed by score ≤ accept


@dataclass(slots=True)
class RoutingDecision:
    quarantine: np.ndarray  # bool per point
    reasons: list[str]
    threshold: float  # the pooled threshold in force (calibrated: over all classes)
    alarm: bool
    policy_version: int
    # The score threshold each point was held to: its class's τ_y when calibrated (else the one
    # in force); for a point only the reference-loss test quarantined, the floor its score passed.
    thresholds: np.ndarray


def conformal_quantile(scores: np.ndarray, alpha: float) -> float:
    """The split-conformal ``(1 − α)`` quantile: the ``⌈(n + 1)(1 − α)⌉``-th smallest score.

    A fresh score exchangeable with ``scores`` exceeds it with probability ≤ α.  When the rank
    exceeds ``n`` (fewer than ``1/α − 1`` points) the largest score is used: the bound then holds
    only approximately, which is why tiny classes borrow the pooled quantile.
    """
    x = np.sort(scores[np.isfinite(scores)])
    if len(x) == 0:
        return float("nan")
    k = min(len(x), int(np.ceil((len(x) + 1) * (1.0 - alpha))))
    return float(x[max(k, 1) - 1])


def class_conformal_quantiles(
    scores: np.ndarray, labels: np.ndarray, n_classes: int, alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`conformal_quantile` of each class's scores (classes ``0 … n_classes − 1``; NaN for a
    class without a finite score) and each class's number of points, from one sort of all of them
    (a sort per class cost more than the calibration's arithmetic)."""
    finite = np.isfinite(scores)
    x, lab = scores[finite], labels[finite]
    ranked = x[np.lexsort((x, lab))]  # by class, then score
    held = np.bincount(lab, minlength=n_classes)
    start = np.cumsum(held) - held  # where each class's run begins in ranked
    n = held[:n_classes]
    k = np.minimum(n, np.ceil((n + 1) * (1.0 - alpha)).astype(np.int64))
    out = np.full(n_classes, np.nan)
    some = n > 0
    out[some] = ranked[(start[:n_classes] + np.maximum(k, 1) - 1)[some]]
    return out, np.bincount(labels, minlength=n_classes)[:n_classes]


def _bh_pass(p: np.ndarray, window: np.ndarray, level: float) -> np.ndarray:
    """Which of ``p`` are at or below the Benjamini–Hochberg threshold at ``level`` over ``window``
    (the recent p-values, ``p`` included)."""
    # The threshold is never above the level, so only the p-values at or below it are sorted:
    # their ranks are their ranks in the whole window.
    low = np.sort(window[window <= level])
    ok = np.flatnonzero(low <= level * np.arange(1, len(low) + 1) / max(len(window), 1))
    if len(ok) == 0:
        return np.zeros(len(p), bool)
    return p <= low[ok[-1]]


class RoutingPolicy:
    """Stateful router; :meth:`swap` installs new settings at run time (hot reload)."""

    def __init__(self, settings: PolicySettings, version: int = 1) -> None:
        self.version = version
        self._install(settings)
        self.alarm = False

    def _install(self, settings: PolicySettings) -> None:
        self.settings = settings
        self._scores = Ring(settings.quantile_window)
        self._flags = Ring(settings.rate_window)
        self._above = Ring(settings.rate_window)  # score above τ, before the gate and the cap
        self.threshold = settings.quarantine_threshold
        # Calibrated mode: per-class thresholds, derived from the scorer's calibration scores
        # (recomputed by calibrate(), never saved: the calibration scores are).
        self.class_thresholds = np.zeros(0)
        self.reference_thresholds = np.zeros(0)  # ρ_y of the reference-loss test (per class)
        # class_fair_gate: decayed per-class counts of loss-test firings (before the gate) and of
        # those the gate let through, over about rate_window events.
        self._fired = np.zeros(0)
        self._passed = np.zeros(0)
        # adaptive_fdr: per class, the sorted calibration statistic of the loss test (what the
        # conformal p-values are ranked against), and the recent p-values of the stream.
        self.loss_calibration: list[np.ndarray] = []
        self._padded: tuple[list[np.ndarray], np.ndarray, np.ndarray] | None = None  # its table
        self._pvalues = Ring(settings.rate_window)
        # floor_yield_fdr: the same, on the plain (unfloored) trusted losses.
        self.plain_loss_calibration: list[np.ndarray] = []
        self._padded_plain: tuple[list[np.ndarray], np.ndarray, np.ndarray] | None = None
        # What plain_loss_calibration was made from (losses, labels, settings, classes): it
        # changes only with a refit of the reference model, not with every recalibration.
        self._plain_source: tuple[Any, ...] = ()
        self._plain_pvalues = Ring(settings.rate_window)
        self._plain_batch: np.ndarray | None = None  # the last observed batch's plain p-values
        # self_loss_fdr: the trusted points' held-out routed losses (sorted, pooled over classes)
        # and the stream's p-values.
        self.self_loss_calibration = np.zeros(0)
        self._self_pvalues = Ring(settings.rate_window)
        # contradiction_rate: the level a margin must exceed for the loss tests to fire (NaN until
        # calibrated, and without fold heads: no gate, the loss tests as without the setting).
        self.margin_threshold = float("nan")

    def swap(self, settings: PolicySettings) -> int:
        """Replace the settings; windows restart only if their sizes changed.  Returns the version.

        The caller re-runs :meth:`calibrate` (the engine does) since α may have changed.
        """
        old_scores, old_flags, old_above = self._scores, self._flags, self._above
        fired, passed, old_p, cal = self._fired, self._passed, self._pvalues, self.loss_calibration
        old_plain, plain_cal = self._plain_pvalues, self.plain_loss_calibration
        old_self, self_cal = self._self_pvalues, self.self_loss_calibration
        margin_threshold = self.margin_threshold
        self._install(settings)
        self.margin_threshold = margin_threshold
        self.self_loss_calibration = self_cal
        self._fired, self._passed, self.loss_calibration = fired, passed, cal
        self.plain_loss_calibration = plain_cal
        if old_p.capacity == settings.rate_window:
            self._pvalues, self._plain_pvalues, self._self_pvalues = old_p, old_plain, old_self
        if old_scores.capacity == settings.quantile_window:
            self._scores = old_scores
        if old_flags.capacity == settings.rate_window:
            self._flags, self._above = old_flags, old_above
        self.version += 1
        return self.version

    @property
    def quarantine_rate(self) -> float:
        flags = self._flags.values()
        return float(flags.mean()) if len(flags) else 0.0

    @property
    def above_threshold_rate(self) -> float:
        """Rolling share of routed points scoring above their threshold, before the gate."""
        above = self._above.values()
        return float(np.add.reduce(above) / len(above)) if len(above) else 0.0  # mean, unwrapped

    def alpha_of(self, test: str) -> float:
        """α of one calibrated test (``influence`` or ``reference_loss``); the hybrid splits α
        between them (Bonferroni: the union quarantines a clean event with probability ≤ α)."""
        s = self.settings
        if s.evidence != "hybrid":
            return s.false_quarantine_rate if s.evidence == test else 0.0
        share = s.hybrid_split if test == "reference_loss" else 1.0 - s.hybrid_split
        return s.false_quarantine_rate * share

    def _class_quantiles(
        self, scores: np.ndarray, labels: np.ndarray, n_classes: int, alpha: float, split: bool = False
    ) -> tuple[np.ndarray, float]:
        """Per-class conformal quantiles (pooled for classes under ``min_class_calibration``).

        ``split``: a test of the hybrid, at a share of α.  There a class whose conformal rank
        ``⌈(n + 1)(1 − α)⌉`` exceeds ``n`` also borrows the pooled quantile: its own would be its
        maximum, which a fresh clean event exceeds with probability ``1/(n + 1)`` — above the
        share (10 trusted points per class at α/2: 9 % instead of 5 %).
        """
        if alpha <= 0.0:  # the test is off
            return np.full(n_classes, np.inf), float("inf")
        pooled = conformal_quantile(scores, alpha)
        needed = self.settings.min_class_calibration
        if split:
            needed = max(needed, int(np.ceil((1.0 - alpha) / alpha - 1e-9)))
        own, counts = class_conformal_quantiles(scores, labels, n_classes, alpha)
        out = np.where(counts >= needed, own, pooled)
        # NaN (no finite score) is "never": quantiles of finite scores are never infinite.
        return np.where(np.isnan(out), np.inf, out), np.inf if np.isnan(pooled) else pooled

    def calibrate(
        self,
        scores: np.ndarray,
        labels: np.ndarray,
        n_classes: int,
        reference_losses: np.ndarray | None = None,
        reference_labels: np.ndarray | None = None,
        reference_scores: np.ndarray | None = None,
    ) -> None:
        """Per-class thresholds from held-out scores of clean points (``calibrated`` mode).

        ``scores`` are the configured score kind of the reference points, each computed with the
        point left out of the reference objective; ``labels`` their classes.
        ``reference_losses`` (with their ``reference_labels``) are the trusted points'
        cross-fitted reference losses, for the reference-loss test of ``evidence``;
        ``reference_scores`` (optional) the held-out scores of the same points in the same order.
        With them the reference-loss test is calibrated *jointly with the floor* it fires under:
        its statistic is ``ℓ_ref`` where the score is above ``quarantine_threshold`` and 0
        elsewhere, so ``ρ_y`` bounds the share of clean events of class ``y`` that pass both (the
        floor alone passes a class-dependent share, which unbalanced the classes).
        """
        s = self.settings
        has_reference = (
            reference_losses is not None and reference_labels is not None and len(reference_losses)
        )
        # Only a hybrid with both tests splits α; otherwise the score thresholds are at α (with
        # evidence reference_loss they are reported, not used; a hybrid without reference-loss
        # evidence, e.g. the offline audit, is the influence test alone).
        split = s.evidence == "hybrid" and has_reference
        alpha = self.alpha_of("influence") if split else s.false_quarantine_rate
        out, pooled = self._class_quantiles(scores, labels, n_classes, alpha, bool(split))
        # The floor: calibrated thresholds never fall below quarantine_threshold.
        self.class_thresholds = np.maximum(out, s.quarantine_threshold)
        self.threshold = max(pooled, s.quarantine_threshold)
        self.reference_thresholds = np.zeros(0)
        if has_reference:
            assert reference_losses is not None and reference_labels is not None
            losses = reference_losses
            source = (reference_losses, reference_labels, s, n_classes)
            known = self._plain_source
            if not (
                known
                and all(a is b for a, b in zip(source[:3], known[:3], strict=True))
                and known[3] == n_classes
            ):
                self.plain_loss_calibration = self._per_class_sorted(losses, reference_labels, n_classes)
                self._plain_source = source
            if (
                s.floor_reference_loss
                and reference_scores is not None
                and len(reference_scores) == len(losses)
            ):
                losses = np.where(reference_scores > s.quarantine_threshold, losses, 0.0)
            self.loss_calibration = self._per_class_sorted(losses, reference_labels, n_classes)
            alpha = self.alpha_of("reference_loss")
            self.reference_thresholds = self._class_quantiles(
                losses, reference_labels, n_classes, alpha, bool(split)
            )[0]
            fair = self._fair_alphas(alpha, n_classes)
            for a in np.unique(fair):  # class_fair_gate: thinned classes
                if a < alpha:
                    thin = fair == a
                    q = self._class_quantiles(losses, reference_labels, n_classes, float(a), True)[0]
                    self.reference_thresholds[thin] = q[thin]

    def _per_class_sorted(self, stat: np.ndarray, labels: np.ndarray, n_classes: int) -> list[np.ndarray]:
        """Per class, the sorted calibration statistic (pooled for classes under
        ``min_class_calibration``): what the conformal p-values are ranked against."""
        finite = np.isfinite(stat)
        x, lab = stat[finite], labels[finite]
        pooled = np.sort(x)
        # Every class's run from one sort (by class, then value), as class_conformal_quantiles:
        # a mask and a sort per class cost more than the rest of the calibration.
        ranked = x[np.lexsort((x, lab))]
        held = np.bincount(lab, minlength=n_classes)[:n_classes].tolist()
        ends = np.cumsum(np.bincount(lab, minlength=n_classes))[:n_classes].tolist()
        needed = self.settings.min_class_calibration
        return [pooled if n < needed else ranked[end - n : end] for n, end in zip(held, ends, strict=True)]

    def calibrate_self_loss(self, losses: np.ndarray) -> None:
        """Install the trusted points' held-out routed losses (``self_loss_fdr``), pooled over
        classes and sorted: an event's conformal p-value is ranked among every trusted point, not
        only the ~10 of its class (a p-value among 10 is at least 1/11, too coarse for
        Benjamini–Hochberg to open at a strict level).  Pooled as they are: dividing each class's
        losses by its trusted median or mean first was measured worse (docs/benchmarks.md, round
        q9) — the median of ~10 skewed losses is tiny for an easy class and blows its tail up."""
        self.self_loss_calibration = np.sort(losses[np.isfinite(losses)])

    def calibrate_margins(self, margins: np.ndarray) -> None:
        """``contradiction_rate`` = a: the loss tests' margin level, the ``(1 − a)`` conformal
        quantile of the trusted points' held-out margins against their labels (pooled over
        classes), so a clean event's margin exceeds it with probability ≤ a (``errors``: of those
        the fold heads get wrong, so a clean event the model disagrees with passes with
        probability ≤ a)."""
        a = self.settings.contradiction_rate
        if a > 0:
            if self.settings.contradiction_calibration == "errors":
                # Conditional on disagreeing (what the loss tests select); none: the plain gate.
                margins = margins[margins > 0]
                if not len(margins):
                    self.margin_threshold = 0.0
                    return
            self.margin_threshold = conformal_quantile(margins, a)

    def observe_self_loss(self, labels: np.ndarray | None, self_loss: np.ndarray | None) -> None:
        """Push a batch's routed-loss p-values into the window without deciding (an updater
        learning decisions taken by score workers keeps the same window as one process)."""
        self._self_loss_test(labels, self_loss, 0 if self_loss is None else len(self_loss))

    def _self_loss_test(self, labels: np.ndarray | None, self_loss: np.ndarray | None, n: int) -> np.ndarray:
        """``self_loss_fdr``: events whose routed loss ``ℓ_θ`` has a conformal p-value
        ``(1 + #{held-out trusted losses ≥ ℓ_θ}) / (n + 1)`` at or below the Benjamini–Hochberg
        threshold at that level over the recent window, this batch included (pushed into it).

        A clean event's p-value is super-uniform (its loss is exchangeable with the held-out
        trusted ones), so on a clean stream BH stays shut; as the routed head learns to separate
        flipped labels their p-values pile up at ``1/(n + 1)`` and the threshold opens."""
        cal = self.self_loss_calibration
        if self.settings.self_loss_fdr <= 0 or labels is None or self_loss is None or len(cal) == 0:
            return np.zeros(n, bool)
        above = len(cal) - np.searchsorted(cal, self_loss, side="left")
        p = (1.0 + above) / (len(cal) + 1.0)
        self._self_pvalues.push(p)
        return _bh_pass(p, self._self_pvalues.values(), self.settings.self_loss_fdr)

    def gate_pass_through(self, n_classes: int) -> np.ndarray:
        """Per class, the share of recent reference-loss firings the disagreement gate let through
        (NaN: too few firings to tell)."""
        fired = np.zeros(n_classes)
        passed = np.zeros(n_classes)
        k = min(n_classes, len(self._fired))
        fired[:k], passed[:k] = self._fired[:k], self._passed[:k]
        return np.where(fired >= 5.0, passed / np.maximum(fired, 1e-300), np.nan)

    def _fair_alphas(self, alpha: float, n_classes: int) -> np.ndarray:
        """Each class's share of α for the loss test: α · g_min / g_y with ``class_fair_gate``
        (``g`` the gate pass-through), α otherwise or while fewer than two classes can tell."""
        s = self.settings
        out = np.full(n_classes, alpha)
        if not (s.class_fair_gate and s.require_disagreement and s.gate_reference_loss):
            return out
        g = self.gate_pass_through(n_classes)
        known = np.isfinite(g)
        if known.sum() < 2:
            return out
        g_min = float(g[known].min())
        out[known] = alpha * np.minimum(1.0, g_min / np.maximum(g[known], 1e-12))
        return out

    def thresholds_for(self, labels: np.ndarray | None, n: int) -> np.ndarray:
        """The threshold each of ``n`` points (with class indices ``labels``) is compared with."""
        s = self.settings
        if s.mode == "calibrated":
            if labels is not None and len(self.class_thresholds) > int(np.maximum.reduce(labels, initial=-1)):
                return self.class_thresholds[labels]
            return np.full(n, self.threshold)
        threshold = s.quarantine_threshold
        if s.mode == "quantile" and self._scores.size >= 10:
            threshold = max(threshold, float(np.quantile(self._scores.values(), 1.0 - s.quantile)))
        self.threshold = threshold
        return np.full(n, threshold)

    def decide(
        self,
        score: np.ndarray,
        warm: bool,
        labels: np.ndarray | None = None,
        disagree: np.ndarray | None = None,
        reference_loss: np.ndarray | None = None,
        self_loss: np.ndarray | None = None,
        margin: np.ndarray | None = None,
    ) -> RoutingDecision:
        """Decide for a batch of scores (NaN scores are only allowed while not warm).

        ``labels`` (class indices) pick the per-class threshold in calibrated mode; ``disagree``
        (argmax ≠ label, per point) gates quarantines when ``require_disagreement`` is on;
        ``reference_loss`` (``ℓ_ref`` per point) feeds the reference-loss test of ``evidence``;
        ``self_loss`` (``ℓ_θ``, the routed head's loss before learning the point) the routed-loss
        test of ``self_loss_fdr``; ``margin`` (``log p(predicted) − log p(y)`` under the routed
        head) the margin gate of ``contradiction_rate`` on those loss tests.
        """
        s = self.settings
        n = len(score)
        if not warm or n == 0:
            self._flags.push(np.zeros(n))
            self._above.push(np.zeros(n))
            finite = score[np.isfinite(score)]
            self._scores.push(finite)
            return RoutingDecision(
                np.zeros(n, bool),
                ["warmup"] * n,
                self.threshold,
                self.alarm,
                self.version,
                np.full(n, self.threshold),
            )

        thresholds = self.thresholds_for(labels, n)
        harmful = score > thresholds
        surprise = self._reference_excess(labels, reference_loss, n)
        # The floor holds for every evidence: an event whose learning would lower the trusted
        # loss (score ≤ quarantine_threshold) is not quarantined by a merely surprising label
        # (only floor_yield_fdr's strong evidence overrides it).
        loss_test = surprise > 1.0
        if s.floor_reference_loss:
            loss_test &= score > s.quarantine_threshold
        if self.adaptive:
            # The stream-adaptive threshold replaces ρ_y (the floor still holds).
            loss_test = self._adaptive_test(score, labels, reference_loss, n)
            if s.floor_reference_loss:
                loss_test &= score > s.quarantine_threshold
                if s.floor_yield_fdr > 0:  # the floor yields to strong evidence only
                    loss_test |= self._strong_test(labels, reference_loss, n)
        if s.mode != "calibrated" or s.evidence == "influence":
            loss_test[:] = False
        elif s.evidence == "reference_loss":
            harmful[:] = False
        if (
            s.self_loss_fdr > 0 and s.mode == "calibrated"
        ):  # strong evidence: overrides the floor, not the gate
            loss_test = loss_test | self._self_loss_test(labels, self_loss, n)
        if (
            s.contradiction_rate > 0
            and s.mode == "calibrated"
            and margin is not None
            and self.margin_threshold >= 0
        ):
            # The loss tests' thresholds open with the stream's noise and then pass hard clean
            # events too (high loss near the boundary); only a label the model confidently
            # contradicts — a margin few clean points reach — is evidence of a flip.
            loss_test &= margin > self.margin_threshold
        # The alarm's pre-gate share counts every test that fires (all evidence).
        self._above.push((harmful | loss_test).astype(np.float64))
        reasons = _HELPFUL_OR_BAND[(score <= s.accept_threshold).view(np.uint8)]
        if s.require_disagreement and disagree is not None:
            if s.class_fair_gate and labels is not None and loss_test.any():
                self._count_gate(labels, loss_test, disagree, n)
            gated = harmful | loss_test if s.gate_reference_loss else harmful
            reasons[gated & ~disagree] = "model_agrees"
            harmful = gated & disagree
            if not s.gate_reference_loss:  # the loss test stands on its own calibration
                harmful |= loss_test
        else:
            harmful |= loss_test
        reasons[harmful] = "harmful"
        # Quarantined by the reference-loss test alone although learning it would lower the
        # trusted loss (floor_yield_fdr's strong evidence, or floor_reference_loss off): the
        # influence score did not call it harmful, so the reason must not either.
        reasons[harmful & ~(score > s.quarantine_threshold)] = "surprising_label"

        # How many quarantines keep the rolling rate ≤ cap once this batch enters the window.
        window = min(self._flags.capacity, self._flags.size + n)
        flags = self._flags
        kept_q = np.add.reduce(flags.values()) - np.add.reduce(flags.oldest(n)) if n < flags.capacity else 0.0
        allowed = max(0, int(np.floor(s.max_quarantine_rate * window - kept_q + 1e-9)))
        wanted = int(np.count_nonzero(harmful))
        capped_now = wanted > allowed
        self.alarm = capped_now or self.above_threshold_rate > s.max_quarantine_rate
        if capped_now:
            # Keep the highest-scoring quarantines (the most surprising with the reference loss alone).
            key = surprise if s.mode == "calibrated" and s.evidence == "reference_loss" else score
            order = np.flatnonzero(harmful)[np.argsort(-key[harmful], kind="stable")]
            capped = order[allowed:]
            harmful[capped] = False
            reasons[capped] = "rate_cap"

        by_loss = harmful & loss_test & ~(score > thresholds)
        if by_loss.any() and s.floor_reference_loss:
            thresholds = np.where(by_loss, s.quarantine_threshold, thresholds)
        self._flags.push(harmful.astype(np.float64))
        self._scores.push(score)
        return RoutingDecision(
            harmful, reasons.tolist(), self.threshold, self.alarm, self.version, thresholds
        )

    @property
    def adaptive(self) -> bool:
        """Whether the reference-loss test uses the stream-adaptive threshold (``adaptive_fdr``)."""
        s = self.settings
        return s.adaptive_fdr > 0 and s.mode == "calibrated" and s.evidence != "influence"

    def observe(
        self, score: np.ndarray, labels: np.ndarray | None, reference_loss: np.ndarray | None
    ) -> np.ndarray | None:
        """Push a routed batch's conformal p-values of the reference-loss test into the window the
        adaptive threshold is taken over; returns them (None without the evidence).

        ``p = (1 + #{trusted statistics of the class ≥ x}) / (n_y + 1)``, ``x`` the statistic the
        trusted points were calibrated on (with the floor: ``ℓ_ref``, or 0 for a score at or below
        it).  The router's :meth:`decide` calls it; an updater learning decisions taken elsewhere
        (scale-out) calls it too, so the snapshots it publishes carry the same window.
        """
        if reference_loss is None or labels is None:
            return None
        s = self.settings
        stat = reference_loss
        if s.floor_reference_loss:
            stat = np.where(score > s.quarantine_threshold, reference_loss, 0.0)
        p = self._pvalues_of(labels, stat)
        if p is None:
            return None
        self._plain_batch = None
        if s.floor_reference_loss and s.floor_yield_fdr > 0:
            plain = self._pvalues_of(labels, reference_loss, plain=True)
            self._plain_pvalues.push(np.ones(len(p)) if plain is None else plain)
            self._plain_batch = plain  # what _strong_test ranks (decide calls it right after)
        self._pvalues.push(p)
        return p

    def _pvalues_of(self, labels: np.ndarray, stat: np.ndarray, plain: bool = False) -> np.ndarray | None:
        """``p = (1 + #{calibration statistics of the class ≥ x}) / (n_y + 1)`` per event against
        ``loss_calibration`` (``plain``: ``plain_loss_calibration``); None when a label has none."""
        cal = self.plain_loss_calibration if plain else self.loss_calibration
        if len(cal) <= int(labels.max(initial=-1)):
            return None
        table, sizes = self._padded_calibration(plain)
        if len(stat) * table.shape[1] <= 1 << 16:
            # One comparison over the batch against every class's statistics (NaN-padded: never
            # ≥ x) counts the same as the per-class search below, in a few calls instead of ~6
            # per class; used while the comparisons stay few (small trusted sets).
            above = np.count_nonzero(table[labels] >= stat[:, None], axis=1)
            return (1.0 + above) / (sizes[labels] + 1.0)
        p = np.ones(len(stat))
        for c in np.unique(labels):  # a loop over classes, not events
            mine = labels == c
            ref = cal[int(c)]
            above = len(ref) - np.searchsorted(ref, stat[mine], side="left")
            p[mine] = (1.0 + above) / (len(ref) + 1.0)
        return p

    def _padded_calibration(self, plain: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``loss_calibration`` (``plain``: ``plain_loss_calibration``) as one NaN-padded
        ``classes × longest`` table and the class sizes, made once per calibration (every
        assignment installs a new list)."""
        cal = self.plain_loss_calibration if plain else self.loss_calibration
        cached = self._padded_plain if plain else self._padded
        if cached is None or cached[0] is not cal:
            width = max((len(r) for r in cal), default=0)
            table = np.full((len(cal), width), np.nan)
            for c, r in enumerate(cal):
                table[c, : len(r)] = r
            cached = (cal, table, np.array([len(r) for r in cal], dtype=np.int64))
            if plain:
                self._padded_plain = cached
            else:
                self._padded = cached
        return cached[1], cached[2]

    def _adaptive_test(
        self, score: np.ndarray, labels: np.ndarray | None, reference_loss: np.ndarray | None, n: int
    ) -> np.ndarray:
        """``adaptive_fdr``: events whose conformal p-value (:meth:`observe`) is at or below the
        Benjamini–Hochberg threshold over the recent window, this batch included.

        The p-value of a clean event exchangeable with the trusted points is super-uniform, so BH
        at level ``q`` bounds the expected share of clean events among those it flags by ``q``
        (Bates et al. 2023, "Testing for outliers with conformal p-values"): the threshold rises
        only with the share of the stream the trusted points make look surprising.
        """
        p = self.observe(score, labels, reference_loss)
        if p is None:
            return np.zeros(n, bool)
        return _bh_pass(p, self._pvalues.values(), self.settings.adaptive_fdr)

    def _strong_test(
        self, labels: np.ndarray | None, reference_loss: np.ndarray | None, n: int
    ) -> np.ndarray:
        """``floor_yield_fdr``: events whose conformal p-value against the *plain* trusted losses
        of their class (no floor) passes Benjamini–Hochberg at that stricter level over the recent
        window — both from :meth:`observe`, which :meth:`_adaptive_test` has just called for this
        batch — the evidence strong enough to override the sign floor."""
        p = self._plain_batch
        if labels is None or reference_loss is None or p is None or len(p) != n:
            return np.zeros(n, bool)
        return _bh_pass(p, self._plain_pvalues.values(), self.settings.floor_yield_fdr)

    def _count_gate(self, labels: np.ndarray, fired: np.ndarray, disagree: np.ndarray, n: int) -> None:
        """Decayed per-class counts of loss-test firings (at the full share of α, whatever the
        thinning) and of those the gate passes."""
        K = max(len(self._fired), int(labels.max()) + 1)
        if len(self._fired) < K:
            self._fired = np.concatenate([self._fired, np.zeros(K - len(self._fired))])
            self._passed = np.concatenate([self._passed, np.zeros(K - len(self._passed))])
        decay = np.exp(-n / self.settings.rate_window)
        self._fired = decay * self._fired + np.bincount(labels[fired], minlength=K)
        self._passed = decay * self._passed + np.bincount(labels[fired & disagree], minlength=K)

    def _reference_excess(
        self, labels: np.ndarray | None, reference_loss: np.ndarray | None, n: int
    ) -> np.ndarray:
        """``ℓ_ref / ρ_y`` per point (> 1: the reference-loss test fires; 0 without the evidence)."""
        rho = self.reference_thresholds
        if reference_loss is None or labels is None or len(rho) <= int(np.maximum.reduce(labels, initial=-1)):
            return np.zeros(n)
        # ρ_y = 0 (a jointly calibrated class whose held-out scores rarely pass the floor): any
        # positive loss passes, the floor decides.
        return reference_loss / np.maximum(rho[labels], 1e-300)

    def state_dict(self) -> dict[str, Any]:
        # An infinite threshold (calibrated mode, no finite held-out score yet) is left out: the
        # loader refuses non-finite numbers, and calibrate() re-derives it on restore.
        threshold = {"threshold": self.threshold} if np.isfinite(self.threshold) else {}
        return {
            "version": self.version,
            "alarm": self.alarm,
            **threshold,
            **self._scores.state("scores"),
            **self._flags.state("flags"),
            **self._above.state("above"),
            **self._pvalues.state("pvalues"),
            **self._plain_pvalues.state("plain_pvalues"),
            **self._self_loss_state(),
            "gate_fired": self._fired,
            "gate_passed": self._passed,
            **({"margin_threshold": self.margin_threshold} if np.isfinite(self.margin_threshold) else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.version = int(state["version"])
        self.alarm = bool(state["alarm"])
        self.threshold = float(state.get("threshold", self.settings.quarantine_threshold))
        self._scores.load(state, "scores")
        self._flags.load(state, "flags")
        if "above_data" in state:  # absent from checkpoints of the previous release
            self._above.load(state, "above")
        if "pvalues_data" in state:  # absent from checkpoints before adaptive_fdr
            self._pvalues.load(state, "pvalues")
        if "plain_pvalues_data" in state:  # absent from checkpoints before floor_yield_fdr
            self._plain_pvalues.load(state, "plain_pvalues")
        if "self_loss_calibration" in state:  # only with self_loss_fdr
            self.self_loss_calibration = np.array(state["self_loss_calibration"], dtype=np.float64).ravel()
            if state.get("self_pvalues_data") is not None:
                self._self_pvalues.load(state, "self_pvalues")
        if "margin_threshold" in state:  # only with contradiction_rate, once calibrated
            self.margin_threshold = float(state["margin_threshold"])
        self._fired = np.array(state.get("gate_fired", []), dtype=np.float64).ravel()
        self._passed = np.array(state.get("gate_passed", []), dtype=np.float64).ravel()

    def _self_loss_state(self) -> dict[str, Any]:
        """The routed-loss test's window and calibration (only with ``self_loss_fdr``): snapshots
        carry the calibration to score workers, a checkpoint the one in force when it was taken."""
        if self.settings.self_loss_fdr <= 0:
            return {}
        return {
            **self._self_pvalues.state("self_pvalues"),
            "self_loss_calibration": self.self_loss_calibration,
        }

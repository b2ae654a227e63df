"""The influence engine: decode → φ → score → route → update, one polled batch at a time.

No I/O happens here; the Kafka service, offline replay and the benchmarks all drive this class.

>>> import json
>>> from stream_influence.core.settings import EngineSettings
>>> engine = InfluenceEngine(EngineSettings())
>>> raws = [json.dumps({"id": str(i), "features": [i % 2, 1.0], "label": i % 2}).encode()
...         for i in range(8)]
>>> result = engine.process(raws)
>>> result.counts()
{'accepted': 8, 'quarantined': 0, 'dead_lettered': 0}
>>> result.reasons[0], engine.not_warm_reason()
('warmup', 'reference set has 0/4 points')

With a trusted reference set the engine routes from the first event: the routed learner (and its
unfiltered shadow) first learn the trusted points (``learner.warm_start_epochs``), and each polled
chunk is scored and learned in micro-batches of ``influence.micro_batch`` events.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stream_influence.core.curvature import Curvature, make_curvature
from stream_influence.core.events import EventBatch, Reject, Schema
from stream_influence.core.influence import InfluenceScorer, ReferenceBuffer, Scores
from stream_influence.core.learner import DriftMonitor, HeadLearner
from stream_influence.core.model import FeatureExtractor, Standardizer, augment, make_extractor, one_hot
from stream_influence.core.policy import RoutingDecision, RoutingPolicy
from stream_influence.core.reference_model import ReferenceModel
from stream_influence.core.settings import EngineSettings, PolicySettings
from stream_influence.errors import CurvatureError, NotWarmError

__all__ = ["BatchResult", "InfluenceEngine"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class BatchResult:
    """What happened to every message of one batch.

    ``events`` are the valid ones (``events.index`` points back into the input), with one entry
    per valid event in ``quarantine``/``reasons``/``scores``; ``rejects`` are dead letters.
    """

    events: EventBatch
    rejects: list[Reject]
    quarantine: np.ndarray
    reasons: list[str]
    scores: Scores
    threshold: float
    policy_version: int
    model_version: int
    alarm: bool
    n_input: int = 0
    drift: bool = False
    # Per valid event: the threshold its score was compared with (per class when calibrated).
    thresholds: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def counts(self) -> dict[str, int]:
        q = int(self.quarantine.sum())
        return {"accepted": len(self.events) - q, "quarantined": q, "dead_lettered": len(self.rejects)}

    def records(self) -> list[dict[str, Any]]:
        """One record per input message, in input order: id, decision, reason and scores."""
        out: list[dict[str, Any] | None] = [None] * self.n_input
        inf = self.scores.influence.tolist()
        rel = self.scores.relative_influence.tolist()
        cos = self.scores.cosine_influence.tolist()
        slf = self.scores.self_influence.tolist()
        for j, (i, eid) in enumerate(zip(self.events.index.tolist(), self.events.ids, strict=True)):
            out[i] = {
                "id": eid,
                "decision": "quarantine" if self.quarantine[j] else "accept",
                "reason": self.reasons[j],
                "influence": _num(inf[j]),
                "relative_influence": _num(rel[j]),
                "cosine_influence": _num(cos[j]),
                "self_influence": _num(slf[j]),
            }
        for r in self.rejects:
            out[r.index] = {
                "id": None,
                "decision": "dead_letter",
                "reason": r.reason.value,
                "detail": r.detail,
                "influence": None,
                "relative_influence": None,
                "cosine_influence": None,
                "self_influence": None,
            }
        return out  # type: ignore[return-value]


def _num(x: float) -> float | None:
    return None if x != x else x  # NaN → null


@dataclass
class Counters:
    consumed: int = 0
    accepted: int = 0
    quarantined: int = 0
    dead_lettered: int = 0
    dead_letter_reasons: dict[str, int] = field(default_factory=dict)
    reference_events: int = 0
    drift_resets: int = 0
    refactor_failures: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class InfluenceEngine:
    """Stateful engine; all learned state is reachable from :meth:`state_dict`."""

    def __init__(self, settings: EngineSettings | None = None) -> None:
        self.settings = settings = settings or EngineSettings()
        self.schema = Schema(settings.schema_)
        self.extractor: FeatureExtractor = make_extractor(settings.model)
        self.policy = RoutingPolicy(settings.policy)
        self.scorer = InfluenceScorer(settings.influence)
        self.reference = ReferenceBuffer(settings.reference)
        self.reference_model = ReferenceModel(settings.influence, settings.seed)
        self.drift = DriftMonitor(settings.drift)
        self.counters = Counters()
        self.events_seen = 0  # valid training events processed
        self.model_version = 0
        self.standardizer: Standardizer | None = None
        self.curvature: Curvature | None = None
        self.routed: HeadLearner | None = None
        self.shadow: HeadLearner | None = None
        self.warm_started = False  # both learners have learned the trusted set (warm start)
        self._dim = 0  # D = φ width + 1
        self._warned_small_reference = False

    # -- schema and model construction ---------------------------------------------------
    @property
    def learning_labels(self) -> bool:
        """Whether *stream* events may still add labels.

        The label space belongs to the trusted side: ``schema.classes``, else the reference
        set's labels.  Only with neither does the warm-up learn labels from the stream.
        """
        # Past the warm-up, labels are still learned until a second class shows up: a sorted or
        # very imbalanced stream must not freeze a one-class label space.
        return (
            not self.schema.frozen
            and not self.schema.trusted
            and (self.events_seen < self.settings.policy.warmup_events or self.schema.n_classes < 2)
        )

    def trust_reference_labels(self) -> None:
        """Declare a trusted reference source (topic or file), even before its first event.

        From then on stream labels outside the label space are dead-lettered ``unknown_label``
        instead of being learned; an untrusted stream never defines a class.
        """
        if not self.schema.trusted:
            self.schema.trusted = True
            self.schema.frozen = True

    def _ensure_model(self) -> None:
        """Build (or grow, while labels are still being learned) the head for the schema."""
        n_features, K = self.schema.n_features, self.schema.n_classes
        if n_features is None or K == 0:
            return
        if self.routed is None:
            d = self.extractor.out_features(n_features)
            self._dim = d + 1
            self.standardizer = Standardizer(d, self.settings.model.standardize_freeze_after)
            self.routed = HeadLearner(self.settings.learner, K, self._dim)
            self.shadow = HeadLearner(self.settings.learner, K, self._dim)
            self.curvature = make_curvature(self.settings.curvature, K, self._dim)
        elif self.routed.theta.shape[0] < K:
            assert self.shadow is not None and self.curvature is not None
            self.routed.resize(K)
            self.shadow.resize(K)
            self.curvature = make_curvature(self.settings.curvature, K, self._dim)
            self.scorer.invalidate()

    def _inputs(self, F: np.ndarray) -> np.ndarray:
        """Standardised, augmented head inputs for φ-features ``F``."""
        assert self.standardizer is not None
        return augment(self.standardizer.transform(F) if self.settings.model.standardize else F)

    # -- public API ----------------------------------------------------------------------
    def decode(
        self, raws: Sequence[bytes | str | None], *, learn: bool | None = None, trusted: bool = False
    ) -> tuple[EventBatch, list[Reject]]:
        batch, rejects = self.schema.decode_batch(
            raws, learn=self.learning_labels if learn is None else learn, trusted=trusted
        )
        self._ensure_model()
        return batch, rejects

    def add_reference(self, raws: Sequence[bytes | str | None]) -> list[Reject]:
        """Add trusted events to the reference buffer; they define the label space.

        Unless ``schema.classes`` is configured, a reference label the schema lacks is added,
        even after the freeze: the head grows a zero row for it (a logit of 0, so the existing
        classes' predictions only rescale), the curvature restarts from ``λI`` for the new
        ``K·D`` shape and the cached ``H⁻¹∇L_R`` is refreshed; routing is not re-warmed.
        """
        self.trust_reference_labels()
        batch, rejects = self.decode(raws, trusted=True)
        self.add_reference_events(batch)
        return rejects

    def add_reference_events(self, batch: EventBatch) -> None:
        if len(batch) == 0:
            return
        self._ensure_model()
        F = self.extractor.transform(batch.features)
        self.reference.add(F, batch.labels)
        self.counters.reference_events += len(batch)
        self.scorer.invalidate()

    @property
    def trusted_reference(self) -> bool:
        """The reference set comes from a trusted source (not seeded from the stream itself)."""
        return self.settings.reference.seed_from_stream == 0

    def _reference_shortfall(self) -> str | None:
        """Why the reference set cannot calibrate routing yet (None: it can)."""
        r = self.settings.reference
        if self.reference.size < r.min_size:
            return f"reference set has {self.reference.size}/{r.min_size} points"
        _, yr = self.reference.arrays()
        counts = np.bincount(yr)
        if int((counts >= r.min_per_class).sum()) < 2:
            return f"reference set needs {r.min_per_class} points in at least two classes (has {counts.tolist()})"
        return None

    @property
    def warm(self) -> bool:
        return self.not_warm_reason() is None

    def not_warm_reason(self) -> str | None:
        """Why events are not routed yet (None: they are).

        A trusted reference routes from the first event; only a reference seeded from the
        stream (``seed_from_stream``) also waits for ``policy.warmup_events`` events.
        """
        if self.routed is None:
            return "no valid event seen yet"
        warmup = self.settings.policy.warmup_events
        if not self.trusted_reference and self.events_seen < warmup:
            return f"warm-up: {self.events_seen}/{warmup} events"
        return self._reference_shortfall()

    def set_policy(self, settings: PolicySettings) -> int:
        """Swap the routing policy at run time; returns the new policy version."""
        version = self.policy.swap(settings)
        self._calibrate()
        return version

    def _calibrate(self) -> None:
        """Per-class thresholds of the calibrated policy from the scorer's held-out reference scores."""
        cal = self.scorer.calibration
        if cal is not None and self.routed is not None:
            ref = self.reference_model if self.reference_model.fitted else None
            scores = cal.scores.get(self.policy.settings.score)
            # The reference-loss test is calibrated jointly with the floor when the reference model
            # was fitted on the very trusted points the held-out scores belong to (same order).
            aligned = (
                ref is not None
                and ref.version == self.reference.version
                and len(scores) == len(ref.calibration_labels)
            )
            self.policy.calibrate(
                scores,
                cal.labels,
                self.routed.theta.shape[0],
                ref.calibration_losses if ref else None,
                ref.calibration_labels if ref else None,
                scores if aligned else None,
            )

    @property
    def uses_reference_model(self) -> bool:
        p = self.policy.settings
        return p.mode == "calibrated" and p.evidence != "influence"

    def _reference_losses(self, F: np.ndarray, labels: np.ndarray) -> np.ndarray | None:
        """``ℓ_ref`` of a micro-batch, (re)fitting the reference model when the trusted set has
        changed by ``reference_model_refit_fraction``."""
        if not self.uses_reference_model or self.reference.size < 2 or self.routed is None:
            return None
        r, added = self.reference, self.counters.reference_events
        fraction = self.settings.influence.reference_model_refit_fraction
        if self.reference_model.stale(r.version, r.size, added, fraction):
            Fr, yr = r.arrays()
            self.reference_model.fit(Fr, yr, self.routed.theta.shape[0], r.version, added)
            self._calibrate()
        return self.reference_model.loss(F, labels)

    def rescore(self, batch: EventBatch) -> tuple[Scores, RoutingDecision]:
        """What routing would decide for ``batch`` now — the full policy (every evidence, the
        floor, the disagreement gate) with the quarantine-rate cap off — learning nothing.

        Scores are the configured kind (positive: learning the event would raise the trusted
        reference loss).  Learners, curvature, counters and the policy's windows are untouched;
        the scorer's cache is refreshed against the current head (and the reference model fitted
        if stale), so call it on a copy whose state is not saved.  Needs a warm engine.
        """
        if self.routed is None or self.curvature is None or not self.warm:
            raise NotWarmError(f"rescore needs a warm engine ({self.not_warm_reason()})")
        F = self.extractor.transform(batch.features)
        X, labels = self._inputs(F), batch.labels
        P = self.routed.predict_proba(X)
        Fr, yr = self.reference.arrays()
        self.scorer.refresh(self.routed.theta, self.curvature, self._inputs(Fr), yr)
        self._calibrate()
        reference_loss = self._reference_losses(F, labels)  # before the copy: it may recalibrate
        scores = self.scorer.score(P, one_hot(labels, self.routed.theta.shape[0]), X, self.curvature)
        policy = copy.deepcopy(self.policy)  # its windows must not see these events
        policy.settings = policy.settings.model_copy(update={"max_quarantine_rate": 1.0})
        score = scores.get(policy.settings.score)
        decision = policy.decide(score, True, labels, P.argmax(axis=1) != labels, reference_loss)
        return scores, decision

    def process(self, raws: Sequence[bytes | str | None]) -> BatchResult:
        """Decode, score, route and learn one polled batch of raw messages."""
        batch, rejects = self.decode(raws)
        result = self.process_events(batch, rejects)
        result.n_input = len(raws)
        return result

    def _warm_start(self) -> None:
        """Both learners learn the trusted set before the first routed event (see LearnerSettings).

        The trusted points also enter the standardiser and the curvature, so the first micro-batch
        is scored by a fitted head under a Hessian with evidence, not by zeros under ``λI``.
        """
        assert self.routed and self.shadow and self.curvature and self.standardizer
        self.warm_started = True
        epochs = self.settings.learner.warm_start_epochs
        if epochs == 0:
            return
        Fr, yr = self.reference.arrays()
        self.standardizer.update(Fr)
        Xr = self._inputs(Fr)
        w = np.ones(len(yr))
        solve = self.curvature.solve if self.settings.learner.optimizer == "newton" else None
        rng = np.random.default_rng(self.settings.seed)
        for _ in range(epochs):
            order = rng.permutation(len(yr))
            self.routed.learn(Xr[order], yr[order], w, solve, trusted=True)
            self.shadow.learn(Xr[order], yr[order], w, solve, trusted=True)
        self._update_curvature(Xr, self.routed.predict_proba(Xr), w)
        self.scorer.invalidate()
        self.model_version += 1

    def _update_curvature(self, X: np.ndarray, P: np.ndarray, w: np.ndarray) -> None:
        assert self.curvature is not None
        try:
            self.curvature.update(X, P, w)
        except CurvatureError as exc:
            # Recover rather than stop the stream: forget the curvature (H = λI) and rebuild it.
            log.warning("curvature update failed, resetting it: %s", exc)
            self.curvature.reset()
            self.scorer.invalidate()
            self.counters.refactor_failures += 1

    def _warn_small_reference(self) -> None:
        if self._warned_small_reference or self.routed is None:
            return
        self._warned_small_reference = True
        _, yr = self.reference.arrays()
        counts = np.bincount(yr, minlength=self.routed.theta.shape[0])
        if counts.min() < 10:
            log.warning(
                "routing with a small reference set (points per class: %s): the calibrated "
                "thresholds of classes under %d points are pooled, and scores are noisier below "
                "~10 points per class",
                counts.tolist(),
                self.settings.policy.min_class_calibration,
            )

    def process_events(self, batch: EventBatch, rejects: Sequence[Reject] = ()) -> BatchResult:
        """Score, route and learn already-decoded events, in micro-batches of ``influence.micro_batch``.

        Results depend only on the engine state and the chunk (micro-batches start at the chunk's
        first event), so a replay of the same chunks is bit-for-bit the same.
        """
        return self._run_micro_batches(batch, rejects, self._route_micro_batch)

    def score_events(self, batch: EventBatch, rejects: Sequence[Reject] = ()) -> BatchResult:
        """Score and route already-decoded events against the current state, learning nothing —
        what a score worker does with a model snapshot (``run --role score``).

        Scores are the configured kind (positive: learning the event would raise the trusted
        reference loss).  Only the policy's windows (quarantine-rate cap, quantile mode), the
        scorer's refresh counter and the counters change; head, standardiser, curvature and the
        learners' metrics are untouched.
        """

        def score(F: np.ndarray, chunk: EventBatch, start: int) -> tuple[Scores, RoutingDecision, bool]:
            assert self.standardizer is not None and self.routed is not None
            labels = chunk.labels[start : start + len(F)]
            X = self._inputs(F)
            scores, decision = self._decide(F, X, self.routed.predict_proba(X), labels, self.warm)
            return scores, decision, False

        return self._run_micro_batches(batch, rejects, score)

    def learn_events(self, batch: EventBatch, quarantine: np.ndarray) -> BatchResult:
        """Learn already-decided events — what the one updater does with the decisions of the
        score workers (``run --role update``): every event informs the standardiser, curvature,
        shadow learner and metrics; the routed head learns the ones with ``quarantine`` False.
        The trusted set is learned first (warm start) as in :meth:`process_events`.
        """
        quarantine = np.asarray(quarantine, dtype=bool)

        def learn(F: np.ndarray, chunk: EventBatch, start: int) -> tuple[Scores, RoutingDecision, bool]:
            m = len(F)
            q = quarantine[start : start + m]
            labels = chunk.labels[start : start + m]
            X, P = self._prepare_micro_batch(F)
            drifted = self._learn_micro_batch(X, P, labels, chunk.weights[start : start + m], ~q)
            decision = RoutingDecision(
                q,
                ["scorer_quarantine" if x else "scorer_accept" for x in q.tolist()],
                float("nan"),
                False,
                self.policy.version,
                np.full(m, np.nan),
            )
            return Scores.missing(m), decision, drifted

        return self._run_micro_batches(batch, (), learn)

    def prepare_snapshot(self) -> None:
        """Bring the parts a score worker reads up to date before the state is published as a
        model snapshot: the warm start (if the trusted set is ready), the cached ``H⁻¹∇L_R``
        against the current head, and the calibrated thresholds."""
        if self.routed is None or self.curvature is None:
            return
        if self.warm and not self.warm_started and self.trusted_reference:
            self._warm_start()
        if self.reference.size > 0:
            Fr, yr = self.reference.arrays()
            self.scorer.refresh(self.routed.theta, self.curvature, self._inputs(Fr), yr)
            self._calibrate()

    def _run_micro_batches(
        self,
        batch: EventBatch,
        rejects: Sequence[Reject],
        step: Any,
    ) -> BatchResult:
        c = self.counters
        c.consumed += len(batch) + len(rejects)
        c.dead_lettered += len(rejects)
        for r in rejects:
            c.dead_letter_reasons[r.reason.value] = c.dead_letter_reasons.get(r.reason.value, 0) + 1
        n = len(batch)
        if n == 0 or self.routed is None:
            return self._result(batch, list(rejects), Scores.missing(n), None, False)
        assert self.shadow is not None and self.curvature is not None and self.standardizer is not None

        F = self.extractor.transform(batch.features)
        seed = self.settings.reference.seed_from_stream - self.counters.reference_events
        if seed > 0 and self.events_seen < self.settings.reference.seed_from_stream:
            self.add_reference_events(batch.subset(np.arange(min(seed, n))))

        mb = self.settings.influence.micro_batch
        parts = [step(F[i : i + mb], batch, i) for i in range(0, n, mb)]
        scores = Scores.concat([p[0] for p in parts])
        decisions = [p[1] for p in parts]
        last = decisions[-1]
        decision = RoutingDecision(
            np.concatenate([d.quarantine for d in decisions]),
            [r for d in decisions for r in d.reasons],
            last.threshold,
            any(d.alarm for d in decisions),
            last.policy_version,
            np.concatenate([d.thresholds for d in decisions]),
        )
        drifted = any(p[2] for p in parts)

        q = int(decision.quarantine.sum())
        c.accepted += n - q
        c.quarantined += q
        if self.schema.n_classes < 2 and self.events_seen >= self.settings.policy.warmup_events:
            log.warning(
                "warm-up is over but only the label(s) %s were seen: nothing can be routed "
                "until a second class arrives (configure schema.classes)",
                self.schema.classes,
            )
        if not self.learning_labels and not self.schema.frozen and self.schema.n_classes >= 2:
            self.schema.freeze()
            # Learned, not configured: say what the label space became (later labels are rejected).
            log.info(
                "label space learned and frozen: %d classes %s, %s features",
                self.schema.n_classes,
                self.schema.classes,
                self.schema.n_features,
            )
        return self._result(batch, list(rejects), scores, decision, drifted)

    def _route_micro_batch(
        self, F: np.ndarray, chunk: EventBatch, start: int
    ) -> tuple[Scores, RoutingDecision, bool]:
        """Test, score, route, then learn one micro-batch (matrix products, no per-event loop)."""
        m = len(F)
        labels = chunk.labels[start : start + m]
        warm = self.warm
        X, P = self._prepare_micro_batch(F)
        scores, decision = self._decide(F, X, P, labels, warm)
        drifted = self._learn_micro_batch(
            X, P, labels, chunk.weights[start : start + m], ~decision.quarantine
        )
        return scores, decision, drifted

    def _prepare_micro_batch(self, F: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Warm start when due, then the standardiser learns ``F``: head inputs and routed ``P``."""
        assert self.routed and self.standardizer
        if self.warm and not self.warm_started and self.trusted_reference:
            self._warm_start()
        self.standardizer.update(F)
        X = self._inputs(F)
        return X, self.routed.predict_proba(X)

    def _decide(
        self, F: np.ndarray, X: np.ndarray, P: np.ndarray, labels: np.ndarray, warm: bool
    ) -> tuple[Scores, RoutingDecision]:
        """Score a micro-batch against the current head and curvature and route it."""
        assert self.routed and self.curvature
        Y = one_hot(labels, self.routed.theta.shape[0])
        scores = Scores.missing(len(F))
        if self.reference.size > 0:
            if self.scorer.needs_refresh():
                Fr, yr = self.reference.arrays()
                self.scorer.refresh(self.routed.theta, self.curvature, self._inputs(Fr), yr)
                self._calibrate()
            scores = self.scorer.score(P, Y, X, self.curvature)
        if warm:
            self._warn_small_reference()
        decision = self.policy.decide(
            scores.get(self.policy.settings.score),
            warm,
            labels,
            P.argmax(axis=1) != labels,
            self._reference_losses(F, labels) if warm else None,
        )
        return scores, decision

    def _learn_micro_batch(
        self, X: np.ndarray, P: np.ndarray, labels: np.ndarray, weights: np.ndarray, accept: np.ndarray
    ) -> bool:
        """Test-then-train metrics, curvature (every event), routed head (``accept``), shadow
        (every event), drift; returns whether drift was detected."""
        assert self.routed and self.shadow and self.curvature
        P_shadow = self.shadow.predict_proba(X)
        errors = self.routed.metrics.update(P, labels)
        self.shadow.metrics.update(P_shadow, labels)
        # The CE Hessian does not depend on labels, so every valid event informs the curvature.
        self._update_curvature(X, P, weights)
        solve = self.curvature.solve if self.settings.learner.optimizer == "newton" else None
        routed = [(self.routed, X[accept], labels[accept], weights[accept])] if accept.any() else []
        self.shadow.learn(X, labels, weights, solve, alongside=routed)  # one product per step for both
        self.model_version += bool(routed)

        drifted = self.drift.update(errors)
        if drifted:
            self.curvature.forget(self.settings.drift.keep)
            self.scorer.invalidate()
            self.counters.drift_resets += 1
        self.events_seen += len(X)
        return drifted

    def _result(
        self, batch: EventBatch, rejects: list[Reject], scores: Scores, decision: Any, drifted: bool
    ) -> BatchResult:
        n = len(batch)
        if decision is None:  # no model yet: nothing to route against, everything is warm-up
            decision = self.policy.decide(np.full(n, np.nan), warm=False)
        return BatchResult(
            events=batch,
            rejects=rejects,
            quarantine=decision.quarantine,
            reasons=decision.reasons,
            scores=scores,
            threshold=decision.threshold,
            policy_version=decision.policy_version,
            model_version=self.model_version,
            alarm=decision.alarm,
            n_input=n + len(rejects),
            drift=drifted,
            thresholds=decision.thresholds,
        )

    # -- introspection -------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Counters, metrics and curvature health, for reports and metrics exporters."""
        out: dict[str, Any] = {
            **self.counters.as_dict(),
            "events_seen": self.events_seen,
            "model_version": self.model_version,
            "policy_version": self.policy.version,
            "classes": self.schema.classes,
            "n_features": self.schema.n_features,
            "warm": self.warm,
            "alarm": self.policy.alarm,
            "quarantine_rate": self.policy.quarantine_rate,
            "threshold": self.policy.threshold,
            "class_thresholds": self.policy.class_thresholds.tolist(),
            "warm_started": self.warm_started,
            "reference_size": self.reference.size,
            "reference_loss": self.scorer.reference_loss,
        }
        if self.routed is not None and self.shadow is not None and self.curvature is not None:
            out.update(
                {
                    "prequential_accuracy": self.routed.metrics.cumulative_accuracy,
                    "shadow_prequential_accuracy": self.shadow.metrics.cumulative_accuracy,
                    "rolling_accuracy": self.routed.metrics.rolling_accuracy,
                    "shadow_rolling_accuracy": self.shadow.metrics.rolling_accuracy,
                    "rolling_log_loss": self.routed.metrics.rolling_log_loss,
                    "shadow_rolling_log_loss": self.shadow.metrics.rolling_log_loss,
                    "updates_applied": self.routed.updates,
                    "shadow_updates_applied": self.shadow.updates,
                    "damping_in_use": self.curvature.damping_in_use,
                    "condition_number": self.curvature.condition_number(),
                    "refactorizations": self.curvature.refactorizations,
                }
            )
        return out

    def predict_proba(self, features: np.ndarray, *, shadow: bool = False) -> np.ndarray:
        """Class probabilities of raw feature rows under the routed (or shadow) head."""
        learner = self.shadow if shadow else self.routed
        if learner is None:
            raise RuntimeError("the engine has not seen a valid event yet")
        return learner.predict_proba(self._inputs(self.extractor.transform(features)))

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Every piece of learned state, as numpy arrays and JSON scalars (see ``state``)."""
        state: dict[str, Any] = {
            "schema": self.schema.state_dict(),
            "events_seen": self.events_seen,
            "model_version": self.model_version,
            "counters": self.counters.as_dict(),
            "policy": self.policy.state_dict(),
            "policy_settings": self.policy.settings.model_dump(mode="json"),
            "scorer": self.scorer.state_dict(),
            "reference": self.reference.state_dict(),
            "drift": self.drift.state_dict(),
            "warm_started": self.warm_started,
        }
        if self.reference_model.fitted:
            state["reference_model"] = self.reference_model.state_dict()
        if self.routed is not None:
            assert self.shadow and self.curvature and self.standardizer
            state.update(
                {
                    "dim": self._dim,
                    "routed": self.routed.state_dict(),
                    "shadow": self.shadow.state_dict(),
                    "curvature": self.curvature.state_dict(),
                    "standardizer": self.standardizer.state_dict(),
                }
            )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.schema.load_state_dict(state["schema"])
        self.events_seen = int(state["events_seen"])
        self.model_version = int(state["model_version"])
        self.counters = Counters(**state["counters"])
        self.policy = RoutingPolicy(PolicySettings(**state["policy_settings"]))
        self.policy.load_state_dict(state["policy"])
        self.scorer.load_state_dict(state["scorer"])
        self.reference.load_state_dict(state["reference"])
        if self.reference.version != int(state["reference"]["version"]):  # resized: other points
            self.scorer.invalidate()
        self.drift.load_state_dict(state["drift"])
        # Checkpoints from before the reference model existed: refit it when it is next needed.
        self.reference_model = ReferenceModel(self.settings.influence, self.settings.seed)
        if "reference_model" in state:
            self.reference_model.load_state_dict(state["reference_model"])
        # Checkpoints from before the warm start existed: their learners are past any warm start.
        self.warm_started = bool(state.get("warm_started", True))
        self.routed = self.shadow = self.curvature = self.standardizer = None
        if "routed" in state:
            self._ensure_model()
            assert self.routed and self.shadow and self.curvature and self.standardizer
            self.routed.load_state_dict(state["routed"])
            self.shadow.load_state_dict(state["shadow"])
            self.curvature.load_state_dict(state["curvature"])
            self.standardizer.load_state_dict(state["standardizer"])
            self._calibrate()

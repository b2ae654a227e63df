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
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from stream_influence.core.curvature import Curvature
from stream_influence.core.decisions import Decision, DecisionRecord
from stream_influence.core.events import EventBatch, Reject, Schema
from stream_influence.core.influence import InfluenceScorer, ReferenceBuffer, Scores
from stream_influence.core.learner import DriftMonitor, HeadLearner
from stream_influence.core.model import FeatureExtractor, Standardizer, make_extractor
from stream_influence.core.policy import RoutingDecision, RoutingPolicy
from stream_influence.core.reference_model import ReferenceModel
from stream_influence.core.router import Router
from stream_influence.core.scorer import Scorer
from stream_influence.core.settings import EngineSettings, PolicySettings
from stream_influence.core.snapshot import ModelSnapshot
from stream_influence.core.updater import Counters, Updater
from stream_influence.errors import NotWarmError

__all__ = ["BatchResult", "EngineSummary", "InfluenceEngine"]

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

    def decisions(self) -> list[DecisionRecord]:
        """One record per input message, in input order: id, decision, reason and scores."""
        out: list[DecisionRecord | None] = [None] * self.n_input
        inf = self.scores.influence.tolist()
        rel = self.scores.relative_influence.tolist()
        cos = self.scores.cosine_influence.tolist()
        slf = self.scores.self_influence.tolist()
        quarantine = self.quarantine.tolist()
        for j, (i, eid) in enumerate(zip(self.events.index.tolist(), self.events.ids, strict=True)):
            decision: Decision = "quarantine" if quarantine[j] else "accept"
            out[i] = DecisionRecord(eid, decision, self.reasons[j], inf[j], rel[j], cos[j], slf[j])
        for r in self.rejects:
            out[r.index] = DecisionRecord.dead_letter(r.reason.value, r.detail)
        return out  # type: ignore[return-value]

    def records(self) -> list[dict[str, Any]]:
        """:meth:`decisions` as JSON objects."""
        return [d.to_dict() for d in self.decisions()]


@dataclass(frozen=True, slots=True)
class EngineSummary:
    """Counters, routing state, learner metrics and curvature health, at one moment.

    What reports and the metrics exporter read (typed: no dict of string keys).  The learner and
    curvature fields are ``None`` until the model exists.
    """

    consumed: int
    accepted: int
    quarantined: int
    dead_lettered: int
    dead_letter_reasons: dict[str, int]
    reference_events: int
    drift_resets: int
    refactor_failures: int
    events_seen: int
    model_version: int
    policy_version: int
    classes: list[int | str]
    n_features: int | None
    warm: bool
    alarm: bool
    quarantine_rate: float
    threshold: float
    class_thresholds: list[float]
    warm_started: bool
    reference_size: int
    reference_loss: float
    prequential_accuracy: float | None = None
    shadow_prequential_accuracy: float | None = None
    rolling_accuracy: float | None = None
    shadow_rolling_accuracy: float | None = None
    rolling_log_loss: float | None = None
    shadow_rolling_log_loss: float | None = None
    updates_applied: int | None = None
    shadow_updates_applied: int | None = None
    damping_in_use: float | None = None
    condition_number: float | None = None
    refactorizations: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready copy (reports)."""
        return {f.name: copy.copy(getattr(self, f.name)) for f in fields(self)}


class InfluenceEngine:
    """Decode → score → route → learn, composed of a :class:`Scorer` (read-only, over a model
    snapshot), a :class:`Router` and an :class:`Updater`; all learned state is reachable from
    :meth:`state_dict`.
    """

    def __init__(self, settings: EngineSettings | None = None) -> None:
        self.settings = settings = settings or EngineSettings()
        self.schema = Schema(settings.schema_)
        self.extractor: FeatureExtractor = make_extractor(settings.model)
        self.router = Router(RoutingPolicy(settings.policy))
        self.updater = Updater(settings, self.extractor)
        self._warned_small_reference = False

    # -- the composed parts (learned state lives in the updater, the policy in the router) ----
    @property
    def policy(self) -> RoutingPolicy:
        return self.router.policy

    @property
    def counters(self) -> Counters:
        return self.updater.counters

    @property
    def events_seen(self) -> int:
        return self.updater.events_seen

    @property
    def model_version(self) -> int:
        return self.updater.model_version

    @property
    def warm_started(self) -> bool:
        return self.updater.warm_started

    @property
    def reference(self) -> ReferenceBuffer:
        return self.updater.reference

    @property
    def reference_model(self) -> ReferenceModel:
        return self.updater.reference_model

    @property
    def scorer(self) -> InfluenceScorer:
        """The cached reference direction ``s = H⁻¹∇L_R`` (see :mod:`~stream_influence.core.influence`)."""
        return self.updater.direction

    @property
    def drift(self) -> DriftMonitor:
        return self.updater.drift

    @property
    def standardizer(self) -> Standardizer | None:
        return self.updater.standardizer

    @property
    def routed(self) -> HeadLearner | None:
        return self.updater.routed

    @property
    def shadow(self) -> HeadLearner | None:
        return self.updater.shadow

    @property
    def curvature(self) -> Curvature | None:
        return self.updater.curvature

    @curvature.setter
    def curvature(self, value: Curvature) -> None:
        self.updater.curvature = value

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
        self.updater.ensure_model(self.schema.n_features, self.schema.n_classes)

    def _inputs(self, F: np.ndarray) -> np.ndarray:
        """Standardised, augmented head inputs for φ-features ``F``."""
        return self.updater.inputs(F)

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
        self.updater.add_reference(self.extractor.transform(batch.features), batch.labels)

    @property
    def trusted_reference(self) -> bool:
        """The reference set comes from a trusted source (not seeded from the stream itself)."""
        return self.updater.trusted_reference

    @property
    def warm(self) -> bool:
        return self.not_warm_reason() is None

    def not_warm_reason(self) -> str | None:
        """Why events are not routed yet (None: they are).

        A trusted reference routes from the first event; only a reference seeded from the
        stream (``seed_from_stream``) also waits for ``policy.warmup_events`` events.
        """
        return self.updater.not_warm_reason(self.trusted_reference)

    def set_policy(self, settings: PolicySettings) -> int:
        """Swap the routing policy at run time; returns the new policy version."""
        version = self.policy.swap(settings)
        self._calibrate()
        return version

    def _calibrate(self) -> None:
        self.updater.calibrate(self.policy)

    @property
    def uses_reference_model(self) -> bool:
        return self.router.uses_reference_loss

    def snapshot(self, *, refresh: bool = False) -> ModelSnapshot:
        """An immutable snapshot of the model and the routing policy in force (see
        :meth:`Updater.snapshot`); the engine is not changed."""
        return self.updater.snapshot(
            self.schema, self.policy, refresh=refresh, not_warm_reason=self.not_warm_reason()
        )

    def rescore(self, batch: EventBatch) -> tuple[Scores, RoutingDecision]:
        """What routing would decide for ``batch`` now — the full policy (every evidence, the
        floor, the disagreement gate) with the quarantine-rate cap off — learning nothing.

        Scores are the configured kind (positive: learning the event would raise the trusted
        reference loss), against ``s = H⁻¹∇L_R`` refreshed for the current head (on a snapshot:
        the engine is not changed).  Needs a warm engine.
        """
        if self.routed is None or self.curvature is None or not self.warm:
            raise NotWarmError(f"rescore needs a warm engine ({self.not_warm_reason()})")
        snapshot = self.snapshot(refresh=True)
        evidence = Scorer(snapshot).evidence(batch)
        decision = Router.from_snapshot(snapshot, rate_cap=False).decide(evidence, warm=True)
        return evidence.scores, decision

    def process(self, raws: Sequence[bytes | str | None]) -> BatchResult:
        """Decode, score, route and learn one polled batch of raw messages."""
        batch, rejects = self.decode(raws)
        result = self.process_events(batch, rejects)
        result.n_input = len(raws)
        return result

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
        c = self.counters
        c.consumed += len(batch) + len(rejects)
        c.dead_lettered += len(rejects)
        for r in rejects:
            c.dead_letter_reasons[r.reason.value] = c.dead_letter_reasons.get(r.reason.value, 0) + 1
        n = len(batch)
        if n == 0 or self.routed is None:
            return self._result(batch, list(rejects), Scores.missing(n), self.router.unscored(n), False)

        F = self.extractor.transform(batch.features)
        seed = self.settings.reference.seed_from_stream - self.counters.reference_events
        if seed > 0 and self.events_seen < self.settings.reference.seed_from_stream:
            self.add_reference_events(batch.subset(np.arange(min(seed, n))))

        mb = self.settings.influence.micro_batch
        losses = _ChunkReferenceLoss(F, batch.labels)
        parts = [self._route_micro_batch(F[i : i + mb], batch, i, losses) for i in range(0, n, mb)]
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

    def score_events(self, batch: EventBatch, rejects: Sequence[Reject] = ()) -> BatchResult:
        """Score and route already-decoded events against the current state, learning nothing —
        what a score worker does with a model snapshot (``run --role score``).

        Scores are the configured kind (positive: learning the event would raise the trusted
        reference loss).  Only the policy's windows (quarantine-rate cap, quantile mode), the cached
        ``s = H⁻¹∇L_R`` (refreshed against this head every ``influence.refresh_every`` events, as
        in one process) and the counters change; head, standardiser, curvature and the learners'
        metrics are untouched.
        """
        n = len(batch)
        c = self.counters
        c.consumed += n + len(rejects)
        c.dead_lettered += len(rejects)
        for r in rejects:
            c.dead_letter_reasons[r.reason.value] = c.dead_letter_reasons.get(r.reason.value, 0) + 1
        if n == 0 or self.routed is None:
            return self._result(batch, list(rejects), Scores.missing(n), self.router.unscored(n), False)
        up, warm = self.updater, self.warm
        F = self.extractor.transform(batch.features)
        mb = self.settings.influence.micro_batch
        losses = _ChunkReferenceLoss(F, batch.labels)
        parts = []
        for i in range(0, n, mb):  # the policy's windows see the events in micro-batches, as in one process
            # s = H⁻¹∇L_R is refreshed as often as in one process, against this (snapshot) head.
            if up.refresh_direction():
                self._calibrate()
            up.calibrate_self_loss(self.policy)
            view = up.view(self.schema, self.policy, up.usable_reference_model(self.uses_reference_model))
            labels = batch.labels[i : i + mb]
            reference_loss = losses.of(view.reference_model, i, i + len(labels))
            evidence = Scorer(view).evidence_of(F[i : i + mb], labels, reference_loss)
            up.count_scored(len(evidence.labels))
            parts.append((evidence.scores, self.router.decide(evidence, warm)))
        decision = _joined([d for _, d in parts])
        q = int(decision.quarantine.sum())
        c.accepted += n - q
        c.quarantined += q
        return self._result(batch, list(rejects), Scores.concat([s for s, _ in parts]), decision, False)

    def learn_events(self, batch: EventBatch, quarantine: np.ndarray) -> BatchResult:
        """Learn already-decided events — what the one updater does with the decisions of the
        score workers (``run --role update``): every event informs the standardiser, curvature,
        shadow learner and metrics; the routed head learns the ones with ``quarantine`` False
        (:meth:`Updater.update`, in micro-batches of ``influence.micro_batch`` as in one process).
        """
        quarantine = np.asarray(quarantine, dtype=bool)
        n = len(batch)
        c = self.counters
        c.consumed += n
        if n == 0 or self.routed is None:
            return self._result(batch, [], Scores.missing(n), self.router.unscored(n), False)
        mb = self.settings.influence.micro_batch
        parts, drifted = [], False
        for i in range(0, n, mb):
            q = quarantine[i : i + mb]
            m = len(q)
            reasons = ["scorer_quarantine" if x else "scorer_accept" for x in q.tolist()]
            d = RoutingDecision(q, reasons, float("nan"), False, self.policy.version, np.full(m, np.nan))
            part = batch.subset(np.arange(i, i + m))
            drifted |= self.updater.update(part, d, self.schema, self.policy, observe=True)
            parts.append(d)
        k = int(quarantine.sum())
        c.accepted += n - k
        c.quarantined += k
        return self._result(batch, [], Scores.missing(n), _joined(parts), drifted)

    def prepare_snapshot(self) -> None:
        """Bring the parts a score worker reads up to date before the state is published as a
        model snapshot: the warm start (if the trusted set is ready), ``s = H⁻¹∇L_R`` against
        the current head, and the calibrated thresholds."""
        up = self.updater
        if up.routed is None:
            return
        if self.warm and not up.warm_started and self.trusted_reference:
            up.warm_start()
        if up.refresh_direction(force=True):
            self._calibrate()

    def _route_micro_batch(
        self, F: np.ndarray, chunk: EventBatch, start: int, losses: _ChunkReferenceLoss
    ) -> tuple[Scores, RoutingDecision, bool]:
        """Score, route, then learn one micro-batch (matrix products, no per-event loop)."""
        up = self.updater
        m = len(F)
        labels = chunk.labels[start : start + m]
        weights = chunk.weights[start : start + m]
        warm = self.warm
        # The learned side first (warm start, standardiser, s = H⁻¹∇L_R, reference model), the
        # policy recalibrated against it, before the scorer reads it.
        wanted = self.uses_reference_model
        if up.begin(F, warm=warm, trusted_reference=self.trusted_reference, reference_evidence=wanted):
            self._calibrate()
        up.calibrate_self_loss(self.policy)
        view = up.view(self.schema, self.policy, up.usable_reference_model(wanted))
        evidence = Scorer(view).evidence_of(F, labels, losses.of(view.reference_model, start, start + m))
        up.count_scored(m)
        if warm:
            self._warn_small_reference()
        decision = self.router.decide(evidence, warm)
        drifted = up.learn(evidence, decision, weights)
        return evidence.scores, decision, drifted

    def _result(
        self,
        batch: EventBatch,
        rejects: list[Reject],
        scores: Scores,
        decision: RoutingDecision,
        drifted: bool,
    ) -> BatchResult:
        n = len(batch)
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
    def summary(self) -> EngineSummary:
        """Counters, metrics and curvature health, for reports and metrics exporters."""
        c = self.counters
        learned: dict[str, Any] = {}
        if self.routed is not None and self.shadow is not None and self.curvature is not None:
            learned = {
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
        return EngineSummary(
            consumed=c.consumed,
            accepted=c.accepted,
            quarantined=c.quarantined,
            dead_lettered=c.dead_lettered,
            dead_letter_reasons=dict(c.dead_letter_reasons),
            reference_events=c.reference_events,
            drift_resets=c.drift_resets,
            refactor_failures=c.refactor_failures,
            events_seen=self.events_seen,
            model_version=self.model_version,
            policy_version=self.policy.version,
            classes=list(self.schema.classes),
            n_features=self.schema.n_features,
            warm=self.warm,
            alarm=self.policy.alarm,
            quarantine_rate=self.policy.quarantine_rate,
            threshold=self.policy.threshold,
            class_thresholds=self.policy.class_thresholds.tolist(),
            warm_started=self.warm_started,
            reference_size=self.reference.size,
            reference_loss=self.scorer.reference_loss,
            **learned,
        )

    def predict_proba(self, features: np.ndarray, *, shadow: bool = False) -> np.ndarray:
        """Class probabilities of raw feature rows under the routed (or shadow) head."""
        learner = self.shadow if shadow else self.routed
        if learner is None:
            raise RuntimeError("the engine has not seen a valid event yet")
        return learner.predict_proba(self._inputs(self.extractor.transform(features)))

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Every piece of learned state, as numpy arrays and JSON scalars (see ``state``)."""
        up = self.updater
        state: dict[str, Any] = {
            "schema": self.schema.state_dict(),
            "events_seen": up.events_seen,
            "model_version": up.model_version,
            "counters": up.counters.as_dict(),
            "policy": self.policy.state_dict(),
            "policy_settings": self.policy.settings.model_dump(mode="json"),
            "scorer": up.direction.state_dict(),
            "reference": up.reference.state_dict(),
            "drift": up.drift.state_dict(),
            "warm_started": up.warm_started,
        }
        if up.reference_model.fitted:
            state["reference_model"] = up.reference_model.state_dict()
        if up.routed is not None:
            assert up.shadow and up.curvature and up.standardizer
            state.update(
                {
                    "dim": up.dim,
                    "routed": up.routed.state_dict(),
                    "shadow": up.shadow.state_dict(),
                    "curvature": up.curvature.state_dict(),
                    "standardizer": up.standardizer.state_dict(),
                }
            )
            if up.cross_fit is not None and up.cross_fit.heads:
                state["cross_fit"] = up.cross_fit.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.schema.load_state_dict(state["schema"])
        up = self.updater = Updater(self.settings, self.extractor)
        up.events_seen = int(state["events_seen"])
        up.model_version = int(state["model_version"])
        up.counters = Counters(**state["counters"])
        self.router = Router(RoutingPolicy(PolicySettings(**state["policy_settings"])))
        self.policy.load_state_dict(state["policy"])
        up.direction.load_state_dict(state["scorer"])
        up.reference.load_state_dict(state["reference"])
        if up.reference.version != int(state["reference"]["version"]):  # resized: other points
            up.direction.invalidate()
        up.drift.load_state_dict(state["drift"])
        # Checkpoints from before the reference model existed: refit it when it is next needed.
        if "reference_model" in state:
            up.reference_model.load_state_dict(state["reference_model"])
        # Checkpoints from before the warm start existed: their learners are past any warm start.
        up.warm_started = bool(state.get("warm_started", True))
        if "routed" in state:
            self._ensure_model()
            assert up.routed and up.shadow and up.curvature and up.standardizer
            up.routed.load_state_dict(state["routed"])
            up.shadow.load_state_dict(state["shadow"])
            up.curvature.load_state_dict(state["curvature"])
            up.standardizer.load_state_dict(state["standardizer"])
            if up.cross_fit is not None and "cross_fit" in state:
                up.cross_fit.load_state_dict(state["cross_fit"], up.n_classes, up.dim)
            elif up.cross_fit is not None and up.warm_started:
                # Fold heads are made at the warm start, which this checkpoint is past.
                log.warning(
                    "the checkpoint has no fold heads: the routed-loss test (policy.self_loss_fdr) stays off"
                )
            self._calibrate()


class _ChunkReferenceLoss:
    """``ℓ_ref`` of a whole chunk's events, computed once per reference-model fit.

    An event's reference loss depends only on the event and the fitted reference model, which
    changes only when it is refitted (a new ``theta``), so the chunk's micro-batches share one
    product instead of one each; a refit inside the chunk recomputes it.
    """

    def __init__(self, features: np.ndarray, labels: np.ndarray) -> None:
        self.features, self.labels = features, labels
        self._theta: np.ndarray | None = None
        self._loss = np.zeros(0)

    def of(self, model: ReferenceModel | None, start: int, stop: int) -> np.ndarray | None:
        if model is None:
            return None
        if self._theta is not model.theta:
            self._theta, self._loss = model.theta, model.loss(self.features, self.labels)
        return self._loss[start:stop]


def _joined(decisions: list[RoutingDecision]) -> RoutingDecision:
    """The decisions of consecutive micro-batches as one."""
    last = decisions[-1]
    return RoutingDecision(
        np.concatenate([d.quarantine for d in decisions]),
        [r for d in decisions for r in d.reasons],
        last.threshold,
        any(d.alarm for d in decisions),
        last.policy_version,
        np.concatenate([d.thresholds for d in decisions]),
    )

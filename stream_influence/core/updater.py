"""Learning: the :class:`Updater` owns every piece of learned model state and learns from a batch
and its routing decisions.

For a batch of valid events (scored by a :class:`~stream_influence.core.scorer.Scorer`, routed by
a :class:`~stream_influence.core.router.Router`) it runs, in order:

* the prequential metrics of both heads (test, then train: predictions before any learning);
* the curvature update on **every** valid event (the cross-entropy Hessian does not depend on
  labels, so quarantined events inform it too);
* the routed head on the **accepted** events only, the unfiltered shadow head on all of them;
* the drift detector on the routed head's errors.

:meth:`Updater.snapshot` exports an immutable :class:`~stream_influence.core.snapshot.ModelSnapshot`
(private copies) from which any number of scorers can be built — in this process or, through
:func:`~stream_influence.core.state.encode_snapshot`, in another.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stream_influence.core.cross_fit import CrossFitHeads
from stream_influence.core.curvature import Curvature, make_curvature
from stream_influence.core.events import EventBatch, Schema
from stream_influence.core.influence import InfluenceScorer, ReferenceBuffer
from stream_influence.core.learner import DriftMonitor, HeadLearner
from stream_influence.core.model import FeatureExtractor, Standardizer
from stream_influence.core.policy import RoutingDecision, RoutingPolicy
from stream_influence.core.reference_model import ReferenceModel
from stream_influence.core.router import Router, calibrate_policy
from stream_influence.core.scorer import Evidence, Scorer, head_inputs
from stream_influence.core.settings import EngineSettings
from stream_influence.core.snapshot import ModelSnapshot
from stream_influence.errors import CurvatureError

__all__ = ["Counters", "Updater"]

log = logging.getLogger(__name__)

_UNSET: Any = object()


@dataclass
class Counters:
    """Lifetime counts of the engine (checkpointed)."""

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


class Updater:
    """Routed and shadow heads, standardiser, curvature, the reference set and what is derived
    from it (``s = H⁻¹∇L_R``, the reference model), the drift detector and the counts."""

    def __init__(self, settings: EngineSettings, extractor: FeatureExtractor) -> None:
        self.settings = settings
        self.extractor = extractor
        # Cache of s = H⁻¹∇L_R and the held-out reference scores (the math: core.influence).
        self.direction = InfluenceScorer(settings.influence)
        self.reference = ReferenceBuffer(settings.reference)
        self.reference_model = ReferenceModel(settings.influence, settings.seed)
        self.drift = DriftMonitor(settings.drift)
        self.counters = Counters()
        self.events_seen = 0  # valid training events learned from
        self.model_version = 0
        self.standardizer: Standardizer | None = None
        self.curvature: Curvature | None = None
        self.routed: HeadLearner | None = None
        self.shadow: HeadLearner | None = None
        self.warm_started = False  # both learners have learned the trusted set (warm start)
        self.dim = 0  # D = φ width + 1
        self._shortfall: tuple[Any, str | None] = (None, None)  # (buffer, version) → reason
        # Fold heads for the routed-loss evidence (policy.self_loss_fdr > 0 at start; None: off).
        p = settings.policy
        self.cross_fit = (
            CrossFitHeads(settings.learner, p.self_loss_folds, settings.seed) if p.self_loss_fdr > 0 else None
        )

    # -- model construction ----------------------------------------------------------------
    @property
    def n_classes(self) -> int:
        return 0 if self.routed is None else int(self.routed.theta.shape[0])

    def ensure_model(self, n_features: int | None, n_classes: int) -> None:
        """Build the heads for ``n_features`` raw features and ``n_classes`` classes, or grow
        them (a zero row per new class; the curvature restarts from ``λI`` for the new shape)."""
        if n_features is None or n_classes == 0:
            return
        if self.routed is None:
            d = self.extractor.out_features(n_features)
            self.dim = d + 1
            self.standardizer = Standardizer(d, self.settings.model.standardize_freeze_after)
            self.routed = HeadLearner(self.settings.learner, n_classes, self.dim)
            self.shadow = HeadLearner(self.settings.learner, n_classes, self.dim)
            self.curvature = make_curvature(self.settings.curvature, n_classes, self.dim)
        elif self.routed.theta.shape[0] < n_classes:
            assert self.shadow is not None and self.curvature is not None
            self.routed.resize(n_classes)
            self.shadow.resize(n_classes)
            if self.cross_fit is not None:
                self.cross_fit.resize(n_classes)
            self.curvature = make_curvature(self.settings.curvature, n_classes, self.dim)
            self.direction.invalidate()

    def inputs(self, F: np.ndarray) -> np.ndarray:
        """Standardised, augmented head inputs for φ-features ``F``."""
        assert self.standardizer is not None
        return head_inputs(self.standardizer, F, self.settings.model.standardize)

    # -- the trusted side ------------------------------------------------------------------
    def add_reference(self, F: np.ndarray, labels: np.ndarray) -> None:
        """Add trusted points (φ-features, class indices) to the reference buffer."""
        self.reference.add(F, labels)
        self.counters.reference_events += len(F)
        if self.cross_fit is not None and self.warm_started:
            self.cross_fit.add(F, labels)
        self.direction.invalidate()

    @property
    def trusted_reference(self) -> bool:
        """The reference set comes from a trusted source (not seeded from the stream itself)."""
        return self.settings.reference.seed_from_stream == 0

    def reference_shortfall(self) -> str | None:
        """Why the reference set cannot calibrate routing yet (None: it can)."""
        # Asked once per micro-batch; the answer changes only with the buffer (its version).
        key = (self.reference, self.reference.version)
        if self._shortfall[0] != key:
            self._shortfall = (key, self._reference_shortfall())
        return self._shortfall[1]

    def _reference_shortfall(self) -> str | None:
        r = self.settings.reference
        if self.reference.size < r.min_size:
            return f"reference set has {self.reference.size}/{r.min_size} points"
        _, yr = self.reference.arrays()
        counts = np.bincount(yr)
        if int((counts >= r.min_per_class).sum()) < 2:
            return f"reference set needs {r.min_per_class} points in at least two classes (has {counts.tolist()})"
        return None

    def not_warm_reason(self, trusted_reference: bool | None = None) -> str | None:
        """Why events are not routed yet (None: they are).

        A trusted reference routes from the first event; only a reference seeded from the
        stream (``seed_from_stream``) also waits for ``policy.warmup_events`` events.
        """
        if self.routed is None:
            return "no valid event seen yet"
        trusted = self.trusted_reference if trusted_reference is None else trusted_reference
        warmup = self.settings.policy.warmup_events
        if not trusted and self.events_seen < warmup:
            return f"warm-up: {self.events_seen}/{warmup} events"
        return self.reference_shortfall()

    def refresh_direction(self, force: bool = False) -> bool:
        """Recompute ``s = H⁻¹∇L_R`` and the held-out reference scores when stale (every
        ``influence.refresh_every`` scored events, or after the head, the curvature or the
        reference set changed shape); returns whether it did."""
        if self.routed is None or self.curvature is None or self.reference.size == 0:
            return False
        if not (force or self.direction.needs_refresh()):
            return False
        Fr, yr = self.reference.arrays()
        self.direction.refresh(self.routed.theta, self.curvature, self.inputs(Fr), yr)
        return True

    def fit_reference_model(self) -> bool:
        """(Re)fit the reference model when the trusted set has changed by
        ``reference_model_refit_fraction``; returns whether it did."""
        if self.reference.size < 2 or self.routed is None:
            return False
        r, added = self.reference, self.counters.reference_events
        fraction = self.settings.influence.reference_model_refit_fraction
        if not self.reference_model.stale(r.version, r.size, added, fraction):
            return False
        Fr, yr = r.arrays()
        self.reference_model.fit(Fr, yr, self.routed.theta.shape[0], r.version, added)
        return True

    def usable_reference_model(self, wanted: bool) -> ReferenceModel | None:
        """The fitted reference model when the policy's evidence ``wanted`` it, else None."""
        if not wanted or self.reference.size < 2 or self.routed is None or not self.reference_model.fitted:
            return None
        return self.reference_model

    def calibrate_self_loss(self, policy: RoutingPolicy) -> None:
        """Give ``policy`` the trusted points' held-out routed losses under the current heads
        (``self_loss_fdr``; they move with every step, so this runs before every routed batch)."""
        cf = self.cross_fit
        if cf is None or not cf.ready or self.routed is None or policy.settings.self_loss_fdr <= 0:
            return
        # self_loss_calibrate_every k: recomputed once per k learned micro-batches, keyed on the
        # (checkpointed) model version so a restored engine recomputes where an uninterrupted
        # one does; right after the fold heads learned (self_loss_fold_every, same counter).
        every = policy.settings.self_loss_calibrate_every
        if every > 1 and len(policy.self_loss_calibration) and (self.model_version - 1) % every:
            return
        # In fold order: both are only sorted below (no gather, no scatter back).
        losses, margins = cf.held_out(
            self.inputs(cf.fold_ordered_features()), self.routed.theta, fold_order=True
        )
        policy.calibrate_self_loss(losses)
        if policy.settings.contradiction_rate > 0:  # the margin gate's level, from the same heads
            policy.calibrate_margins(margins)

    def calibrate(self, policy: RoutingPolicy) -> None:
        """Calibrate ``policy`` against the current held-out reference scores (and reference model)."""
        if self.routed is None:
            return
        ref = self.reference_model if self.reference_model.fitted else None
        calibrate_policy(policy, self.direction, self.n_classes, ref, self.reference.version)

    # -- learning ----------------------------------------------------------------------------
    def warm_start(self) -> None:
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
        Xr = self.inputs(Fr)
        w = np.ones(len(yr))
        solve = self.curvature.solve if self.settings.learner.optimizer == "newton" else None
        if self.cross_fit is not None:  # before the routed head moves: the folds start where it starts
            self.cross_fit.warm_start(self.routed, Fr, Xr, yr, epochs, solve)
        rng = np.random.default_rng(self.settings.seed)
        for _ in range(epochs):
            order = rng.permutation(len(yr))
            self.routed.learn(Xr[order], yr[order], w, solve, trusted=True)
            self.shadow.learn(Xr[order], yr[order], w, solve, trusted=True)
        self._update_curvature(Xr, self.routed.predict_proba(Xr), w)
        self.direction.invalidate()
        self.model_version += 1

    def begin(self, F: np.ndarray, *, warm: bool, trusted_reference: bool, reference_evidence: bool) -> bool:
        """Bring the learned side up to date for a micro-batch of φ-features ``F`` about to be
        scored: the warm start (once, when routing starts with a trusted reference), the running
        standardiser (every valid event), ``s = H⁻¹∇L_R`` when stale, and — while ``warm`` and
        when the policy's evidence uses it — the reference model.  Returns whether the policy's
        calibration must be recomputed (:meth:`calibrate`)."""
        assert self.standardizer is not None
        if warm and not self.warm_started and trusted_reference:
            self.warm_start()
        self.standardizer.update(F)
        stale = self.refresh_direction()
        if warm and reference_evidence and self.fit_reference_model():
            stale = True
        return stale

    def count_scored(self, n: int) -> None:
        """``n`` events were scored against the cached direction (it is refreshed every
        ``influence.refresh_every`` of them)."""
        if self.reference.size > 0:
            self.direction.events_since_refresh += n

    def update(
        self,
        batch: EventBatch,
        decision: RoutingDecision,
        schema: Schema,
        policy: RoutingPolicy,
        observe: bool = False,
    ) -> bool:
        """Learn a batch routed elsewhere (by a scorer process, from an older snapshot): the
        same steps as the engine, the decisions taken as given; ``policy`` is recalibrated when
        the learned side changed.  ``observe``: the decisions came from another policy object
        (score workers), so this one's adaptive-threshold window (``policy.adaptive_fdr``) is fed
        here, as the deciding router fed its own.  Returns whether the drift detector fired."""
        F = self.extractor.transform(batch.features)
        wanted = Router(policy).uses_reference_loss
        warm = self.not_warm_reason() is None
        if self.begin(F, warm=warm, trusted_reference=self.trusted_reference, reference_evidence=wanted):
            self.calibrate(policy)
        view = self.view(schema, policy, None)
        evidence = Scorer(view).evidence_of(F, batch.labels)
        ref = self.usable_reference_model(wanted)
        if (
            observe and warm and policy.adaptive and ref is not None
        ):  # the adaptive threshold's window, as one process
            policy.observe(
                evidence.scores.get(policy.settings.score), batch.labels, ref.loss(F, batch.labels)
            )
        if observe and warm and policy.settings.self_loss_fdr > 0:  # the routed-loss window too
            self.calibrate_self_loss(policy)
            policy.observe_self_loss(batch.labels, evidence.routed_loss)
        self.count_scored(len(batch))
        return self.learn(evidence, decision, batch.weights)

    def learn(self, evidence: Evidence, decision: RoutingDecision, weights: np.ndarray) -> bool:
        """Learn one routed batch; returns whether the drift detector fired.

        Metrics first (test, then train), then the curvature on every event, the routed head on
        the accepted ones, the shadow head on all, the drift detector last.
        """
        assert self.routed and self.shadow and self.curvature
        X, P, labels = evidence.inputs, evidence.probs, evidence.labels
        errors = self.routed.metrics.defer(P, labels)
        self.shadow.metrics.defer(self.shadow.predict_proba(X), labels)

        self._update_curvature(X, P, weights)
        accept = ~decision.quarantine
        solve = self.curvature.solve if self.settings.learner.optimizer == "newton" else None
        if len(accept) and accept.all():  # the common case: the rows themselves, no copies
            routed = [(self.routed, X, labels, weights)]
        else:
            routed = [(self.routed, X[accept], labels[accept], weights[accept])] if accept.any() else []
        # The fold heads learn what the routed head learns (self_loss_fold_every k: on every k-th
        # learned micro-batch, keyed on the checkpointed model version).
        fold_turn = self.model_version % self.settings.policy.self_loss_fold_every == 0
        if routed and self.cross_fit is not None and fold_turn:
            routed += self.cross_fit.alongside(*routed[0][1:])
        self.shadow.learn(X, labels, weights, solve, alongside=routed)  # one product per step for all
        self.model_version += bool(routed)

        drifted = self.drift.update(errors)
        if drifted:
            self.curvature.forget(self.settings.drift.keep)
            self.direction.invalidate()
            self.counters.drift_resets += 1
        self.events_seen += len(X)
        return drifted

    def _update_curvature(self, X: np.ndarray, P: np.ndarray, w: np.ndarray) -> None:
        assert self.curvature is not None
        try:
            self.curvature.update(X, P, w)
        except CurvatureError as exc:
            # Recover rather than stop the stream: forget the curvature (H = λI) and rebuild it.
            log.warning("curvature update failed, resetting it: %s", exc)
            self.curvature.reset()
            self.direction.invalidate()
            self.counters.refactor_failures += 1

    # -- export ------------------------------------------------------------------------------
    def view(
        self, schema: Schema, policy: RoutingPolicy, reference_model: ReferenceModel | None
    ) -> ModelSnapshot:
        """A zero-copy snapshot over the live state, valid until the next change (the engine's
        hot path scores with it; export with :meth:`snapshot`)."""
        return ModelSnapshot(
            settings=self.settings,
            schema=schema,
            extractor=self.extractor,
            theta=None if self.routed is None else self.routed.theta,
            standardizer=self.standardizer,
            curvature=self.curvature,
            direction=self.direction,
            reference_model=reference_model,
            policy=policy,
            not_warm_reason=None,
            model_version=self.model_version,
            reference_size=self.reference.size,
        )

    def snapshot(
        self,
        schema: Schema,
        policy: RoutingPolicy | None = None,
        *,
        refresh: bool = False,
        not_warm_reason: str | None = _UNSET,
    ) -> ModelSnapshot:
        """An immutable snapshot (private copies) that a :class:`~stream_influence.core.scorer.Scorer`
        and a :class:`~stream_influence.core.router.Router` can be built from.

        ``schema`` is the label space to decode with; ``policy`` the routing policy to calibrate
        (a copy; default: a fresh one from the settings).  The copied ``s = H⁻¹∇L_R`` is brought
        up to date against the current head when it is stale (always with ``refresh``), and the
        reference model fitted if the policy uses it and it is stale — on the copies: this
        updater is not changed.
        """
        reason = self.not_warm_reason() if not_warm_reason is _UNSET else not_warm_reason
        twin = copy.deepcopy(self, {id(self.extractor): self.extractor})  # φ is stateless: shared
        pol = copy.deepcopy(policy) if policy is not None else RoutingPolicy(self.settings.policy)
        wanted = Router(pol).uses_reference_loss
        changed = twin.refresh_direction(force=refresh)
        if wanted and twin.fit_reference_model():
            changed = True
        if changed or refresh or policy is None:
            twin.calibrate(pol)
        twin.calibrate_self_loss(pol)
        snap = twin.view(copy.deepcopy(schema), pol, twin.usable_reference_model(wanted))
        for arr in (snap.theta, snap.direction.s):
            if arr is not None:
                arr.flags.writeable = False
        return dataclasses.replace(snap, not_warm_reason=reason)

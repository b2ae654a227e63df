"""Routing: events + their :class:`~stream_influence.core.scorer.Evidence` → typed decisions.

A :class:`Router` is the routing policy (:mod:`stream_influence.core.policy`: thresholds, the
floor, the reference-loss evidence, the disagreement gate, the quarantine-rate cap and its alarm)
applied to what a scorer computed.  It learns nothing about the model; its only state is the
policy's rolling windows (recent scores and quarantine flags).  Scores follow the project's sign
convention: **positive = learning the event would raise the trusted reference loss (route away)**.
"""

from __future__ import annotations

import copy

import numpy as np

from stream_influence.core.influence import InfluenceScorer
from stream_influence.core.policy import RoutingDecision, RoutingPolicy
from stream_influence.core.reference_model import ReferenceModel
from stream_influence.core.scorer import Evidence
from stream_influence.core.snapshot import ModelSnapshot

__all__ = ["Router", "calibrate_policy"]


def calibrate_policy(
    policy: RoutingPolicy,
    direction: InfluenceScorer,
    n_classes: int,
    reference_model: ReferenceModel | None,
    reference_version: int,
) -> None:
    """Per-class thresholds of the calibrated policy from the held-out reference scores.

    The reference-loss test is calibrated jointly with the floor when the reference model was
    fitted on the very trusted points the held-out scores belong to (same buffer version, same
    order).  Nothing happens before the first refresh of ``direction`` or without a head.
    """
    cal = direction.calibration
    if cal is None or n_classes == 0:
        return
    ref = reference_model if reference_model is not None and reference_model.fitted else None
    scores = cal.scores.get(policy.settings.score)
    aligned = (
        ref is not None and ref.version == reference_version and len(scores) == len(ref.calibration_labels)
    )
    policy.calibrate(
        scores,
        cal.labels,
        n_classes,
        ref.calibration_losses if ref else None,
        ref.calibration_labels if ref else None,
        scores if aligned else None,
    )


class Router:
    """Decides accept / quarantine for scored events with a :class:`RoutingPolicy`."""

    def __init__(self, policy: RoutingPolicy) -> None:
        self.policy = policy

    @classmethod
    def from_snapshot(cls, snapshot: ModelSnapshot, *, rate_cap: bool = True) -> Router:
        """A router over a private copy of the snapshot's calibrated policy.

        ``rate_cap=False`` turns the quarantine-rate cap off: what the policy would decide for
        these events on their own merits (``requeue`` asks that of quarantined events).
        """
        policy = copy.deepcopy(snapshot.policy)
        if not rate_cap:
            policy.settings = policy.settings.model_copy(update={"max_quarantine_rate": 1.0})
        return cls(policy)

    def adopt(self, snapshot: ModelSnapshot) -> None:
        """Take the snapshot's calibration (per-class thresholds, reference-loss thresholds, the
        pooled threshold), keeping this router's own rolling windows and version: how a
        long-lived router follows the models an updater publishes."""
        theirs = snapshot.policy
        self.policy.class_thresholds = theirs.class_thresholds.copy()
        self.policy.reference_thresholds = theirs.reference_thresholds.copy()
        self.policy.loss_calibration = [c.copy() for c in theirs.loss_calibration]
        self.policy.plain_loss_calibration = [c.copy() for c in theirs.plain_loss_calibration]
        self.policy._plain_source = ()  # not made here: a calibration of this policy remakes it
        self.policy.self_loss_calibration = theirs.self_loss_calibration.copy()
        self.policy.margin_threshold = theirs.margin_threshold
        self.policy.threshold = theirs.threshold

    @property
    def score_kind(self) -> str:
        """The score the policy compares with its thresholds (``policy.score``)."""
        return self.policy.settings.score

    @property
    def uses_reference_loss(self) -> bool:
        """Whether the policy's evidence includes the reference-model loss."""
        p = self.policy.settings
        return p.mode == "calibrated" and p.evidence != "influence"

    def decide(self, evidence: Evidence, warm: bool) -> RoutingDecision:
        """Route scored events; before ``warm`` every event is accepted (reason ``warmup``)."""
        s = self.policy.settings
        self_loss = margin = None
        if warm and (s.self_loss_fdr > 0 or s.contradiction_rate > 0):
            routed_loss = evidence.routed_loss  # once for both
            self_loss = routed_loss if s.self_loss_fdr > 0 else None
            margin = evidence.margin_given(routed_loss) if s.contradiction_rate > 0 else None
        return self.policy.decide(
            evidence.scores.get(self.score_kind),
            warm,
            evidence.labels,
            evidence.disagree,
            evidence.reference_loss if warm else None,
            self_loss,
            margin,
        )

    def unscored(self, n: int) -> RoutingDecision:
        """Decisions for ``n`` events when no model exists yet: all warm-up accepts."""
        return self.policy.decide(np.full(n, np.nan), warm=False)

"""Scoring, read-only: the influence of every event of a batch under a :class:`ModelSnapshot`.

A :class:`Scorer` never changes its snapshot (nor anything else): scoring the same batch twice
gives the same :class:`~stream_influence.core.influence.Scores`, and a scorer built from the
bytes of a snapshot (:func:`~stream_influence.core.state.decode_snapshot`) scores exactly like
one built from the snapshot itself.  What the scores estimate, and their sign, is stated once in
:mod:`stream_influence.core.influence`; in short, **positive = learning the event would raise the
trusted reference loss (the model would memorise it), negative = it would lower it**.

>>> import json
>>> from stream_influence.core.engine import InfluenceEngine
>>> from stream_influence.core.settings import EngineSettings
>>> engine = InfluenceEngine(EngineSettings())
>>> ref = [json.dumps({"id": f"r{i}", "features": [i % 2, 1.0 + i % 3], "label": i % 2}).encode()
...        for i in range(40)]
>>> _ = engine.add_reference(ref)
>>> _ = engine.process(ref[:8])
>>> scorer = Scorer(engine.snapshot())
>>> batch, _ = scorer.decode(ref[:4])
>>> first, again = scorer.score(batch), scorer.score(batch)
>>> bool((first.influence == again.influence).all()), len(first.influence)
(True, 4)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from stream_influence.core.events import EventBatch, Reject
from stream_influence.core.influence import Scores
from stream_influence.core.model import Standardizer, augment, label_loss, one_hot, row_max, softmax
from stream_influence.core.snapshot import ModelSnapshot
from stream_influence.errors import NotWarmError

__all__ = ["Evidence", "Scorer", "head_inputs"]


def head_inputs(standardizer: Standardizer, features: np.ndarray, standardize: bool) -> np.ndarray:
    """Standardised (when ``standardize``), augmented head inputs ``x̃ = [φ; 1]`` of φ-features."""
    return standardizer.transform_augmented(features) if standardize else augment(features)


@dataclass(frozen=True, slots=True)
class Evidence:
    """What routing reads about a batch of ``n`` valid events, all computed from one snapshot.

    ``inputs`` are the standardised, augmented head inputs ``x̃`` (``n × D``), ``probs`` the
    routed head's class probabilities ``p`` before it learns anything of the batch, ``scores``
    the influence scores (NaN when the snapshot cannot score yet), ``reference_loss`` the
    reference model's ``ℓ_ref = −log p_ref(y | φ(x))`` (``None`` when the policy does not use it).
    """

    inputs: np.ndarray
    probs: np.ndarray
    labels: np.ndarray
    scores: Scores
    reference_loss: np.ndarray | None

    @property
    def routed_loss(self) -> np.ndarray:
        """Per event: ``ℓ_θ = −log p_θ(y | φ(x))`` under the routed head before it learns the
        event (≥ 0; larger = the label is more surprising to the model that routes)."""
        return label_loss(self.probs, self.labels)

    @property
    def margin(self) -> np.ndarray:
        """Per event: the routed head's margin against the label, ``log p(predicted) − log p(y)``
        (≥ 0; 0 when it predicts the label; large = the model confidently contradicts the label,
        small = it finds the event merely hard)."""
        return self.margin_given(self.routed_loss)

    def margin_given(self, routed_loss: np.ndarray) -> np.ndarray:
        """:attr:`margin` from :attr:`routed_loss` already computed (the router reads both)."""
        # log p(predicted) + ℓ_θ: the same operations as their difference (negation is exact).
        return np.log(np.clip(row_max(self.probs), 1e-300, None)) + routed_loss

    @property
    def disagree(self) -> np.ndarray:
        """Per event: the routed head's most likely class is not the event's label."""
        return self.probs.argmax(axis=1) != self.labels


class Scorer:
    """Scores batches against an immutable :class:`ModelSnapshot` (no side effects)."""

    def __init__(self, snapshot: ModelSnapshot) -> None:
        self.snapshot = snapshot

    def decode(self, raws: Sequence[bytes | str | None]) -> tuple[EventBatch, list[Reject]]:
        """Decode raw messages against the snapshot's label space (never adding a label)."""
        if self.snapshot.theta is None:
            raise NotWarmError("the snapshot has no model yet: no valid event was learned")
        return self.snapshot.schema.decode_batch(raws, learn=False)

    def inputs(self, features: np.ndarray) -> np.ndarray:
        """Standardised, augmented head inputs ``x̃`` of φ-features ``features``."""
        snap = self.snapshot
        assert snap.standardizer is not None
        return head_inputs(snap.standardizer, features, snap.settings.model.standardize)

    def score(self, batch: EventBatch) -> Scores:
        """Influence scores of ``batch`` (positive: learning the event would raise the trusted
        reference loss — memorise, route away; negative: it would lower it — accept)."""
        return self.evidence(batch).scores

    def evidence(self, batch: EventBatch) -> Evidence:
        """Scores and everything else the router reads, for decoded events."""
        if self.snapshot.theta is None:
            raise NotWarmError("the snapshot has no model yet: no valid event was learned")
        return self.evidence_of(self.snapshot.extractor.transform(batch.features), batch.labels)

    def evidence_of(
        self, features: np.ndarray, labels: np.ndarray, reference_loss: np.ndarray | None = None
    ) -> Evidence:
        """:meth:`evidence` for φ-features already computed (the engine's hot path);
        ``reference_loss``: the snapshot's reference model's ``ℓ_ref`` of these events, when the
        caller already has it (the engine computes a whole chunk's in one product)."""
        snap = self.snapshot
        assert snap.theta is not None and snap.curvature is not None
        X = self.inputs(features)
        P = softmax(X @ snap.theta.T)
        if snap.scorable:
            scores = snap.direction.score(P, one_hot(labels, snap.n_classes), X, snap.curvature)
        else:
            scores = Scores.missing(len(X))
        ref = snap.reference_model
        if ref is None:
            reference_loss = None
        elif reference_loss is None:
            reference_loss = ref.loss(features, labels)
        return Evidence(X, P, labels, scores, reference_loss)

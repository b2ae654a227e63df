"""An immutable model snapshot: everything a :class:`~stream_influence.core.scorer.Scorer` and a
:class:`~stream_influence.core.router.Router` read, and nothing they could change.

The :class:`~stream_influence.core.updater.Updater` exports one with :meth:`Updater.snapshot`
(private copies of its parts); :func:`stream_influence.core.state.encode_snapshot` turns it into
bytes (the safetensors + JSON state format, with its own version number) so another process can
score against the model that one shared updater learns.

*Immutable* is a contract, kept by construction: the snapshot's parts are copies no one else
holds, its arrays are marked read-only, and the scorer and router only read them (the router
routes with its own copy of :attr:`ModelSnapshot.policy`, whose rolling windows it advances).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stream_influence.core.curvature import Curvature
from stream_influence.core.events import Schema
from stream_influence.core.influence import InfluenceScorer
from stream_influence.core.model import FeatureExtractor, Standardizer
from stream_influence.core.policy import RoutingPolicy
from stream_influence.core.reference_model import ReferenceModel
from stream_influence.core.settings import EngineSettings

__all__ = ["ModelSnapshot"]


@dataclass(frozen=True, slots=True)
class ModelSnapshot:
    """The routed head and what scoring and routing need around it, at one model version.

    ``theta``, ``standardizer`` and ``curvature`` are ``None`` until the updater has seen a valid
    event (nothing can be scored then).  ``direction`` holds the cached ``s = H⁻¹∇L_R``, its norm,
    the reference loss and the held-out calibration scores of the trusted points;
    ``reference_model`` is the head fitted on the trusted set alone, present only when the policy's
    evidence uses the reference loss and it has been fitted; ``policy`` is calibrated against
    ``direction`` (and ``reference_model``).  ``not_warm_reason`` is why events would not be
    routed yet (``None``: they are).
    """

    settings: EngineSettings
    schema: Schema
    extractor: FeatureExtractor
    theta: np.ndarray | None
    standardizer: Standardizer | None
    curvature: Curvature | None
    direction: InfluenceScorer
    reference_model: ReferenceModel | None
    policy: RoutingPolicy
    not_warm_reason: str | None
    model_version: int
    reference_size: int

    @property
    def warm(self) -> bool:
        return self.not_warm_reason is None

    @property
    def n_classes(self) -> int:
        return 0 if self.theta is None else int(self.theta.shape[0])

    @property
    def scorable(self) -> bool:
        """Whether events can be scored: a head exists and ``s = H⁻¹∇L_R`` has been computed."""
        return self.theta is not None and self.direction.s is not None and self.reference_size > 0

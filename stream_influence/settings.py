"""Typed settings of the influence engine.

Every tunable of the engine lives here, in frozen pydantic models, so a configuration can be
validated up front, printed, saved next to the artifacts it produced and compared later.  The
defaults work out of the box on raw, unscaled features and on dense embeddings of a few hundred
dimensions.

>>> from stream_influence.settings import EngineSettings
>>> s = EngineSettings()
>>> s.curvature.kind, s.policy.score
('kfac', 'cosine_influence')
>>> CurvatureSettings(damping=-1.0)
Traceback (most recent call last):
...
pydantic_core._pydantic_core.ValidationError: 1 validation error for CurvatureSettings
damping
  Input should be greater than 0 [type=greater_than, input_value=-1.0, input_type=float]
...
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "CurvatureSettings",
    "DriftSettings",
    "EngineSettings",
    "InfluenceSettings",
    "LearnerSettings",
    "ModelSettings",
    "PolicySettings",
    "ReferenceSettings",
    "SchemaSettings",
]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SchemaSettings(_Frozen):
    """What a valid training event looks like."""

    classes: list[int | str] | None = Field(
        default=None,
        description="Class labels in index order. None: the reference set's labels (the trusted side "
        "owns the label space: stream labels outside it are dead-lettered unknown_label); only "
        "without a reference set are they learned from the warm-up events, then frozen.",
    )
    n_features: int | None = Field(
        default=None, gt=0, description="Feature width. None: taken from the first valid event."
    )
    max_event_bytes: int = Field(
        default=1_048_576, gt=0, description="Events larger than this are rejected as too_large."
    )
    max_abs_feature: float = Field(
        default=1e15,
        gt=0,
        description="Features of larger magnitude are rejected as out_of_range (their squares would "
        "overflow the running statistics).",
    )
    max_classes: int = Field(
        default=1000, ge=2, description="Guard on label discovery: more labels than this are rejected."
    )

    @model_validator(mode="after")
    def _classes_unique(self) -> SchemaSettings:
        if self.classes is not None:
            keys = [str(c) for c in self.classes]
            if len(set(keys)) != len(keys):
                raise ValueError("classes must be unique (labels are compared as strings)")
            if len(keys) < 2:
                raise ValueError("classes needs at least two labels")
        return self


class ModelSettings(_Frozen):
    """Feature extractor φ and feature standardisation."""

    extractor: Literal["identity", "torch"] = Field(
        default="identity", description="identity: φ(x) = x; torch: a frozen torch module."
    )
    torch_factory: str | None = Field(
        default=None,
        description="'package.module:callable' returning the (untrained) torch module for φ.",
    )
    torch_weights: Path | None = Field(
        default=None, description="State dict for the module, loaded with weights_only=True."
    )
    standardize: bool = Field(
        default=True,
        description="Standardise φ(x) with running mean/variance (keeps raw, unscaled features sane).",
    )
    standardize_freeze_after: int | None = Field(
        default=None,
        ge=1,
        description="Stop updating the standardiser after this many events (None: never).",
    )

    @model_validator(mode="after")
    def _torch_needs_factory(self) -> ModelSettings:
        if self.extractor == "torch" and not self.torch_factory:
            raise ValueError("extractor='torch' needs torch_factory ('package.module:callable')")
        return self


class CurvatureSettings(_Frozen):
    """Running estimate of the output-layer Hessian ``H = E[(diag p − ppᵀ) ⊗ φφᵀ] + λI``."""

    kind: Literal["exact", "kfac", "diagonal"] = Field(
        default="kfac",
        description="exact: full (K·D)² inverse, for small heads; kfac: G ⊗ A factors; diagonal.",
    )
    damping: float = Field(
        default=0.1,
        gt=0,
        description="λ added to the Hessian (on standardised features 0.1 measured best on the "
        "bundled streams; see docs/benchmarks.md).",
    )
    forgetting: float = Field(
        default=0.999,
        gt=0,
        le=1,
        description="γ per event: H_t = γ H_{t−1} + (1−γ) h_t (1 = plain running mean).",
    )
    refactor_every: int = Field(
        default=4096,
        ge=1,
        description="Events between re-factorisations from the running Hessian (stops drift).",
    )
    damping_floor: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="exact: re-factorise early when the damping in force (which forgets along "
        "with the data between re-factorisations) falls below this fraction of λ.",
    )


class ReferenceSettings(_Frozen):
    """The trusted reference set R."""

    capacity: int = Field(default=2000, ge=1, description="Bounded buffer size (newest kept).")
    min_size: int = Field(
        default=100, ge=1, description="Routing stays in warm-up until R holds this many points."
    )
    seed_from_stream: int = Field(
        default=0,
        ge=0,
        description="When no reference stream exists: the first N valid events seed R "
        "(they are also applied to the model).",
    )


class InfluenceSettings(_Frozen):
    """How influence is scored."""

    objective: Literal["loss", "margin"] = Field(
        default="loss",
        description="loss: reference cross-entropy; margin: reference logit margin "
        "(classification influence).",
    )
    refresh_every: int = Field(
        default=256, ge=1, description="Events between refreshes of the cached s = H⁻¹∇L_R."
    )


class PolicySettings(_Frozen):
    """Routing policy: which points go to the updater and which to quarantine.

    Sign convention: a positive score means learning the point raises the trusted reference
    loss (memorise) and is routed away.  Hot-swappable at run time.
    """

    score: Literal["influence", "relative_influence", "cosine_influence"] = Field(
        default="cosine_influence",
        description="Score the thresholds apply to (all share the sign; cosine_influence is in "
        "[−1, 1] and keeps its scale over the whole stream).",
    )
    mode: Literal["absolute", "quantile"] = Field(
        default="absolute",
        description="absolute: fixed thresholds; quantile: quarantine the top `quantile` of "
        "recent scores (never a score ≤ quarantine_threshold).",
    )
    accept_threshold: float = Field(default=0.0, description="Accept if score ≤ this.")
    quarantine_threshold: float = Field(
        default=0.02,
        description="Quarantine if score > this (a small positive margin on cosine_influence trades "
        "a little recall for much higher precision).",
    )
    quantile: float = Field(
        default=0.1, gt=0, lt=1, description="quantile mode: fraction of recent scores quarantined."
    )
    quantile_window: int = Field(default=5000, ge=10, description="Recent scores the quantile is taken over.")
    warmup_events: int = Field(
        default=500, ge=0, description="Accept everything until this many valid events were seen."
    )
    max_quarantine_rate: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="Cap on the rolling quarantine rate; above it the alarm is raised and the "
        "lowest-scoring excess is accepted (reason rate_cap) instead of quarantined.",
    )
    rate_window: int = Field(default=2000, ge=10, description="Events in the rolling rate.")

    @model_validator(mode="after")
    def _ordered(self) -> PolicySettings:
        if self.accept_threshold > self.quarantine_threshold:
            raise ValueError(
                f"accept_threshold ({self.accept_threshold}) must be ≤ quarantine_threshold "
                f"({self.quarantine_threshold})"
            )
        return self


class LearnerSettings(_Frozen):
    """The online updater (the routed learner and its unfiltered shadow share these)."""

    optimizer: Literal["sgd", "adam", "newton"] = Field(
        default="sgd",
        description="sgd/adam: first-order steps; newton: damped Newton step reusing the curvature.",
    )
    learning_rate: float = Field(
        default=0.1,
        gt=0,
        description="Step size (sgd: for inputs of up to 64 standardised features; see normalize_step).",
    )
    normalize_step: bool = Field(
        default=True,
        description="sgd: shrink the step by 64 / mean ‖x̃‖² once inputs are wider than that, so "
        "the default suits 10 features and 1,000 alike (0.1 on digits, about 0.009 on 784 pixels).",
    )
    l2: float = Field(default=1e-4, ge=0, description="L2 penalty on the weights (not the bias).")
    minibatch: int = Field(default=8, ge=1, description="Events per optimizer step inside a polled batch.")
    metrics_window: int = Field(default=1000, ge=1, description="Rolling prequential window.")


class DriftSettings(_Frozen):
    """ADWIN on the routed learner's prequential error."""

    enabled: bool = Field(default=True, description="Watch the routed learner's error for drift.")
    delta: float = Field(default=0.002, gt=0, lt=1, description="ADWIN significance (smaller: fewer alarms).")
    keep: float = Field(
        default=0.1,
        ge=0,
        le=1,
        description="On drift the curvature keeps this fraction of its evidence (0 = reset).",
    )
    history: int = Field(
        default=65_536, ge=256, description="Errors kept to restore the detector from a checkpoint."
    )


class EngineSettings(_Frozen):
    """Everything the engine needs; saved with every checkpoint and report."""

    schema_: SchemaSettings = Field(default_factory=SchemaSettings, alias="schema")
    model: ModelSettings = Field(default_factory=ModelSettings)
    curvature: CurvatureSettings = Field(default_factory=CurvatureSettings)
    reference: ReferenceSettings = Field(default_factory=ReferenceSettings)
    influence: InfluenceSettings = Field(default_factory=InfluenceSettings)
    policy: PolicySettings = Field(default_factory=PolicySettings)
    learner: LearnerSettings = Field(default_factory=LearnerSettings)
    drift: DriftSettings = Field(default_factory=DriftSettings)
    seed: int = Field(default=0, description="Seed for every random choice the engine makes.")

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

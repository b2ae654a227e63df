"""Typed settings of the influence engine.

Every tunable of the engine lives here, in frozen pydantic models, so a configuration can be
validated up front, printed, saved next to the artifacts it produced and compared later.  The
defaults work out of the box on raw, unscaled features and on dense embeddings of a few hundred
dimensions.

>>> from stream_influence.core.settings import EngineSettings
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
    # allow_inf_nan=False: a NaN threshold compares False with everything (routing silently off).
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


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

    kind: Literal["exact", "kfac", "ekfac", "classblock", "diagonal"] = Field(
        default="kfac",
        description="exact: full (K·D)² inverse, for small heads; kfac: G ⊗ A factors; ekfac: "
        "K-FAC's eigenbasis with the data's own eigenvalues (eigenvalue-corrected K-FAC); "
        "classblock: the K per-class D × D blocks exactly, cross-class blocks dropped; diagonal. "
        "With refine (the default) every kind but exact serves the reference direction H⁻¹∇L_R "
        "refined against the exact running Hessian; the kind then sets the preconditioner and the "
        "self-terms gᵀH⁻¹g. 'refined' (earlier releases) is still accepted: it means kfac with "
        "refine: true. classblock runs at roughly half kfac's rate (docs/benchmarks.md, fidelity "
        "and engine).",
    )
    refine: bool = Field(
        default=True,
        description="Refine the reference direction s = H⁻¹∇L_R (the one solve scoring needs) on the "
        "stream against the exact running Hessian: each micro-batch adds its exact Hessian-vector "
        "product with the current direction (two matrix products over the batch, no (K·D)² matrix) "
        "and s takes one step preconditioned by the kind's own approximate inverse. Its fixed point "
        "is the exact solve (C + λI)⁻¹∇L_R. Cost: the engine cell ran at 97.8 % of plain kfac's rate "
        "(91.5–99.7 % in passes on a loaded machine; docs/benchmarks.md, fidelity). Against "
        "leave-one-out refits on the 10-class fidelity heads: kfac 0.92 / 0.86 without, 0.999 / "
        "0.97 with; ekfac 0.91 / 0.86 without, 0.999 / 0.97 with. Ignored by exact, which solves "
        "exactly already; a "
        "checkpoint restores whether it was written with refine on or off (the refinement state "
        "is derived and restarts from the kind's own solve).",
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
    ekfac_buffer: int = Field(
        default=256,
        ge=0,
        description="ekfac: most recent points kept (features, probabilities, weight) to re-project "
        "the corrected eigenvalues exactly when the eigenbasis is refreshed; older evidence is "
        "estimated from its K-FAC factors (0: K-FAC eigenvalues as the prior after every refresh).",
    )
    refine_step: float = Field(
        default=0.7,
        gt=0,
        le=1,
        description="refine: step ω of each preconditioned correction of the reference direction, "
        "s ← s + ω M⁻¹ (∇L_R − (H + λI) s) with M the kind's own damped Hessian; below 1 keeps the "
        "correction stable where the preconditioner underestimates the curvature by a large factor "
        "(measured with kfac: 1 oscillated after a drift, 0.5–0.7 did not; docs/benchmarks.md, "
        "fidelity).",
    )
    damping_floor: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="exact: re-factorise early when the damping in force (which forgets along "
        "with the data between re-factorisations) falls below this fraction of λ.",
    )

    @model_validator(mode="before")
    @classmethod
    def _refined_alias(cls, data: object) -> object:
        """``kind: refined`` (earlier releases' estimator) is ``kind: kfac, refine: true``."""
        if isinstance(data, dict) and data.get("kind") == "refined":
            if data.get("refine") is False:
                raise ValueError("kind 'refined' is kfac with refine: true; it cannot have refine: false")
            data = {**data, "kind": "kfac", "refine": True}
        return data


class ReferenceSettings(_Frozen):
    """The trusted reference set R."""

    capacity: int = Field(default=2000, ge=1, description="Bounded buffer size (newest kept).")
    min_size: int = Field(
        default=4,
        ge=1,
        description="Routing waits until R holds this many points in all (with min_per_class: a "
        "couple of points per class is what the held-out calibration needs).",
    )
    min_per_class: int = Field(
        default=2,
        ge=1,
        description="Routing waits until at least two classes each have this many points in R; "
        "classes with fewer borrow the pooled calibration (a warning is logged under 10 per class).",
    )
    seed_from_stream: int = Field(
        default=0,
        ge=0,
        description="When no reference stream exists: the first N valid events seed R "
        "(they are also applied to the model, and policy.warmup_events applies).",
    )


class InfluenceSettings(_Frozen):
    """How influence is scored."""

    objective: Literal["loss", "margin"] = Field(
        default="loss",
        description="loss: reference cross-entropy; margin: reference logit margin "
        "(classification influence).",
    )
    refresh_every: int = Field(
        default=256,
        ge=1,
        description="Events between refreshes of the cached s = H⁻¹∇L_R (and of the calibration "
        "scores of the reference points).",
    )
    micro_batch: int = Field(
        default=512,
        ge=1,
        description="Events scored, routed and learned together inside a polled chunk: later "
        "micro-batches are scored by the model that learned the earlier ones (the poll/commit "
        "chunk size stays a Kafka setting).  512 (one micro-batch per default poll) measured "
        "quality-neutral against 64 on both routing grids (docs/benchmarks.md, quality variant "
        "mb512 and routing_ablation) at about 1.5x the engine's speed; smaller values score later "
        "events of a large poll with a head that has learned the earlier ones.",
    )
    reference_model_l2: float = Field(
        default=1e-2,
        gt=0,
        description="policy.evidence reference_loss/hybrid: L2 penalty of the reference model (the "
        "head fitted on the trusted set alone, on the trusted points' own standardisation).",
    )
    reference_model_folds: int = Field(
        default=5,
        ge=2,
        description="policy.evidence reference_loss/hybrid: folds of the cross-fitting that gives "
        "each trusted point its reference loss under a head fitted without it (the calibration "
        "sample); refitted only when the trusted set has changed enough, see "
        "reference_model_refit_fraction.",
    )
    reference_model_refit_fraction: float = Field(
        default=0.1,
        ge=0,
        description="policy.evidence reference_loss/hybrid: refit the reference model (an L-BFGS "
        "fit per fold, ~0.4 s at 2,000 points of width 64) once the trusted points added since "
        "its last fit, or the change of the trusted set's size, reach this fraction of the set it "
        "was fitted on; in between the old fit is kept, so a trickle of trusted points does not "
        "refit on every poll (0: refit on every change).",
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
    mode: Literal["calibrated", "absolute", "quantile"] = Field(
        default="calibrated",
        description="calibrated: quarantine above the (1 − false_quarantine_rate) quantile of the "
        "held-out scores of the clean reference points of the event's class; absolute: fixed "
        "thresholds; quantile: quarantine the top `quantile` of recent scores. calibrated and "
        "quantile never quarantine a score ≤ quarantine_threshold (save the strong-evidence exception "
        "of floor_yield_fdr).",
    )
    evidence: Literal["influence", "reference_loss", "hybrid"] = Field(
        default="hybrid",
        description="calibrated mode: what quarantines an event. influence: its score above the "
        "class threshold; reference_loss: its label's loss under the reference model (fitted on "
        "the trusted set alone) above the class threshold of cross-fitted trusted losses; hybrid: "
        "either, α split between them by hybrid_split (Bonferroni, so α still bounds clean "
        "quarantines). With reference_loss and hybrid alike the reference-loss route fires only "
        "when the score is also above quarantine_threshold (learning the event would raise the "
        "reference loss): the floor holds for every evidence, yielding only to the strong evidence of "
        "floor_yield_fdr. hybrid (with class_fair_gate) is the "
        "default: measured in docs/benchmarks.md (routing_ablation, quality).",
    )
    hybrid_split: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="evidence hybrid: the share of α given to the reference-loss test; the "
        "influence test gets the rest (1: the reference-loss test alone at α, still only for "
        "scores above quarantine_threshold). With adaptive_fdr > 0 the reference-loss test sets "
        "its own threshold from the stream and only the influence test's share counts.",
    )
    gate_reference_loss: bool = Field(
        default=True,
        description="evidence reference_loss/hybrid: the disagreement gate (require_disagreement) "
        "also applies to the reference-loss test. False: only the influence test is gated; the "
        "reference-loss test, calibrated jointly with the floor, then quarantines each clean "
        "class at most at its share of α on its own, whatever the model predicts.",
    )
    floor_reference_loss: bool = Field(
        default=True,
        description="evidence reference_loss/hybrid: the reference-loss test fires only for a "
        "score above quarantine_threshold (the sign floor), and is calibrated jointly with it. "
        "False: the test fires on the reference loss alone (calibrated on the plain cross-fitted "
        "losses); the influence test keeps its floor.",
    )
    adaptive_fdr: float = Field(
        default=0.5,
        ge=0,
        lt=1,
        description="evidence reference_loss/hybrid: the reference-loss test's threshold adapts "
        "to the stream (0: the fixed per-class threshold at its share of α). Each event's reference "
        "loss gets a conformal p-value against the cross-fitted trusted losses of its class; the "
        "test fires at or below the Benjamini–Hochberg threshold at this false discovery rate over "
        "the last rate_window events. On a clean stream that threshold stays near 0; as the share "
        "of surprising labels grows it rises, and recall with it. Measured in docs/benchmarks.md "
        "(quality).",
    )
    floor_yield_fdr: float = Field(
        default=0.15,
        ge=0,
        lt=1,
        description="With floor_reference_loss and adaptive_fdr > 0: the sign floor yields only to "
        "strong evidence — an event scored helpful is still quarantined by the reference-loss test "
        "when its conformal p-value against the plain (unfloored) cross-fitted trusted losses of its "
        "class passes Benjamini–Hochberg at this stricter false discovery rate over the last "
        "rate_window events (0: the floor always holds). Measured in docs/benchmarks.md "
        "(routing_ablation, quality).",
    )
    self_loss_fdr: float = Field(
        default=0.2,
        ge=0,
        lt=1,
        description="Routed-loss evidence (0: off). Each event's label loss under the routed head "
        "before it learns the event gets a conformal p-value among the trusted points' held-out "
        "losses under the same head (cross-fitted fold heads, see self_loss_folds), pooled over "
        "classes after dividing each class's losses by its trusted median; the event is "
        "quarantined (disagreement gate permitting) when that p-value passes Benjamini–Hochberg "
        "at this false discovery rate over the last rate_window events — strong evidence that "
        "overrides the sign floor. Shut on a clean stream; it opens as the model learns to "
        "separate flips. Fold heads exist only when this is > 0 at start (a hot reload that turns "
        "it on has no calibration: the test stays off), and are made at the warm start (a trusted "
        "reference with learner.warm_start_epochs > 0). Calibrated mode only. Measured in "
        "docs/benchmarks.md (quality, routing_ablation).",
    )
    self_loss_folds: int = Field(
        default=2,
        ge=2,
        le=10,
        description="self_loss_fdr: cross-fitting folds of the trusted set; one extra head per fold "
        "learns every accepted event alongside the routed head (learning cost × (2 + folds) / 2).",
    )
    contradiction_rate: float = Field(
        default=0.4,
        ge=0,
        lt=1,
        description="Spare hard-but-correct events from the loss-evidence tests (0: off). With a "
        "level a > 0 the reference-loss and routed-loss tests (adaptive_fdr, floor_yield_fdr, "
        "self_loss_fdr) quarantine an event only when the routed head's margin against its label, "
        "log p(predicted) − log p(label), exceeds the (1 − a) conformal quantile of the trusted "
        "points' held-out margins (cross-fitted fold heads, see self_loss_folds): the model "
        "confidently contradicts the label rather than finds it merely uncertain. A clean event "
        "passes with probability ≤ a whatever the loss tests' thresholds, which open with the "
        "stream's noise. Needs the fold heads (self_loss_fdr > 0 at start); the influence test is "
        "not affected. Calibrated mode only. Measured in docs/benchmarks.md (quality, round q11).",
    )
    contradiction_calibration: Literal["all", "errors"] = Field(
        default="errors",
        description="contradiction_rate: which trusted held-out margins the level is the (1 − a) "
        "quantile of — all of them (a clean event passes with probability ≤ a; 0 where the fold "
        "heads predict more than 1 − a of the trusted points right, i.e. the disagreement gate), "
        "or only those the fold heads get wrong (errors: a clean event the model disagrees with "
        "passes with probability ≤ a — the loss tests select disagreeing events; with fewer than "
        "1/a − 1 such points the largest is the level).",
    )
    self_loss_fold_every: int = Field(
        default=1,
        ge=1,
        description="self_loss_fdr: the fold heads learn the accepted events of every k-th learned "
        "micro-batch only (keyed on the model version; 1: every one, in the same steps as the "
        "routed head — exact). Larger values save most of the fold heads' learning (about half a "
        "µs per event at d = 64, K = 10) but leave them less trained than the routed head (larger "
        "held-out losses: a more cautious test). An option, not the default: measured (speed and "
        "benchmarks/quality.py --quick) in the commit that added it.",
    )
    self_loss_calibrate_every: int = Field(
        default=1,
        ge=1,
        description="self_loss_fdr: recompute the trusted points' held-out losses under the fold "
        "heads once per k learned micro-batches (keyed on the model version, right after the fold "
        "heads learned when self_loss_fold_every is the same k; 1: before every micro-batch — "
        "exact). Saves about 0.3 µs per event at d = 64, K = 10; events are compared with a "
        "calibration up to k − 1 micro-batches old. An option, not the default.",
    )
    class_fair_gate: bool = Field(
        default=True,
        description="evidence reference_loss/hybrid with require_disagreement and the fixed "
        "threshold (adaptive_fdr 0): thin each class's reference-loss test to the gate pass-through of the least-passed class (the share of the "
        "class's recent loss-test firings the gate let through, measured on the stream over "
        "rate_window events): on clean data the gate passes a class-dependent share (the model's "
        "prior waves a frequent class through), so the loss test then quarantines no class more "
        "than another; flips pass the gate in every class, so a noisy stream keeps the full test.",
    )
    false_quarantine_rate: float = Field(
        default=0.1,
        gt=0,
        lt=1,
        description="calibrated mode: α, the share of clean events of each class allowed to score "
        "above the threshold (the disagreement gate lowers the quarantined share further).",
    )
    min_class_calibration: int = Field(
        default=10,
        ge=1,
        description="calibrated mode: a class with fewer reference points than this uses the "
        "threshold pooled over all classes instead of its own.",
    )
    require_disagreement: bool = Field(
        default=True,
        description="Quarantine only events whose label the model does not predict (argmax ≠ "
        "label); hard-but-correct events the model already gets right are learned.",
    )
    accept_threshold: float = Field(default=0.0, description="Accept (reason helpful) if score ≤ this.")
    quarantine_threshold: float = Field(
        default=0.0,
        description="absolute mode: quarantine if score > this; calibrated/quantile: a floor under "
        "the data-driven threshold (0: never quarantine an event whose learning lowers the "
        "reference loss, save on the strong evidence of floor_yield_fdr).",
    )
    quantile: float = Field(
        default=0.1, gt=0, lt=1, description="quantile mode: fraction of recent scores quarantined."
    )
    quantile_window: int = Field(default=5000, ge=10, description="Recent scores the quantile is taken over.")
    warmup_events: int = Field(
        default=500,
        ge=0,
        description="Only without a trusted reference (reference.seed_from_stream): accept "
        "everything until this many valid events were seen. A trusted reference routes from the "
        "first event.",
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
    warm_start_epochs: int = Field(
        default=10,
        ge=0,
        description="Passes over the trusted reference set that both learners make before the "
        "first routed event (0: cold start). Not with seed_from_stream, whose points are learned "
        "as stream events.",
    )
    metrics_window: int = Field(default=1000, ge=1, description="Rolling prequential window.")
    kernel: Literal["compiled", "numpy"] = Field(
        default="compiled",
        description="How sgd steps are computed. numpy: the reference, a few batched numpy calls per "
        "step (bitwise what earlier releases computed); compiled: the same steps as one numba loop "
        "over the rows in place (the whole engine ~1.2x faster: docs/benchmarks.md, engine), whose "
        "arithmetic inside a step (sums, divisions, fused multiply-adds, exp) may round differently "
        "in the last bits (relative differences ~1e-15 per step). adam and newton always use the "
        "numpy path. Changes no checkpointed state: a checkpoint restores under either kernel.",
    )


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

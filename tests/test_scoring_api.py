"""The public seam between scoring and learning: Scorer (read-only, over a ModelSnapshot), Router,
Updater — and the snapshot's bytes, which scorer processes of a scaled-out deployment receive."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import numpy as np
import pytest

from stream_influence.core.engine import EngineSummary, InfluenceEngine
from stream_influence.core.influence import Scores
from stream_influence.core.router import Router
from stream_influence.core.scorer import Scorer
from stream_influence.core.settings import EngineSettings
from stream_influence.core.snapshot import ModelSnapshot
from stream_influence.core.state import (
    SNAPSHOT_VERSION,
    _split,
    decode_snapshot,
    decode_state,
    encode_snapshot,
    encode_state,
)
from stream_influence.errors import CheckpointCorrupt, CheckpointIncompatible

K, D = 4, 6


def _raws(rng: np.random.Generator, n: int, prefix: str, flip: float = 0.3) -> list[bytes]:
    """Separable classes on unscaled features, a share ``flip`` of labels shifted by one."""
    y = rng.integers(0, K, n)
    X = (rng.normal(size=(n, D)) + 2.0 * np.eye(K, D)[y]) * np.linspace(0.5, 3.0, D)
    labels = np.where(rng.random(n) < flip, (y + 1) % K, y)
    return [
        json.dumps({"id": f"{prefix}{i}", "features": X[i].tolist(), "label": int(labels[i])}).encode()
        for i in range(n)
    ]


def _engine(settings: EngineSettings, seed: int = 0, chunks: int = 3) -> tuple[InfluenceEngine, Any]:
    rng = np.random.default_rng(seed)
    engine = InfluenceEngine(settings)
    engine.add_reference(_raws(rng, 80, "r", flip=0.0))
    for c in range(chunks):
        engine.process(_raws(rng, 64, f"c{c}-"))
    return engine, rng


def _digest(data: bytes) -> str:
    """Content digest of a state file (the header's key order is not deterministic)."""
    state, meta, tensors = decode_state(data, "test")
    skeleton = json.dumps([_split(state, "", {}), meta], sort_keys=True)
    arrays = "".join(k + hashlib.sha256(tensors[k].tobytes()).hexdigest() for k in sorted(tensors))
    return hashlib.sha256((skeleton + arrays).encode()).hexdigest()


def _engine_digest(engine: InfluenceEngine) -> str:
    return _digest(encode_state(engine.state_dict()))


def _same_scores(a: Scores, b: Scores) -> None:
    for f in dataclasses.fields(Scores):
        np.testing.assert_array_equal(getattr(a, f.name), getattr(b, f.name), err_msg=f.name)


SETTINGS = {
    "calibrated": EngineSettings(),
    "hybrid_kfac": EngineSettings(policy={"evidence": "hybrid"}, curvature={"kind": "kfac"}),
    # hybrid_split 0: the reference-loss test is off, its thresholds are +inf (stored as flags).
    "hybrid_inf": EngineSettings(policy={"evidence": "hybrid", "hybrid_split": 0.0}),
    "reference_loss_ekfac": EngineSettings(
        policy={"evidence": "reference_loss"}, curvature={"kind": "ekfac"}
    ),
    "quantile_diagonal": EngineSettings(policy={"mode": "quantile"}, curvature={"kind": "diagonal"}),
    "margin_classblock": EngineSettings(influence={"objective": "margin"}, curvature={"kind": "classblock"}),
    "exact_newton": EngineSettings(curvature={"kind": "exact"}, learner={"optimizer": "newton"}),
}


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_scorer_is_pure_and_the_snapshot_independent(name: str) -> None:
    engine, rng = _engine(SETTINGS[name])
    before = _engine_digest(engine)
    snap = engine.snapshot()
    assert _engine_digest(engine) == before  # exporting a snapshot changes nothing in the engine
    frozen = _digest(encode_snapshot(snap))
    scorer = Scorer(snap)
    batch, _ = scorer.decode(_raws(rng, 50, "q"))
    first, again = scorer.score(batch), scorer.score(batch)
    _same_scores(first, again)
    assert np.isfinite(first.cosine_influence).all()
    assert _digest(encode_snapshot(snap)) == frozen  # scoring left the snapshot as it was
    assert snap.theta is not None and not snap.theta.flags.writeable
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.model_version = 0  # type: ignore[misc]

    # The engine keeps learning; the snapshot (private copies) and its scores do not move.
    engine.process(_raws(rng, 128, "later"))
    assert _engine_digest(engine) != before
    assert _digest(encode_snapshot(snap)) == frozen
    _same_scores(Scorer(snap).score(batch), first)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_snapshot_bytes_round_trip_scores_and_routes_identically(name: str) -> None:
    engine, rng = _engine(SETTINGS[name])
    snap = engine.snapshot()
    data = encode_snapshot(snap)
    back = decode_snapshot(data)
    assert _digest(encode_snapshot(back)) == _digest(data)
    assert (back.model_version, back.not_warm_reason, back.n_classes) == (
        snap.model_version,
        snap.not_warm_reason,
        snap.n_classes,
    )
    np.testing.assert_array_equal(back.policy.class_thresholds, snap.policy.class_thresholds)
    np.testing.assert_array_equal(back.policy.reference_thresholds, snap.policy.reference_thresholds)
    raws = _raws(rng, 60, "q", flip=0.5)
    batch, _ = Scorer(snap).decode(raws)
    ours, theirs = Scorer(snap).evidence(batch), Scorer(back).evidence(Scorer(back).decode(raws)[0])
    _same_scores(ours.scores, theirs.scores)
    if ours.reference_loss is not None or theirs.reference_loss is not None:
        np.testing.assert_array_equal(ours.reference_loss, theirs.reference_loss)
    a = Router.from_snapshot(snap).decide(ours, snap.warm)
    b = Router.from_snapshot(back).decide(theirs, back.warm)
    assert (a.quarantine.tolist(), a.reasons) == (b.quarantine.tolist(), b.reasons)
    np.testing.assert_array_equal(a.thresholds, b.thresholds)


def test_hybrid_split_zero_stores_infinite_thresholds() -> None:
    snap = _engine(SETTINGS["hybrid_inf"])[0].snapshot()
    assert np.isinf(snap.policy.reference_thresholds).all() and len(snap.policy.reference_thresholds) == K
    assert np.isinf(decode_snapshot(encode_snapshot(snap)).policy.reference_thresholds).all()


@pytest.mark.parametrize("name", ["calibrated", "hybrid_kfac", "quantile_diagonal"])
def test_router_over_a_snapshot_decides_as_the_engine_then_does(name: str) -> None:
    """A snapshot taken before each chunk, scored and routed elsewhere, gives the engine's own
    decisions for that chunk: the Scorer + Router seam is exactly what the engine runs."""
    base = SETTINGS[name]
    # One micro-batch per chunk, and a standardiser that does not move inside it (the engine folds
    # a micro-batch into the running standardiser before scoring it; a snapshot cannot know it).
    settings = base.model_copy(
        update={
            "influence": base.influence.model_copy(update={"micro_batch": 128}),
            "model": base.model.model_copy(update={"standardize_freeze_after": 80}),
        }
    )
    engine, rng = _engine(settings, chunks=1)  # the first chunk runs the warm start
    quarantined = 0
    for c in range(8):
        raws = _raws(rng, 100, f"s{c}-", flip=0.3 if c < 5 else 0.8)
        snap = engine.snapshot()
        scorer, router = Scorer(snap), Router.from_snapshot(snap)
        evidence = scorer.evidence(scorer.decode(raws)[0])
        predicted = router.decide(evidence, snap.warm)
        result = engine.process(raws)
        _same_scores(evidence.scores, result.scores)
        assert predicted.quarantine.tolist() == result.quarantine.tolist()
        assert predicted.reasons == result.reasons
        np.testing.assert_array_equal(predicted.thresholds, result.thresholds)
        quarantined += int(result.quarantine.sum())
    assert quarantined > 0  # the comparison covered quarantines, not only accepts


def test_rescore_is_the_scorer_and_router_over_a_refreshed_snapshot() -> None:
    engine, rng = _engine(SETTINGS["hybrid_kfac"])
    before = _engine_digest(engine)
    batch, _ = engine.decode(_raws(rng, 40, "rq", flip=0.5), learn=False)
    scores, decision = engine.rescore(batch)
    assert _engine_digest(engine) == before  # rescore learns nothing and refreshes nothing
    snap = engine.snapshot(refresh=True)
    evidence = Scorer(snap).evidence(batch)
    _same_scores(scores, evidence.scores)
    again = Router.from_snapshot(snap, rate_cap=False).decide(evidence, warm=True)
    assert decision.quarantine.tolist() == again.quarantine.tolist() and decision.reasons == again.reasons


def test_snapshot_bytes_are_versioned_and_checked() -> None:
    data = encode_snapshot(_engine(EngineSettings(), chunks=1)[0].snapshot())
    state, meta, _ = decode_state(data, "test")
    assert meta["snapshot_version"] == SNAPSHOT_VERSION
    with pytest.raises(CheckpointIncompatible, match="snapshot version 99"):
        decode_snapshot(encode_state(state, {**meta, "snapshot_version": 99}))
    with pytest.raises(CheckpointCorrupt):
        decode_snapshot(data[: len(data) // 2])
    del state["direction"]
    with pytest.raises(CheckpointCorrupt, match="not a consistent model snapshot"):
        decode_snapshot(encode_state(state, meta))


def test_a_snapshot_before_any_event_cannot_score() -> None:
    snap = InfluenceEngine().snapshot()
    assert isinstance(snap, ModelSnapshot) and snap.theta is None and not snap.warm
    back = decode_snapshot(encode_snapshot(snap))
    assert back.theta is None and back.not_warm_reason == "no valid event seen yet"


def test_engine_summary_is_typed_and_frozen() -> None:
    engine, _ = _engine(EngineSettings(), chunks=1)
    s = engine.summary()
    assert isinstance(s, EngineSummary)
    assert s.accepted + s.quarantined + s.dead_lettered == s.consumed == 64
    assert s.updates_applied == s.accepted and s.shadow_updates_applied == s.consumed
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.accepted = 0  # type: ignore[misc]
    assert json.loads(json.dumps(s.as_dict(), default=float))["consumed"] == 64


def test_engine_seed_drives_the_warm_start_order() -> None:
    """``EngineSettings.seed`` is live (the issue listed it as dead code before the warm start
    used it): it orders the warm-start epochs and the reference model's folds."""
    thetas = []
    for seed in (0, 0, 1):
        engine, _ = _engine(EngineSettings(seed=seed), chunks=1)
        assert engine.routed is not None
        thetas.append(engine.routed.theta.copy())
    np.testing.assert_array_equal(thetas[0], thetas[1])
    assert not np.array_equal(thetas[0], thetas[2])


def test_a_standalone_updater_with_scorer_and_router_reproduces_the_engine() -> None:
    """The scaled-out shape: a router that follows published snapshots, a scorer per snapshot,
    one updater that learns each batch with the decisions taken elsewhere — same decisions and
    the same learned state as the engine."""
    from stream_influence.core.events import Schema
    from stream_influence.core.policy import RoutingPolicy
    from stream_influence.core.updater import Updater

    settings = SETTINGS["hybrid_kfac"].model_copy(
        update={
            "influence": SETTINGS["hybrid_kfac"].influence.model_copy(update={"micro_batch": 128}),
            "model": SETTINGS["hybrid_kfac"].model.model_copy(update={"standardize_freeze_after": 80}),
        }
    )
    engine, rng = _engine(settings, chunks=1)
    # The same learned start (through a checkpoint's state), split into its parts: the label
    # space, one updater, one long-lived router — driven by hand from here on.
    twin = InfluenceEngine(settings)
    twin.load_state_dict(engine.state_dict())
    updater, router = twin.updater, twin.router
    assert isinstance(updater, Updater) and isinstance(router.policy, RoutingPolicy)
    schema = Schema(settings.schema_)
    schema.load_state_dict(engine.schema.state_dict())
    quarantined = 0
    for c in range(6):
        raws = _raws(rng, 100, f"u{c}-", flip=0.3 if c < 4 else 0.8)
        snap = updater.snapshot(schema, router.policy)
        router.adopt(snap)
        scorer = Scorer(snap)
        batch, _ = scorer.decode(raws)
        decision = router.decide(scorer.evidence(batch), snap.warm)
        updater.update(batch, decision, schema, router.policy)
        expected = engine.process(raws)
        assert decision.quarantine.tolist() == expected.quarantine.tolist()
        assert decision.reasons == expected.reasons
        quarantined += int(decision.quarantine.sum())
    assert quarantined > 0
    for part in ("routed", "shadow", "curvature", "scorer", "reference_model", "policy"):
        a, b = engine.state_dict()[part], twin.state_dict()[part]
        assert _digest(encode_state(a)) == _digest(encode_state(b)), part

"""InfluenceEngine end to end on synthetic streams: accounting, warm-up, rate cap, hot swap, drift."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stream_influence.core.engine import InfluenceEngine
from stream_influence.core.settings import (
    CurvatureSettings,
    DriftSettings,
    EngineSettings,
    InfluenceSettings,
    PolicySettings,
    ReferenceSettings,
    SchemaSettings,
)

K, d = 3, 5
CENTERS = np.random.default_rng(42).normal(scale=3.0, size=(K, d))


def blobs(rng: np.random.Generator, n: int, noise: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian blobs; a fraction ``noise`` of labels replaced by a wrong class (returned mask)."""
    y = rng.integers(0, K, n)
    X = CENTERS[y] + rng.normal(size=(n, d))
    flip = rng.random(n) < noise
    y = y.copy()
    y[flip] = (y[flip] + rng.integers(1, K, flip.sum())) % K
    return X, y, flip


def encode(X: np.ndarray, y: np.ndarray, prefix: str = "e") -> list[bytes]:
    return [
        json.dumps({"id": f"{prefix}{i}", "features": x.tolist(), "label": int(label)}).encode()
        for i, (x, label) in enumerate(zip(X, y, strict=True))
    ]


def settings(**parts: object) -> EngineSettings:
    base: dict[str, object] = {"schema": SchemaSettings(classes=list(range(K)))}
    base.update(parts)
    return EngineSettings(**base)


def warm_engine(rng: np.random.Generator, s: EngineSettings | None = None) -> InfluenceEngine:
    engine = InfluenceEngine(s or settings(policy=PolicySettings(warmup_events=100)))
    Xr, yr, _ = blobs(rng, 150)
    engine.add_reference(encode(Xr, yr, "r"))
    return engine


def test_counts_add_up_and_records_follow_input_order() -> None:
    rng = np.random.default_rng(0)
    engine = warm_engine(rng)
    consumed = 0
    outcomes: dict[str, int] = {"accept": 0, "quarantine": 0, "dead_letter": 0}
    for b in range(12):
        X, y, _ = blobs(rng, 50, noise=0.3)
        raws: list[bytes | None] = list(encode(X, y, f"b{b}-"))
        raws.insert(3, b"not json")
        raws.insert(10, None)
        raws.append(json.dumps({"id": "w", "features": [1.0], "label": 0}).encode())
        result = engine.process(raws)
        consumed += len(raws)
        counts = result.counts()
        assert sum(counts.values()) == len(raws) == result.n_input
        assert counts["dead_lettered"] == 3
        records = result.records()
        assert len(records) == len(raws)
        for i, (raw, rec) in enumerate(zip(raws, records, strict=True)):
            if i in (3, 10) or i == len(raws) - 1:
                assert rec["decision"] == "dead_letter" and rec["id"] is None
                assert rec["reason"] in ("invalid_json", "empty", "wrong_dimension")
            else:
                assert rec["id"] == json.loads(raw)["id"]  # type: ignore[arg-type]
                assert rec["decision"] in ("accept", "quarantine")
            outcomes[rec["decision"]] += 1
        json.dumps(records)  # JSON-serialisable (NaN became null)
    c = engine.counters
    assert c.consumed == consumed == c.accepted + c.quarantined + c.dead_lettered
    assert (c.accepted, c.quarantined, c.dead_lettered) == (
        outcomes["accept"],
        outcomes["quarantine"],
        outcomes["dead_letter"],
    )
    assert c.quarantined > 0 and c.dead_letter_reasons == {
        "invalid_json": 12,
        "empty": 12,
        "wrong_dimension": 12,
    }
    summary = engine.summary()
    assert summary.updates_applied == c.accepted
    assert summary.shadow_updates_applied == c.accepted + c.quarantined


def test_quarantined_events_do_not_reach_the_routed_learner() -> None:
    rng = np.random.default_rng(1)
    engine = warm_engine(rng)
    X, y, _ = blobs(rng, 200, noise=0.3)
    engine.process(encode(X, y))  # warm-up
    theta_before = engine.routed.theta.copy()  # type: ignore[union-attr]
    X, y, _ = blobs(rng, 64, noise=1.0)  # every label wrong
    result = engine.process(encode(X, y))
    assert result.quarantine.any()
    # Replay the accepted rows alone through a fresh learner copy: the same theta.
    from stream_influence.core.learner import HeadLearner

    check = HeadLearner(engine.settings.learner, K, d + 1)
    check.theta = theta_before
    Xa = engine._inputs(X[~result.quarantine])
    check.learn(Xa, y[~result.quarantine], np.ones(int((~result.quarantine).sum())))
    assert np.allclose(check.theta, engine.routed.theta)  # type: ignore[union-attr]


def test_warmup_accepts_everything_until_events_and_reference_suffice() -> None:
    """A reference seeded from the stream: the event warm-up and the reference size both gate."""
    rng = np.random.default_rng(2)
    s = settings(
        policy=PolicySettings(warmup_events=200),
        reference=ReferenceSettings(min_size=120, seed_from_stream=90),
    )
    engine = InfluenceEngine(s)
    assert not engine.warm and engine.not_warm_reason() == "no valid event seen yet"
    X, y, _ = blobs(rng, 250, noise=0.5)
    result = engine.process(encode(X[:150], y[:150]))
    assert set(result.reasons) == {"warmup"} and not result.quarantine.any()
    assert "warm-up: 150/200" in (engine.not_warm_reason() or "")
    result = engine.process(encode(X[150:], y[150:]))
    assert set(result.reasons) == {"warmup"}
    assert engine.not_warm_reason() == "reference set has 90/120 points"
    Xr, yr, _ = blobs(rng, 10)
    engine.add_reference(encode(Xr, yr, "r"))
    assert not engine.warm and engine.not_warm_reason() == "reference set has 100/120 points"
    engine.add_reference(encode(*blobs(rng, 20)[:2], "s"))
    assert engine.warm and engine.not_warm_reason() is None
    X, y, _ = blobs(rng, 200, noise=0.5)
    result = engine.process(encode(X, y))
    assert "warmup" not in result.reasons
    assert np.isfinite(result.scores.influence).all()
    assert result.quarantine.any() and {"helpful", "harmful"} <= set(result.reasons)


def test_trusted_reference_routes_from_the_first_event_without_warmup() -> None:
    """A trusted reference: no event warm-up, only the reference's per-class minimum gates."""
    rng = np.random.default_rng(2)
    engine = InfluenceEngine(settings(policy=PolicySettings(warmup_events=10_000)))
    X, y, _ = blobs(rng, 100, noise=0.5)
    result = engine.process(encode(X, y))
    assert set(result.reasons) == {"warmup"}
    assert np.isnan(result.scores.influence).all()  # no reference yet: no scores
    assert engine.not_warm_reason() == "reference set has 0/4 points"
    engine.add_reference(encode(CENTERS[[0, 0, 0, 0]], np.zeros(4, dtype=int), "r"))
    assert not engine.warm and "at least two classes" in (engine.not_warm_reason() or "")
    engine.add_reference(encode(CENTERS[[1, 1]], np.ones(2, dtype=int), "s"))
    assert engine.warm and engine.not_warm_reason() is None
    result = engine.process(encode(X, y))
    assert "warmup" not in result.reasons and np.isfinite(result.scores.influence).all()


def test_scores_share_the_sign_and_self_influence_is_negative() -> None:
    rng = np.random.default_rng(3)
    engine = warm_engine(rng)
    engine.process(encode(*blobs(rng, 300, noise=0.2)[:2]))
    result = engine.process(encode(*blobs(rng, 200, noise=0.3)[:2]))
    sc = result.scores
    assert np.array_equal(np.sign(sc.influence), np.sign(sc.relative_influence))
    assert np.array_equal(np.sign(sc.influence), np.sign(sc.cosine_influence))
    assert (sc.self_influence < 0).all()
    assert (np.abs(sc.cosine_influence) <= 1 + 1e-9).all()


def test_seeded_reference_from_stream() -> None:
    rng = np.random.default_rng(4)
    engine = InfluenceEngine(settings(reference=ReferenceSettings(seed_from_stream=120, min_size=100)))
    engine.process(encode(*blobs(rng, 100)[:2]))
    assert engine.reference.size == 100
    engine.process(encode(*blobs(rng, 100)[:2]))
    assert engine.reference.size == 120 and engine.counters.reference_events == 120


def test_rate_cap_raises_alarm_and_bounds_quarantine_rate() -> None:
    rng = np.random.default_rng(5)
    cap = 0.2
    s = settings(
        policy=PolicySettings(
            warmup_events=100, max_quarantine_rate=cap, rate_window=500, quarantine_threshold=0.0
        )
    )
    engine = warm_engine(rng, s)
    engine.process(encode(*blobs(rng, 300)[:2]))
    assert not engine.policy.alarm
    flags: list[bool] = []
    alarms = []
    for _ in range(8):
        X, y, _ = blobs(rng, 64, noise=0.9)  # a broken stream: mostly wrong labels
        result = engine.process(encode(X, y))
        alarms.append(result.alarm)
        flags.extend(result.quarantine.tolist())
        assert engine.policy.quarantine_rate <= cap + 1e-9
        if result.alarm:
            assert "rate_cap" in result.reasons
            capped = result.scores.cosine_influence[np.array(result.reasons) == "rate_cap"]
            kept = result.scores.cosine_influence[result.quarantine]
            if len(kept):  # the highest scores are the ones still quarantined
                assert capped.max() <= kept.min()
    assert any(alarms)
    assert engine.summary().alarm == alarms[-1]
    assert 0 < np.mean(flags[-500:]) <= cap + 1e-9  # the rolling window is 500 events


def test_policy_hot_swap_increments_version_and_takes_effect() -> None:
    rng = np.random.default_rng(6)
    engine = warm_engine(rng)
    engine.process(encode(*blobs(rng, 200)[:2]))
    X, y, _ = blobs(rng, 100, noise=0.5)
    result = engine.process(encode(X, y))
    assert result.policy_version == 1 and result.quarantine.any()
    # A floor without exceptions (floor_yield_fdr and self_loss_fdr 0: strong reference-loss or
    # routed-loss evidence does not override it).
    v = engine.set_policy(
        PolicySettings(
            warmup_events=100,
            accept_threshold=1.0,
            quarantine_threshold=1.0,
            floor_yield_fdr=0.0,
            self_loss_fdr=0.0,
        )
    )
    assert v == 2 == engine.policy.version == engine.summary().policy_version
    result = engine.process(encode(X, y))
    assert result.policy_version == 2
    assert not result.quarantine.any()  # cosine influence never exceeds 1
    assert set(result.reasons) == {"helpful"}
    v = engine.set_policy(PolicySettings(warmup_events=100, mode="quantile", quantile=0.2))
    assert v == 3
    result = engine.process(encode(*blobs(rng, 100, noise=0.5)[:2]))
    assert result.policy_version == 3 and result.threshold >= 0.02


def test_drift_resets_curvature_evidence() -> None:
    rng = np.random.default_rng(7)
    s = settings(
        policy=PolicySettings(warmup_events=100),
        curvature=CurvatureSettings(kind="exact", forgetting=1.0),
        drift=DriftSettings(keep=0.1),
        # One micro-batch per chunk, so a detection forgets the evidence of the whole chunk.
        influence=InfluenceSettings(micro_batch=100),
    )
    engine = warm_engine(rng, s)
    # ADWIN reacts to any change of the error rate, including the fall while the head learns,
    # so the stable phase is long enough for the detector to settle.
    for _ in range(15):
        engine.process(encode(*blobs(rng, 100)[:2]))
    resets = engine.counters.drift_resets
    for _ in range(5):
        assert not engine.process(encode(*blobs(rng, 100)[:2])).drift
    # Concept drift: the labels of the clusters rotate.
    drifted = None
    for _ in range(20):
        X, y, _ = blobs(rng, 100)
        n_before = engine.curvature.n_seen  # type: ignore[union-attr]
        result = engine.process(encode(X, (y + 1) % K))
        if result.drift:
            drifted = (n_before, result)
            break
    assert drifted is not None, "ADWIN never fired on a label rotation"
    n_before, result = drifted
    assert engine.counters.drift_resets == resets + 1 == engine.drift.detections
    assert engine.curvature.n_seen == pytest.approx(0.1 * (n_before + 100))  # type: ignore[union-attr]
    assert engine.scorer.s is None  # the cached H⁻¹∇L_R is stale
    refreshes = engine.scorer.refreshes
    engine.process(encode(*blobs(rng, 10)[:2]))
    assert engine.scorer.refreshes == refreshes + 1


def test_disabled_drift_never_resets() -> None:
    rng = np.random.default_rng(7)
    engine = warm_engine(
        rng, settings(policy=PolicySettings(warmup_events=100), drift=DriftSettings(enabled=False))
    )
    for i in range(30):
        X, y, _ = blobs(rng, 100)
        engine.process(encode(X, (y + (i >= 10)) % K))
    assert engine.counters.drift_resets == 0


def test_process_events_matches_process_on_raw_bytes() -> None:
    rng = np.random.default_rng(8)
    a, b = warm_engine(np.random.default_rng(9)), warm_engine(np.random.default_rng(9))
    for _ in range(5):
        raws = encode(*blobs(rng, 64, noise=0.3)[:2])
        ra = a.process(raws)
        batch, rejects = b.decode(raws)
        rb = b.process_events(batch, rejects)
        assert ra.records() == rb.records()
    assert np.array_equal(a.routed.theta, b.routed.theta)  # type: ignore[union-attr]


def test_predict_before_any_event_raises() -> None:
    with pytest.raises(RuntimeError):
        InfluenceEngine().predict_proba(np.zeros((1, 3)))


@pytest.mark.parametrize("kind", ["exact", "kfac", "ekfac", "classblock", "diagonal"])
def test_every_estimator_routes_noise(kind: str) -> None:
    rng = np.random.default_rng(10)
    engine = warm_engine(
        rng, settings(policy=PolicySettings(warmup_events=100), curvature=CurvatureSettings(kind=kind))
    )
    engine.process(encode(*blobs(rng, 200, noise=0.3)[:2]))
    q, noisy = [], []
    for _ in range(10):
        X, y, flip = blobs(rng, 64, noise=0.3)
        q.extend(engine.process(encode(X, y)).quarantine.tolist())
        noisy.extend(flip.tolist())
    qa, na = np.array(q), np.array(noisy)
    assert qa.sum() > 20
    assert na[qa].mean() >= 0.8  # quarantined events are mostly the corrupted ones


def test_a_one_class_warm_up_keeps_learning_labels() -> None:
    """A sorted or very imbalanced stream: the label space must not freeze with one class."""
    from stream_influence.core.settings import EngineSettings, PolicySettings

    engine = InfluenceEngine(EngineSettings(policy=PolicySettings(warmup_events=50)))
    ones = [
        json.dumps({"id": f"a{i}", "features": [float(i), 1.0], "label": "fraud"}).encode() for i in range(80)
    ]
    engine.process(ones[:40])
    engine.process(ones[40:])
    assert engine.schema.classes == ["fraud"] and not engine.schema.frozen
    later = [json.dumps({"id": "b", "features": [0.5, 2.0], "label": "ok"}).encode()]
    result = engine.process(later)
    assert result.counts()["dead_lettered"] == 0
    assert engine.schema.classes == ["fraud", "ok"] and engine.schema.frozen  # warm-up over: frozen at 2
    unseen = engine.process([json.dumps({"id": "c", "features": [0.0, 0.0], "label": "other"}).encode()])
    assert [r.reason.value for r in unseen.rejects] == ["unknown_label"]


def test_a_failed_curvature_update_resets_it_and_the_stream_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    from stream_influence.core.settings import EngineSettings, PolicySettings, SchemaSettings
    from stream_influence.errors import CurvatureError

    engine = InfluenceEngine(
        EngineSettings(
            schema=SchemaSettings(classes=[0, 1], n_features=2), policy=PolicySettings(warmup_events=0)
        )
    )
    raws = [
        json.dumps({"id": str(i), "features": [float(i % 3), 1.0], "label": i % 2}).encode()
        for i in range(20)
    ]
    engine.process(raws[:10])
    assert engine.curvature is not None and engine.curvature.n_seen == 10

    def broken(*_args: object, **_kwargs: object) -> None:
        raise CurvatureError("not positive definite")

    monkeypatch.setattr(engine.curvature, "update", broken)
    result = engine.process(raws[10:])
    assert result.counts()["accepted"] + result.counts()["quarantined"] == 10  # the batch still routed
    assert engine.counters.refactor_failures == 1
    assert engine.curvature.n_seen == 0  # reset to H = λI, rebuilt from the next batch

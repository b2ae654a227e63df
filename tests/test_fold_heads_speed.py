"""The fold heads' speed work (issues 9 and 11) keeps their results: shared rows laid out once in
the lockstep SGD, held-out losses in fold order, and the ``policy.self_loss_calibrate_every``
option that recomputes the calibration only every k micro-batches (the engine-level equality with
main's recording is ``tests/test_engine_golden.py``'s routed-loss runs)."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import numpy as np

from stream_influence.core.cross_fit import CrossFitHeads
from stream_influence.core.engine import InfluenceEngine
from stream_influence.core.events import EventBatch
from stream_influence.core.learner import HeadLearner
from stream_influence.core.settings import EngineSettings, LearnerSettings, SchemaSettings


def _heads(n: int, K: int, D: int, rng: np.random.Generator) -> list[HeadLearner]:
    s = LearnerSettings()
    theta = rng.normal(scale=0.1, size=(K, D))
    heads = []
    for i in range(n):
        h = HeadLearner(s, K, D)
        h.theta = theta + 0.01 * i
        h.sq_norm = 3.0 + i  # a different step scale per head
        heads.append(h)
    return heads


def _three_fold_heads(K: int, D: int, n: int, rng: np.random.Generator) -> CrossFitHeads:
    """Three fold heads over ``n`` trusted points whose folds interleave, late points (fold −1,
    held out by the routed head) among them."""
    cf = CrossFitHeads(LearnerSettings(), folds=3)
    cf.heads = _heads(3, K, D, rng)
    cf.features = rng.normal(size=(n, D - 1))
    cf.labels = rng.integers(0, K, n)
    cf.fold = rng.integers(-1, 3, n)
    return cf


def test_learners_sharing_rows_end_where_separate_copies_leave_them() -> None:
    """Learners given the *same* arrays (laid out once, then copied) end bit-for-bit where learners
    given equal but distinct copies (each laid out on its own) do — with a shadow on other rows."""
    rng = np.random.default_rng(3)
    K, D, n = 4, 7, 61
    X, y, w = rng.normal(size=(n, D)), rng.integers(0, K, n), rng.uniform(0.5, 2, n)
    keep = rng.random(n) > 0.3
    Xa, ya, wa = X[keep], y[keep], w[keep]
    shared = _heads(4, K, D, rng)
    separate = copy.deepcopy(shared)
    shared[0].learn(X, y, w, alongside=[(h, Xa, ya, wa) for h in shared[1:]])
    separate[0].learn(X, y, w, alongside=[(h, Xa.copy(), ya.copy(), wa.copy()) for h in separate[1:]])
    for h, g in zip(shared, separate, strict=True):
        assert np.array_equal(h.theta, g.theta)
        assert h.steps == g.steps and h.updates == g.updates
    assert not np.array_equal(shared[1].theta, shared[2].theta)  # they did learn, each its own way


def test_held_out_losses_match_a_per_fold_loop() -> None:
    """Fold-ordered products and one log-sum-exp give every point's loss under its own fold head
    (fold −1: the routed head), bit for bit as a plain loop over the folds, in the points' order."""
    rng = np.random.default_rng(5)
    K, D, n = 3, 6, 40
    cf = _three_fold_heads(K, D, n, rng)
    X = np.hstack([cf.features, np.ones((n, 1))])
    routed = rng.normal(size=(K, D))
    # main's loop (0aa009d): a boolean mask per fold, a softmax per fold.
    expected = np.empty(n)
    for f in range(-1, 3):
        mine = cf.fold == f
        Z = X[mine] @ (routed if f < 0 else cf.heads[f].theta).T
        Z -= Z.max(axis=1, keepdims=True)
        expected[mine] = np.log(np.exp(Z).sum(axis=1)) - Z[np.arange(len(Z)), cf.labels[mine]]
    assert np.array_equal(cf.held_out_losses(X, routed), expected)
    # And the quantity itself, point by point (other products: equal to rounding).
    for i in range(n):
        z = X[i] @ (routed if cf.fold[i] < 0 else cf.heads[cf.fold[i]].theta).T
        assert abs(expected[i] - (np.log(np.exp(z - z.max()).sum()) - (z[cf.labels[i]] - z.max()))) < 1e-12
    # New points (add) change the layout: it is made again, not reused stale.
    cf.add(rng.normal(size=(2, D - 1)), np.array([0, 1]))
    X2 = np.hstack([cf.features, np.ones((n + 2, 1))])
    got = cf.held_out_losses(X2, routed)
    assert np.array_equal(got[:n], expected)
    tail = X2[n:] @ routed.T
    tail -= tail.max(axis=1, keepdims=True)
    np.testing.assert_allclose(got[n:], np.log(np.exp(tail).sum(axis=1)) - tail[[0, 1], [0, 1]], rtol=1e-12)


def _engine(**policy: Any) -> InfluenceEngine:
    base = EngineSettings(
        schema=SchemaSettings(classes=[0, 1, 2], n_features=5), influence={"micro_batch": 32}
    )
    return InfluenceEngine(base.model_copy(update={"policy": base.policy.model_copy(update=policy)}))


def test_calibrate_every_k_recomputes_the_held_out_losses_every_k_micro_batches() -> None:
    """With ``self_loss_calibrate_every: 3`` the routed-loss calibration changes on every third
    learned micro-batch only, keyed on the checkpointed model version (between, the heads move
    but the calibration is kept); with 1 (the default) on every one."""
    rng = np.random.default_rng(9)
    centers = rng.normal(scale=2.0, size=(3, 5))
    y = rng.integers(0, 3, 30 + 32 * 12)
    X = centers[y] + rng.normal(size=(len(y), 5))
    for every in (1, 3):
        engine = _engine(self_loss_calibrate_every=every)
        engine.add_reference_events(EventBatch.from_arrays(X[:30], y[:30]))
        seen, versions = [], []
        for i in range(30, len(y), 32):
            versions.append(engine.model_version)
            engine.process_events(EventBatch.from_arrays(X[i : i + 32], y[i : i + 32]))
            seen.append(engine.policy.self_loss_calibration.copy())
        assert len(seen[0]) == 30
        assert versions[1:] == list(range(versions[1], versions[1] + len(versions) - 1))  # one per batch
        changed = [not np.array_equal(a, b) for a, b in itertools.pairwise(seen)]
        assert changed == [(v - 1) % every == 0 for v in versions[1:]], every
        if every == 3:
            assert 3 <= sum(changed) <= 4


def test_fold_every_k_steps_the_fold_heads_on_every_kth_micro_batch() -> None:
    """``self_loss_fold_every: 2``: the fold heads move on every other learned micro-batch only."""
    rng = np.random.default_rng(4)
    centers = rng.normal(scale=2.0, size=(3, 5))
    y = rng.integers(0, 3, 30 + 32 * 8)
    X = centers[y] + rng.normal(size=(len(y), 5))
    engine = _engine(self_loss_fold_every=2)
    engine.add_reference_events(EventBatch.from_arrays(X[:30], y[:30]))
    moved = []
    for i in range(30, len(y), 32):
        cf = engine.updater.cross_fit
        before = None if cf is None or not cf.heads else cf.heads[0].theta.copy()
        version = engine.model_version
        engine.process_events(EventBatch.from_arrays(X[i : i + 32], y[i : i + 32]))
        if before is not None:
            moved.append(
                (version % 2 == 0, not np.array_equal(before, engine.updater.cross_fit.heads[0].theta))
            )
    assert len(moved) >= 6
    assert all(expected == got for expected, got in moved)


def test_the_cheaper_options_resume_where_an_uninterrupted_engine_goes() -> None:
    """Both options are keyed on checkpointed state: an engine restored mid-stream from
    ``state_dict()`` steps its fold heads and recalibrates on the same micro-batches as one that
    never stopped (bit for bit the same fold heads and calibration at the end)."""
    rng = np.random.default_rng(12)
    centers = rng.normal(scale=2.0, size=(3, 5))
    y = rng.integers(0, 3, 30 + 32 * 10)
    X = centers[y] + rng.normal(size=(len(y), 5))
    options = {"self_loss_fold_every": 2, "self_loss_calibrate_every": 3}

    def feed(engine: InfluenceEngine, start: int, stop: int) -> None:
        for i in range(start, stop, 32):
            engine.process_events(EventBatch.from_arrays(X[i : i + 32], y[i : i + 32]))

    whole = _engine(**options)
    whole.add_reference_events(EventBatch.from_arrays(X[:30], y[:30]))
    feed(whole, 30, len(y))
    first = _engine(**options)
    first.add_reference_events(EventBatch.from_arrays(X[:30], y[:30]))
    feed(first, 30, 30 + 32 * 5)
    resumed = _engine(**options)
    resumed.load_state_dict(first.state_dict())
    feed(resumed, 30 + 32 * 5, len(y))
    a, b = whole.updater.cross_fit, resumed.updater.cross_fit
    assert a is not None and b is not None and len(a.heads) == len(b.heads) == 2
    for ha, hb in zip(a.heads, b.heads, strict=True):
        assert np.array_equal(ha.theta, hb.theta)
    assert np.array_equal(whole.policy.self_loss_calibration, resumed.policy.self_loss_calibration)


def test_fold_ordered_held_out_is_the_same_numbers_without_the_gather() -> None:
    """The updater's path (inputs of the fold-ordered features, results left in fold order) gives
    bit for bit the points' losses and margins of :meth:`CrossFitHeads.held_out`, permuted — also
    after new points change the folds (the cached order is made again, not reused stale)."""
    rng = np.random.default_rng(8)
    K, D, n = 3, 6, 40
    cf = _three_fold_heads(K, D, n, rng)
    routed = rng.normal(size=(K, D))
    for _ in range(2):
        m = len(cf.labels)
        losses, margins = cf.held_out(np.hstack([cf.features, np.ones((m, 1))]), routed)
        ordered = cf.fold_ordered_features()
        order = np.argsort(cf.fold, kind="stable")
        assert np.array_equal(ordered, cf.features[order])
        got_l, got_m = cf.held_out(np.hstack([ordered, np.ones((m, 1))]), routed, fold_order=True)
        assert got_l.tobytes() == losses[order].tobytes() and got_m.tobytes() == margins[order].tobytes()
        cf.add(rng.normal(size=(3, D - 1)), np.array([0, 1, 2]))
    assert len(cf.fold_ordered_features()) == n + 6

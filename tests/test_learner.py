"""The head learner's batched steps: learning alongside another learner ≡ learning alone ≡ the
textbook minibatch loop."""

from __future__ import annotations

import numpy as np
import pytest

from stream_influence.core.curvature import make_curvature
from stream_influence.core.learner import HeadLearner
from stream_influence.core.model import one_hot, softmax
from stream_influence.core.settings import CurvatureSettings, LearnerSettings

K, D = 4, 6


def _data(rng: np.random.Generator, n: int, unit: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    X = np.hstack([rng.normal(size=(n, D - 1)) * 3, np.ones((n, 1))])
    return X, rng.integers(0, K, n), np.ones(n) if unit else rng.uniform(0, 2, n)


def _textbook(
    settings: LearnerSettings, theta: np.ndarray, X: np.ndarray, y: np.ndarray, w: np.ndarray
) -> np.ndarray:
    """Plain sgd: per chunk, the weighted mean cross-entropy gradient plus l2 on the weights."""
    theta = theta.copy()
    sq = float((X * X).sum(axis=1).mean())  # a fresh learner's running mean of ‖x̃‖²
    lr = settings.learning_rate * min(1.0, 64.0 / max(sq, 1.0))
    for s in range(0, len(X), settings.minibatch):
        Xc, yc, wc = (
            X[s : s + settings.minibatch],
            y[s : s + settings.minibatch],
            w[s : s + settings.minibatch],
        )
        R = (softmax(Xc @ theta.T) - one_hot(yc, K)) * wc[:, None]
        grad = R.T @ Xc / len(Xc)
        grad[:, :-1] += settings.l2 * theta[:, :-1]
        theta -= lr * grad
    return theta


@pytest.mark.parametrize("unit", [True, False])
@pytest.mark.parametrize(("n1", "n2"), [(64, 64), (64, 37), (5, 64), (64, 0), (3, 1)])
def test_sgd_steps_follow_the_textbook_loop(n1: int, n2: int, unit: bool) -> None:
    rng = np.random.default_rng(n1 * 100 + n2)
    s = LearnerSettings(learning_rate=0.3, l2=0.05, minibatch=8)
    a, b = HeadLearner(s, K, D), HeadLearner(s, K, D)
    start = rng.normal(size=(K, D))
    a.theta, b.theta = start.copy(), start.copy() + 1.0
    (X1, y1, w1), (X2, y2, w2) = _data(rng, n1, unit), _data(rng, n2, unit)
    a.learn(X1, y1, w1, alongside=[(b, X2, y2, w2)])
    np.testing.assert_allclose(a.theta, _textbook(s, start, X1, y1, w1), rtol=1e-12, atol=1e-12)
    want_b = _textbook(s, start + 1.0, X2, y2, w2) if n2 else start + 1.0
    np.testing.assert_allclose(b.theta, want_b, rtol=1e-12, atol=1e-12)
    assert (a.steps, b.steps) == (-(-n1 // 8), -(-n2 // 8))
    assert (a.updates, b.updates) == (n1, n2)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "newton"])
def test_learning_alongside_equals_learning_alone(optimizer: str) -> None:
    rng = np.random.default_rng(7)
    s = LearnerSettings(optimizer=optimizer, learning_rate=0.05, minibatch=8)  # type: ignore[arg-type]
    curv = make_curvature(CurvatureSettings(kind="exact"), K, D)
    X0, _, _ = _data(rng, 64, True)
    curv.update(X0, rng.dirichlet(np.ones(K), size=64))
    together = [HeadLearner(s, K, D) for _ in range(2)]
    alone = [HeadLearner(s, K, D) for _ in range(2)]
    for _ in range(3):  # several calls: adam's moments and the running ‖x̃‖² carry over
        (X1, y1, w1), (X2, y2, w2) = _data(rng, 64, False), _data(rng, 29, False)
        together[0].learn(X1, y1, w1, curv.solve, alongside=[(together[1], X2, y2, w2)])
        alone[0].learn(X1, y1, w1, curv.solve)
        alone[1].learn(X2, y2, w2, curv.solve)
    for t, a in zip(together, alone, strict=True):
        np.testing.assert_allclose(t.theta, a.theta, rtol=1e-12, atol=1e-14)
        assert (t.steps, t.updates, t.sq_norm) == (a.steps, a.updates, a.sq_norm)
        np.testing.assert_allclose(t._m, a._m, rtol=1e-12, atol=1e-14)


def test_learners_alongside_must_match() -> None:
    a = HeadLearner(LearnerSettings(), K, D)
    b = HeadLearner(LearnerSettings(minibatch=4), K, D)
    X, y, w = _data(np.random.default_rng(0), 8, True)
    with pytest.raises(ValueError, match="share settings"):
        a.learn(X, y, w, alongside=[(b, X, y, w)])


def test_prequential_windows_match_the_history_whatever_the_chunking() -> None:
    """Rolling metrics are those of the newest ``window`` events, chunks wrapping the ring or not."""
    from stream_influence.core.learner import Prequential

    rng = np.random.default_rng(3)
    window = 10
    metrics = Prequential(window)
    correct: list[float] = []
    losses: list[float] = []
    for m in [3, 7, 1, 9, 25, 4, 10, 2]:  # wraps, exact fits, and a chunk longer than the window
        P = rng.dirichlet(np.ones(K), size=m)
        y = rng.integers(0, K, m)
        errors = metrics.update(P, y)
        correct += (P.argmax(axis=1) == y).astype(float).tolist()
        losses += (-np.log(P[np.arange(m), y])).tolist()
        assert errors.tolist() == [1.0 - c for c in correct[-m:]]
        assert metrics.rolling_accuracy == pytest.approx(np.mean(correct[-window:]))
        assert metrics.rolling_log_loss == pytest.approx(np.mean(losses[-window:]))
        assert metrics.cumulative_accuracy == pytest.approx(np.mean(correct))


def test_deferred_prequential_counts_equal_counting_each_batch() -> None:
    """``Prequential.defer`` (what the engine calls per micro-batch) returns the same errors at
    once and leaves, whenever it is read, the very state of ``update`` per batch — across a ring
    wrap, a pile-up longer than the window (counted on its own) and a head that grows a class."""
    from stream_influence.core.learner import Prequential

    rng = np.random.default_rng(7)
    window = 12
    eager, lazy = Prequential(window), Prequential(window)
    for m, k in [(5, 3), (4, 3), (2, 4), (9, 4), (3, 4), (14, 4), (2, 5), (6, 5)]:
        P = rng.dirichlet(np.ones(k), size=m)
        y = rng.integers(0, k, m)
        assert lazy.defer(P, y).tolist() == eager.update(P, y).tolist()
        if (m, k) == (2, 5):  # a read in between settles what waits
            assert lazy.rolling_log_loss == eager.rolling_log_loss
    for (key, a), b in zip(eager.state_dict().items(), lazy.state_dict().values(), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b)), key
    assert lazy.n == eager.n == 45
    assert lazy.cumulative_accuracy == eager.cumulative_accuracy


@pytest.mark.parametrize("kernel", ["numpy", "compiled"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_uninitialised_step_buffers_leave_no_trace(
    optimizer: str, kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lockstep's layout arrays are allocated uninitialised (``np.empty``; the padding rows
    zeroed by hand): with every uninitialised array full of NaN, learners on mixed rows (a partial
    last step, fold-style learners sharing rows) end bit for bit where they do otherwise."""
    import copy

    rng = np.random.default_rng(11)
    s = LearnerSettings(optimizer=optimizer, learning_rate=0.2, l2=0.01, minibatch=8, kernel=kernel)  # type: ignore[arg-type]
    heads = [HeadLearner(s, K, D) for _ in range(3)]
    for h in heads:
        h.theta = rng.normal(size=(K, D))
    X, y, w = _data(rng, 45, False)
    keep = rng.random(45) > 0.3
    Xa, ya, wa = X[keep], y[keep], w[keep]

    def run(learners: list[HeadLearner]) -> None:
        # The first learner all 45 rows (a partial last step), two sharing the kept rows.
        learners[0].learn(X, y, w, alongside=[(h, Xa, ya, wa) for h in learners[1:]])

    plain = copy.deepcopy(heads)
    run(plain)
    empty = np.empty

    def poisoned(*args: object, **kwargs: object) -> np.ndarray:
        out = empty(*args, **kwargs)  # type: ignore[call-overload]
        out.fill(np.nan)
        return out  # type: ignore[no-any-return]

    monkeypatch.setattr(np, "empty", poisoned)
    poison = copy.deepcopy(heads)
    run(poison)
    monkeypatch.undo()
    for a, b in zip(poison, plain, strict=True):
        assert np.isfinite(a.theta).all()
        assert a.theta.tobytes() == b.theta.tobytes()
        assert a.steps == b.steps

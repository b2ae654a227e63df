"""Feature extractor φ, the standardiser, and reference gradients against finite differences."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from stream_influence.core.engine import InfluenceEngine
from stream_influence.core.influence import reference_gradient
from stream_influence.core.model import Standardizer, TorchExtractor, augment, one_hot, softmax
from stream_influence.core.settings import EngineSettings, ModelSettings, PolicySettings, SchemaSettings
from stream_influence.errors import ExtractorError
from tests.torch_phi import NotWeights, small_net


def _weights(tmp_path: Path) -> Path:
    net = small_net()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.5)  # differ from the factory's initialisation, so loading is observable
    path = tmp_path / "phi.pt"
    torch.save(net.state_dict(), path)
    return path


def test_torch_extractor_loads_weights_and_feeds_the_head(tmp_path: Path) -> None:
    weights = _weights(tmp_path)
    settings = EngineSettings(
        schema=SchemaSettings(classes=[0, 1], n_features=4),
        model=ModelSettings(
            extractor="torch", torch_factory="tests.torch_phi:small_net", torch_weights=weights
        ),
        policy=PolicySettings(warmup_events=0),
    )
    engine = InfluenceEngine(settings)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(32, 4))
    raws = [
        json.dumps({"id": str(i), "features": x.tolist(), "label": int(x[0] > 0)}).encode()
        for i, x in enumerate(X)
    ]
    result = engine.process(raws)
    assert len(result.events) == 32
    assert engine.routed is not None and engine.routed.theta.shape == (2, 3 + 1)  # φ width 3, plus bias

    expected = small_net()
    expected.load_state_dict(torch.load(weights, weights_only=True))
    with torch.no_grad():
        phi = expected(torch.from_numpy(X).float()).double().numpy()
    np.testing.assert_allclose(engine.extractor.transform(X), phi, rtol=1e-6)
    assert not np.allclose(TorchExtractor("tests.torch_phi:small_net").transform(X), phi)  # weights mattered


def test_torch_extractor_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ExtractorError, match="cannot build"):
        TorchExtractor("tests.torch_phi:missing")
    pickled = tmp_path / "evil.pt"
    torch.save({"0.weight": NotWeights()}, pickled)
    with pytest.raises(ExtractorError, match="cannot load weights"):  # weights_only refuses to unpickle it
        TorchExtractor("tests.torch_phi:small_net", pickled)


def test_standardizer_matches_numpy_over_batches() -> None:
    rng = np.random.default_rng(1)
    X = rng.normal(size=(1000, 5)) * np.array([1e3, 1.0, 1e-3, 5.0, 0.0]) + 7.0
    st = Standardizer(5)
    for chunk in np.array_split(X, 13):
        st.update(chunk)
    np.testing.assert_allclose(st.mean, X.mean(axis=0), rtol=1e-12)
    Z = st.transform(X)
    np.testing.assert_allclose(Z[:, :4].std(axis=0), 1.0, rtol=1e-9)
    assert np.allclose(Z[:, 4], 0.0)  # a constant feature is centred, not blown up


def _numeric_grad(f, theta: np.ndarray, eps: float = 1e-6) -> np.ndarray:  # type: ignore[no-untyped-def]
    g = np.zeros_like(theta)
    for idx in np.ndindex(theta.shape):
        t1, t2 = theta.copy(), theta.copy()
        t1[idx] += eps
        t2[idx] -= eps
        g[idx] = (f(t1) - f(t2)) / (2 * eps)
    return g


@pytest.mark.parametrize("objective", ["loss", "margin"])
def test_reference_gradient_matches_finite_differences(objective: str) -> None:
    rng = np.random.default_rng(2)
    K, d, n = 4, 3, 50
    Xr = augment(rng.normal(size=(n, d)))
    yr = rng.integers(0, K, size=n)
    theta = rng.normal(size=(K, d + 1))

    def loss(t: np.ndarray) -> float:
        P = softmax(Xr @ t.T)
        return float(-np.log((P * one_hot(yr, K)).sum(axis=1)).mean())

    def neg_margin(t: np.ndarray) -> float:
        Z = Xr @ t.T
        rival = np.where(one_hot(yr, K) > 0, -np.inf, Z).max(axis=1)
        return float(-(Z[np.arange(n), yr] - rival).mean())

    f = loss if objective == "loss" else neg_margin
    np.testing.assert_allclose(
        reference_gradient(theta, Xr, yr, objective), _numeric_grad(f, theta), atol=1e-6
    )


def test_scaled_augmented_is_augment_of_the_scaled_rows_bit_for_bit() -> None:
    """The in-place standardise-and-augment (standardiser, reference model) rounds every number as
    ``augment((X − mean) · scale)`` does; the standardiser's update matches its two-pass formula."""
    from stream_influence.core.model import scaled_augmented

    rng = np.random.default_rng(4)
    X = rng.normal(size=(37, 6)) * np.exp(rng.uniform(-3, 3, 6))
    mean, scale = rng.normal(size=6), np.exp(rng.uniform(-2, 2, 6))
    assert scaled_augmented(X, mean, scale).tobytes() == augment((X - mean) * scale).tobytes()
    s = Standardizer(6)
    s.update(X)
    assert s.m2.tobytes() == np.add.reduce(np.square(X - X.sum(axis=0) / len(X)), axis=0).tobytes()
    assert s.transform_augmented(X).tobytes() == augment(s.transform(X)).tobytes()


def test_row_max_and_softmax_match_the_row_reduction_bit_for_bit() -> None:
    """``row_max`` (a reduction down the columns of a transposed copy) gives each row's maximum
    as numpy's row reduction does, NaN and ±∞ included; the softmax built on it is bit for bit the
    one built on the row reduction, also for rows whose maximum is a +0/−0 tie."""
    from stream_influence.core.model import row_max

    rng = np.random.default_rng(6)
    Z = rng.normal(size=(300, 10)) * 30
    Z[3, 4], Z[5, :] = np.nan, np.inf
    Z[7, 2], Z[8, :] = -np.inf, -np.inf
    Z[9, :], Z[9, 3] = -1.0, -0.0
    Z[10, :], Z[10, 1], Z[10, 6] = -1.0, 0.0, -0.0  # a tie of zeros: either sign may come back
    with np.errstate(invalid="ignore"):
        want = np.maximum.reduce(Z, axis=1)
        assert np.array_equal(row_max(Z), want, equal_nan=True)
        old = Z - np.maximum.reduce(Z, axis=1, keepdims=True)
        np.exp(old, out=old)
        old /= np.add.reduce(old, axis=1, keepdims=True)
        assert softmax(Z).tobytes() == old.tobytes()
    assert row_max(np.zeros((0, 4))).shape == (0,)

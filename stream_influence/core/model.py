"""The model ``f(x) = softmax(W φ(x) + b)``: feature extractor, standardiser and softmax head.

The head is one ``K × D`` float64 matrix ``Θ = [W b]`` applied to augmented features
``x̃ = [φ(x); 1]``.  Its per-point gradient needs no autograd: ``g = (p − onehot(y)) ⊗ x̃``.

>>> import numpy as np
>>> theta = np.zeros((3, 3))
>>> softmax(augment(np.ones((1, 2))) @ theta.T).round(3).tolist()
[[0.333, 0.333, 0.333]]
"""

from __future__ import annotations

import importlib
import pickle
from typing import Any, Protocol

import numpy as np

from stream_influence.core.settings import ModelSettings
from stream_influence.errors import ExtractorError

__all__ = [
    "FeatureExtractor",
    "IdentityExtractor",
    "Standardizer",
    "TorchExtractor",
    "augment",
    "make_extractor",
    "one_hot",
    "row_max",
    "scaled_augmented",
    "softmax",
]


def row_max(Z: np.ndarray) -> np.ndarray:
    """Each row's maximum (NaN for a row holding one), from a transposed copy.

    numpy reduces along a short contiguous row (``K`` numbers) one row at a time, about five
    times slower at ``K = 10`` than a copy and an element-wise pass down the columns.  A maximum
    is exact, so the numbers are the same whatever the order; only which zero of a ``+0``/``−0``
    tie comes back may differ, which every caller cancels (``z − max`` then ``exp``, margins
    ``0 − (z_y − max)``, probabilities ≥ +0).
    """
    return np.maximum.reduce(Z.T.copy(), axis=0)


def softmax(Z: np.ndarray) -> np.ndarray:
    # The ufuncs' reductions directly (what ndarray.sum calls, less its Python wrapper): this runs
    # several times per micro-batch on a few hundred numbers.  The sum stays a row reduction
    # (its pairwise order is part of the result).
    Z = Z - row_max(Z)[:, None]
    np.exp(Z, out=Z)
    Z /= np.add.reduce(Z, axis=1, keepdims=True)
    return Z


def label_loss(P: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``−log p(y)`` per row of class probabilities ``P`` (one gather, no loop; clipped so a
    probability that underflowed to 0 gives a large finite loss, not ∞)."""
    return -np.log(np.clip(P[np.arange(len(labels)), labels], 1e-300, None))


def augment(X: np.ndarray) -> np.ndarray:
    """``[X, 1]``: the bias becomes the last column of Θ."""
    out = np.empty((len(X), X.shape[1] + 1))
    out[:, :-1] = X
    out[:, -1] = 1.0
    return out


def scaled_augmented(X: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``augment((X − mean) · scale)`` computed in place in the augmented array (the same two
    roundings per number, two arrays and a copy less)."""
    out = np.empty((len(X), X.shape[1] + 1))
    body = out[:, :-1]
    np.subtract(X, mean, out=body)
    body *= scale
    out[:, -1] = 1.0
    return out


def one_hot(y: np.ndarray, n_classes: int) -> np.ndarray:
    Y = np.zeros((len(y), n_classes))
    Y[np.arange(len(y)), y] = 1.0
    return Y


class FeatureExtractor(Protocol):
    """φ: raw features (``b × n_features``) to head inputs (``b × d``), float64, no learning."""

    def out_features(self, n_features: int) -> int: ...

    def transform(self, X: np.ndarray) -> np.ndarray: ...


class IdentityExtractor:
    """φ(x) = x."""

    def out_features(self, n_features: int) -> int:
        return n_features

    def transform(self, X: np.ndarray) -> np.ndarray:
        return X


class TorchExtractor:
    """A frozen torch module as φ.

    ``factory`` is ``'package.module:callable'`` returning the module; ``weights`` a state dict
    loaded with ``weights_only=True`` (never unpickling arbitrary objects).
    """

    def __init__(self, factory: str, weights: Any = None) -> None:
        import torch

        module_name, _, attr = factory.partition(":")
        try:
            build = getattr(importlib.import_module(module_name), attr)
            module = build()
        except (ImportError, AttributeError, TypeError) as exc:
            raise ExtractorError(f"cannot build the feature extractor from {factory!r}: {exc}") from exc
        if weights is not None:
            try:
                state = torch.load(weights, map_location="cpu", weights_only=True)
                module.load_state_dict(state)
            except (OSError, RuntimeError, KeyError, pickle.UnpicklingError) as exc:
                raise ExtractorError(f"cannot load weights {str(weights)!r}: {exc}") from exc
        module.eval()
        for p in module.parameters():
            p.requires_grad_(False)
        self.module = module
        self._torch = torch
        self._dtype = next(module.parameters(), torch.zeros(0)).dtype

    def out_features(self, n_features: int) -> int:
        return int(self.transform(np.zeros((1, n_features))).shape[1])

    def transform(self, X: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            out = self.module(self._torch.from_numpy(X).to(self._dtype))
        return out.reshape(len(X), -1).double().numpy()


def make_extractor(settings: ModelSettings) -> FeatureExtractor:
    if settings.extractor == "torch":
        assert settings.torch_factory is not None  # guaranteed by ModelSettings validation
        return TorchExtractor(settings.torch_factory, settings.torch_weights)
    return IdentityExtractor()


class Standardizer:
    """Running mean and variance of φ(x) (Chan et al. batch merge), optionally frozen after N.

    Features with zero variance are centred but not scaled.
    """

    def __init__(self, dim: int, freeze_after: int | None = None) -> None:
        self.freeze_after = freeze_after
        self.n = 0.0
        self.mean = np.zeros(dim)
        self.m2 = np.zeros(dim)
        self._scale = np.ones(dim)

    def update(self, X: np.ndarray) -> None:
        if len(X) == 0 or (self.freeze_after is not None and self.n >= self.freeze_after):
            return
        nb = float(len(X))
        mb = np.add.reduce(X, axis=0) / len(X)  # X.mean(axis=0), without its Python wrapper
        centred = X - mb
        m2b = np.add.reduce(np.square(centred, out=centred), axis=0)
        delta = mb - self.mean
        tot = self.n + nb
        self.mean = self.mean + delta * (nb / tot)
        self.m2 = self.m2 + m2b + np.square(delta) * (self.n * nb / tot)
        self.n = tot
        self._refresh_scale()

    def _refresh_scale(self) -> None:
        var = self.m2 / max(self.n, 1.0)
        self._scale = np.where(var > 1e-12, 1.0 / np.sqrt(np.maximum(var, 1e-300)), 1.0)

    def transform(self, X: np.ndarray) -> np.ndarray:
        return (X - self.mean) * self._scale

    def transform_augmented(self, X: np.ndarray) -> np.ndarray:
        """``augment(transform(X))``, see :func:`scaled_augmented`."""
        return scaled_augmented(X, self.mean, self._scale)

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n = float(state["n"])
        self.mean = np.array(state["mean"], dtype=np.float64)
        self.m2 = np.array(state["m2"], dtype=np.float64)
        self._refresh_scale()

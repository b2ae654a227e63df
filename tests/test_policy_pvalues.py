"""The conformal p-values of the adaptive reference-loss test do not depend on how they are
counted: the per-class search (large batches against large trusted sets) and the one-table
comparison the hot path uses for small ones give the same numbers, ties, 0, ∞ and NaN included."""

from __future__ import annotations

import numpy as np

from stream_influence.core.policy import RoutingPolicy
from stream_influence.core.settings import PolicySettings


def test_pvalues_are_the_same_whichever_way_they_are_counted() -> None:
    rng = np.random.default_rng(5)
    policy = RoutingPolicy(PolicySettings(floor_reference_loss=False))
    sizes = [300, 7, 120, 1]
    policy.loss_calibration = [np.sort(rng.exponential(size=n).round(2)) for n in sizes]
    n = 400  # 400 × 300 comparisons: over the table's budget, so one batch takes the per-class search
    labels = rng.integers(0, len(sizes), n)
    stat = rng.exponential(size=n).round(2)  # rounded: many ties with the trusted statistics
    stat[:4] = [0.0, np.inf, np.nan, policy.loss_calibration[0][10]]
    score = np.ones(n)
    searched = policy.observe(score, labels, stat)
    assert policy._padded is not None and n * policy._padded[1].shape[1] > 1 << 16
    tabled = np.concatenate(
        [policy.observe(score[i : i + 64], labels[i : i + 64], stat[i : i + 64]) for i in range(0, n, 64)]
    )
    assert searched is not None
    assert np.array_equal(searched, tabled)
    # ∞ and NaN: no trusted statistic is at least as large, p = 1 / (n_y + 1); 0: every one is, p = 1.
    assert searched[1] == 1.0 / (sizes[labels[1]] + 1.0) and searched[2] == 1.0 / (sizes[labels[2]] + 1.0)
    assert searched[0] == 1.0


def test_per_class_calibration_from_one_sort_equals_a_sort_per_class() -> None:
    """The per-class sorted statistics (what the p-values are ranked against) come from one sort
    of all of them: each class gets exactly its own finite values in order — the pooled ones when
    it has fewer than ``min_class_calibration`` — whatever the interleaving, ties and NaNs."""
    rng = np.random.default_rng(9)
    policy = RoutingPolicy(PolicySettings(min_class_calibration=5))
    n_classes = 5
    labels = rng.permutation(np.repeat(np.arange(n_classes), [30, 4, 0, 12, 9]))
    stat = rng.exponential(size=len(labels)).round(1)  # rounded: ties inside and across classes
    stat[::7] = np.nan
    got = policy._per_class_sorted(stat, labels, n_classes)
    pooled = np.sort(stat[np.isfinite(stat)])
    assert len(got) == n_classes
    for c in range(n_classes):
        own = np.sort(stat[(labels == c) & np.isfinite(stat)])
        want = pooled if len(own) < 5 else own
        assert np.array_equal(got[c], want), c
    assert len(got[3]) == int(np.isfinite(stat[labels == 3]).sum()) and len(got[1]) == len(pooled)


def test_plain_loss_calibration_is_remade_only_when_its_inputs_change() -> None:
    """Recalibrating on new held-out scores keeps the plain (unfloored) loss calibration, which
    depends only on the reference model's losses: the same list, so its padded table is reused;
    a refit (new loss arrays) or new settings remake it, equal to a fresh policy's."""
    rng = np.random.default_rng(2)
    n, K = 60, 3
    labels = rng.integers(0, K, n)
    losses = rng.exponential(size=n)

    def calibrated(policy: RoutingPolicy, scores: np.ndarray, losses: np.ndarray) -> list[np.ndarray]:
        policy.calibrate(scores, labels, K, losses, labels, scores)
        return policy.plain_loss_calibration

    policy = RoutingPolicy(PolicySettings())
    first = calibrated(policy, rng.normal(size=n), losses)
    assert calibrated(policy, rng.normal(size=n), losses) is first  # new scores, same losses
    refit = rng.exponential(size=n)
    remade = calibrated(policy, rng.normal(size=n), refit)
    fresh = calibrated(RoutingPolicy(PolicySettings()), rng.normal(size=n), refit)
    assert remade is not first and all(np.array_equal(a, b) for a, b in zip(remade, fresh, strict=True))
    policy.swap(PolicySettings(min_class_calibration=50))  # every class now borrows the pooled losses
    pooled = calibrated(policy, rng.normal(size=n), refit)
    assert all(np.array_equal(c, np.sort(refit)) for c in pooled)

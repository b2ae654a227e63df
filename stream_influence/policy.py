"""Routing policy: accept a point for the online updater, or quarantine it.

Rules, in order, for a point with score ``x`` (the configured score kind; positive = harmful):

1. warm-up (too few events, or too small a reference set): accept, reason ``warmup``;
2. ``x ≤ accept_threshold``: accept, reason ``helpful``;
3. ``x > threshold`` where threshold is ``quarantine_threshold`` (absolute mode) or the larger of
   it and the ``1 − quantile`` quantile of recent scores (quantile mode): quarantine, ``harmful``;
4. otherwise accept, reason ``within_band``.

The quarantine-rate cap: when step 3 would push the rolling quarantine rate above
``max_quarantine_rate``, only the highest-scoring points up to the cap are quarantined, the rest
are accepted with reason ``rate_cap``, and the alarm is raised — a stream that suddenly looks half
harmful is drift or a broken reference, not noise, and an operator must look.

>>> import numpy as np
>>> policy = RoutingPolicy(PolicySettings(warmup_events=0, max_quarantine_rate=0.5))
>>> d = policy.decide(np.array([-1.0, 2.0, 3.0, 4.0]), warm=True)
>>> d.quarantine.tolist(), d.reasons, d.alarm
([False, False, True, True], ['helpful', 'rate_cap', 'harmful', 'harmful'], True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .settings import PolicySettings

__all__ = ["REASONS", "RoutingDecision", "RoutingPolicy"]

REASONS = ("warmup", "helpful", "within_band", "rate_cap", "harmful")


@dataclass(slots=True)
class RoutingDecision:
    quarantine: np.ndarray  # bool per point
    reasons: list[str]
    threshold: float
    alarm: bool
    policy_version: int


class _Ring:
    """Fixed-size window of floats (recent scores / quarantine flags)."""

    def __init__(self, size: int) -> None:
        self.data = np.zeros(size)
        self.n = 0
        self.pos = 0

    def values(self) -> np.ndarray:
        return self.data[: self.n] if self.n < len(self.data) else self.data

    def oldest(self, k: int) -> np.ndarray:
        """The ``k`` values the next ``k`` pushes would evict."""
        k = max(0, min(k, self.n + k - len(self.data), self.n))
        if self.n < len(self.data):
            return self.data[:k]
        return self.data[(self.pos + np.arange(k)) % len(self.data)]

    def push(self, x: np.ndarray) -> None:
        x = x[-len(self.data) :]
        idx = (self.pos + np.arange(len(x))) % len(self.data)
        self.data[idx] = x
        self.pos = int((self.pos + len(x)) % len(self.data))
        self.n = min(len(self.data), self.n + len(x))

    def state(self, prefix: str) -> dict[str, Any]:
        return {f"{prefix}_data": self.data, f"{prefix}_n": self.n, f"{prefix}_pos": self.pos}

    def load(self, state: dict[str, Any], prefix: str) -> None:
        data = np.array(state[f"{prefix}_data"], dtype=np.float64)
        if len(data) == len(self.data):  # a resized window after a policy swap starts afresh
            self.data, self.n, self.pos = data, int(state[f"{prefix}_n"]), int(state[f"{prefix}_pos"])


class RoutingPolicy:
    """Stateful router; :meth:`swap` installs new settings at run time (hot reload)."""

    def __init__(self, settings: PolicySettings, version: int = 1) -> None:
        self.version = version
        self._install(settings)
        self.alarm = False

    def _install(self, settings: PolicySettings) -> None:
        self.settings = settings
        self._scores = _Ring(settings.quantile_window)
        self._flags = _Ring(settings.rate_window)
        self.threshold = settings.quarantine_threshold

    def swap(self, settings: PolicySettings) -> int:
        """Replace the settings; windows restart only if their sizes changed.  Returns the version."""
        old_scores, old_flags = self._scores, self._flags
        self._install(settings)
        if len(old_scores.data) == settings.quantile_window:
            self._scores = old_scores
        if len(old_flags.data) == settings.rate_window:
            self._flags = old_flags
        self.version += 1
        return self.version

    @property
    def quarantine_rate(self) -> float:
        flags = self._flags.values()
        return float(flags.mean()) if len(flags) else 0.0

    def decide(self, score: np.ndarray, warm: bool) -> RoutingDecision:
        """Decide for a batch of scores (NaN scores are only allowed while not warm)."""
        s = self.settings
        n = len(score)
        if not warm or n == 0:
            self._flags.push(np.zeros(n))
            finite = score[np.isfinite(score)]
            self._scores.push(finite)
            return RoutingDecision(
                np.zeros(n, bool), ["warmup"] * n, self.threshold, self.alarm, self.version
            )

        threshold = s.quarantine_threshold
        if s.mode == "quantile" and self._scores.n >= 10:
            threshold = max(threshold, float(np.quantile(self._scores.values(), 1.0 - s.quantile)))
        self.threshold = threshold
        harmful = score > threshold
        reasons = np.where(score <= s.accept_threshold, "helpful", "within_band").astype(object)
        reasons[harmful] = "harmful"

        # How many quarantines keep the rolling rate ≤ cap once this batch enters the window.
        window = min(len(self._flags.data), self._flags.n + n)
        kept_q = (
            self._flags.values().sum() - self._flags.oldest(n).sum() if n < len(self._flags.data) else 0.0
        )
        allowed = max(0, int(np.floor(s.max_quarantine_rate * window - kept_q + 1e-9)))
        wanted = int(harmful.sum())
        self.alarm = wanted > allowed
        if self.alarm:
            order = np.flatnonzero(harmful)[np.argsort(-score[harmful], kind="stable")]
            capped = order[allowed:]
            harmful[capped] = False
            reasons[capped] = "rate_cap"

        self._flags.push(harmful.astype(np.float64))
        self._scores.push(score)
        return RoutingDecision(harmful, reasons.tolist(), threshold, self.alarm, self.version)

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "alarm": self.alarm,
            "threshold": self.threshold,
            **self._scores.state("scores"),
            **self._flags.state("flags"),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.version = int(state["version"])
        self.alarm = bool(state["alarm"])
        self.threshold = float(state["threshold"])
        self._scores.load(state, "scores")
        self._flags.load(state, "flags")

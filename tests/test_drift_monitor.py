"""The drift monitor detects exactly where River's ADWIN, driven through its public API, does.

:class:`DriftMonitor` feeds ADWIN's compiled window directly (one call per error, not two);
this holds it to the plain loop ``detector.update(e); detector.drift_detected`` on streams with
rises and falls of the error rate, batch by batch, including the rebuild from history.
"""

from __future__ import annotations

import numpy as np
from river import drift

from stream_influence.core.learner import DriftMonitor
from stream_influence.core.settings import DriftSettings


class _PublicApiMonitor:
    """The monitor's documented behaviour, written with River's public API only."""

    def __init__(self, settings: DriftSettings) -> None:
        self.settings, self.detections, self.improvements = settings, 0, 0
        self.history = np.zeros(0, dtype=np.uint8)
        self.detector = drift.ADWIN(delta=settings.delta)

    def update(self, errors: np.ndarray) -> bool:
        for j, e in enumerate(errors.tolist()):
            self.detector.update(e)
            if self.detector.drift_detected:
                seen = np.concatenate([self.history, errors[: j + 1]])
                rising = self.detector.estimation > float(seen.mean())
                self.detector = drift.ADWIN(delta=self.settings.delta)
                self.history = np.zeros(0, dtype=np.uint8)
                self.detections += rising
                self.improvements += not rising
                return rising
        self.history = np.concatenate([self.history, errors.astype(np.uint8)])
        if len(self.history) > self.settings.history:
            self.history = self.history[len(self.history) // 2 :]
            self.detector = drift.ADWIN(delta=self.settings.delta)
            for e in self.history.tolist():
                self.detector.update(float(e))
        return False


def test_drift_monitor_matches_adwin_through_its_public_api() -> None:
    rng = np.random.default_rng(3)
    # Error rate 0.1 → 0.6 → 0.05 → 0.4, long enough to pass the history cap (rebuilds too).
    rates = np.repeat([0.1, 0.6, 0.05, 0.4], 900)
    errors = (rng.random(len(rates)) < rates).astype(np.float64)
    settings = DriftSettings(history=256)
    ours, plain = DriftMonitor(settings), _PublicApiMonitor(settings)
    fired = []
    for s in range(0, len(errors), 64):
        chunk = errors[s : s + 64]
        got = ours.update(chunk)
        assert got == plain.update(chunk), s
        fired.append(got)
    assert any(fired)  # the stream does drift
    assert (ours.detections, ours.improvements) == (plain.detections, plain.improvements)
    assert ours.improvements > 0
    assert ours.state_dict()["history"].tobytes() == plain.history.tobytes()
    # A restored monitor (history replayed) keeps detecting where the uninterrupted one does.
    restored = DriftMonitor(settings)
    restored.load_state_dict(ours.state_dict())
    tail = (rng.random(1500) < np.repeat([0.05, 0.7], 750)).astype(np.float64)
    for s in range(0, len(tail), 64):
        assert restored.update(tail[s : s + 64]) == ours.update(tail[s : s + 64]), s

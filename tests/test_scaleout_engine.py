"""The engine's split API used by the scale-out roles: scoring with a snapshot, then learning the
decisions, is the single process's score-then-learn step (no broker here)."""

from __future__ import annotations

import copy

import numpy as np

from stream_influence.core.engine import InfluenceEngine
from stream_influence.core.settings import EngineSettings
from tests.fixtures.service_events import events, malformed, max_abs_diff

MB = 64


def _settings() -> EngineSettings:
    # Standardiser off: a score worker never updates it, the single process does before scoring.
    return EngineSettings.model_validate(
        {"model": {"standardize": False}, "influence": {"micro_batch": MB}, "reference": {"min_size": 50}}
    )


def test_score_then_learn_chunk_by_chunk_equals_the_single_process() -> None:
    refs, _ = events(200, seed=3, prefix="ref")
    stream, _ = events(40 * MB, noise=0.3, seed=4)
    one, split = InfluenceEngine(_settings()), InfluenceEngine(_settings())
    one.add_reference(refs)
    split.add_reference(refs)
    split.prepare_snapshot()  # the updater warm-starts before its first snapshot
    quarantined = 0
    for start in range(0, len(stream), MB):  # one micro-batch per chunk: no staleness inside it
        chunk = stream[start : start + MB]
        want = one.process(chunk)
        worker = copy.deepcopy(split)  # the worker's snapshot: the updater's state right now
        batch, rejects = worker.decode(chunk, learn=False)
        scored = worker.score_events(batch, rejects)
        assert scored.quarantine.tolist() == want.quarantine.tolist()
        assert np.allclose(scored.scores.influence, want.scores.influence, rtol=1e-12, atol=1e-15)
        split.learn_events(batch, scored.quarantine)
        quarantined += int(want.quarantine.sum())
    assert quarantined > 0, "routing never quarantined: the comparison would be vacuous"
    got, ref = split.state_dict(), one.state_dict()
    for part in ("routed", "shadow", "curvature"):
        assert max_abs_diff(got[part], ref[part], part) <= 1e-9, part
    assert split.events_seen == one.events_seen == len(stream)


def test_score_events_learns_nothing_and_learn_events_applies_only_accepted_to_the_routed_head() -> None:
    refs, _ = events(200, seed=5, prefix="ref")
    engine = InfluenceEngine(_settings())
    engine.add_reference(refs)
    engine.prepare_snapshot()
    stream = events(300, noise=0.3, seed=6)[0] + malformed(5, seed=7)
    batch, rejects = engine.decode(stream, learn=False)
    before = copy.deepcopy(engine.state_dict())  # state_dict shares the live arrays
    result = engine.score_events(batch, rejects)
    after = copy.deepcopy(engine.state_dict())
    for part in ("routed", "shadow", "curvature", "standardizer"):
        assert max_abs_diff(after[part], before[part], part) == 0.0, part
    assert len(result.rejects) == 5 and result.counts()["dead_lettered"] == 5

    quarantine = np.zeros(len(batch), dtype=bool)
    quarantine[::3] = True  # decisions come from the worker, whatever they are
    routed_updates = engine.routed.updates
    engine.learn_events(batch, quarantine)
    assert engine.events_seen == len(batch)  # every valid event: curvature, shadow, metrics
    assert engine.shadow.updates > 0
    assert engine.routed.updates > routed_updates
    # Learning the same events as all accepted: the same shadow, another routed head (the
    # quarantined ones did not reach it).
    everything = InfluenceEngine(_settings())
    everything.load_state_dict(before)
    everything.learn_events(batch, np.zeros(len(batch), dtype=bool))
    assert not np.allclose(everything.routed.theta, engine.routed.theta)
    assert np.allclose(everything.shadow.theta, engine.shadow.theta)

"""The engine's results do not depend on which JSON parser decoded the stream.

The default decoder accepts typical events in one simdjson pass (``Schema`` with ``simdjson``);
the standard library's parser (``json``) is the reference every decoder is held to.  Fed the same
fixed stream (typical events mixed with weighted, timestamped, padded and invalid messages), two
engines that differ only in the parser take the same decisions with the same scores, in the same
order, and end in the same learned state, bit for bit.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from stream_influence.core.engine import InfluenceEngine
from stream_influence.core.events import Schema
from stream_influence.core.settings import EngineSettings, SchemaSettings


def _stream(rng: np.random.Generator, n: int, d: int, k: int, start: int) -> list[bytes]:
    centers = rng.normal(size=(k, d))
    y = rng.integers(0, k, n)
    X = (centers[y] + rng.normal(size=(n, d))) * np.exp(rng.uniform(-2, 3, d))
    y = np.where(rng.random(n) < 0.2, rng.integers(0, k, n), y)
    out = []
    for i, (x, c) in enumerate(zip(X.tolist(), y.tolist(), strict=True)):
        event: dict[str, Any] = {"id": f"e{start + i}", "features": x, "label": c}
        kind = i % 23
        if kind == 5:
            event["weight"] = 0.5
        elif kind == 7:
            event["ts"] = 1.7e9 + i
        raw = json.dumps(event).encode()
        if kind == 11:
            raw = b" " + raw  # leading whitespace: the full rules
        elif kind == 13:
            raw = raw.replace(b'"features": [', b'"features": [[0], ', 1)  # nested: rejected
        elif kind == 17:
            raw = b'{"id": "x", "features": [1], "label": 0}'  # wrong width: rejected
        out.append(raw)
    return out


def _same_state(a: Any, b: Any, path: str = "") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _same_state(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), path
    elif isinstance(a, float) and np.isnan(a):
        assert isinstance(b, float) and np.isnan(b), path
    else:
        assert a == b, path


def test_simdjson_and_standard_parser_engines_route_and_learn_identically() -> None:
    d, k = 16, 4
    settings = EngineSettings(schema=SchemaSettings(classes=list(range(k)), n_features=d))
    fast, reference = InfluenceEngine(settings), InfluenceEngine(settings)
    reference.schema = Schema(settings.schema_, parser="json")
    rng = np.random.default_rng(7)
    trusted = _stream(rng, 120, d, k, 0)
    events = _stream(np.random.default_rng(8), 1500, d, k, 1000)
    rejected = fast.add_reference(trusted)
    assert [(r.index, r.reason) for r in rejected] == [
        (r.index, r.reason) for r in reference.add_reference(trusted)
    ]
    routed = 0
    for s in range(0, len(events), 200):
        a, b = fast.process(events[s : s + 200]), reference.process(events[s : s + 200])
        assert json.dumps(a.records()) == json.dumps(b.records())
        assert a.quarantine.tolist() == b.quarantine.tolist()
        routed += sum(r != "warmup" for r in a.reasons)
    assert routed > 0 and fast.counters.quarantined > 0 and fast.counters.dead_lettered > 0
    _same_state(fast.state_dict(), reference.state_dict())

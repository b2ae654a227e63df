"""The event decoder: every malformed message becomes a Reject with its reason, never an exception."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stream_influence.core.engine import InfluenceEngine
from stream_influence.core.events import RejectReason, Schema
from stream_influence.core.settings import EngineSettings, PolicySettings, ReferenceSettings, SchemaSettings

R = RejectReason


def _fixed() -> Schema:
    return Schema(SchemaSettings(classes=[0, 1, "cat"], n_features=3, max_event_bytes=2000))


def _ev(**fields: object) -> bytes:
    base: dict[str, object] = {"id": "e1", "features": [1.0, 2.0, 3.0], "label": 1}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not ...}).encode()


MALFORMED = [
    (b'{"id": "a", "features": [1, 2, 3], "label": 1', R.INVALID_JSON),
    (b"\xff\xfe\x00garbage", R.INVALID_JSON),
    (b"[" * 1900, R.INVALID_JSON),  # deep nesting: RecursionError inside json
    (b"[1, 2, 3]", R.NOT_AN_OBJECT),
    (b'"a string"', R.NOT_AN_OBJECT),
    (b"42", R.NOT_AN_OBJECT),
    (b"null", R.NOT_AN_OBJECT),
    (_ev(id=...), R.MISSING_FIELD),
    (_ev(features=...), R.MISSING_FIELD),
    (_ev(label=...), R.MISSING_FIELD),
    (_ev(id=5), R.INVALID_ID),
    (_ev(id=""), R.INVALID_ID),
    (_ev(features=[]), R.INVALID_FEATURES),
    (_ev(features="1,2,3"), R.INVALID_FEATURES),
    (_ev(features={"a": 1}), R.INVALID_FEATURES),
    (_ev(features=[1.0, 2.0]), R.WRONG_DIMENSION),
    (_ev(features=[1.0, 2.0, 3.0, 4.0]), R.WRONG_DIMENSION),
    (b'{"id": "a", "features": [1, NaN, 3], "label": 1}', R.NON_FINITE),
    (b'{"id": "a", "features": [1, Infinity, 3], "label": 1}', R.NON_FINITE),
    (b'{"id": "a", "features": [-Infinity, 2, 3], "label": 1}', R.NON_FINITE),
    (b'{"id": "a", "features": [1e400, 2, 3], "label": 1}', R.NON_FINITE),
    (b'{"id": "a", "features": [1' + b"0" * 400 + b', 2, 3], "label": 1}', R.NON_FINITE),
    (_ev(features=[1.0, "2.0", 3.0]), R.INVALID_FEATURES),
    (_ev(features=[1.0, True, 3.0]), R.INVALID_FEATURES),
    (_ev(features=[1.0, None, 3.0]), R.INVALID_FEATURES),
    (_ev(features=[1.0, [2.0], 3.0]), R.INVALID_FEATURES),
    (_ev(label=True), R.INVALID_LABEL),
    (_ev(label=1.0), R.INVALID_LABEL),
    (_ev(label=None), R.INVALID_LABEL),
    (_ev(label=[1]), R.INVALID_LABEL),
    (_ev(label=""), R.INVALID_LABEL),
    (_ev(label=7), R.UNKNOWN_LABEL),
    (_ev(label="dog"), R.UNKNOWN_LABEL),
    (_ev(meta={"pad": "x" * 3000}), R.TOO_LARGE),
    (b"", R.EMPTY),
    (b"   \n", R.EMPTY),
    (None, R.EMPTY),
    (_ev(weight=-1), R.INVALID_WEIGHT),
    (_ev(weight="1"), R.INVALID_WEIGHT),
    (_ev(weight=True), R.INVALID_WEIGHT),
    (b'{"id": "a", "features": [1, 2, 3], "label": 1, "weight": NaN}', R.INVALID_WEIGHT),
    (b'{"id": "a", "features": [1, 2, 3], "label": 1, "weight": 1' + b"0" * 400 + b"}", R.INVALID_WEIGHT),
    (_ev(ts="yesterday"), R.INVALID_TIMESTAMP),
    (_ev(ts=True), R.INVALID_TIMESTAMP),
    (_ev(ts=[2024]), R.INVALID_TIMESTAMP),
    (b'{"id": "a", "features": [1, 2, 3], "label": 1, "ts": Infinity}', R.INVALID_TIMESTAMP),
    (_ev(meta=5), R.INVALID_META),
    (_ev(meta="x"), R.INVALID_META),
    (_ev(meta=[1]), R.INVALID_META),
]


@pytest.mark.parametrize(("raw", "reason"), MALFORMED)
def test_malformed_event_is_rejected_with_reason(raw: bytes | None, reason: RejectReason) -> None:
    schema = _fixed()
    good = _ev(id="ok")
    batch, rejects = schema.decode_batch([good, raw, good])
    assert batch.ids == ["ok", "ok"]
    assert batch.index.tolist() == [0, 2]
    assert [(r.index, r.reason) for r in rejects] == [(1, reason)]
    assert rejects[0].detail  # a human-readable explanation


@pytest.mark.parametrize(("raw", "reason"), MALFORMED)
def test_malformed_event_is_rejected_while_learning(raw: bytes | None, reason: RejectReason) -> None:
    """With nothing configured the decoder learns labels and width; bad events still reject."""
    schema = Schema(SchemaSettings(max_event_bytes=2000))
    schema.decode_batch([_ev(id="w", label=0), _ev(id="w", label=1), _ev(id="w", label="cat")], learn=True)
    schema.freeze()
    batch, rejects = schema.decode_batch([raw], learn=False)
    assert len(batch) == 0 and [r.reason for r in rejects] == [reason]


def test_valid_events_decode_exactly() -> None:
    schema = _fixed()
    raws = [
        _ev(id="a", features=[1, 2.5, -3e10], label="cat", weight=2, ts=1_700_000_000, meta={"k": True}),
        _ev(id="b", label="1", ts="2024-01-02T03:04:05+00:00", meta=None),  # "1" and 1 are one class
        _ev(id="c", label=0, weight=0),
        b'{"id": "d", "features": [0, 0, 0], "label": 1, "extra": {"ignored": [true]}}',
    ]
    batch, rejects = schema.decode_batch(raws)
    assert rejects == []
    assert batch.ids == ["a", "b", "c", "d"]
    assert batch.labels.tolist() == [2, 1, 0, 1]
    assert batch.features.dtype == np.float64
    assert batch.features[0].tolist() == [1.0, 2.5, -3e10]
    assert batch.weights.tolist() == [2.0, 1.0, 0.0, 1.0]
    assert batch.timestamps[0] == 1_700_000_000.0
    assert batch.timestamps[1] == 1704164645.0
    assert np.isnan(batch.timestamps[2:]).all()
    assert batch.index.tolist() == [0, 1, 2, 3]


def test_string_labels_map_through_class_list() -> None:
    schema = Schema(SchemaSettings(classes=["spam", "ham", "eggs"]))
    raws = [
        json.dumps({"id": str(i), "features": [i], "label": lab}).encode()
        for i, lab in enumerate(["eggs", "spam", "ham", "eggs", "bacon"])
    ]
    batch, rejects = schema.decode_batch(raws, learn=True)  # configured classes are frozen
    assert batch.labels.tolist() == [2, 0, 1, 2]
    assert [(r.index, r.reason) for r in rejects] == [(4, R.UNKNOWN_LABEL)]


def test_mixed_batch_keeps_order_and_accounts_for_every_message() -> None:
    schema = _fixed()
    raws = [raw for raw, _ in MALFORMED] + [_ev(id=f"g{i}") for i in range(5)]
    order = np.random.default_rng(0).permutation(len(raws))
    shuffled = [raws[i] for i in order]
    batch, rejects = schema.decode_batch(shuffled)
    assert len(batch) == 5 and len(rejects) == len(MALFORMED)
    seen = sorted(batch.index.tolist() + [r.index for r in rejects])
    assert seen == list(range(len(raws)))
    assert [r.index for r in rejects] == sorted(r.index for r in rejects)
    assert batch.ids == [shuffled[i] and json.loads(shuffled[i])["id"] for i in batch.index.tolist()]


def test_labels_and_width_come_from_the_reference_never_from_the_stream() -> None:
    """Defect 6: with a reference set, a stream label outside it is ``unknown_label`` even during
    warm-up; a *reference* label grows the label space and the head, even after the warm-up."""
    settings = EngineSettings(policy=PolicySettings(warmup_events=4), reference=ReferenceSettings(min_size=1))
    engine = InfluenceEngine(settings)
    ref = [
        json.dumps({"id": f"r{i}", "features": [i, 1.0], "label": lab}).encode()
        for i, lab in enumerate(["b", "a", "b"])
    ]
    assert engine.add_reference(ref) == []
    assert engine.schema.classes == ["b", "a"] and engine.schema.n_features == 2
    assert engine.routed is not None and engine.routed.theta.shape == (2, 3)
    assert not engine.learning_labels
    warm = [
        json.dumps({"id": "w1", "features": [1.0, 2.0], "label": "c"}).encode(),
        json.dumps({"id": "w2", "features": [1.0, 2.0, 3.0], "label": "a"}).encode(),
        json.dumps({"id": "w3", "features": [1.0, 2.0], "label": "a"}).encode(),
    ]
    result = engine.process(warm)
    assert [(r.index, r.reason) for r in result.rejects] == [(0, R.UNKNOWN_LABEL), (1, R.WRONG_DIMENSION)]
    assert engine.schema.classes == ["b", "a"] and engine.routed.theta.shape == (2, 3)
    assert engine.events_seen == 1
    engine.process(
        [json.dumps({"id": f"w{i}", "features": [0.0, 1.0], "label": "b"}).encode() for i in range(4)]
    )
    assert engine.events_seen == 5  # past the warm-up
    # A trusted label grows the space and the head (a zero row), the curvature follows.
    assert (
        engine.add_reference([json.dumps({"id": "r9", "features": [0.0, 2.0], "label": "c"}).encode()]) == []
    )
    assert engine.schema.classes == ["b", "a", "c"]
    assert engine.routed.theta.shape == (3, 3) and engine.shadow is not None
    assert engine.shadow.theta.shape == (3, 3)
    assert engine.curvature is not None and engine.curvature.n_classes == 3
    assert engine.routed.theta[2].tolist() == [0.0, 0.0, 0.0]
    result = engine.process([json.dumps({"id": "x", "features": [0.0, 0.0], "label": "c"}).encode()])
    assert result.rejects == [] and np.isfinite(result.scores.influence).all()
    late = [json.dumps({"id": "x", "features": [0.0, 0.0], "label": "d"}).encode()]
    result = engine.process(late)
    assert [(r.index, r.reason) for r in result.rejects] == [(0, R.UNKNOWN_LABEL)]
    assert engine.summary().classes == ["b", "a", "c"]


def test_labels_learned_from_warmup_without_reference() -> None:
    engine = InfluenceEngine(EngineSettings(policy=PolicySettings(warmup_events=3)))
    raws = [json.dumps({"id": str(i), "features": [float(i)], "label": i % 2}).encode() for i in range(3)]
    engine.process(raws)
    assert engine.schema.classes == [0, 1] and engine.schema.frozen
    result = engine.process([json.dumps({"id": "z", "features": [1.0], "label": 2}).encode()])
    assert [r.reason for r in result.rejects] == [R.UNKNOWN_LABEL]


def _mutations(rng: np.random.Generator, n: int) -> list[bytes]:
    """Random bytes, truncated/bit-flipped valid events and random JSON values."""
    valid = [_ev(id=f"v{i}", label=["cat", 0, 1][i % 3], ts=i, weight=0.5, meta={"i": i}) for i in range(20)]
    atoms: list[object] = [
        0,
        -1,
        1.5,
        1e308,
        "",
        "x",
        "cat",
        True,
        False,
        None,
        [],
        {},
        [1, 2, 3],
        [1.0, "a", None],
        {"id": "q"},
        10**30,
    ]
    out: list[bytes] = []
    for _ in range(n):
        kind = int(rng.integers(0, 5))
        if kind == 0:
            out.append(rng.integers(0, 256, int(rng.integers(0, 80)), dtype=np.uint8).tobytes())
        elif kind == 1:
            raw = valid[int(rng.integers(0, len(valid)))]
            out.append(raw[: int(rng.integers(0, len(raw) + 1))])
        elif kind == 2:
            raw = bytearray(valid[int(rng.integers(0, len(valid)))])
            for _ in range(int(rng.integers(1, 4))):
                raw[int(rng.integers(0, len(raw)))] = int(rng.integers(0, 256))
            out.append(bytes(raw))
        elif kind == 3:
            obj = {
                k: atoms[int(rng.integers(0, len(atoms)))]
                for k in ("id", "features", "label", "ts", "weight", "meta")
                if rng.random() < 0.8
            }
            out.append(json.dumps(obj).encode())
        else:
            obj = json.loads(valid[int(rng.integers(0, len(valid)))])
            key = ["id", "features", "label", "ts", "weight", "meta"][int(rng.integers(0, 6))]
            obj[key] = atoms[int(rng.integers(0, len(atoms)))]
            out.append(json.dumps(obj).encode())
    return out


@pytest.mark.parametrize("learn", [False, True])
def test_fuzz_decoder_never_raises(learn: bool) -> None:
    rng = np.random.default_rng(1234 + learn)
    for _ in range(20):
        schema = _fixed() if not learn else Schema(SchemaSettings(max_event_bytes=2000))
        raws = _mutations(rng, 200)
        batch, rejects = schema.decode_batch(raws, learn=learn)
        # Every message ends in exactly one place, valid rows are clean.
        assert sorted(batch.index.tolist() + [r.index for r in rejects]) == list(range(len(raws)))
        assert all(isinstance(r.reason, RejectReason) and r.detail for r in rejects)
        assert np.isfinite(batch.features).all()
        assert batch.features.shape == (len(batch), schema.n_features or 0)
        assert ((batch.labels >= 0) & (batch.labels < schema.n_classes)).all()
        assert (batch.weights >= 0).all() and np.isfinite(batch.weights).all()


def test_fuzz_engine_never_raises_and_counts_add_up() -> None:
    engine = InfluenceEngine(
        EngineSettings(
            schema=SchemaSettings(classes=[0, 1, "cat"], n_features=3),
            policy=PolicySettings(warmup_events=10),
            reference=ReferenceSettings(min_size=5),
        )
    )
    rng = np.random.default_rng(99)
    engine.add_reference([_ev(id=f"r{i}", label=i % 3, features=[i, -i, 1.0]) for i in range(10)])
    total = 0
    for _ in range(10):
        raws = _mutations(rng, 100) + [_ev(id=f"g{i}", label=i % 3) for i in range(20)]
        result = engine.process(raws)
        total += len(raws)
        assert len(result.records()) == len(raws)
    c = engine.counters
    assert c.consumed == total == c.accepted + c.quarantined + c.dead_lettered


def test_huge_but_finite_features_are_out_of_range() -> None:
    """Squares of such values overflow the running statistics: dead-letter them, never crash."""
    schema = Schema(SchemaSettings(classes=[0, 1], n_features=2))
    batch, rejects = schema.decode_batch(
        [
            b'{"id": "a", "features": [1e200, 1.0], "label": 0}',
            b'{"id": "b", "features": [-2e15, 1.0], "label": 1}',
            b'{"id": "c", "features": [9.9e14, 1.0], "label": 1}',
        ]
    )
    assert batch.ids == ["c"]
    assert [(r.index, r.reason.value) for r in rejects] == [(0, "out_of_range"), (1, "out_of_range")]

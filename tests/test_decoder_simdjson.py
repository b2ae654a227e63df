"""The simdjson path of the decoder keeps the one decoder contract.

``Schema``'s default parser reads typical events with simdjson (features straight into float64)
and hands every message it cannot vouch for to the orjson path.  These tests hold it to the
standard library's answer (same accepts, rejects, reasons and bit-exact values) on the contract's
adversarial messages and on plain events with arbitrary numbers, show that a batch decodes as
its messages do one by one, and that typical events never leave the simdjson path.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stream_influence.core.events as events
from stream_influence.core.events import RejectReason, Schema
from stream_influence.core.settings import SchemaSettings
from tests.test_decoder_contract import EXAMPLES, _decode, message

R = RejectReason


def _observable(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if not k.startswith("_")}


def _assert_same(raws: list[Any]) -> None:
    for configured in (True, False):
        fast = _observable(_decode("simdjson", raws, configured))
        assert fast == _observable(_decode("json", raws, configured)), (configured, raws)
    # Without the magnitude bound, so integers beyond 2⁵³ and huge floats are accepted and compared.
    wide = SchemaSettings(classes=[0, 1, "cat"], n_features=3, max_abs_feature=1e308)
    (fast_b, fast_r), (std_b, std_r) = (
        Schema(wide, parser=p).decode_batch(raws) for p in ("simdjson", "json")
    )
    assert fast_b.features.tobytes() == std_b.features.tobytes() and fast_b.ids == std_b.ids, raws
    assert [(r.index, r.reason) for r in fast_r] == [(r.index, r.reason) for r in std_r], raws


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(message, min_size=1, max_size=6))
def test_simdjson_and_standard_parsers_agree_exactly(raws: list[bytes | str]) -> None:
    _assert_same(raws)


# Numbers as JSON writes them and as other producers do: shortest repr, 17 digits, integers up to
# and beyond 64 bits, exponents, negative zero, subnormals, numbers beyond float64.
_FEATURE = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda f: f"{f:.17g}"),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda f: f"{f:.25e}"),
    st.integers(-(2**65), 2**65).map(str),
    st.sampled_from(["-0", "-0.0", "0e0", "1E+2", "5e-324", "2.4703282292062328e-324", "1e-400", "1e400"]),
    st.sampled_from(["true", "null", '"1"', "[1]", "{}", "NaN"]),  # never a number: rejected
)


@st.composite
def plain_event(draw: st.DrawFn) -> bytes:
    n = draw(st.integers(1, 4))
    feats = draw(st.lists(_FEATURE, min_size=n, max_size=n))
    if draw(st.integers(0, 3)) > 0:  # mostly numbers only, so most events are accepted
        feats = [f if f[0] in "-0123456789" else "1" for f in feats]
    label = draw(st.sampled_from(["0", "1", '"cat"', "2", "9007199254740992", '""', "1.0"]))
    fields = [
        f'"id": {json.dumps(draw(st.text(min_size=0, max_size=4)))}',
        f'"features": [{", ".join(feats)}]',
    ]
    fields.append(f'"label": {label}')
    if draw(st.booleans()):
        fields.append(
            draw(st.sampled_from(['"weight": 0.5', '"weight": -1', '"ts": 1700000000', '"ts": "x"']))
        )
    fields = draw(st.permutations(fields))
    return ("{" + ", ".join(fields) + "}").encode()


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(plain_event(), min_size=1, max_size=8))
def test_plain_events_decode_bit_exactly(raws: list[bytes]) -> None:
    """Numbers read by simdjson into float64 equal ``float()`` of the standard parser's values."""
    _assert_same(raws)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(st.one_of(plain_event(), message), min_size=1, max_size=8))
def test_batch_decodes_as_its_messages_one_by_one(raws: list[bytes | str]) -> None:
    """A batch mixing fast and fallback messages ≡ each message decoded alone, in input order."""
    s = SchemaSettings(classes=[0, 1, "cat"], n_features=3)
    batch, rejects = Schema(s).decode_batch(raws)
    ids: list[str] = []
    rows: list[np.ndarray] = []
    alone: list[tuple[int, RejectReason]] = []
    for i, raw in enumerate(raws):
        b, r = Schema(s).decode_batch([raw])
        ids += b.ids
        rows += list(b.features)
        alone += [(i, x.reason) for x in r]
    assert batch.ids == ids
    assert batch.features.tobytes() == np.array(rows).reshape(len(rows), 3).tobytes()
    assert [(r.index, r.reason) for r in rejects] == alone


GOOD = b'{"id": "ok", "features": [1, 2, 3], "label": 1}'


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        # simdjson's float buffer flattens nested lists: [1, [2], 3] must not read as 3 numbers.
        (b'{"id": "a", "features": [1, [2], 3], "label": 1}', R.INVALID_FEATURES),
        (b'{"id": "a", "features": [[1, 2, 3]], "label": 1}', R.WRONG_DIMENSION),
        (b'{"id": "a", "features": [1, [2, 3]], "label": 1}', R.WRONG_DIMENSION),
        (b'{"id": "a", "features": [1, true, 3], "label": 1}', R.INVALID_FEATURES),
        (b'{"id": "a", "features": [1, null, 3], "label": 1}', R.INVALID_FEATURES),
        (b'{"id": "a", "features": [1, "2", 3], "label": 1}', R.INVALID_FEATURES),
        (b'{"id": "a", "features": [1, {}, 3], "label": 1}', R.INVALID_FEATURES),
        (b'{"id": "a", "features": [1, 2, 1e400], "label": 1}', R.NON_FINITE),
        (b'{"id": "a", "features": [1, 2, 1' + b"0" * 30 + b"], " + b'"label": 1}', R.OUT_OF_RANGE),
        (
            b'\xef\xbb\xbf{"id": "a", "features": [1, 2, 3], "label": 1}',
            R.INVALID_JSON,
        ),  # simdjson skips BOMs
        (b'{"id": "a", "features": [1, 2, 3], "label": 1, "id": "b"}', R.DUPLICATE_KEY),
        (b'{"id": "a", "features": [1, 2, 3], "label": 1, "label": 2}', R.DUPLICATE_KEY),
        (b'{"id": "a", "features": [1, 2, 3], "label": 1}\x00', R.INVALID_JSON),
        (b'{"id": "\\ud800", "features": [1, 2, 3], "label": 1}', R.INVALID_JSON),
        (b'{"id": "\\ud800\\u0041", "features": [1, 2, 3], "label": 1}', R.INVALID_JSON),
        (b'{"id": "a", "features": [1, 2, 3], "label": 9007199254740992}', R.INVALID_LABEL),
        (b'{"id": "a", "features": [1, 2, 3], "label": 18446744073709551615}', R.INVALID_LABEL),
        (b'{"id": "a", "features": [1, 2, 3], "label": true}', R.INVALID_LABEL),
        (b'{"id": "a", "features": [1, 2, 3], "label": ""}', R.INVALID_LABEL),
        (b'{"id": "a", "features": [1, 2, 3], "label": 7}', R.UNKNOWN_LABEL),
        (b'{"id": "", "features": [1, 2, 3], "label": 1}', R.INVALID_ID),
        (b'{"id": "a", "features": [], "label": 1}', R.INVALID_FEATURES),
        (b'{"id": "a", "features": [1, 2, 3], "label": 1, "weight": -1}', R.INVALID_WEIGHT),
        (b'{"id": "a", "features": [1, 2, 3], "label": 1, "meta": 5}', R.INVALID_META),
        (b'{"id": "a", "features": [1, 2, 3], "label": 1, "meta": [{"k": 1, "k": 2}]}', R.DUPLICATE_KEY),
    ],
)
def test_simdjson_path_rejects_like_the_standard_decoder(raw: bytes, reason: RejectReason) -> None:
    schema = Schema(SchemaSettings(classes=[0, 1, "cat"], n_features=3))
    batch, rejects = schema.decode_batch([GOOD, raw, GOOD])
    assert batch.ids == ["ok", "ok"]
    assert [(r.index, r.reason) for r in rejects] == [(1, reason)]
    _assert_same([GOOD, raw, GOOD])


@pytest.mark.parametrize(
    "raw",
    [
        b'{"id": "a[b", "features": [1, 2, 3], "label": "cat"}',  # a '[' in a string: fallback path
        b'{"id": "a\\"b\\u00e9", "features": [1, -0.0, 3], "label": "cat"}',
        b'{"id": "a", "features": [9007199254740993, -9223372036854775807, 0.1], "label": 1}',
        b'{"id": "a", "features": [1, 2, 3], "label": 1, "weight": 0, "ts": "2024-01-02T03:04:05+00:00"}',
        b'{"id": "a", "features": [1, 2, 3], "label": "1", "meta": null}',
        b' \n{"label": 0, "features": [1e-400, 5e-324, 2.5E+3], "id": "z"}\r\n',
    ],
)
def test_simdjson_path_accepts_like_the_standard_decoder(raw: bytes) -> None:
    schema = Schema(SchemaSettings(classes=[0, 1, "cat"], n_features=3, max_abs_feature=1e300))
    batch, rejects = schema.decode_batch([raw])
    assert rejects == [] and len(batch) == 1
    _assert_same([raw])


def _counting_fallback(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = events.load_fast

    def counting(raws: Any) -> list[Any]:
        calls.append(len(raws))
        return real(raws)

    monkeypatch.setattr(events, "load_fast", counting)
    return calls


def test_typical_events_never_leave_the_simdjson_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain events, and events with a weight and a timestamp, never reach orjson (a counter)."""
    calls = _counting_fallback(monkeypatch)
    rng = np.random.default_rng(0)
    raws = [
        json.dumps(
            {"id": f"e{i}", "features": rng.normal(size=8).tolist(), "label": i % 3}
            | ({"weight": 0.5, "ts": 1.7e9 + i} if i % 2 else {})
        ).encode()
        for i in range(200)
    ]
    batch, rejects = Schema(SchemaSettings(classes=[0, 1, 2])).decode_batch(raws, learn=True)
    assert len(batch) == 200 and rejects == []
    assert calls == []
    # The contract's other messages do take the fallback (the counter counts).
    Schema(SchemaSettings(classes=[0, 1, 2])).decode_batch([b'{"id": "a", "id": "b"}'])
    assert calls == [1]


def test_threads_decode_concurrently() -> None:
    """simdjson's parser serves one document at a time: each thread has its own."""
    rng = np.random.default_rng(1)
    raws = [
        json.dumps({"id": str(i), "features": rng.normal(size=16).tolist(), "label": i % 2}).encode()
        for i in range(300)
    ]
    want = Schema(SchemaSettings(classes=[0, 1]), parser="json").decode_batch(raws)[0].features.tobytes()
    got: list[bytes] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(20):
                got.append(Schema(SchemaSettings(classes=[0, 1])).decode_batch(raws)[0].features.tobytes())
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(got) == 80 and set(got) == {want}


def test_plain_events_after_a_label_learned_in_the_same_batch_keep_input_order() -> None:
    """The one-pass plain-event path (known label, known width) runs before the full rules; a
    plain event whose label an *earlier* message of the same batch teaches, and events around
    fallback messages, still decode exactly as the standard parser decodes them, in input order."""

    def ev(i: int, label: Any, extra: str = "") -> bytes:
        return f'{{"id": "e{i}", "features": [{i}.5, -{i}, 1e{i % 5}], "label": {json.dumps(label)}{extra}}}'.encode()

    first = [ev(0, 0), ev(1, 1)]  # sets the width and two labels
    batch = [
        ev(2, 0),
        ev(3, "new", ', "weight": 0.5'),  # fallback message that teaches "new"
        ev(4, "new"),  # plain, but its label is only known once message 3 is read
        b" " + ev(5, 1),  # leading whitespace: the full rules
        ev(6, 1),
        b'{"id": "e7", "features": [1, [2], 3], "label": 0}',  # nested: rejected
        ev(8, 0, ', "ts": 1700000000'),
        ev(9, True),  # a bool label is never plain
        ev(10, 1),
    ]
    got = []
    for parser in ("simdjson", "json"):
        schema = Schema(SchemaSettings(), parser=parser)  # type: ignore[arg-type]
        schema.decode_batch(first, learn=True)
        b, r = schema.decode_batch(batch, learn=True)
        got.append(
            (
                b.ids,
                b.features.tobytes(),
                b.labels.tolist(),
                b.weights.tobytes(),
                b.timestamps.tobytes(),
                b.index.tolist(),
                [(x.index, x.reason) for x in r],
                schema.classes,
            )
        )
    assert got[0] == got[1]
    assert got[0][0] == ["e2", "e3", "e4", "e5", "e6", "e8", "e10"]


@pytest.mark.parametrize("mixed", [False, True])
def test_out_of_range_plain_events_are_rejected_with_their_reason(mixed: bool) -> None:
    """A plain event whose magnitude exceeds ``max_abs_feature`` is rejected ``out_of_range`` by
    the vectorised check, whether the batch's rows are all plain-pass buffers or mixed with
    events that took the full rules."""
    s = SchemaSettings(classes=[0, 1], n_features=2, max_abs_feature=100.0)
    raws = [b'{"id": "a", "features": [1, 2], "label": 0}', b'{"id": "b", "features": [1e5, 2], "label": 1}']
    if mixed:
        raws.append(b'{"id": "c", "features": [3, 4], "label": 1, "weight": 2}')
    got = []
    for parser in ("simdjson", "json"):
        b, r = Schema(s, parser=parser).decode_batch(raws)  # type: ignore[arg-type]
        got.append((b.ids, b.features.tobytes(), b.weights.tolist(), [(x.index, x.reason) for x in r]))
    assert got[0] == got[1]
    assert got[0][3] == [(1, R.OUT_OF_RANGE)]


def test_plain_pass_leaves_what_its_batch_checks_refuse_to_the_full_rules() -> None:
    """The plain pass checks the label's class and the flat feature list once over the batch,
    after its per-message loop: messages shaped like plain events that these checks refuse — a
    feature list with a nested one-element list (simdjson's buffer would read ``[1, [2]]`` as two
    numbers), an empty-string or out-of-bound integer label that *is* a configured class, an
    unknown label — go to the full rules, and the batch decodes as the standard parser does."""
    s = SchemaSettings(classes=[0, 1, 2**60, ""], n_features=2)

    def ev(i: int, label: str, feats: str = "[1.5, -2]") -> bytes:
        return f'{{"id": "e{i}", "features": {feats}, "label": {label}}}'.encode()

    raws = [ev(0, "0"), ev(1, "1", "[1, [2]]"), ev(2, '""'), ev(3, str(2**60)), ev(4, '"dog"'), ev(5, "1")]
    valid, rest = events._plain_events(raws, Schema(s)._index, 2, 1 << 20)
    assert valid.index == [0, 5] and valid.ids == ["e0", "e5"] and valid.codes == [0, 1]
    assert rest == [1, 2, 3, 4]
    got = []
    for parser in ("simdjson", "json"):
        b, r = Schema(s, parser=parser).decode_batch(raws)  # type: ignore[arg-type]
        got.append((b.ids, b.features.tobytes(), b.labels.tolist(), [(x.index, x.reason) for x in r]))
    assert got[0] == got[1]
    assert got[0][3] == [
        (1, R.INVALID_FEATURES),
        (2, R.INVALID_LABEL),
        (3, R.INVALID_LABEL),
        (4, R.UNKNOWN_LABEL),
    ]

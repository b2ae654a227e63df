"""One decoder contract: the orjson fast path and the standard-library parser agree exactly.

The property test feeds adversarial JSON — lone surrogates, huge integers, NaN/Infinity, deep
nesting, duplicate keys, non-UTF-8 bytes, random bytes, valid events with mutations — to both
parsers and requires the same accepts, rejects, reasons and decoded values, and that every
accepted id and label is valid Unicode.  ``HYPOTHESIS_EXAMPLES`` scales the run (default 400).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream_influence.core.events import MAX_LABEL_INT, MAX_NESTING, RejectReason, Schema
from stream_influence.core.settings import EngineSettings, SchemaSettings
from stream_influence.offline.replay import replay
from tests.fixtures.broker import Broker, fresh_topic
from tests.fixtures.service_events import (
    events,
    latest_checkpoint,
    produce,
    read_topic,
    start_service,
    wait_for,
    write_config,
)

R = RejectReason
EXAMPLES = int(os.environ.get("HYPOTHESIS_EXAMPLES", "400"))
KEYS = ["id", "features", "label", "ts", "weight", "meta", "x"]


def _decode(parser: str, raws: list[Any], configured: bool) -> dict[str, Any]:
    """Everything observable about one decode call, in a form that compares exactly."""
    s = SchemaSettings(classes=[0, 1, "cat"], n_features=3) if configured else SchemaSettings()
    schema = Schema(s, parser=parser)  # type: ignore[arg-type]
    batch, rejects = schema.decode_batch(raws, learn=not configured)
    return {
        "ids": batch.ids,
        "features": batch.features.tobytes(),  # bit-exact, -0.0 included
        "labels": batch.labels.tolist(),
        "weights": batch.weights.tobytes(),
        "timestamps": batch.timestamps.tobytes(),
        "index": batch.index.tolist(),
        "rejects": [(r.index, r.reason) for r in rejects],
        "classes": schema.classes,
        "n_features": schema.n_features,
        "_schema": schema,
        "_batch": batch,
    }


def _assert_same(raws: list[Any]) -> None:
    for configured in (True, False):
        fast, std = _decode("orjson", raws, configured), _decode("json", raws, configured)
        for key in fast:
            if not key.startswith("_"):
                assert fast[key] == std[key], (key, configured, raws)
        schema, batch = fast["_schema"], fast["_batch"]
        assert sorted(batch.index.tolist() + [i for i, _ in fast["rejects"]]) == list(range(len(raws)))
        for eid in batch.ids:
            assert isinstance(eid, str) and eid.encode("utf-8").decode("utf-8") == eid
        for lab in batch.labels.tolist():
            c = schema.classes[lab]
            assert isinstance(c, str | int) and not isinstance(c, bool)
            assert str(c).encode("utf-8")
            assert not isinstance(c, int) or abs(c) <= MAX_LABEL_INT


# -- strategies: JSON text built from fragments, so that invalid pieces can be spliced in ----------

_SURROGATES = [
    "\\ud800",
    "\\udfff",
    "\\uDC00x",
    "\\ud83d",
    "\\ude00\\ud83d",
    "\\ud83d\\ude00",
    "\\uD834\\uDD1E",
]


@st.composite
def string_literal(draw: st.DrawFn) -> str:
    text = draw(st.text(max_size=8))
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return json.dumps(text)  # ASCII with escapes
    if kind == 1:
        return json.dumps(text, ensure_ascii=False)  # raw UTF-8
    pos = draw(st.integers(0, len(text)))
    body = json.dumps(text)[1:-1]
    pos = min(pos, len(body))
    while pos and body[pos - 1] == "\\":  # never split an escape
        pos -= 1
    return '"' + body[:pos] + draw(st.sampled_from(_SURROGATES)) + body[pos:] + '"'


_NUMBERS = st.one_of(
    st.integers(-5, 5).map(str),
    st.integers().map(str),
    st.sampled_from(
        [
            str(MAX_LABEL_INT),
            str(MAX_LABEL_INT + 1),
            str(-MAX_LABEL_INT - 1),
            str(2**63),
            str(2**64),
            str(-(2**63) - 1),
            "1" + "0" * 400,
            "-1" + "0" * 30,
            "9" * 5000,
            "NaN",
            "Infinity",
            "-Infinity",
            "1e400",
            "-1e400",
            "1e-400",
            "-0",
            "-0.0",
            "1E5",
            "2.5e-3",
            "01",
            "1.",
            ".5",
        ]
    ),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.floats(min_value=-1e6, max_value=1e6).map(lambda f: f"{f:.17g}"),
)


def _container(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    keys = st.one_of(st.sampled_from(KEYS).map(json.dumps), string_literal())
    obj = st.lists(st.tuples(keys, children), max_size=5).map(
        lambda kv: "{" + ",".join(f"{k}:{v}" for k, v in kv) + "}"
    )
    arr = st.lists(children, max_size=5).map(lambda xs: "[" + ",".join(xs) + "]")
    return st.one_of(obj, arr)


json_value = st.recursive(
    st.one_of(st.sampled_from(["null", "true", "false"]), _NUMBERS, string_literal()),
    _container,
    max_leaves=12,
)


@st.composite
def deep(draw: st.DrawFn) -> str:
    n = draw(
        st.sampled_from([MAX_NESTING - 3, MAX_NESTING - 2, MAX_NESTING - 1, MAX_NESTING, 40, 1023, 1100])
    )
    inner = "[" * n + "1" + "]" * n if draw(st.booleans()) else '{"a":' * n + "1" + "}" * n
    if draw(st.booleans()):
        return inner
    return '{"id":"d","features":[1,2,3],"label":1,"meta":{"x":' + inner + "}}"


@st.composite
def event_text(draw: st.DrawFn) -> str:
    """A valid-looking event whose fields may be replaced, duplicated or reordered."""
    fields: list[tuple[str, str]] = [
        ('"id"', draw(st.one_of(st.sampled_from(['"e1"', '"é-ü"', '"😀"']), string_literal()))),
        ('"features"', draw(st.sampled_from(["[1,2,3]", "[1.5,-2,3e2]", "[0,0,0]", "[1,2]"]))),
        ('"label"', draw(st.one_of(st.sampled_from(["0", "1", '"cat"', '"1"']), string_literal()))),
    ]
    if draw(st.booleans()):
        fields.append(('"ts"', draw(st.sampled_from(["1700000000", '"2024-01-02T03:04:05+00:00"']))))
    if draw(st.booleans()):
        fields.append(('"weight"', draw(st.sampled_from(["1", "0.5", "2"]))))
    if draw(st.booleans()):
        fields.append(('"meta"', draw(st.sampled_from(['{"k":"v"}', '{"k":{"j":1}}', "{}", '{"id":"m"}']))))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):  # replace a field's value with anything
        i = draw(st.integers(0, len(fields) - 1))
        fields[i] = (fields[i][0], draw(st.one_of(json_value, _NUMBERS, string_literal())))
    for _ in range(draw(st.sampled_from([0, 0, 1]))):  # duplicate a key (same or another value)
        k, v = fields[draw(st.integers(0, len(fields) - 1))]
        fields.append((k, draw(st.sampled_from([v, "1", '"x"']))))
    fields = draw(st.permutations(fields))
    sep = draw(st.sampled_from([",", ", ", " ,\n"]))
    return "{" + sep.join(f"{k}:{v}" for k, v in fields) + "}"


@st.composite
def as_bytes(draw: st.DrawFn, text: st.SearchStrategy[str]) -> bytes | str:
    """Encode text adversarially: UTF-8 (maybe mutated), a BOM, UTF-16, or left as str."""
    t = draw(text)
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return t  # a str message
    if kind == 1:
        return b"\xef\xbb\xbf" + t.encode()
    if kind == 2:
        return t.encode(draw(st.sampled_from(["utf-16", "utf-16-le", "utf-32"])))
    raw = bytearray(t.encode("utf-8"))
    if kind in (3, 4) and raw:
        for _ in range(draw(st.integers(1, 3))):
            pos = draw(st.integers(0, len(raw)))
            junk = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80", b"\x00", b'"', b"\\"]))
            raw[pos:pos] = junk
    return bytes(raw)


message = st.one_of(
    event_text().map(str.encode),  # near-valid events, plainly encoded, are the most searching
    as_bytes(event_text()),
    as_bytes(json_value),
    as_bytes(deep()),
    st.binary(max_size=64),
    st.text(max_size=20).map(lambda t: t + "\ud800"),  # a str holding a raw lone surrogate
)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(message, min_size=1, max_size=6))
def test_fast_and_standard_parsers_agree_exactly(raws: list[bytes | str]) -> None:
    _assert_same(raws)


# -- the contract's rules, case by case (each broke the old decoder or let the two paths disagree) --

EV = '"features": [1, 2, 3], "label": 1'


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        # Defect 2: accepted by the json fallback, later crashed encoding the Kafka key.
        (b'{"id": "\\ud800x", ' + EV.encode() + b"}", R.INVALID_JSON),
        (b'{"id": "a", "features": [1, 2, 3], "label": "\\udc00"}', R.INVALID_JSON),
        (b'{"id": "a", ' + EV.encode() + b', "meta": {"\\ud800": 1}}', R.INVALID_JSON),
        (b'{"id": "a", ' + EV.encode() + b', "weight": NaN, "meta": {"k": "\\ud800"}}', R.INVALID_JSON),
        ('{"id": "a\ud800", ' + EV + "}", R.INVALID_JSON),  # a str message holding one
        (b'{"id": "a", ' + EV.encode() + b', "id": "b"}', R.DUPLICATE_KEY),
        (b'{"id": "a", ' + EV.encode() + b', "meta": {"k": 1, "k": 2}}', R.DUPLICATE_KEY),
        (b'{"id": "a", ' + EV.encode() + b', "lab\\u0065l": 2}', R.DUPLICATE_KEY),
        (b'{"id": "a", ' + EV.encode() + b', "meta": [{"k": 1, "k": 2}]}', R.DUPLICATE_KEY),
        (b'{"id": "a", ' + EV.encode() + b', "weight": NaN, "weight": 1}', R.DUPLICATE_KEY),
        (b"\xef\xbb\xbf" + b'{"id": "a", ' + EV.encode() + b"}", R.INVALID_JSON),
        (('{"id": "a", ' + EV + "}").encode("utf-16"), R.INVALID_JSON),  # json.loads(bytes) reads it
        (b'{"id": "\xc3(", ' + EV.encode() + b"}", R.INVALID_JSON),
        (b'{"id": "\xed\xa0\x80", ' + EV.encode() + b"}", R.INVALID_JSON),  # CESU-8 surrogate
        (b'{"id": "a", ' + EV.encode() + b', "meta": ' + b"[" * 40 + b"]" * 40 + b"}", R.INVALID_JSON),
        (
            b'{"id": "a", ' + EV.encode() + b', "meta": {"x": ' + b"[" * 1100 + b"]" * 1100 + b"}}",
            R.INVALID_JSON,
        ),
        (b"[" * 1023 + b"]" * 1023, R.INVALID_JSON),  # orjson parses it, json recursed too deep
        (b'{"a":' * 1000 + b"1" + b"}" * 1000, R.INVALID_JSON),  # walking it once recursed too deep
        (
            b'{"id": "a", ' + EV.encode() + b', "meta": ' + b'{"a":' * 1020 + b"1" + b"}" * 1021,
            R.INVALID_JSON,
        ),
        (b'{"id": "a", "features": [1, 2, 3], "label": 9007199254740992}', R.INVALID_LABEL),
        (b'{"id": "a", "features": [1, 2, 3], "label": 18446744073709551616}', R.INVALID_LABEL),
        (b'{"id": "a", "features": [1, 2, 3], "label": -1' + b"0" * 400 + b"}", R.INVALID_LABEL),
        (b'{"id": "a", "features": [1, 2, 3], "label": 1' + b"0" * 5000 + b"}", R.INVALID_JSON),
    ],
)
def test_contract_rule(raw: bytes | str, reason: RejectReason) -> None:
    for parser in ("orjson", "json"):
        schema = Schema(SchemaSettings(), parser=parser)  # type: ignore[arg-type]
        good = b'{"id": "ok", "features": [1, 2, 3], "label": 1}'
        batch, rejects = schema.decode_batch([good, raw, good], learn=True)
        assert batch.ids == ["ok", "ok"], parser
        assert [(r.index, r.reason) for r in rejects] == [(1, reason)], parser
        assert schema.classes == [1]  # a rejected label is never learned
    _assert_same([raw])


@pytest.mark.parametrize(
    "raw",
    [
        b'{"id": "a", "features": [1, 2, 3], "label": 9007199254740991}',  # 2**53 - 1: the bound
        b'{"id": "\\ud83d\\ude00", "features": [1, 2, 3], "label": "\\ud834\\udd1e"}',  # valid pairs
        b'{"id": "k", "features": [1, 2, 3], "label": "k", "meta": {"id": "m", "k": "id"}}',
        b'{"id": "a\\"b", "features": [1, 2, 3], "label": 1, "meta": {"a": {"b": [{"c": 1}]}}}',
        b'{"id": "a", "features": [1, 2, 3], "label": 1, "meta": {"x": ' + b"[" * 28 + b"]" * 28 + b"}}",
    ],
)
def test_contract_accepts(raw: bytes) -> None:
    for parser in ("orjson", "json"):
        schema = Schema(SchemaSettings(), parser=parser)  # type: ignore[arg-type]
        batch, rejects = schema.decode_batch([raw], learn=True)
        assert rejects == [] and len(batch) == 1, parser
        assert batch.ids[0].encode("utf-8") and str(schema.classes[0]).encode("utf-8")
    _assert_same([raw])


def test_fast_path_stays_fast_on_typical_events() -> None:
    """Typical events never leave the orjson path (a counter, not a timing)."""
    import stream_influence.core.events as events

    calls = 0
    real = events.load_standard

    def counting(raw: bytes | str) -> Any:
        nonlocal calls
        calls += 1
        return real(raw)

    rng = np.random.default_rng(0)
    raws = [
        json.dumps(
            {
                "id": f"e{i}",
                "features": rng.normal(size=8).tolist(),
                "label": i % 3,
                "ts": 1.7e9 + i,
                "meta": {"src": "web", "user": {"id": f"u{i}"}},
            }
        ).encode()
        for i in range(200)
    ]
    events.load_standard = counting  # type: ignore[assignment]
    try:
        batch, rejects = Schema(SchemaSettings()).decode_batch(raws, learn=True)
    finally:
        events.load_standard = real  # type: ignore[assignment]
    assert len(batch) == 200 and rejects == []
    assert calls == 0


def test_replay_reports_no_unencodable_id_for_a_dead_letter(tmp_path: Path) -> None:
    lines = [b'{"id": "ok%d", "features": [1, 2], "label": %d}' % (i, i % 2) for i in range(4)]
    lines.insert(2, b'{"id": "\\ud800x", "features": [1, 2], "label": 0}')
    (tmp_path / "ev.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    replay(tmp_path / "ev.jsonl", EngineSettings(), decisions=tmp_path / "dec.jsonl")
    dec = [json.loads(x) for x in (tmp_path / "dec.jsonl").read_text(encoding="utf-8").splitlines()]
    assert (dec[2]["decision"], dec[2]["reason"], dec[2]["id"]) == ("dead_letter", "invalid_json", None)
    assert [d["decision"] for d in dec].count("dead_letter") == 1


@pytest.mark.integration
def test_service_dead_letters_contract_breakers_and_keeps_running(
    broker: Broker, tmp_path: Path, kafka_client: str
) -> None:
    """Defect 2 on the real broker: a lone-surrogate id used to be accepted by the json fallback and
    crash the service when its key was encoded (every restart, same offset).  Now it and the other
    contract breakers are dead-lettered with their original bytes; every output key is UTF-8."""
    topic = fresh_topic(broker, "contract")
    ref = fresh_topic(broker, "contract-ref")
    produce(broker.bootstrap, ref, events(150, k=3, seed=7, prefix="ref")[0])
    bad = {
        b'{"id": "\\ud800x", "features": [0,0,0,0,0,0,0,0], "label": 1}': "invalid_json",
        b'{"id": "s2", "features": [0,0,0,0,0,0,0,0], "label": "\\udfff"}': "invalid_json",
        b'{"id": "d1", "features": [0,0,0,0,0,0,0,0], "label": 1, "label": 2}': "duplicate_key",
        b'{"id": "u\xff", "features": [0,0,0,0,0,0,0,0], "label": 1}': "invalid_json",
        b'{"id": "n1", "features": [0,0,0,0,0,0,0,0], "label": 1, "meta": {"a": '
        + b"[" * 40
        + b"]" * 40
        + b"}}": "invalid_json",
        b'{"id": "h1", "features": [0,0,0,0,0,0,0,0], "label": 18446744073709551616}': "invalid_label",
    }
    good = events(600, k=3, seed=8)[0]
    messages = list(good)
    for j, b in enumerate(bad):
        messages.insert(50 + 97 * j, b)
    produce(broker.bootstrap, topic, messages)
    cfg = write_config(
        tmp_path / "cfg.yaml",
        broker.bootstrap,
        topic,
        tmp_path / "ck",
        kafka={
            "client": kafka_client,
            "reference_topic": ref,
            "accepted_topic": f"{topic}.accepted",
            "decisions_topic": f"{topic}.dec",
        },
    )
    log = tmp_path / "svc.log"
    proc = start_service(cfg, log)
    try:

        def done() -> bool:
            if proc.poll() is not None:
                raise AssertionError("the service exited:\n" + log.read_text(errors="replace")[-3000:])
            ck = latest_checkpoint(tmp_path / "ck")
            return ck is not None and ck.engine.counters.consumed >= len(messages)

        wait_for(done, 120, what="all consumed")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = -9
    assert rc == 0, log.read_text(errors="replace")[-3000:]
    dead = read_topic(broker.bootstrap, f"{topic}.dead-letter", at_least=len(bad))
    assert {m.value: dict(m.headers)["reason"].decode() for m in dead} == bad
    for out in (f"{topic}.accepted", f"{topic}.dec"):
        for m in read_topic(broker.bootstrap, out, at_least=1):
            assert m.key is not None and m.key.decode("utf-8")


def test_reject_details_stay_short() -> None:
    huge = json.dumps({"id": list(range(50_000)), "features": [1, 2, 3], "label": 1}).encode()
    _, rejects = Schema(SchemaSettings()).decode_batch([huge])
    assert [r.reason for r in rejects] == [R.INVALID_ID] and len(rejects[0].detail) <= 300

"""The label space belongs to the trusted side (issue 10, defect 6).

Configured ``schema.classes``, else the reference set's labels; a stream label outside them is
dead-lettered ``unknown_label`` — in the engine, in ``score`` and in ``replay`` alike, and in the
service on the real broker.  Only with neither does the warm-up learn labels from the stream.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from stream_influence.cli import main
from stream_influence.core.engine import InfluenceEngine
from stream_influence.core.events import RejectReason
from stream_influence.core.settings import EngineSettings, PolicySettings, ReferenceSettings, SchemaSettings
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


def _ev(i: int, label: object, d: int = 4, prefix: str = "e") -> bytes:
    x = np.random.default_rng(i).normal(size=d) + (label if isinstance(label, int) and label < 3 else 0)
    return json.dumps({"id": f"{prefix}{i}", "features": x.round(6).tolist(), "label": label}).encode()


def _settings(**schema: object) -> EngineSettings:
    return EngineSettings(
        schema=SchemaSettings(**schema),
        policy=PolicySettings(warmup_events=200),
        reference=ReferenceSettings(min_size=10),
    )


def test_stream_label_outside_the_reference_is_unknown_during_warm_up() -> None:
    engine = InfluenceEngine(_settings())
    assert engine.add_reference([_ev(i, i % 3, prefix="r") for i in range(30)]) == []
    assert engine.schema.classes == [0, 1, 2]
    raws = [_ev(i, 7 if i % 5 == 0 else i % 3) for i in range(50)]
    result = engine.process(raws)  # all inside the warm-up, where labels used to be learned
    assert [r.index for r in result.rejects] == list(range(0, 50, 5))
    assert {r.reason for r in result.rejects} == {R.UNKNOWN_LABEL}
    assert engine.schema.classes == [0, 1, 2]
    assert engine.routed is not None and engine.routed.theta.shape[0] == 3
    assert engine.counters.dead_letter_reasons == {"unknown_label": 10}
    assert len(result.events) + len(result.rejects) == 50


def test_a_declared_reference_owns_the_labels_before_its_first_event() -> None:
    """A reference topic that is still empty: the stream must not define classes meanwhile."""
    engine = InfluenceEngine(_settings())
    engine.trust_reference_labels()
    result = engine.process([_ev(i, i % 2) for i in range(20)])
    assert {r.reason for r in result.rejects} == {R.UNKNOWN_LABEL} and len(result.rejects) == 20
    assert engine.schema.classes == [] and engine.schema.n_features is None
    assert engine.add_reference([_ev(i, i % 3, prefix="r") for i in range(30)]) == []
    assert engine.schema.classes == [0, 1, 2] and engine.schema.n_features == 4
    result = engine.process([_ev(i, i % 3) for i in range(20)])
    assert result.rejects == [] and len(result.events) == 20


def test_configured_classes_are_final_even_for_the_reference() -> None:
    engine = InfluenceEngine(_settings(classes=[0, 1, 2]))
    rejects = engine.add_reference([_ev(0, 0, prefix="r"), _ev(1, 9, prefix="r")])
    assert [(r.index, r.reason) for r in rejects] == [(1, R.UNKNOWN_LABEL)]
    assert engine.schema.classes == [0, 1, 2]


def test_without_classes_or_reference_the_warm_up_learns_labels() -> None:
    engine = InfluenceEngine(_settings())
    engine.process([_ev(i, [0, 1, 7][i % 3]) for i in range(30)])
    assert engine.schema.classes == [0, 1, 7] and not engine.schema.trusted


def test_trusted_label_space_survives_a_checkpoint() -> None:
    engine = InfluenceEngine(_settings())
    engine.add_reference([_ev(i, i % 3, prefix="r") for i in range(30)])
    state = engine.state_dict()
    assert state["schema"]["trusted"] is True
    restored = InfluenceEngine(_settings())
    restored.load_state_dict(state)
    result = restored.process([_ev(0, 7)])
    assert [r.reason for r in result.rejects] == [R.UNKNOWN_LABEL]
    # A checkpoint written before the flag existed loads as untrusted (its old behaviour).
    del state["schema"]["trusted"]
    restored.load_state_dict(state)
    assert not restored.schema.trusted


def test_score_never_makes_a_training_only_label_a_class(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ref = [_ev(i, i % 3, prefix="r") for i in range(60)]
    train = [_ev(i, i % 3) for i in range(120)]
    train[5] = _ev(5, 7)  # a label only the training file has
    train[9] = _ev(9, "seven")
    (tmp_path / "ref.jsonl").write_bytes(b"\n".join(ref) + b"\n")
    (tmp_path / "train.jsonl").write_bytes(b"\n".join(train) + b"\n")
    out = tmp_path / "scores.jsonl"
    argv = ["score", "--train", str(tmp_path / "train.jsonl"), "--reference", str(tmp_path / "ref.jsonl")]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "classes=[0, 1, 2]" in printed.out
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 120
    dead = {i: r["reason"] for i, r in enumerate(records) if r["decision"] == "dead_letter"}
    assert dead == {5: "unknown_label", 9: "unknown_label"}


def test_replay_dead_letters_labels_outside_the_reference_file(tmp_path: Path) -> None:
    (tmp_path / "ref.jsonl").write_bytes(b"\n".join(_ev(i, i % 3, prefix="r") for i in range(60)) + b"\n")
    stream = [_ev(i, 7 if i % 10 == 3 else i % 3) for i in range(300)]
    (tmp_path / "ev.jsonl").write_bytes(b"\n".join(stream) + b"\n")
    out = replay(
        tmp_path / "ev.jsonl",
        _settings(),
        reference=tmp_path / "ref.jsonl",
        decisions=tmp_path / "dec.jsonl",
        batch_size=64,
    )
    assert out.report["dead_letter_reasons"] == {"unknown_label": 30}
    assert out.report["engine"]["classes"] == [0, 1, 2]
    dec = [json.loads(line) for line in (tmp_path / "dec.jsonl").read_text().splitlines()]
    assert [i for i, r in enumerate(dec) if r["reason"] == "unknown_label"] == list(range(3, 300, 10))
    assert all(dec[i]["id"] == f"e{i}" for i in range(3, 300, 10))  # the operator can find them


@pytest.mark.integration
def test_service_dead_letters_stream_labels_outside_the_reference(
    broker: Broker, tmp_path: Path, kafka_client: str
) -> None:
    """Reference topic with classes {0, 1, 2}; stream events labelled 7 arrive during the warm-up.

    Before the fix, label 7 became a fourth class; now each is dead-lettered ``unknown_label``
    with its original bytes and the label space stays the reference's.
    """
    topic = fresh_topic(broker, "labels")
    ref = fresh_topic(broker, "labels-ref")
    produce(broker.bootstrap, ref, events(200, k=3, seed=7, prefix="ref")[0])
    good = events(1_000, k=3, seed=8)[0]
    sevens = [json.dumps({"id": f"seven-{i}", "features": [0.5] * 8, "label": 7}).encode() for i in range(20)]
    messages = list(good)
    for j, s in enumerate(sevens):
        messages.insert(10 + 7 * j, s)  # all inside the first 300 events: the warm-up
    produce(broker.bootstrap, topic, messages)
    cfg = write_config(
        tmp_path / "cfg.yaml",
        broker.bootstrap,
        topic,
        tmp_path / "ck",
        kafka={"client": kafka_client, "reference_topic": ref},
    )
    log = tmp_path / "svc.log"
    proc = start_service(cfg, log)
    try:

        def done() -> bool:
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
    ck = latest_checkpoint(tmp_path / "ck")
    assert sorted(ck.engine.schema.classes) == [0, 1, 2]  # in order of first appearance
    assert ck.engine.counters.dead_letter_reasons == {"unknown_label": 20}
    assert ck.engine.routed is not None and ck.engine.routed.theta.shape[0] == 3
    dead = read_topic(broker.bootstrap, f"{topic}.dead-letter", at_least=20)
    assert sorted(m.value for m in dead) == sorted(sevens)  # the original bytes
    assert {dict(m.headers)["reason"] for m in dead} == {b"unknown_label"}

"""Verified checkpoints through the running service on the embedded broker.

Stop the service, corrupt its newest checkpoint (one flipped bit), restart: it restores the
previous good checkpoint, re-applies the window the corrupt one covered exactly once (one
partition and offset-aligned batches, so the model equals an uninterrupted run, as in
tests/test_service_crash.py), and counts the fallback in its metric.  With every checkpoint
corrupt, ``run`` refuses to start within seconds with one line; ``run --fresh`` starts.
"""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from stream_influence.config import load_config
from stream_influence.core.engine import InfluenceEngine
from stream_influence.service.checkpoint import CheckpointStore
from tests.fixtures.broker import Broker, fresh_topic
from tests.fixtures.service_events import (
    consumed,
    events,
    latest_checkpoint,
    malformed,
    max_abs_diff,
    produce,
    start_service,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.integration

BATCH = 500
FIRST, SECOND = 4000, 2000  # messages before the stop / after it
N_BAD = 40
# Generous: two cores shared by many test runs.
TIMEOUT = float(os.environ.get("STREAM_INFLUENCE_TEST_TIMEOUT", "120"))
ROOT = Path(__file__).resolve().parents[1]


def _flip_bit(path: Path) -> None:
    """Flip the top exponent bit of routed.theta[0, 0] (a finite value stays finite: ×2¹⁰²⁴)."""
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    begin = json.loads(data[8 : 8 + n])["routed.theta"]["data_offsets"][0]
    data[8 + n + begin + 7] ^= 0x40
    path.write_bytes(bytes(data))


def _fallbacks(log: Path, since: int) -> float:
    text = log.read_text(errors="replace")[since:]
    port = int(re.findall(r"metrics on http://[\d.]+:(\d+)/metrics", text)[-1])
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        body = r.read().decode()
    m = re.search(r'^stream_influence_checkpoint_fallbacks_total\{reason="manifest"\} (\S+)$', body, re.M)
    assert m, "the fallback metric is not exported"
    return float(m.group(1))


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(60)


def test_a_corrupt_newest_checkpoint_resumes_from_the_previous_and_replays_once(
    broker: Broker, tmp_path: Path, kafka_client: str
) -> None:
    topic = fresh_topic(broker, "ckv")
    ref = fresh_topic(broker, "ckv-ref")
    refs, _ = events(300, seed=17, prefix="ref")
    produce(broker.bootstrap, ref, refs)
    good, _ = events(FIRST + SECOND - N_BAD, noise=0.3, seed=11)
    messages = list(good)
    for i, b in enumerate(malformed(N_BAD, seed=12)):
        messages.insert(97 * i + 13, b)
    first, second = messages[:FIRST], messages[FIRST:]
    total = len(messages)  # a multiple of every_events: the last event is checkpointed at once
    produce(broker.bootstrap, topic, first)

    ckdir = tmp_path / "ck"
    cfg_path = write_config(
        tmp_path / "cfg.yaml",
        broker.bootstrap,
        topic,
        ckdir,
        kafka={"client": kafka_client, "reference_topic": ref, "process_batch_size": BATCH},
        # Only count-based checkpoints (every 1000 events), so the previous one is a window behind.
        checkpoint={"every_events": 1000, "every_seconds": 3600, "keep": 2},
    )
    log = tmp_path / "svc.log"
    proc = start_service(cfg_path, log)
    try:
        wait_for(lambda: consumed(ckdir) >= FIRST, TIMEOUT, what=f"{FIRST} consumed")
    finally:
        assert _stop(proc) == 0
    store = CheckpointStore(ckdir)
    (_, previous), (_, newest) = store.paths()
    prev_offset = store.load(previous).offsets[(topic, 0)]
    assert store.load(newest).offsets[(topic, 0)] == FIRST > prev_offset  # a window to replay
    _flip_bit(newest)

    produce(broker.bootstrap, topic, second)
    since = len(log.read_text(errors="replace"))
    proc = start_service(cfg_path, log)
    try:
        wait_for(lambda: consumed(ckdir) >= total, TIMEOUT, what="all consumed after the restart")
        assert wait_for(lambda: _fallbacks(log, since) == 1, 30, what="fallback metric = 1")
    finally:
        assert _stop(proc) == 0
    text = log.read_text(errors="replace")[since:]
    assert re.search(rf"checkpoint {re.escape(newest.name)} is corrupt \(manifest: SHA-256", text), text
    assert f"restored checkpoint {previous.name}" in text
    assert f"resuming at {prev_offset}" in text

    # One uninterrupted run over the same events, same batches, no Kafka.
    engine = InfluenceEngine(load_config(cfg_path).engine)
    engine.add_reference(refs)
    for start in range(0, total, BATCH):
        engine.process(messages[start : start + BATCH])
    ck = latest_checkpoint(ckdir)
    assert ck.offsets == {(topic, 0): total}
    assert ck.engine.counters.as_dict() == engine.counters.as_dict()  # the window counted once
    got, want = ck.engine.state_dict(), engine.state_dict()
    for part in ("routed", "shadow", "curvature"):
        assert max_abs_diff(got[part], want[part], part) <= 1e-9, part
    assert max_abs_diff(got, want) <= 1e-9, "the whole engine state"
    assert (ckdir / (newest.name + ".corrupt")).exists()  # set aside, not deleted

    # Every checkpoint corrupt: refuse to start, quickly, with one line and no traceback.
    for _, path in CheckpointStore(ckdir).paths():
        _flip_bit(path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "stream_influence", "run", "--config", str(cfg_path)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env,
        cwd=ROOT,
    )
    elapsed = time.monotonic() - t0
    assert run.returncode == 2, run.stderr
    assert elapsed < 30, f"refusal took {elapsed:.1f}s"
    assert "Traceback" not in run.stderr
    final = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(final) == 1 and "no usable checkpoint" in final[0], run.stderr

    # `run --fresh` sets them aside and starts with an empty model.
    since = len(log.read_text(errors="replace"))
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stream_influence", "run", "--fresh", "--config", str(cfg_path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
    try:
        wait_for(lambda: "consuming " in log.read_text(errors="replace")[since:], TIMEOUT, what="fresh start")
    finally:
        assert _stop(proc) == 0
    text = log.read_text(errors="replace")[since:]
    assert "set aside as *.corrupt" in text and "no checkpoint in" in text

"""The issue's must-show: `stream-influence run` consumes a stream from the test broker while a
real Prometheus scrapes it; every panel query of the committed dashboard returns data through
Prometheus' HTTP API, and the decision counters in Prometheus equal the counts in the output
topics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from stream_influence.cli import main
from stream_influence.observability.dashboard import all_panels
from stream_influence.service.checkpoint import CheckpointStore
from tests.fixtures.broker import Broker, free_port, fresh_topic
from tests.fixtures.prometheus import JOB, check_dashboard

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "rules" / "stream-influence.yml"
N_EVENTS, N_BAD, N_REFERENCE = 3000, 60, 300


def _events(n: int, noise: float, seed: int, prefix: str) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        x = rng.normal(size=6)
        y = int(x[0] + 0.5 * x[1] > 0)
        if rng.random() < noise:
            y = 1 - y
        out.append(json.dumps({"id": f"{prefix}{i}", "features": x.round(6).tolist(), "label": y}).encode())
    return out


def _produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=1 << 20)
    try:
        for v in values:
            producer.send(topic, value=v)
        producer.flush(30)
    finally:
        producer.close(5)


def _count(bootstrap: str, topic: str) -> int:
    """Messages in every partition of ``topic`` (highwater, which is right on Tansu and Kafka)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        n = 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for msgs in consumer.poll(timeout_ms=200).values():
                n += len(msgs)
            hws = [consumer.highwater(tp) for tp in tps]
            if all(h is not None for h in hws) and all(
                consumer.position(tp) >= h for tp, h in zip(tps, hws, strict=True)
            ):
                return n
        raise AssertionError(f"could not read {topic} to its end (read {n})")
    finally:
        consumer.close()


def test_service_metrics_in_prometheus_match_the_output_topics(
    broker: Broker, prometheus_factory, tmp_path: Path, kafka_client: str
) -> None:
    b = broker.bootstrap
    events_topic = fresh_topic(broker, "events", partitions=2)
    reference_topic = fresh_topic(broker, "reference")
    outputs = {
        "quarantined": fresh_topic(broker, "quarantine"),
        "dead_lettered": fresh_topic(broker, "dead-letter"),
        "accepted": fresh_topic(broker, "accepted"),
    }
    stream = _events(N_EVENTS, noise=0.3, seed=1, prefix="e")
    bad = [b"not json", b"", b'{"id": "x"}', b'{"id": "y", "features": [1, 2], "label": 0}']
    for i in range(N_BAD):  # spread malformed messages through the stream
        stream.insert((i * 53) % len(stream), bad[i % len(bad)])
    _produce(b, reference_topic, _events(N_REFERENCE, noise=0.0, seed=2, prefix="r"))
    _produce(b, events_topic, stream)

    port = free_port()
    cfg = {
        "kafka": {
            "client": kafka_client,
            "bootstrap_servers": b,
            "topic": events_topic,
            "group_id": f"g-{events_topic}",
            "reference_topic": reference_topic,
            "quarantine_topic": outputs["quarantined"],
            "dead_letter_topic": outputs["dead_lettered"],
            "accepted_topic": outputs["accepted"],
            "session_timeout_ms": 2000,
            "heartbeat_interval_ms": 500,
            "max_poll_records": 256,
        },
        "checkpoint": {"directory": str(tmp_path / "ckpt"), "every_events": 500, "every_seconds": 1.0},
        "metrics": {"host": "127.0.0.1", "port": port},
        "shutdown_grace_seconds": 20,
    }
    cfg_path = tmp_path / "service.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    log_path = tmp_path / "service.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_INFLUENCE_")}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stream_influence", "run", "--config", str(cfg_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
        )
    instance = f"127.0.0.1:{port}"
    try:
        prom = prometheus_factory([instance], rule_files=[RULES])

        def service_log() -> str:
            return log_path.read_text(errors="replace")[-4000:]

        total = len(stream)
        sel = f'job="{JOB}",instance="{instance}"'
        try:
            prom.wait_for(
                f"sum(stream_influence_events_consumed_total{{{sel}}})",
                lambda r: bool(r) and float(r[0]["value"][1]) >= total,
                timeout=60,
            )
            # A few more scrapes after the last change, so every rate() window has samples.
            t_done = time.time()
            prom.wait_for(f"timestamp(up{{{sel}}}) > {t_done + 3}", timeout=20)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- service log ---\n{service_log()}") from exc
        assert proc.poll() is None, service_log()

        # /readyz on the same port answers 200 once partitions are assigned and the model is warm.
        with urllib.request.urlopen(f"http://{instance}/readyz", timeout=5) as r:
            ready = json.loads(r.read())
        assert r.status == 200 and ready["ready"] is True, ready

        check = check_dashboard(prom, job=JOB, instance=instance, rate_interval="10s")
        # A `--role all` process exports no role metrics: only the scale-out panels are skipped
        # (and check_dashboard asserts they are empty).
        assert check.skipped == [p.title for p in all_panels() if p.roles]

        in_prometheus = {
            r["metric"]["decision"]: round(float(r["value"][1]))
            for r in prom.query(f"sum by (decision) (stream_influence_decisions_total{{{sel}}})")
        }
        assert prom.value(f"sum(stream_influence_events_consumed_total{{{sel}}})") == total
        assert sum(in_prometheus.values()) == total
        assert in_prometheus["dead_lettered"] == N_BAD
        assert in_prometheus["quarantined"] > 0, in_prometheus  # 30 % label noise
        # Outputs are flushed at each checkpoint (every second here): poll until they are all in.
        deadline = time.monotonic() + 20
        while True:
            in_topics = {d: _count(b, t) for d, t in outputs.items()}
            if in_topics == in_prometheus or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert in_topics == in_prometheus, service_log()

        # The engine-state gauges show the engine's final state, not a stale one: compare them
        # with the last checkpoint (written after the last batch; the stream is idle now).
        store = CheckpointStore(tmp_path / "ckpt")
        deadline = time.monotonic() + 20
        while True:
            ck = store.latest()
            if (ck is not None and ck.engine.counters.consumed == total) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert ck is not None and ck.engine.counters.consumed == total
        final = ck.engine.summary()
        time.sleep(2.5)  # two scrapes after the checkpoint
        for expr, key in (
            (f'stream_influence_rolling_accuracy{{{sel},model="routed"}}', "rolling_accuracy"),
            (f'stream_influence_rolling_accuracy{{{sel},model="shadow"}}', "shadow_rolling_accuracy"),
            (f'stream_influence_model_updates_total{{{sel},model="routed"}}', "updates_applied"),
            (f"stream_influence_reference_loss{{{sel}}}", "reference_loss"),
            (f"stream_influence_quarantine_rate{{{sel}}}", "quarantine_rate"),
        ):
            assert prom.value(expr) == pytest.approx(float(getattr(final, key)), rel=1e-9), (
                f"{expr} in Prometheus is not the engine's final {key} ({getattr(final, key)}): stale gauges"
            )

        # The screenshot-free look at the same data (kept under the test's tmp_path).
        rc = main(
            [
                "dashboard",
                "--snapshot", str(tmp_path / "snapshot"),
                "--prometheus", prom.url,
                "--range", "60s",
                "--step", "1s",
                "--scrape-interval", "1s",
                "--job", JOB,
                "--instance", instance,
                "--require-data",
            ]
        )  # fmt: skip
        assert rc == 0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
    assert proc.returncode == 0, log_path.read_text(errors="replace")[-4000:]

"""Hot reload of the routing policy while the service runs on the real broker (issue 6)."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest

from tests.fixtures.broker import Broker, fresh_topic
from tests.fixtures.service_events import events, produce, read_topic, start_service, wait_for, write_config
from tests.test_service_integration import _get, _log, _metrics_port

pytestmark = pytest.mark.integration


def _consumed(port: int) -> float:
    m = re.search(
        r"^stream_influence_events_consumed_total (\S+)", _get(f"http://127.0.0.1:{port}/metrics")[1], re.M
    )
    return float(m.group(1)) if m else 0.0


def test_policy_file_change_reloads_without_losing_events(
    broker: Broker, tmp_path: Path, kafka_client: str
) -> None:
    topic = fresh_topic(broker, "reload")
    ref = fresh_topic(broker, "reload-ref")
    decisions = f"{topic}.decisions"
    produce(broker.bootstrap, ref, events(300, seed=40, prefix="ref")[0])
    cfg_path = tmp_path / "cfg.yaml"

    def config(policy: dict[str, object]) -> None:
        write_config(
            cfg_path,
            broker.bootstrap,
            topic,
            tmp_path / "ck",
            kafka={"client": kafka_client, "reference_topic": ref, "decisions_topic": decisions},
            # The fixed-threshold mode, ungated: every decision follows the threshold in force.
            engine={
                "policy": {"warmup_events": 300, "mode": "absolute", "require_disagreement": False, **policy}
            },
        )

    config({"quarantine_threshold": 0.0})
    proc = start_service(cfg_path, log := tmp_path / "svc.log")
    try:
        port = _metrics_port(log)
        phases = [("a", 0.0), ("b", 0.3), ("c", 0.3)]
        for i, (phase, _) in enumerate(phases):
            if phase == "b":  # a plain edit of the file, no signal: picked up by the file watcher
                config({"quarantine_threshold": 0.3})
                wait_for(lambda: "routing policy version 2 in force" in _log(log), 20, what="reload")
            if phase == "c":  # an invalid file is rejected and the policy in force stays
                cfg_path.write_text(
                    cfg_path.read_text().replace("quarantine_threshold: 0.3", "quarantine_threshold: -1.0")
                )
                proc.send_signal(signal.SIGHUP)
                wait_for(lambda: "policy reload rejected" in _log(log), 20, what="rejection")
            produce(broker.bootstrap, topic, events(2000, noise=0.3, seed=41 + i, prefix=phase)[0])
            wait_for(lambda i=i: _consumed(port) >= 2000 * (i + 1), 60, what=f"phase {phase} consumed")
        metrics = _get(f"http://127.0.0.1:{port}/metrics")[1]
        assert re.search(r'^stream_influence_policy_reloads_total\{result="error"\} [1-9]', metrics, re.M)
        assert re.search(r"^stream_influence_policy_version 2", metrics, re.M)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0

    records = [json.loads(m.value) for m in read_topic(broker.bootstrap, decisions, at_least=6000)]
    by_offset = {r["source_offset"]: r for r in records}
    assert sorted(by_offset) == list(range(6000)), "every event decided exactly once, none lost"
    quarantine_headers = {
        m.key.decode(): dict((k, v.decode()) for k, v in m.headers)
        for m in read_topic(broker.bootstrap, f"{topic}.quarantine", at_least=1)
    }
    for phase, threshold in phases:
        decided = [r for r in by_offset.values() if r["id"].startswith(f"{phase}-")]
        assert len(decided) == 2000
        routed = [r for r in decided if r["reason"] != "warmup"]
        quarantined = [r for r in routed if r["decision"] == "quarantine"]
        assert quarantined, f"phase {phase}: nothing quarantined"
        # Decisions follow the threshold in force: above it → quarantine, at or below → accept.
        assert all(r["cosine_influence"] > threshold for r in quarantined)
        assert all(
            r["cosine_influence"] <= threshold
            for r in routed
            if r["decision"] == "accept" and r["reason"] != "rate_cap"
        )
        versions = {quarantine_headers[r["id"]]["policy_version"] for r in quarantined}
        assert versions == ({"1"} if phase == "a" else {"2"})
    # Phase a really had points between the two thresholds, so the change was observable.
    assert any(
        0.0 < r["cosine_influence"] <= 0.3
        for r in by_offset.values()
        if r["id"].startswith("a-") and r["decision"] == "quarantine"
    )

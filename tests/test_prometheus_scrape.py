"""A real Prometheus scrapes ServiceMetrics (fed by a real engine) served by MetricsServer:
every panel query of the committed dashboard returns data, the counters agree with the engine's
batch results, and `stream-influence dashboard --snapshot` renders the panels to PNG."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from stream_influence.cli import main
from stream_influence.core.settings import EngineSettings
from stream_influence.observability.dashboard import all_panels
from stream_influence.observability.metrics import MetricsServer, ServiceMetrics
from tests.fixtures.prometheus import JOB, check_dashboard
from tests.metrics_data import run_stream

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "rules" / "stream-influence.yml"


def test_prometheus_scrapes_the_metrics_and_every_panel_has_data(prometheus_factory, tmp_path) -> None:
    metrics = ServiceMetrics(engine_settings=EngineSettings())
    metrics.set_broker_up(True)
    server = MetricsServer("127.0.0.1", 0, metrics.registry, lambda: (True, {})).start()
    try:
        instance = f"127.0.0.1:{server.port}"
        prom = prometheus_factory([instance], rule_files=[RULES])
        prom.wait_scraped(timeout=30)

        # Feed the stream over a few seconds, as the service would: batches, commits, lag,
        # outputs and periodic checkpoints, so every panel has a few samples to rate().
        def service_side_effects(b: int, result) -> None:
            counts = result.counts()
            metrics.observe_commit(0.002 * (b % 5 + 1))
            metrics.set_lag("events", 0, 600 - 20 * b)
            metrics.set_lag("events", 1, 10 * b)
            metrics.observe_outputs("quarantine", counts["quarantined"])
            metrics.observe_outputs("dead_letter", counts["dead_lettered"])
            if b % 4 == 3:
                metrics.observe_checkpoint(0.02, written_at=time.time())
            time.sleep(0.25)

        run_stream(metrics, batches=24, on_batch=service_side_effects)

        # Ground truth from the registry itself .
        g = metrics.registry.get_sample_value
        expected = {
            d: sum(
                s.value
                for fam in metrics.registry.collect()
                if fam.name == "stream_influence_decisions"
                for s in fam.samples
                if s.labels["decision"] == d
            )
            for d in ("accepted", "quarantined", "dead_lettered")
        }
        assert expected["quarantined"] > 0 and expected["dead_lettered"] > 0
        assert sum(expected.values()) == g("stream_influence_events_consumed_total") == 6 * 4 * 100

        sel = f'job="{JOB}",instance="{instance}"'
        prom.wait_for(
            f"sum(stream_influence_events_consumed_total{{{sel}}})",
            lambda r: bool(r) and float(r[0]["value"][1]) == 2400,
            timeout=20,
        )
        # Enough samples after the last change for every rate() window.
        prom.wait_for(f"count_over_time(up{{{sel}}}[10s]) >= 5", timeout=20)

        check = check_dashboard(prom, job=JOB, instance=instance, rate_interval="10s")
        # Skipped: exactly the scale-out panels (no role metrics here; check_dashboard asserts
        # they are empty), every other panel required.
        topology = [p.title for p in all_panels() if p.roles]
        assert topology and check.skipped == topology

        by_decision = {
            r["metric"]["decision"]: float(r["value"][1])
            for r in prom.query(f"sum by (decision) (stream_influence_decisions_total{{{sel}}})")
        }
        assert by_decision == expected
        assert (
            prom.value(f"sum(stream_influence_output_messages_total{{{sel},output='quarantine'}})")
            == (expected["quarantined"])
        )
        # The alert rules loaded and evaluate (none of them should fire on this healthy stream).
        groups = prom.api("rules")["groups"]
        assert {r["name"] for grp in groups for r in grp["rules"]} >= {"StreamInfluenceQuarantineAlarm"}
        assert all(r["health"] == "ok" for grp in groups for r in grp["rules"]), groups

        # The check has teeth: for an instance nobody scrapes, panels are empty and it fails.
        with pytest.raises(AssertionError, match="without data"):
            check_dashboard(prom, job=JOB, instance="127.0.0.1:1", rate_interval="10s")

        # Screenshot-free look: the CLI renders the main panels from this Prometheus.
        out = tmp_path / "snapshot"
        rc = main(
            [
                "dashboard",
                "--snapshot", str(out),
                "--prometheus", prom.url,
                "--range", "30s",
                "--step", "1s",
                "--scrape-interval", "1s",
                "--job", JOB,
                "--instance", instance,
                "--require-data",
            ]
        )  # fmt: skip
        assert rc == 0
        pngs = sorted(out.glob("*.png"))
        assert len(pngs) == sum(p.main for p in all_panels())
        for png in pngs:
            data = png.read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
        index = (out / "index.md").read_text()
        assert "(0 series)" not in index
    finally:
        server.stop()

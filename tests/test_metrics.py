"""ServiceMetrics fed by a real InfluenceEngine, scraped from MetricsServer over a real socket."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from stream_influence.config import MetricsSettings
from stream_influence.core.settings import EngineSettings, PolicySettings
from stream_influence.observability.metrics import DECISIONS, MetricsServer, ServiceMetrics, _ArrayHistogram
from tests.metrics_data import Stream, run_stream

ROOT = Path(__file__).resolve().parents[1]


def scrape(url: str) -> dict[str, dict]:
    """GET /metrics and parse it: family name → {"type", "samples": [(name, labels, value)]}."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {
        f.name: {
            "type": f.type,
            "documentation": f.documentation,
            "samples": [(s.name, s.labels, s.value) for s in f.samples],
        }
        for f in text_string_to_metric_families(text)
    }


def value(families: dict, sample: str, **labels: str) -> float:
    for fam in families.values():
        for name, lab, v in fam["samples"]:
            if name == sample and lab == labels:
                return v
    raise KeyError(f"{sample}{labels}")


@pytest.fixture(scope="module")
def fed() -> tuple[ServiceMetrics, Stream]:
    metrics = ServiceMetrics(engine_settings=EngineSettings())
    stream = run_stream(metrics)
    return metrics, stream


@pytest.fixture
def server(fed: tuple[ServiceMetrics, Stream]):
    metrics, _ = fed
    srv = MetricsServer("127.0.0.1", 0, metrics.registry, lambda: (True, {})).start()
    try:
        yield srv
    finally:
        srv.stop()


def test_decision_counters_match_batch_results(fed, server) -> None:
    _, stream = fed
    fams = scrape(server.url)
    totals = stream.totals()
    assert totals["quarantined"] > 0 and totals["dead_lettered"] > 0  # the stream exercises all paths
    per_decision = {d: 0.0 for d in DECISIONS}
    for name, labels, v in fams["stream_influence_decisions"]["samples"]:
        assert name == "stream_influence_decisions_total"
        per_decision[labels["decision"]] += v
    assert per_decision == {k: float(v) for k, v in totals.items()}
    # Every (decision, reason) pair as counted from the per-message records.
    for (decision, reason), n in stream.by_reason().items():
        assert value(fams, "stream_influence_decisions_total", decision=decision, reason=reason) == n
    consumed = sum(r.n_input for r in stream.results)
    assert value(fams, "stream_influence_events_consumed_total") == consumed == sum(per_decision.values())
    assert value(fams, "stream_influence_batches_total") == len(stream.results)
    assert value(fams, "stream_influence_batch_duration_seconds_count") == len(stream.results)


def test_score_histograms_match_scores(fed, server) -> None:
    _, stream = fed
    fams = scrape(server.url)
    for metric, attr in (
        ("stream_influence_influence", "influence"),
        ("stream_influence_relative_influence", "relative_influence"),
        ("stream_influence_cosine_influence", "cosine_influence"),
    ):
        assert fams[metric]["type"] == "histogram"
        for decision, flag in (("accepted", False), ("quarantined", True)):
            scores = np.concatenate([getattr(r.scores, attr)[r.quarantine == flag] for r in stream.results])
            scores = scores[np.isfinite(scores)]  # warm-up events have no score
            assert value(fams, metric + "_count", decision=decision) == len(scores)
            with pytest.raises(KeyError):  # signed scores: no _sum (OpenMetrics)
                value(fams, metric + "_sum", decision=decision)
            buckets = [
                (float(lab["le"]), v)
                for name, lab, v in fams[metric]["samples"]
                if name == metric + "_bucket" and lab["decision"] == decision
            ]
            for le, v in buckets:
                assert v == int((scores <= le).sum()), (metric, decision, le)
    # Quarantined events all score above the threshold in force.
    thr = stream.results[-1].threshold
    assert value(fams, "stream_influence_cosine_influence_bucket", decision="quarantined", le=repr(thr)) == 0


def test_gauges_follow_the_engine_summary(fed, server) -> None:
    _, stream = fed
    s = stream.summaries[-1]
    fams = scrape(server.url)
    assert value(fams, "stream_influence_rolling_accuracy", model="routed") == pytest.approx(
        s.rolling_accuracy
    )
    assert value(fams, "stream_influence_rolling_accuracy", model="shadow") == pytest.approx(
        s.shadow_rolling_accuracy
    )
    assert value(fams, "stream_influence_rolling_log_loss", model="shadow") == pytest.approx(
        s.shadow_rolling_log_loss
    )
    assert value(fams, "stream_influence_reference_loss") == pytest.approx(s.reference_loss)
    assert value(fams, "stream_influence_curvature_damping") == pytest.approx(s.damping_in_use)
    assert value(fams, "stream_influence_curvature_condition_number") == pytest.approx(s.condition_number)
    assert value(fams, "stream_influence_curvature_refactorizations_total") == s.refactorizations
    assert value(fams, "stream_influence_drift_resets_total") == s.drift_resets
    assert value(fams, "stream_influence_model_updates_total", model="routed") == s.updates_applied
    assert value(fams, "stream_influence_model_updates_total", model="shadow") == s.shadow_updates_applied
    assert value(fams, "stream_influence_quarantine_rate") == pytest.approx(s.quarantine_rate)
    assert value(fams, "stream_influence_quarantine_alarm") == float(s.alarm)
    assert value(fams, "stream_influence_warm") == 1.0
    assert value(fams, "stream_influence_policy_threshold", kind="quarantine") == s.threshold
    assert (
        value(fams, "stream_influence_policy_threshold", kind="accept") == PolicySettings().accept_threshold
    )
    assert value(fams, "stream_influence_policy_version") == s.policy_version
    assert value(fams, "stream_influence_model_version") == s.model_version
    assert value(fams, "stream_influence_reference_buffer_events") == s.reference_size
    build = fams["stream_influence_build_info"]["samples"]
    assert len(build) == 1 and build[0][1]["curvature"] == EngineSettings().curvature.kind


def test_service_calls_update_their_metrics() -> None:
    m = ServiceMetrics(registry=CollectorRegistry(), process_metrics=False)
    g = m.registry.get_sample_value
    m.observe_commit(0.012)
    m.observe_commit(0.3)
    assert g("stream_influence_poll_to_commit_seconds_count") == 2
    assert g("stream_influence_poll_to_commit_seconds_bucket", {"le": "0.025"}) == 1
    t = time.time()
    m.observe_checkpoint(0.05, written_at=t)
    assert g("stream_influence_last_checkpoint_timestamp_seconds") == t
    assert g("stream_influence_checkpoint_duration_seconds_count") == 1
    assert g("stream_influence_checkpoints_total") == 1
    m.set_lag("events", 3, 120)
    m.set_lag("events", 3, 80)
    assert g("stream_influence_consumer_lag_messages", {"topic": "events", "partition": "3"}) == 80
    m.remove_lag("events", 3)
    m.remove_lag("events", 3)  # idempotent
    assert g("stream_influence_consumer_lag_messages", {"topic": "events", "partition": "3"}) is None
    m.policy_reloaded(2, True, PolicySettings(quarantine_threshold=0.1, max_quarantine_rate=0.25))
    m.policy_reloaded(2, False)
    m.policy_reloaded(2, False)
    assert g("stream_influence_policy_reloads_total", {"result": "ok"}) == 1
    assert g("stream_influence_policy_reloads_total", {"result": "error"}) == 2
    assert g("stream_influence_policy_version") == 2
    assert g("stream_influence_policy_max_quarantine_rate") == 0.25
    assert g("stream_influence_policy_threshold", {"kind": "quarantine"}) == 0.1
    m.observe_outputs("quarantine", 7)
    m.observe_outputs("quarantine", 3)
    assert g("stream_influence_output_messages_total", {"output": "quarantine"}) == 10
    assert g("stream_influence_output_messages_total", {"output": "dead_letter"}) == 0
    m.set_broker_up(True)
    assert g("stream_influence_broker_up") == 1
    m.set_broker_up(False)
    assert g("stream_influence_broker_up") == 0


def test_array_histogram_bucket_edges_are_inclusive() -> None:
    reg = CollectorRegistry()
    h = _ArrayHistogram("x_score", "doc", "decision", (-1.0, 0.0, 0.5))
    reg.register(h)
    h.observe_many("a", np.array([-2.0, -1.0, 0.0, 0.2, 0.5, 0.7, np.nan, np.inf]))
    g = reg.get_sample_value
    # le=-1 holds -2 and -1 (≤), le=0 adds 0, le=0.5 adds 0.2 and 0.5, +Inf adds 0.7; NaN/inf dropped.
    assert [g("x_score_bucket", {"decision": "a", "le": le}) for le in ("-1.0", "0.0", "0.5", "+Inf")] == [
        2,
        3,
        5,
        6,
    ]
    assert g("x_score_count", {"decision": "a"}) == 6
    assert g("x_score_sum", {"decision": "a"}) is None


def test_readiness_goes_from_503_to_200_and_health_is_200() -> None:
    state = {"ready": False}
    m = ServiceMetrics(registry=CollectorRegistry())

    def ready() -> tuple[bool, dict]:
        return state["ready"], {"assigned": ["events-0"] if state["ready"] else [], "warm": state["ready"]}

    with MetricsServer("127.0.0.1", 0, m.registry, ready) as srv:
        assert srv.port != 0
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(srv.url + "/readyz", timeout=5)
        assert exc.value.code == 503
        assert json.loads(exc.value.read()) == {"ready": False, "assigned": [], "warm": False}
        state["ready"] = True
        with urllib.request.urlopen(srv.url + "/readyz", timeout=5) as r:
            assert r.status == 200
            assert json.loads(r.read()) == {"ready": True, "assigned": ["events-0"], "warm": True}
        with urllib.request.urlopen(srv.url + "/healthz", timeout=5) as r:
            assert r.status == 200 and r.read().strip() == b"ok"
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(srv.url + "/nope", timeout=5)
        assert exc.value.code == 404
        port = srv.port
    # Stopped: the port no longer answers.
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)


def test_a_failing_readiness_probe_answers_503() -> None:
    def broken() -> tuple[bool, dict]:
        raise RuntimeError("consumer gone")

    with MetricsServer("127.0.0.1", 0, CollectorRegistry(), broken) as srv:
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(srv.url + "/readyz", timeout=5)
        assert exc.value.code == 503
        assert "consumer gone" in json.loads(exc.value.read())["error"]


def test_concurrent_scrapes_while_observing() -> None:
    """Scrapes from another thread while batches are observed never fail or go backwards."""
    m = ServiceMetrics(registry=CollectorRegistry())
    errors: list[BaseException] = []
    seen: list[float] = []
    with MetricsServer("127.0.0.1", 0, m.registry, lambda: (True, {})) as srv:
        stop = threading.Event()

        def scraper() -> None:
            while not stop.is_set():
                try:
                    seen.append(value(scrape(srv.url), "stream_influence_events_consumed_total"))
                except BaseException as exc:
                    errors.append(exc)
                    return

        def wait_for_scrape(_b: int, _r: object) -> None:
            # Interleave: after each batch let at least one scrape land, so the test checks
            # concurrency on a loaded machine too instead of racing the scheduler.
            n, deadline = len(seen), time.monotonic() + 10
            while len(seen) == n and not errors and time.monotonic() < deadline:
                time.sleep(0.001)

        t = threading.Thread(target=scraper)
        t.start()
        run_stream(m, batches=8, on_batch=wait_for_scrape)
        stop.set()
        t.join(10)
    assert not errors
    assert len(seen) > 1 and seen == sorted(seen)


def test_default_bind_host_is_loopback() -> None:
    assert MetricsSettings().host == "127.0.0.1"


def test_naming_conventions_and_docs(fed) -> None:
    metrics, _ = fed
    text = metrics.exposition().decode()
    families = list(text_string_to_metric_families(text))
    docs = (ROOT / "docs" / "metrics.md").read_text()
    ours = [f for f in families if not f.name.startswith("process_")]
    assert ours
    for fam in ours:
        assert fam.name.startswith("stream_influence_"), fam.name
        assert fam.documentation, fam.name
        exposed = fam.name + "_total" if fam.type == "counter" else fam.name
        assert f"`{exposed}`" in docs, f"{exposed} is not documented in docs/metrics.md"
        if fam.type == "counter":
            assert all(s.name == fam.name + "_total" for s in fam.samples), fam.name
        assert not re.search(r"_(ms|milliseconds|kb|mb|percent)(_|$)", fam.name), fam.name
    # No *_created series (disabled: they double the exposition).
    assert "_created" not in text


def test_engine_gauges_are_nan_until_the_model_exists() -> None:
    import math

    m = ServiceMetrics(registry=CollectorRegistry(), process_metrics=False)
    for name in (
        "stream_influence_curvature_damping",
        "stream_influence_curvature_condition_number",
        "stream_influence_reference_loss",
    ):
        assert math.isnan(m.registry.get_sample_value(name)), name
    run_stream(m, batches=1)
    assert m.registry.get_sample_value("stream_influence_curvature_damping") > 0

"""The dashboard's Scale-out row against a real topology: one ``run --role score`` worker and one
``run --role update`` process on the embedded broker, both scraped by a real Prometheus.  Every
panel flagged ``Panel.roles`` returns data (the single-process tests skip exactly those), and
the numbers they show are the topology's: the worker decided every event, the updater learned
each once and published the version the worker scores with."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from stream_influence.observability.dashboard import all_panels
from tests.fixtures.broker import Broker, free_port, fresh_topic
from tests.fixtures.prometheus import JOB, check_dashboard
from tests.fixtures.service_events import (
    events,
    latest_checkpoint,
    produce,
    start_service,
    wait_for,
    write_config,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_EVENTS, N_REFERENCE = 3000, 300
# Generous: two service processes and Prometheus share 2 cores with other work here.
TIMEOUT = float(os.environ.get("DASHBOARD_SCALEOUT_TIMEOUT", "90"))


def _config(tmp: Path, name: str, broker: Broker, topic: str, ref: str, port: int, client: str) -> Path:
    return write_config(
        tmp / f"{name}.yaml",
        broker.bootstrap,
        topic,
        tmp / name,
        kafka={"client": client, "reference_topic": ref},
        checkpoint={"every_events": 500, "every_seconds": 0.5},
        metrics={"enabled": True, "host": "127.0.0.1", "port": port},
        scaleout={
            "updates_topic": f"{topic}.updates",
            "model_topic": f"{topic}.model",
            "updater_group_id": f"{topic}.updater",
            "updates_partitions": 2,
            "max_model_lag_versions": 2,
            "snapshot_every_seconds": 0,
        },
    )


def _start(config: Path, role: str, log: Path) -> subprocess.Popen[bytes]:
    return start_service(config, log, role=role)


def test_every_scale_out_panel_has_data_for_one_worker_and_the_updater(
    broker: Broker, prometheus_factory, tmp_path: Path, kafka_client: str
) -> None:
    topic = fresh_topic(broker, "dash-scale", partitions=2)
    ref = fresh_topic(broker, "dash-scale-ref")
    produce(broker.bootstrap, ref, events(N_REFERENCE, seed=1, prefix="r")[0])
    produce(broker.bootstrap, topic, events(N_EVENTS, noise=0.2, seed=2)[0])

    ports = {"score": free_port(), "update": free_port()}
    instances = {role: f"127.0.0.1:{port}" for role, port in ports.items()}
    logs = {role: tmp_path / f"{role}.log" for role in ports}
    procs = {
        role: _start(_config(tmp_path, role, broker, topic, ref, ports[role], kafka_client), role, logs[role])
        for role in ("update", "score")
    }

    def service_logs() -> str:
        return "\n".join(f"--- {r} ---\n{p.read_text(errors='replace')[-3000:]}" for r, p in logs.items())

    try:
        prom = prometheus_factory(list(instances.values()))
        both = "|".join(instances.values())
        sel = f'job="{JOB}",instance=~"{both}"'
        try:
            prom.wait_scraped(timeout=TIMEOUT)
            wait_for(
                lambda: (
                    (ck := latest_checkpoint(tmp_path / "update")) is not None
                    and ck.engine.events_seen >= N_EVENTS
                ),
                TIMEOUT,
                what="the updater learned every event",
            )
            prom.wait_for(
                f"sum(stream_influence_updates_applied_total{{{sel}}}) == {N_EVENTS}", timeout=TIMEOUT
            )
            # Enough scrapes after the last change for every rate() window.
            t_done = time.time()
            prom.wait_for(f'min(timestamp(up{{job="{JOB}"}})) > {t_done + 3}', timeout=TIMEOUT)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{service_logs()}") from exc
        assert all(p.poll() is None for p in procs.values()), service_logs()

        check = check_dashboard(prom, job=JOB, instance=both, rate_interval="10s", topology=True)
        # Required here: exactly the flagged panels (the single-process panels are skipped).
        topology = [p.title for p in all_panels() if p.roles]
        assert topology and [p.title for p in all_panels() if p.title not in check.skipped] == topology

        # The panels show the topology's numbers, each series from the right process.
        def by_instance(expr: str) -> dict[str, float]:
            return {r["metric"]["instance"]: float(r["value"][1]) for r in prom.query(expr)}

        def panel_query(title: str, i: int) -> str:
            panel = next(p for p in all_panels() if p.title == title)
            expr = panel.queries[i].expr.replace("$__rate_interval", "10s")
            return expr.replace("$job", JOB).replace("$instance", both)

        decided = by_instance(f"sum by (instance) (stream_influence_decisions_total{{{sel}}})")
        # The updater exports the (pre-initialised) decision counters too, at 0.
        assert decided.get(instances["score"]) == N_EVENTS and decided.get(instances["update"], 0) == 0
        throughput = by_instance(panel_query("Per-worker throughput", 0))
        assert set(throughput) == {instances["score"]}, "the worker's series only, not the updater's"
        learned = by_instance(panel_query("Per-worker throughput", 1))
        assert set(learned) == {instances["update"]}
        in_use = by_instance(panel_query("Snapshot version in use", 0))
        published = by_instance(panel_query("Snapshot version in use", 1))
        assert set(in_use) == {instances["score"]} and set(published) == {instances["update"]}
        assert 1 <= in_use[instances["score"]] <= published[instances["update"]]
        worker_lag = by_instance(panel_query("Consumer lag: workers (input) and updater (updates topic)", 0))
        updater_lag = prom.query(panel_query("Consumer lag: workers (input) and updater (updates topic)", 1))
        assert worker_lag == {instances["score"]: 0.0}, "the worker consumed the whole input"
        assert [r["metric"]["topic"] for r in updater_lag] == [f"{topic}.updates"]
        assert by_instance(panel_query("Updater fenced", 0)) == {instances["update"]: 0.0}
        assert by_instance(panel_query("Workers holding back", 0)).keys() == {instances["score"]}
        assert prom.value(f"sum(stream_influence_updates_duplicates_total{{{sel}}})") == 0

        # The check has teeth: with only the worker in the instance regex, updater panels are empty.
        with pytest.raises(AssertionError, match="without data"):
            check_dashboard(prom, job=JOB, instance=instances["score"], rate_interval="10s", topology=True)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = {r: p.wait(60) for r, p in procs.items()}
    assert codes == {"update": 0, "score": 0}, service_logs()

"""The committed dashboard JSON is the generator's output, and is well formed."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

from stream_influence.observability.dashboard import ANNOTATIONS, all_panels
from stream_influence.observability.metrics import ServiceMetrics
from stream_influence.observability.roles import RoleMetrics

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "grafana" / "dashboards" / "stream-influence.json"


def load_generator():
    pytest.importorskip(
        "grafana_foundation_sdk", reason="grafana-foundation-sdk (test extra) is not installed"
    )
    spec = importlib.util.spec_from_file_location("grafana_generate", ROOT / "grafana" / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def committed() -> dict:
    return json.loads(DASHBOARD.read_text())


def targets(d: dict) -> list[str]:
    return [t["expr"] for p in d["panels"] for t in p.get("targets", [])]


def test_committed_json_is_the_generators_output() -> None:
    gen = load_generator()
    assert DASHBOARD.read_text() == gen.render_json(), (
        "grafana/dashboards/stream-influence.json is stale: run .venv/bin/python grafana/generate.py"
    )
    assert gen.main(["--check"]) == 0


def test_check_mode_detects_a_stale_file(tmp_path: Path) -> None:
    gen = load_generator()
    stale = tmp_path / "d.json"
    stale.write_text(DASHBOARD.read_text().replace("Quarantine rate", "Quarantine  rate"))
    assert gen.main(["--check", "--output", str(stale)]) == 1


def test_panels_match_the_spec_and_do_not_overlap() -> None:
    d = committed()
    assert d["uid"] == "stream-influence"
    panels = [p for p in d["panels"] if p["type"] != "row"]
    spec = all_panels()
    assert [p["title"] for p in panels] == [p.title for p in spec]
    assert targets(d) == [q.expr for p in spec for q in p.queries]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not area & cells, f"panel {p['title']!r} overlaps another"
        cells |= area
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert p["description"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
    kinds = {p["type"] for p in panels}
    assert {"timeseries", "heatmap", "stat", "state-timeline"} <= kinds
    assert {a["name"] for a in d["annotations"]["list"]} == {name for name, _, _ in ANNOTATIONS}
    assert {v["name"] for v in d["templating"]["list"]} == {"datasource", "job", "instance"}


def test_required_panels_exist() -> None:
    titles = " | ".join(p.title.lower() for p in all_panels())
    for needle in (
        "by decision",
        "quarantine rate",
        "cosine influence",
        "routed vs shadow",
        "lag",
        "latency",
        "checkpoint age",
        "condition number",
        "alerts",
        "per-worker throughput",
        "consumer lag: workers",
        "updater",
        "snapshot version in use",
        "snapshot version lag",
        "snapshot age",
        "not learned",
        "holding back",
        "fenced",
        "duplicates",
    ):
        assert needle in titles, needle
    quarantine = next(p for p in all_panels() if p.title == "Quarantine rate")
    assert any("policy_max_quarantine_rate" in q.expr and q.dashed for q in quarantine.queries)


def _exported(*registries) -> set[str]:
    """Metric and sample names (``_total``, ``_bucket`` …) the registries export."""
    names = set()
    for registry in registries:
        for fam in registry.collect():
            names.add(fam.name)
            names.update(s.name for s in fam.samples)
            if fam.type == "histogram":
                names.update({fam.name + "_bucket", fam.name + "_count"})
    return names


def _metrics(expr: str) -> set[str]:
    return set(re.findall(r"\b(stream_influence_[a-z_]+)", expr))


def test_every_query_uses_metrics_the_service_exports() -> None:
    # A score worker and the updater export the service's metrics plus RoleMetrics.
    registry_names = _exported(
        ServiceMetrics().registry, RoleMetrics("score").registry, RoleMetrics("update").registry
    )
    exprs = targets(committed()) + [a["expr"] for a in committed()["annotations"]["list"]]
    used = {m for e in exprs for m in _metrics(e)}
    assert used, "no stream_influence metrics referenced"
    assert used - registry_names == set()
    # Every query filters on the dashboard's job variable, so one dashboard serves many deployments.
    for e in exprs:
        if "vector(0)" not in e:
            assert 'job=~"$job"' in e, e


def test_topology_panels_are_exactly_those_only_role_processes_feed() -> None:
    """``Panel.roles`` marks a panel iff its queries need score/update processes.  Each query of a
    flagged panel joins ``stream_influence_role_info`` — kept for one role (``and on``) or labelled
    with it (``group_left (role)``) — because every role process exports every RoleMetrics series
    (a worker's updater counters are 0), so only the join tells a worker from the updater; the
    roles it keeps are the panel's.  No other panel reads a role-only metric.  (The Prometheus
    tests skip flagged panels for one process, and require them for a topology.)"""
    role_only = _exported(RoleMetrics("score").registry, RoleMetrics("update").registry) - _exported(
        ServiceMetrics().registry
    )
    assert "stream_influence_role_info" in role_only
    flagged = [p for p in all_panels() if p.roles]
    assert {r for p in flagged for r in p.roles} == {"score", "update"}
    for panel in all_panels():
        kept: set[str] = set()
        for q in panel.queries:
            used = _metrics(q.expr)
            if not panel.roles:
                assert not used & role_only, (panel.title, q.expr)
                continue
            roles = set(re.findall(r'stream_influence_role_info\{[^}]*role="([a-z]+)"', q.expr))
            if roles:
                assert "and on (job, instance) stream_influence_role_info" in q.expr, q.expr
            else:
                assert "on (job, instance) group_left (role) stream_influence_role_info" in q.expr, (
                    f"{panel.title}: not limited to, nor labelled with, the role: {q.expr}"
                )
                roles = set(panel.roles)
            kept |= roles
        assert kept == set(panel.roles), (panel.title, kept)
        # Not plotted by `dashboard --snapshot` by default (its tests scrape one process).
        assert not (panel.roles and panel.main), panel.title


def test_provisioning_files() -> None:
    ds = yaml.safe_load((ROOT / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert ds["apiVersion"] == 1 and ds["datasources"][0]["type"] == "prometheus"
    dash = yaml.safe_load((ROOT / "grafana/provisioning/dashboards/stream-influence.yaml").read_text())
    assert dash["providers"][0]["type"] == "file"
    assert dash["providers"][0]["options"]["path"]


def test_snapshot_cli_reports_an_unreachable_prometheus(tmp_path: Path, capsys) -> None:
    from stream_influence.cli import main

    rc = main(
        ["dashboard", "--snapshot", str(tmp_path), "--prometheus", "http://127.0.0.1:1", "--range", "5m"]
    )
    assert rc == 2
    assert "cannot reach Prometheus" in capsys.readouterr().err


def test_snapshot_cli_rejects_a_bad_duration(tmp_path: Path, capsys) -> None:
    from stream_influence.cli import main

    assert main(["dashboard", "--snapshot", str(tmp_path), "--range", "five minutes"]) == 2
    assert "not a duration" in capsys.readouterr().err

"""Generate grafana/dashboards/stream-influence.json from stream_influence/dashboard.py.

The panels and their PromQL live in ``stream_influence.observability.dashboard`` (plain data, also used by the
tests and by ``stream-influence dashboard --snapshot``); this script only lays them out with
Grafana's maintained SDK, ``grafana-foundation-sdk`` (a test extra, pinned in pyproject.toml).

    python grafana/generate.py            # rewrite the committed JSON
    python grafana/generate.py --check    # exit 1 if the committed JSON is out of date

The output is deterministic (no timestamps, sorted keys), so the check is a plain comparison.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import common as common_b
from grafana_foundation_sdk.builders import dashboard as dash_b
from grafana_foundation_sdk.builders import heatmap as heatmap_b
from grafana_foundation_sdk.builders import prometheus as prom_b
from grafana_foundation_sdk.builders import stat as stat_b
from grafana_foundation_sdk.builders import statetimeline as state_b
from grafana_foundation_sdk.builders import table as table_b
from grafana_foundation_sdk.builders import timeseries as ts_b
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as common_m
from grafana_foundation_sdk.models import dashboard as dash_m
from grafana_foundation_sdk.models import heatmap as heatmap_m
from grafana_foundation_sdk.models import prometheus as prom_m

from stream_influence.observability.dashboard import ANNOTATIONS, ROWS, Panel

UID = "stream-influence"
OUTPUT = Path(__file__).resolve().parent / "dashboards" / "stream-influence.json"
DATASOURCE = dash_m.DataSourceRef(type_val="prometheus", uid="${datasource}")
GRID_WIDTH = 24


def _target(panel: Panel, i: int) -> prom_b.Dataquery:
    q = panel.queries[i]
    t = (
        prom_b.Dataquery()
        .expr(q.expr)
        .legend_format(q.legend or "__auto")
        .ref_id(chr(ord("A") + i))
        .datasource(DATASOURCE)
    )
    if panel.kind == "heatmap":
        t = t.format(prom_m.PromQueryFormat.HEATMAP)
    elif panel.kind == "table":
        t = t.format(prom_m.PromQueryFormat.TABLE).instant()
    return t


def _thresholds(panel: Panel) -> dash_b.ThresholdsConfig:
    steps = panel.steps or ((None, "green"),)
    return (
        dash_b.ThresholdsConfig()
        .mode(dash_m.ThresholdsMode.ABSOLUTE)
        .steps([dash_m.Threshold(value=v, color=c) for v, c in steps])
    )


def _panel(panel: Panel) -> Any:
    if panel.kind == "timeseries":
        b = (
            ts_b.Panel()
            .line_width(1)
            .fill_opacity(10)
            .legend(
                common_b.VizLegendOptions()
                .show_legend(True)
                .display_mode(common_m.LegendDisplayMode.LIST)
                .placement(common_m.LegendPlacement.BOTTOM)
            )
        )
        if panel.log_scale:
            b = b.scale_distribution(
                common_b.ScaleDistributionConfig().type(common_m.ScaleDistribution.LOG).log(10)
            )
        for q in panel.queries:
            if q.dashed and q.legend:
                # Reference lines (caps, versions): dashed, not filled.
                b = b.override_by_name(
                    q.legend,
                    [
                        dash_m.DynamicConfigValue(
                            id_val="custom.lineStyle", value={"fill": "dash", "dash": [10, 10]}
                        ),
                        dash_m.DynamicConfigValue(id_val="custom.fillOpacity", value=0),
                    ],
                )
    elif panel.kind == "heatmap":
        b = (
            heatmap_b.Panel()
            .calculate(False)
            .color(
                heatmap_b.HeatmapColorOptions()
                .mode(heatmap_m.HeatmapColorMode.SCHEME)
                .scheme("Spectral")
                .scale(heatmap_m.HeatmapColorScale.EXPONENTIAL)
                .exponent(0.5)
                .steps(64)
            )
            .rows_frame(heatmap_b.RowsHeatmapOptions().layout(common_m.HeatmapCellLayout.LE))
            .cell_values(heatmap_b.CellValues().unit("short"))
        )
    elif panel.kind == "stat":
        b = stat_b.Panel().graph_mode(common_m.BigValueGraphMode.AREA)
    elif panel.kind == "state-timeline":
        b = state_b.Panel().show_value(common_m.VisibilityMode.NEVER)
    elif panel.kind == "table":
        b = table_b.Panel()
    else:  # pragma: no cover - Panel.kind is a Literal
        raise ValueError(panel.kind)
    b = (
        b.title(panel.title)
        .description(panel.description)
        .datasource(DATASOURCE)
        .unit(panel.unit)
        .thresholds(_thresholds(panel))
    )
    if panel.min is not None:
        b = b.min(panel.min)
    if panel.max is not None:
        b = b.max(panel.max)
    for i in range(len(panel.queries)):
        b = b.with_target(_target(panel, i))
    return b


def build() -> dict[str, Any]:
    """The dashboard as a JSON-ready dict (deterministic)."""
    d = (
        dash_b.Dashboard("stream-influence")
        .uid(UID)
        .description(
            "Streaming influence-based routing: throughput by decision, quarantine rate, influence "
            "distributions, routed vs shadow accuracy, lag, latency, checkpoints, curvature health, "
            "scale-out topology (score workers, updater, model snapshots)."
        )
        .tags(["stream-influence", "kafka", "online-learning"])
        .time("now-1h", "now")
        .refresh("30s")
        .timezone("browser")
        .tooltip(dash_m.DashboardCursorSync.CROSSHAIR)
        .with_variable(dash_b.DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(
            dash_b.QueryVariable("job")
            .label("Job")
            .datasource(DATASOURCE)
            .query("label_values(stream_influence_build_info, job)")
            .refresh(dash_m.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .multi(True)
            .include_all(True)
            .all_value(".*")
            .sort(dash_m.VariableSort.ALPHABETICAL_ASC)
        )
        .with_variable(
            dash_b.QueryVariable("instance")
            .label("Instance")
            .datasource(DATASOURCE)
            .query('label_values(stream_influence_build_info{job=~"$job"}, instance)')
            .refresh(dash_m.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .multi(True)
            .include_all(True)
            .all_value(".*")
            .sort(dash_m.VariableSort.ALPHABETICAL_ASC)
        )
    )
    for name, expr, colour in ANNOTATIONS:
        d = d.annotation(
            dash_b.AnnotationQuery()
            .name(name)
            .datasource(DATASOURCE)
            .expr(expr)
            .icon_color(colour)
            .enable(True)
        )

    # Explicit grid positions: rows full width, panels left to right, wrapping at 24 columns.
    y = 0
    panel_id = 1
    for row in ROWS:
        d = d.with_row(
            dash_b.Row(row.title).id(panel_id).grid_pos(dash_m.GridPos(h=1, w=GRID_WIDTH, x=0, y=y))
        )
        panel_id += 1
        y += 1
        x, line_h = 0, 0
        for panel in row.panels:
            if x + panel.width > GRID_WIDTH:
                x, y, line_h = 0, y + line_h, 0
            d = d.with_panel(
                _panel(panel).id(panel_id).grid_pos(dash_m.GridPos(h=panel.height, w=panel.width, x=x, y=y))
            )
            panel_id += 1
            x += panel.width
            line_h = max(line_h, panel.height)
        y += line_h
    return json.loads(json.dumps(d.build(), cls=JSONEncoder))


def render_json() -> str:
    return json.dumps(build(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed JSON is stale")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    text = render_json()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is out of date: run python grafana/generate.py", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date")
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

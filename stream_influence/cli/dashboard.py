"""``stream-influence dashboard --snapshot DIR``: the dashboard's main panels as PNG plots.

A screenshot-free look at what Grafana would show: every main panel's PromQL (the same queries
as grafana/dashboards/stream-influence.json) is evaluated with ``query_range`` against a
Prometheus that scrapes the service, and plotted with matplotlib — lines for time series,
a bucket-by-time image for heatmaps, step lines for states.  An ``index.md`` lists the panels,
their queries and how many series each returned.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from stream_influence.errors import StreamInfluenceError
from stream_influence.observability.dashboard import Panel, all_panels, render

log = logging.getLogger(__name__)

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "dashboard",
        help="render the dashboard's main panels from Prometheus into PNG files",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--snapshot", type=Path, required=True, metavar="DIR", help="output directory")
    p.add_argument("--prometheus", default="http://127.0.0.1:9090", help="Prometheus base URL")
    p.add_argument(
        "--range",
        dest="range_",
        default="1h",
        metavar="DURATION",
        help="time range ending at --end (e.g. 15m, 1h)",
    )
    p.add_argument("--end", type=float, default=None, help="end of the range, Unix seconds (default now)")
    p.add_argument("--step", default=None, help="resolution (default: range / 240, at least 1s)")
    p.add_argument(
        "--scrape-interval", default="15s", help="Prometheus' scrape interval, for $__rate_interval"
    )
    p.add_argument("--job", default=".*", help="value of the $job variable (regex)")
    p.add_argument("--instance", default=".*", help="value of the $instance variable (regex)")
    p.add_argument("--all-panels", action="store_true", help="render every panel, not only the main ones")
    p.add_argument("--require-data", action="store_true", help="exit 1 if any rendered panel has no series")
    p.set_defaults(handler=_handle)


def parse_duration(text: str) -> float:
    """``90`` / ``90s`` / ``15m`` / ``1h`` / ``1h30m`` → seconds.

    >>> parse_duration("1h30m"), parse_duration("45s"), parse_duration("90")
    (5400.0, 45.0, 90.0)
    """
    text = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhd])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise StreamInfluenceError(f"not a duration: {text!r} (use e.g. 30s, 15m, 1h)")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def rate_interval(step: float, scrape: float) -> str:
    """Grafana's ``$__rate_interval``: max(step + scrape interval, 4 × scrape interval)."""
    return f"{max(step + scrape, 4 * scrape):.0f}s"


def query_range(base: str, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
    qs = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    url = f"{base.rstrip('/')}/api/v1/query_range?{qs}"
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            body = json.loads(r.read())
    except urllib.error.HTTPError as exc:
        try:
            body = json.loads(exc.read())
        except ValueError:
            body = {"error": str(exc)}
        raise StreamInfluenceError(f"Prometheus rejected {expr!r}: {body.get('error')}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise StreamInfluenceError(f"cannot reach Prometheus at {base}: {exc}") from exc
    if body.get("status") != "success":
        raise StreamInfluenceError(f"Prometheus error for {expr!r}: {body.get('error')}")
    return body["data"]["result"]


def legend(template: str, labels: dict[str, str]) -> str:
    if not template or template == "__auto":
        return ",".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "__name__") or "value"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template)


def _series(result: list[dict[str, Any]]) -> list[tuple[dict[str, str], list[float], list[float]]]:
    out = []
    for s in result:
        ts = [float(t) for t, _ in s["values"]]
        vs = [float(v) for _, v in s["values"]]  # "NaN", "+Inf" parse as floats
        out.append((s["metric"], ts, vs))
    return out


def _plot(panel: Panel, data: list[tuple[Any, list]], path: Path, end: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(9, 3.6), dpi=100)
    ax.set_title(panel.title, fontsize=11, loc="left")
    if panel.kind == "heatmap":
        # Buckets (cumulative, by le) × time → per-bucket counts, like Grafana's heatmap.
        series = [(s, ts, vs) for q, result in data for s, ts, vs in _series(result)]
        if series:
            les = sorted({float(m["le"]) for m, _, _ in series})
            times = sorted({t for _, ts, _ in series for t in ts})
            ti = {t: i for i, t in enumerate(times)}
            grid = np.zeros((len(les), len(times)))
            for m, ts, vs in series:
                row = les.index(float(m["le"]))
                for t, v in zip(ts, vs, strict=True):
                    grid[row, ti[t]] = v if math.isfinite(v) else 0.0
            grid = np.diff(np.vstack([np.zeros((1, len(times))), grid]), axis=0).clip(min=0)
            x = np.array(times) - end
            ax.imshow(
                grid,
                aspect="auto",
                origin="lower",
                cmap="magma",
                extent=(x[0], x[-1] if len(x) > 1 else x[0] + 1, -0.5, len(les) - 0.5),
                interpolation="nearest",
            )
            ax.set_yticks(range(len(les)))
            ax.set_yticklabels([f"≤{le:g}" for le in les], fontsize=6)
    else:
        for q, result in data:
            for labels, ts, vs in _series(result):
                x = np.array(ts) - end
                y = np.array(vs, dtype=float)
                kw: dict[str, Any] = {"label": legend(q.legend, labels), "linewidth": 1.2}
                if q.dashed:
                    kw.update(linestyle="--", color="black", linewidth=1.0)
                if panel.kind == "state-timeline":
                    ax.step(x, y, where="post", **kw)
                else:
                    ax.plot(x, y, **kw)
        if panel.log_scale:
            ax.set_yscale("symlog", linthresh=1e-3)
        if panel.min is not None:
            ax.set_ylim(bottom=panel.min)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left", ncols=3)
        ax.set_ylabel({"percentunit": "fraction", "s": "seconds", "ops": "per second"}.get(panel.unit, ""))
    ax.set_xlabel("seconds before end")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def snapshot(
    out: Path,
    prometheus: str,
    *,
    range_s: float,
    end: float | None = None,
    step: float | None = None,
    scrape_interval_s: float = 15.0,
    job: str = ".*",
    instance: str = ".*",
    all_panels_: bool = False,
) -> list[dict[str, Any]]:
    """Render the panels; returns one entry per panel: title, file, queries, series count."""
    end = time.time() if end is None else end
    step = step or max(1.0, range_s / 240)
    start = end - range_s
    ri = rate_interval(step, scrape_interval_s)
    out.mkdir(parents=True, exist_ok=True)
    report = []
    panels = [p for p in all_panels() if all_panels_ or p.main]
    for i, panel in enumerate(panels, 1):
        data = []
        exprs = []
        for q in panel.queries:
            expr = render(q.expr, job=job, instance=instance, rate_interval=ri)
            exprs.append(expr)
            data.append((q, query_range(prometheus, expr, start, end, step)))
        n_series = sum(len(r) for _, r in data)
        slug = re.sub(r"[^a-z0-9]+", "-", panel.title.lower()).strip("-")
        path = out / f"{i:02d}-{slug}.png"
        _plot(panel, data, path, end)
        report.append({"title": panel.title, "file": path.name, "queries": exprs, "series": n_series})
        log.info("%s: %d series → %s", panel.title, n_series, path)
    lines = [
        "# stream-influence dashboard snapshot",
        "",
        f"Prometheus {prometheus}, {range_s:.0f} s ending {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(end))}, "
        f"step {step:g} s, $__rate_interval {ri}.",
        "",
    ]
    for r in report:
        lines += [f"## {r['title']} ({r['series']} series)", "", f"![{r['title']}]({r['file']})", ""]
        lines += [f"    {e}" for e in r["queries"]] + [""]
    (out / "index.md").write_text("\n".join(lines))
    return report


def _handle(args: argparse.Namespace) -> int:
    report = snapshot(
        args.snapshot,
        args.prometheus,
        range_s=parse_duration(args.range_),
        end=args.end,
        step=parse_duration(args.step) if args.step else None,
        scrape_interval_s=parse_duration(args.scrape_interval),
        job=args.job,
        instance=args.instance,
        all_panels_=args.all_panels,
    )
    empty = [r["title"] for r in report if r["series"] == 0]
    print(f"wrote {len(report)} panels to {args.snapshot} (index.md)")
    if empty:
        print("panels without data: " + ", ".join(empty))
        if args.require_data:
            return 1
    return 0

"""``stream-influence replay EVENTS.jsonl``: offline replay through the engine, no Kafka."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from stream_influence.config import limit_blas_threads, load_config
from stream_influence.offline.replay import DEFAULT_SEED_REFERENCE, replay


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "replay",
        help="replay a JSON Lines file of events through the engine (no Kafka)",
        description="Replay recorded events through the same engine as the service. Writes one "
        "decision per input line, in order; reports counts and accuracies.",
    )
    p.add_argument("events", type=Path, help="JSON Lines file of training events")
    p.add_argument("--reference", type=Path, help="trusted events for the reference buffer")
    p.add_argument("--test", type=Path, help="clean labelled events to measure test accuracy on")
    p.add_argument("--config", type=Path, help="YAML configuration (its `engine` section is used)")
    p.add_argument("--decisions", type=Path, help="write one JSON decision per input line here")
    p.add_argument("--report", type=Path, help="write the report JSON here")
    p.add_argument("--plots", type=Path, metavar="DIR", help="write PNG plots into this directory")
    p.add_argument("--batch-size", type=int, default=512, help="lines per engine batch (default 512)")
    p.add_argument(
        "--seed-reference",
        type=int,
        default=DEFAULT_SEED_REFERENCE,
        help="without --reference: first N valid events seed the reference buffer "
        f"(default {DEFAULT_SEED_REFERENCE}; engine.reference.seed_from_stream wins when set)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the report JSON instead of a summary")
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    limit_blas_threads(cfg.blas_threads)
    progress_cb, stop = _progress(args.events, quiet=args.quiet)
    try:
        result = replay(
            args.events,
            cfg.engine,
            reference=args.reference,
            test=args.test,
            decisions=args.decisions,
            batch_size=args.batch_size,
            seed_reference=args.seed_reference,
            progress=progress_cb,
        )
    finally:
        stop()
    report = result.report
    if args.plots is not None:
        from stream_influence.offline.plots import plot_replay

        report["plots"] = [str(p) for p in plot_replay(result.trace, args.plots, args.events.name)]
    text = json.dumps(report, indent=2)
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(text + "\n")
    if args.json:
        print(text)
    else:
        print(_summary(report))
    return 0


def _progress(path: Path, quiet: bool) -> tuple[Any, Any]:
    """A rich progress bar over the file's bytes (the line count is unknown without a pass)."""
    if quiet:
        return None, lambda: None
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("[bold]replay"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TextColumn("{task.fields[events]:>9,} ev  {task.fields[rate]:>8,.0f} ev/s"),
        TextColumn(
            "[green]acc {task.fields[accepted]:,}[/] [yellow]q {task.fields[quarantined]:,}[/] "
            "[red]dl {task.fields[dead_lettered]:,}[/]"
        ),
        TimeElapsedColumn(),
        console=Console(stderr=True),  # stdout stays clean for --json
        transient=False,
    )
    total = max(path.stat().st_size, 1) if path.is_file() else 1
    task = progress.add_task(
        "replay", total=total, events=0, rate=0.0, accepted=0, quarantined=0, dead_lettered=0
    )
    progress.start()

    def update(pos: int, c: dict[str, Any]) -> None:
        rate = c["events"] / c["elapsed"] if c["elapsed"] > 0 else 0.0
        progress.update(
            task,
            completed=pos,
            events=c["events"],
            rate=rate,
            accepted=c["accepted"],
            quarantined=c["quarantined"],
            dead_lettered=c["dead_lettered"],
        )

    return update, progress.stop


def _fmt(x: Any, pct: bool = True) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.2f} %" if pct else f"{x:,.0f}"


def _summary(r: dict[str, Any]) -> str:
    n = r["events"]
    lines = [
        f"replayed {n:,} lines of {r['input']} in {r['elapsed_seconds']:.1f} s "
        f"({_fmt(r['events_per_second'], pct=False)} events/s)",
        f"  accepted       {r['accepted']:>10,}",
        f"  quarantined    {r['quarantined']:>10,}",
        f"  dead-lettered  {r['dead_lettered']:>10,}"
        + (f"  {r['dead_letter_reasons']}" if r["dead_letter_reasons"] else ""),
        f"  reasons        {r['decision_reasons']}",
        f"  updates applied {r['updates_applied']:,} (shadow {r['shadow_updates_applied']:,})",
        f"  prequential accuracy  routed {_fmt(r['prequential_accuracy'])}   "
        f"shadow {_fmt(r['shadow_prequential_accuracy'])}",
    ]
    if "test_accuracy" in r:
        lines.append(
            f"  test accuracy         routed {_fmt(r['test_accuracy'])}   "
            f"shadow {_fmt(r['shadow_test_accuracy'])}   ({r['test_events']:,} events)"
        )
    ref = r["reference"]
    if ref["source"] == "stream":
        lines.append(f"  reference: {ref['note']}")
    else:
        lines.append(f"  reference: {ref['events']:,} events from {ref['path']} ({ref['rejected']} rejected)")
    if not r["warm"]:
        lines.append(f"  warning: routing never became active ({r['not_warm_reason']})")
    if r["alarm_batches"]:
        lines.append(f"  warning: quarantine-rate alarm in {r['alarm_batches']} batch(es)")
    if r.get("decisions"):
        lines.append(f"  decisions: {r['decisions']}")
    if r.get("plots"):
        lines.append(f"  plots: {', '.join(r['plots'])}")
    return "\n".join(lines)

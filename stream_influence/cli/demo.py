"""``stream-influence demo``: the main job on an embedded default (see stream_influence.tooling.demo)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from stream_influence.offline.datasets import DATASETS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the service end to end on an embedded broker and a bundled noisy data set",
        description="Starts the embedded Kafka-protocol broker, streams a bundled data set with "
        "injected label noise into it, runs the real service with metrics, and reports accuracy "
        "(routed vs unfiltered vs clean oracle), quarantine precision/recall and throughput.",
    )
    p.add_argument("--dataset", default="digits", choices=sorted(DATASETS), help="bundled data set")
    p.add_argument("--noise", type=float, default=0.4, help="label noise rate (default 0.4)")
    p.add_argument("--noise-kind", default="symmetric", choices=["symmetric", "pairflip"])
    p.add_argument("--events", type=int, default=None, help="cap on streamed events")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("demo-output"), help="where plots and the report go")
    p.add_argument("--metrics-port", type=int, default=9400, help="Prometheus endpoint port (0: any free)")
    p.add_argument(
        "--client",
        default="kafka-python",
        choices=["kafka-python", "confluent"],
        help="Kafka client of the service and the demo's own readers and producers (kafka.client)",
    )
    p.add_argument(
        "--keep-running",
        action="store_true",
        help="leave the broker and service up (Ctrl-C stops) so Prometheus can scrape them",
    )
    p.add_argument("--quiet", action="store_true", help="no live progress")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    from stream_influence.config import limit_blas_threads, load_config
    from stream_influence.tooling.demo import DemoOptions, format_report, run_demo

    if not 0.0 <= args.noise < 1.0:
        raise SystemExit("error: --noise must be in [0, 1)")
    # The clean-label oracle (and the in-process fallback) run the engine in this process too.
    limit_blas_threads(load_config().blas_threads)
    opts = DemoOptions(
        dataset=args.dataset,
        noise=args.noise,
        noise_kind=args.noise_kind,
        events=args.events,
        seed=args.seed,
        out=args.out,
        metrics_port=args.metrics_port,
        keep_running=args.keep_running,
        client=args.client,
    )
    report = run_demo(opts, quiet=args.quiet or args.json, verbose=args.verbose)
    print(json.dumps(report, indent=2, default=str) if args.json else format_report(report))
    return 0

"""``stream-influence datasets list|export``: bundled noisy streams as JSON Lines files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from stream_influence.errors import StreamInfluenceError
from stream_influence.offline.datasets import export_stream, list_datasets, load_stream


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("datasets", help="list or export the bundled noisy streams")
    ds = p.add_subparsers(dest="datasets_command", required=True, metavar="ACTION")
    ls = ds.add_parser("list", help="list the datasets shipped inside installed packages")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(handler=_list)
    ex = ds.add_parser(
        "export",
        help="write events.jsonl (noisy), reference.jsonl and test.jsonl (clean)",
        description="Corrupted events carry meta.corrupted=true and meta.clean_label.",
    )
    ex.add_argument("name")
    ex.add_argument("--noise", type=float, default=0.0, help="fraction of corrupted events (0–1)")
    ex.add_argument("--noise-kind", choices=["symmetric", "pairflip"], default="symmetric")
    ex.add_argument("--seed", type=int, default=0)
    ex.add_argument("--out", type=Path, required=True, help="output directory")
    ex.add_argument("--events", type=int, help="number of streamed events (synthetic: generated)")
    ex.add_argument("--reference-size", type=int, default=200)
    ex.set_defaults(handler=_export)


def _list(args: argparse.Namespace) -> int:
    rows = [
        {"name": d.name, "available": d.available(), "source": d.source, "description": d.description}
        for d in list_datasets()
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        flag = "" if r["available"] else "  [not installed]"
        print(f"{r['name']:<18} {r['description']}\n{'':<18} source: {r['source']}{flag}")
    return 0


def _export(args: argparse.Namespace) -> int:
    try:
        stream = load_stream(
            args.name,
            noise=args.noise,
            noise_kind=args.noise_kind,
            seed=args.seed,
            n_events=args.events,
            n_reference=args.reference_size,
        )
    except ValueError as exc:
        raise StreamInfluenceError(str(exc)) from exc
    manifest = export_stream(stream, args.out)
    print(
        f"{args.out}: {manifest['events']} events ({manifest['corrupted']} corrupted, "
        f"{args.noise_kind}), {manifest['reference']} reference, {manifest['test']} test; "
        f"{manifest['n_features']} features, {manifest['n_classes']} classes"
    )
    return 0

"""``stream-influence score``: the offline audit of a data set (and oracle for the stream).

Fits the softmax head on the training events to convergence, then writes one JSON line per
training line: ``{"id", "influence", "relative_influence", "cosine_influence",
"self_influence", "corrected_loss", "decision", "reason"}``; invalid lines become ``{"id": null,
"decision": "dead_letter", "reason", "detail", "line"}`` (never a crash).  ``decision`` is the
routing policy's; to find flipped labels, rank by ``corrected_loss`` (highest first: the label's
held-out loss corrected toward the trusted set).  See ``stream_influence.offline.audit``.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from stream_influence.core.decisions import DecisionRecord
from stream_influence.core.events import EventBatch, Reject, Schema
from stream_influence.core.model import make_extractor
from stream_influence.core.settings import EngineSettings
from stream_influence.core.state import atomic_write
from stream_influence.errors import ConfigError, StreamInfluenceError
from stream_influence.offline.audit import CURVATURE_AT_OPTIMUM, SCORE_L2, Audit, score_dataset
from stream_influence.offline.jsonl import iter_lines


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score",
        help="fit the head on a data set and write every training event's influence",
        description="Offline audit: full-batch fit (float64, to convergence, explicit L2), exact or "
        "K-FAC Hessian at the optimum, influence of every training event on the reference loss, and "
        "corrected_loss (rank by it, highest first, to find flipped labels).",
    )
    p.add_argument("--train", type=Path, required=True, help="training events (JSON Lines)")
    p.add_argument("--reference", type=Path, required=True, help="trusted reference events (JSON Lines)")
    p.add_argument("--out", type=Path, required=True, help="scores, one JSON line per training line")
    p.add_argument("--l2", type=float, default=SCORE_L2, help=f"L2 on Θ = [W b] (default {SCORE_L2})")
    p.add_argument(
        "--curvature", choices=tuple(CURVATURE_AT_OPTIMUM), default="exact", help="Hessian at the optimum"
    )
    p.add_argument("--objective", choices=("loss", "margin"), default=None, help="default: engine setting")
    p.add_argument("--config", type=Path, help="YAML config: engine schema, model and policy settings apply")
    p.add_argument("--tol", type=float, default=1e-10, help="gradient-norm tolerance of the fit")
    p.set_defaults(handler=_score)


def _read_lines(path: Path) -> list[bytes]:
    """Every line (a blank one too: it gets its own dead-letter record)."""
    try:
        return list(iter_lines(path))
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc


def _report_rejects(name: str, rejects: list[Reject]) -> None:
    if not rejects:
        return
    by_reason = Counter(r.reason.value for r in rejects)
    print(f"{name}: {len(rejects)} invalid line(s) dead-lettered: {dict(by_reason)}", file=sys.stderr)
    for r in rejects[:5]:
        print(f"  line {r.index + 1}: {r.reason.value}: {r.detail}", file=sys.stderr)


def _score(args: argparse.Namespace) -> int:
    from stream_influence.config import limit_blas_threads, load_config

    cfg = load_config(args.config)  # without --config: the defaults (and the environment)
    limit_blas_threads(cfg.blas_threads)
    settings = cfg.engine if args.config is not None else EngineSettings()
    if args.l2 <= 0:
        print("error: --l2 must be > 0", file=sys.stderr)
        return 2
    schema = Schema(settings.schema_)
    # Labels and width: configured, else the (trusted) reference set's.  A label only the training
    # file has is dead-lettered unknown_label: it must not become a one-point class.
    ref_raws, train_raws = _read_lines(args.reference), _read_lines(args.train)
    ref, ref_rejects = schema.decode_batch(ref_raws, trusted=True)
    train, train_rejects = schema.decode_batch(train_raws)
    _report_rejects(str(args.reference), ref_rejects)
    _report_rejects(str(args.train), train_rejects)
    if len(train) == 0 or len(ref) == 0:
        print(
            f"error: need valid training and reference events (got {len(train)} and {len(ref)})",
            file=sys.stderr,
        )
        return 1
    if schema.n_classes < 2:
        print(f"error: need at least two classes, found {schema.classes!r}", file=sys.stderr)
        return 1
    if len(ref) < settings.reference.min_size:
        print(
            f"warning: the reference set has {len(ref)} points (< {settings.reference.min_size}); "
            "influence on a small reference is noisy",
            file=sys.stderr,
        )

    extractor = make_extractor(settings.model)
    objective = args.objective or settings.influence.objective
    try:
        audit = score_dataset(
            extractor.transform(train.features),
            train.labels,
            extractor.transform(ref.features),
            ref.labels,
            n_classes=schema.n_classes,
            l2=args.l2,
            weights=train.weights,
            curvature=args.curvature,
            objective_kind=objective,
            standardize=settings.model.standardize,
            policy=settings.policy,
            tol=args.tol,
        )
    except (ValueError, np.linalg.LinAlgError) as exc:
        raise StreamInfluenceError(f"offline fit failed: {exc}") from exc

    atomic_write(args.out, _render(train, train_rejects, len(train_raws), audit))
    fit = audit.fit
    n_q = int(audit.quarantine.sum())
    print(
        f"fit: l2={fit.l2:g} method={fit.method} iterations={fit.iterations} "
        f"gradient_norm={fit.grad_norm:.3e} converged={fit.grad_norm <= args.tol} "
        f"train_loss={fit.loss:.6f} reference_loss={audit.reference_loss:.6f}"
    )
    print(
        f"scored {len(train)} events with {args.curvature} curvature (objective {objective}, "
        f"score {settings.policy.score}): accept={len(train) - n_q} quarantine={n_q} "
        f"dead_letter={len(train_rejects)} classes={schema.classes!r} -> {args.out}"
    )
    print("to find flipped labels, rank by corrected_loss (highest first)")
    return 0


def _render(train: EventBatch, rejects: list[Reject], n_lines: int, audit: Audit) -> bytes:
    out: list[DecisionRecord | None] = [None] * n_lines
    sc = audit.scores
    cols = zip(
        sc.influence.tolist(),
        sc.relative_influence.tolist(),
        sc.cosine_influence.tolist(),
        sc.self_influence.tolist(),
        strict=True,
    )
    q, cl = audit.quarantine.tolist(), audit.corrected_loss.tolist()
    for j, (i, eid, scores) in enumerate(zip(train.index.tolist(), train.ids, cols, strict=True)):
        out[i] = DecisionRecord(
            eid, "quarantine" if q[j] else "accept", audit.reasons[j], *scores, corrected_loss=cl[j]
        )
    for r in rejects:
        out[r.index] = DecisionRecord.dead_letter(r.reason.value, r.detail).replace(line=r.index + 1)
    return "".join(f"{rec.to_json()}\n" for rec in out if rec is not None).encode()

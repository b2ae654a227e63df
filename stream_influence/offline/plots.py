"""PNG plots of a replay (matplotlib, Agg backend: no display needed).

``plot_replay`` writes three files into a directory:

* ``accuracy.png`` — rolling prequential accuracy of the routed and the shadow (unfiltered)
  learner over the stream;
* ``influence_hist.png`` — histogram of ``cosine_influence`` split by decision (warm-up
  acceptances, made before routing starts, drawn separately);
* ``quarantine_rate.png`` — rolling quarantine rate over the stream.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from stream_influence.offline.replay import ReplayTrace

__all__ = ["plot_replay", "rolling_ratio"]


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")  # headless; must precede the pyplot import
    import matplotlib.pyplot as plt

    return plt


def rolling_ratio(num: np.ndarray, den: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Ratio of sums over the batches covering the last ``window`` events, at each batch end.

    Returns ``(events_so_far, ratio)``.

    >>> x, r = rolling_ratio(np.array([1, 2, 3]), np.array([2, 2, 4]), 4)
    >>> x.tolist(), r.tolist()
    ([2, 4, 8], [0.5, 0.75, 0.75])
    """
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    cn, cd = np.cumsum(num), np.cumsum(den)
    ends = cd
    # First batch index whose end is inside the window (events (end − window, end]).
    start = np.searchsorted(cd, cd - window, side="right")
    prev_n = np.where(start > 0, cn[np.maximum(start - 1, 0)], 0.0)
    prev_d = np.where(start > 0, cd[np.maximum(start - 1, 0)], 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = (cn - prev_n) / (cd - prev_d)
    return ends.astype(np.int64), ratio


def _window(total: int) -> int:
    return max(50, total // 20)


def plot_replay(trace: ReplayTrace, out_dir: Path, title: str = "") -> list[Path]:
    """Write the three replay plots; returns their paths."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    valid = np.asarray(trace.valid)
    total = int(valid.sum())
    w = _window(total)
    paths: list[Path] = []

    fig, ax = plt.subplots(figsize=(7, 4))
    x, routed = rolling_ratio(np.asarray(trace.routed_correct), valid, w)
    _, shadow = rolling_ratio(np.asarray(trace.shadow_correct), valid, w)
    ax.plot(x, routed, label="routed (filtered)")
    ax.plot(x, shadow, label="shadow (unfiltered)", linestyle="--")
    ax.set_xlabel("valid events")
    ax.set_ylabel(f"prequential accuracy (last {w} events)")
    ax.set_title(f"Rolling accuracy {title}".strip())
    ax.legend()
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out_dir / "accuracy.png", plt))

    fig, ax = plt.subplots(figsize=(7, 4))
    edges = trace.hist_edges
    centers = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    ax.bar(centers, trace.hist_accept, width=width, alpha=0.6, label="accepted (routed)")
    ax.bar(centers, trace.hist_quarantine, width=width, alpha=0.6, label="quarantined")
    if trace.hist_warmup.any():
        ax.step(centers, trace.hist_warmup, where="mid", color="grey", label="accepted in warm-up")
    ax.axvline(0.0, color="k", linewidth=0.8)
    ax.set_xlabel("cosine influence (> 0: would raise the reference loss)")
    ax.set_ylabel("events")
    ax.set_title(f"Influence by decision {title}".strip())
    ax.legend()
    paths.append(_save(fig, out_dir / "influence_hist.png", plt))

    fig, ax = plt.subplots(figsize=(7, 4))
    x, rate = rolling_ratio(np.asarray(trace.quarantined), valid, w)
    ax.plot(x, rate)
    ax.set_xlabel("valid events")
    ax.set_ylabel(f"quarantine rate (last {w} events)")
    ax.set_ylim(0, max(0.05, float(np.nanmax(rate)) * 1.1) if len(rate) else 1)
    ax.set_title(f"Quarantine rate {title}".strip())
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out_dir / "quarantine_rate.png", plt))
    return paths


def _save(fig, path: Path, plt) -> Path:  # type: ignore[no-untyped-def]
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

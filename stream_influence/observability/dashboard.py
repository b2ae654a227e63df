"""What the Grafana dashboard shows, as plain data: rows, panels and their PromQL.

One source for three consumers:

* ``grafana/generate.py`` turns it into the dashboard JSON with ``grafana-foundation-sdk``;
* the tests evaluate every query against a real Prometheus scraping the service and require data;
* ``stream-influence dashboard --snapshot DIR`` plots the main panels without a Grafana server.

Queries use Grafana's template syntax: ``$job``/``$instance`` (dashboard variables, regex
matchers) and ``$__rate_interval``.  :func:`render` substitutes them for use outside Grafana.

The *Scale-out* row's panels carry ``roles``: they only have data while ``run --role score`` /
``run --role update`` processes are scraped (a ``--role all`` process exports no role metrics), so
the single-process checks skip them and a scale-out check requires them.

>>> render('rate(x{%s}[$__rate_interval])' % SEL, rate_interval="30s")
'rate(x{job=~".*",instance=~".*"}[30s])'
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["ANNOTATIONS", "ROWS", "SEL", "Panel", "Query", "Role", "Row", "all_panels", "render"]

# Label matchers every query carries, so the dashboard can be narrowed to one job or instance.
SEL = 'job=~"$job",instance=~"$instance"'

PanelKind = Literal["timeseries", "heatmap", "stat", "state-timeline", "table"]
# The scale-out roles (``run --role``) whose processes a topology panel needs.
Role = Literal["score", "update"]


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""
    # Dashed line for reference values (thresholds, caps) drawn on the same panel.
    dashed: bool = False


@dataclass(frozen=True)
class Panel:
    title: str
    kind: PanelKind
    queries: tuple[Query, ...]
    description: str
    unit: str = "short"
    width: int = 12
    height: int = 8
    # Plotted by `stream-influence dashboard --snapshot`.
    main: bool = True
    min: float | None = None
    max: float | None = None
    log_scale: bool = False
    # Stat/state panels: value → colour thresholds as (value, colour), first value None = base.
    steps: tuple[tuple[float | None, str], ...] = ()
    # Topology panels: only processes of these roles export what they show (empty = any process).
    roles: tuple[Role, ...] = ()


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...] = field(default_factory=tuple)


def _q(expr: str, legend: str = "", dashed: bool = False) -> Query:
    return Query(expr.replace("{SEL}", "{" + SEL + "}").replace("{SEL,", "{" + SEL + ","), legend, dashed)


def _quantiles(metric: str, what: str) -> tuple[Query, ...]:
    return tuple(
        _q(
            f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{{SEL}}[$__rate_interval])))",
            f"{what} p{int(q * 100)}",
        )
        for q in (0.5, 0.99)
    )


def _of_role(expr: str, role: Role) -> str:
    """``expr`` (aggregated ``by (job, instance)``) kept for the processes of one role only.

    Every role process exports every RoleMetrics series (a worker's updater counters stay 0), so
    the role comes from ``stream_influence_role_info``, never from which metric exists."""
    return f'{expr} and on (job, instance) stream_influence_role_info{{SEL,role="{role}"}}'


def _with_role(expr: str) -> str:
    """``expr`` (aggregated ``by (job, instance)``) with each process's ``role`` label joined in."""
    return f"{expr} * on (job, instance) group_left (role) stream_influence_role_info{{SEL}}"


def _heatmap(metric: str, decision: str) -> Query:
    return _q(
        f'sum by (le) (increase({metric}_bucket{{SEL,decision="{decision}"}}[$__rate_interval]))',
        "{{le}}",
    )


ROWS: tuple[Row, ...] = (
    Row(
        "Throughput and routing",
        (
            Panel(
                "Events by decision",
                "timeseries",
                (
                    _q(
                        "sum(rate(stream_influence_events_consumed_total{SEL}[$__rate_interval]))", "consumed"
                    ),
                    _q(
                        "sum by (decision) (rate(stream_influence_decisions_total{SEL}[$__rate_interval]))",
                        "{{decision}}",
                    ),
                ),
                "Messages per second consumed, and how they were routed: accepted (learned), "
                "quarantined (would only be memorised), dead_lettered (invalid). "
                "accepted + quarantined + dead_lettered = consumed.",
                unit="ops",
            ),
            Panel(
                "Quarantine rate",
                "timeseries",
                (
                    _q(
                        "max by (instance) (stream_influence_quarantine_rate{SEL})",
                        "rolling rate {{instance}}",
                    ),
                    _q(
                        'sum(rate(stream_influence_decisions_total{SEL,decision="quarantined"}[$__rate_interval]))'
                        " / sum(rate(stream_influence_decisions_total"
                        '{SEL,decision=~"accepted|quarantined"}[$__rate_interval]))',
                        "over the interval",
                    ),
                    _q("max(stream_influence_policy_max_quarantine_rate{SEL})", "alarm cap", dashed=True),
                ),
                "Fraction of scored events quarantined; the dashed line is the policy's cap, above "
                "which the service caps quarantines and raises the alarm.",
                unit="percentunit",
                min=0,
            ),
            Panel(
                "Dead letters by reason",
                "timeseries",
                (
                    _q(
                        "sum by (reason) (rate(stream_influence_decisions_total"
                        '{SEL,decision="dead_lettered"}[$__rate_interval]))',
                        "{{reason}}",
                    ),
                ),
                "Invalid messages per second by reason (they go to the dead-letter topic with the "
                "original bytes).",
                unit="ops",
            ),
            Panel(
                "Policy thresholds in force",
                "timeseries",
                (
                    _q("max by (kind) (stream_influence_policy_threshold{SEL})", "{{kind}} threshold"),
                    _q("max(stream_influence_policy_version{SEL})", "policy version", dashed=True),
                ),
                "Score thresholds in force (quantile mode raises the quarantine threshold) and the "
                "policy version (steps on every hot reload).",
            ),
        ),
    ),
    Row(
        "Influence",
        (
            Panel(
                "Cosine influence of accepted events",
                "heatmap",
                (_heatmap("stream_influence_cosine_influence", "accepted"),),
                "Distribution over time of the cosine influence of accepted events (negative = "
                "learning the event lowers the trusted reference loss).",
                width=8,
            ),
            Panel(
                "Cosine influence of quarantined events",
                "heatmap",
                (_heatmap("stream_influence_cosine_influence", "quarantined"),),
                "Distribution over time of the cosine influence of quarantined events (all above "
                "the quarantine threshold).",
                width=8,
            ),
            Panel(
                "Relative influence, median by decision",
                "timeseries",
                tuple(
                    _q(
                        f"histogram_quantile({q}, sum by (decision, le) "
                        "(rate(stream_influence_relative_influence_bucket{SEL}[$__rate_interval])))",
                        f"{{{{decision}}}} p{int(q * 100)}",
                    )
                    for q in (0.1, 0.5, 0.9)
                ),
                "Quantiles of the relative influence I(z)/sqrt(gᵀH⁻¹g) by decision.",
                width=8,
            ),
        ),
    ),
    Row(
        "Model quality",
        (
            Panel(
                "Prequential accuracy: routed vs shadow",
                "timeseries",
                (_q("max by (model) (stream_influence_rolling_accuracy{SEL})", "{{model}}"),),
                "Test-then-train accuracy over the rolling window of the routed model (learns "
                "accepted events) and of the shadow model (learns every valid event). Routed below "
                "shadow for long means the filter hurts.",
                unit="percentunit",
            ),
            Panel(
                "Log-loss: routed vs shadow, and reference loss",
                "timeseries",
                (
                    _q("max by (model) (stream_influence_rolling_log_loss{SEL})", "{{model}} rolling"),
                    _q("max(stream_influence_reference_loss{SEL})", "reference loss (routed)"),
                ),
                "Rolling prequential log-loss, and the routed head's loss on the trusted reference set.",
            ),
            Panel(
                "Model updates",
                "timeseries",
                (
                    _q(
                        "sum by (model) (rate(stream_influence_model_updates_total{SEL}[$__rate_interval]))",
                        "{{model}} updates/s",
                    ),
                ),
                "Online updates applied per second by the routed and the shadow head.",
                unit="ops",
                main=False,
            ),
        ),
    ),
    Row(
        "Kafka, latency and checkpoints",
        (
            Panel(
                "Consumer lag by partition",
                "timeseries",
                (
                    _q(
                        "max by (topic, partition) (stream_influence_consumer_lag_messages{SEL})",
                        "{{topic}}[{{partition}}]",
                    ),
                ),
                "Messages not yet consumed per assigned partition (highwater − position).",
                width=8,
            ),
            Panel(
                "Latency quantiles",
                "timeseries",
                _quantiles("stream_influence_batch_duration_seconds", "batch")
                + _quantiles("stream_influence_poll_to_commit_seconds", "poll→commit"),
                "Batch processing time and time from poll to offset commit (outputs flushed, "
                "checkpoint durable), 50th and 99th percentiles.",
                unit="s",
                width=8,
            ),
            Panel(
                "Checkpoint age",
                "timeseries",
                (
                    _q(
                        "time() - max by (instance) (stream_influence_last_checkpoint_timestamp_seconds{SEL})",
                        "age {{instance}}",
                    ),
                    *_quantiles("stream_influence_checkpoint_duration_seconds", "write"),
                ),
                "Seconds since the last durable checkpoint (a process that has not checkpointed yet "
                "shows the time since the epoch), and checkpoint write time.",
                unit="s",
                width=8,
                log_scale=True,
            ),
        ),
    ),
    Row(
        "Curvature health",
        (
            Panel(
                "Damping and condition number",
                "timeseries",
                (
                    _q("max by (instance) (stream_influence_curvature_damping{SEL})", "damping λ"),
                    _q(
                        "max by (instance) (stream_influence_curvature_condition_number{SEL})",
                        "condition number",
                    ),
                ),
                "Damping in force and the condition-number estimate of the damped curvature (log scale).",
                log_scale=True,
            ),
            Panel(
                "Re-factorisations and drift resets",
                "timeseries",
                (
                    _q(
                        "sum(increase(stream_influence_curvature_refactorizations_total{SEL}[$__rate_interval]))",
                        "re-factorisations",
                    ),
                    _q(
                        "sum(increase(stream_influence_curvature_refactorization_failures_total"
                        "{SEL}[$__rate_interval]))",
                        "re-factorisation failures",
                    ),
                    _q(
                        "sum(increase(stream_influence_drift_resets_total{SEL}[$__rate_interval]))",
                        "drift resets",
                    ),
                ),
                "Curvature re-factorisations from scratch (periodic), the failed ones, and drift resets.",
            ),
        ),
    ),
    Row(
        "Health and alerts",
        (
            Panel(
                "Quarantine alarm",
                "state-timeline",
                (_q("max by (instance) (stream_influence_quarantine_alarm{SEL})", "{{instance}}"),),
                "1 (red) while the quarantine-rate cap is hit: drift, a broken producer or a bad "
                "reference set.",
                width=6,
                steps=((None, "green"), (1, "red")),
            ),
            Panel(
                "Health",
                "state-timeline",
                (
                    _q("min(stream_influence_warm{SEL})", "warm"),
                    _q("min(stream_influence_broker_up{SEL})", "broker up"),
                    _q("min(up{SEL})", "scraped"),
                ),
                "1 (green) = warm-up done, broker reachable, target scraped; 0 (red) otherwise.",
                width=6,
                steps=((None, "red"), (1, "green")),
            ),
            Panel(
                "Firing alerts",
                "stat",
                (_q('count(ALERTS{job=~"$job",alertstate="firing"}) or vector(0)', "firing"),),
                "Alerts of deploy/prometheus/rules firing now for this job (0 when none).",
                width=4,
                steps=((None, "green"), (1, "red")),
            ),
            Panel(
                "Build",
                "table",
                (_q("max by (version, python, curvature) (stream_influence_build_info{SEL})", ""),),
                "Version, Python and curvature estimator of the running instances.",
                width=8,
                main=False,
            ),
        ),
    ),
    Row(
        "Scale-out",
        (
            Panel(
                "Per-worker throughput",
                "timeseries",
                (
                    _q(
                        _of_role(
                            "sum by (job, instance) "
                            "(rate(stream_influence_decisions_total{SEL}[$__rate_interval]))",
                            "score",
                        ),
                        "worker {{instance}}",
                    ),
                    _q(
                        _of_role(
                            "sum by (job, instance) "
                            "(rate(stream_influence_updates_applied_total{SEL}[$__rate_interval]))",
                            "update",
                        ),
                        "updater learned {{instance}}",
                    ),
                ),
                "Input events decided per second by each score worker (their sum is the "
                "topology's throughput; each input offset is counted once, by the worker that "
                "owns its partition), and updates records the updater learned per second.",
                unit="ops",
                main=False,
                roles=("score", "update"),
            ),
            Panel(
                "Consumer lag: workers (input) and updater (updates topic)",
                "timeseries",
                (
                    _q(
                        _of_role(
                            "sum by (job, instance) (stream_influence_consumer_lag_messages{SEL})", "score"
                        ),
                        "worker {{instance}}",
                    ),
                    _q(
                        _of_role(
                            "sum by (job, instance, topic) (stream_influence_consumer_lag_messages{SEL})",
                            "update",
                        ),
                        "updater {{instance}} ({{topic}})",
                    ),
                ),
                "Messages not yet consumed, summed over each worker's input partitions, and over "
                "the updates topic for the updater (highwater − position). Growing worker lag: "
                "add workers; growing updater lag: the one updater is the bottleneck.",
                main=False,
                roles=("score", "update"),
            ),
            Panel(
                "Snapshot version in use",
                "timeseries",
                (
                    _q(
                        _of_role("max by (job, instance) (stream_influence_snapshot_version{SEL})", "score"),
                        "in use {{instance}}",
                    ),
                    _q(
                        _of_role("max by (job, instance) (stream_influence_snapshot_version{SEL})", "update"),
                        "published {{instance}}",
                        dashed=True,
                    ),
                ),
                "Model snapshot version each worker scores with, and the last one the updater "
                "published (dashed). Versions keep counting across updater epochs.",
                width=8,
                main=False,
                roles=("score", "update"),
            ),
            Panel(
                "Snapshot version lag",
                "timeseries",
                (
                    _q(
                        _of_role(
                            "max by (job, instance) (stream_influence_snapshot_version_lag{SEL})", "score"
                        ),
                        "{{instance}}",
                    ),
                ),
                "Versions between the newest snapshot a worker has read from the model topic and "
                "the one it scores with (0 once swapped in).",
                width=8,
                main=False,
                min=0,
                roles=("score",),
            ),
            Panel(
                "Snapshot age",
                "timeseries",
                (
                    _q(
                        _with_role("max by (job, instance) (stream_influence_snapshot_age_seconds{SEL})"),
                        "{{role}} {{instance}}",
                    ),
                ),
                "Seconds since the snapshot a worker scores with (or the updater last published) "
                "was published; empty (NaN) before the first one.",
                unit="s",
                width=8,
                main=False,
                roles=("score", "update"),
            ),
            Panel(
                "Events not learned by the snapshot in use",
                "timeseries",
                (
                    _q(
                        _of_role(
                            "max by (job, instance) (stream_influence_snapshot_events_unlearned{SEL})",
                            "score",
                        ),
                        "unlearned {{instance}}",
                    ),
                    _q(
                        _of_role(
                            "max by (job, instance) (stream_influence_snapshot_events_scored{SEL})", "score"
                        ),
                        "scored on it {{instance}}",
                    ),
                ),
                "Per worker: offsets it scored and sent on that the snapshot in use has not "
                "learned, and events scored with that snapshot. Both are bounded by "
                "scaleout.max_model_lag_versions × checkpoint.every_events; at the bound the "
                "worker holds chunks back.",
                main=False,
                min=0,
                roles=("score",),
            ),
            Panel(
                "Updater: duplicates skipped, records rejected",
                "timeseries",
                (
                    _q(
                        _of_role(
                            "sum by (job, instance) "
                            "(rate(stream_influence_updates_duplicates_total{SEL}[$__rate_interval]))",
                            "update",
                        ),
                        "duplicates {{instance}}",
                    ),
                    _q(
                        _of_role(
                            "sum by (job, instance) "
                            "(rate(stream_influence_updates_rejected_total{SEL}[$__rate_interval]))",
                            "update",
                        ),
                        "rejected {{instance}}",
                    ),
                ),
                "Updates records per second the updater skipped because their source offset was "
                "already learned (a worker replayed a window after a rebalance or a kill), and "
                "records it could not read (not learned; logged).",
                unit="ops",
                main=False,
                roles=("update",),
            ),
            Panel(
                "Workers holding back",
                "state-timeline",
                (
                    _q(
                        _of_role("max by (job, instance) (stream_influence_snapshot_stale{SEL})", "score"),
                        "{{instance}}",
                    ),
                ),
                "1 (red) while a worker holds chunks back, waiting for a newer (or a first) "
                "snapshot: the updater is down or behind.",
                width=6,
                main=False,
                steps=((None, "green"), (1, "red")),
                roles=("score",),
            ),
            Panel(
                "Updater fenced",
                "state-timeline",
                (
                    _q(
                        _of_role("max by (job, instance) (stream_influence_updater_fenced{SEL})", "update"),
                        "{{instance}}",
                    ),
                ),
                "1 (red) once a newer updater's lease fenced this one (it stops without "
                "publishing; a second updater was started).",
                width=6,
                main=False,
                steps=((None, "green"), (1, "red")),
                roles=("update",),
            ),
        ),
    ),
)

# Grafana annotations: (name, expr, colour).  Not panels, but evaluated by the tests too.
ANNOTATIONS: tuple[tuple[str, str, str], ...] = (
    ("Alerts", 'ALERTS{job=~"$job",alertstate="firing"}', "red"),
    ("Policy reloads", f"changes(stream_influence_policy_version{{{SEL}}}[2m]) > 0", "blue"),
    ("Drift resets", f"increase(stream_influence_drift_resets_total{{{SEL}}}[2m]) > 0", "orange"),
)


def all_panels() -> list[Panel]:
    return [p for row in ROWS for p in row.panels]


def render(expr: str, *, job: str = ".*", instance: str = ".*", rate_interval: str = "1m") -> str:
    """Substitute the dashboard's template variables, for evaluation outside Grafana."""
    out = expr.replace("$__rate_interval", rate_interval)
    out = re.sub(r"\$job\b", job, out)
    return re.sub(r"\$instance\b", instance, out)

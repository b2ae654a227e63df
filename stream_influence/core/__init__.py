"""Pure math and state: events, model head, curvature, influence, policy, learner, engine.

No I/O lives here (``state`` reads and writes bytes it is handed or one file atomically); the
service, the offline tools and the benchmarks all drive these objects.

The public seam between scoring and learning:

* :class:`~stream_influence.core.scorer.Scorer` — read-only scores of a batch under an immutable
  :class:`~stream_influence.core.snapshot.ModelSnapshot` (positive = learning the event would
  raise the trusted reference loss);
* :class:`~stream_influence.core.router.Router` — the routing policy's decisions for scored events;
* :class:`~stream_influence.core.updater.Updater` — all learned state; learns from a batch and its
  decisions and exports snapshots (:func:`~stream_influence.core.state.encode_snapshot` makes
  them bytes);
* :class:`~stream_influence.core.engine.InfluenceEngine` composes the three in one process.
"""

"""Pure math and state: events, model head, curvature, influence, policy, learner, engine.

No I/O lives here (``state`` reads and writes bytes it is handed or one file atomically); the
service, the offline tools and the benchmarks all drive these objects.
"""

"""Online updater of the softmax head, prequential metrics and the drift monitor.

The engine runs two :class:`HeadLearner` s with identical settings: the *routed* one learns only
accepted events, the *shadow* one learns every valid event, so the gain (or cost) of routing is
always visible.  Metrics are prequential (test-then-train): each event is predicted before any
learner sees it.

>>> import numpy as np
>>> learner = HeadLearner(LearnerSettings(learning_rate=0.5), n_classes=2, dim=2)
>>> X = np.array([[1.0, 1.0], [-1.0, 1.0]] * 50)
>>> y = np.array([1, 0] * 50)
>>> learner.learn(X, y, np.ones(100))
>>> learner.predict_proba(X[:2]).argmax(axis=1).tolist()
[1, 0]
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from river import drift

from stream_influence.core.model import softmax
from stream_influence.core.ring import Ring
from stream_influence.core.settings import DriftSettings, LearnerSettings

__all__ = ["DriftMonitor", "HeadLearner", "Prequential", "load_kernels"]

WIDTH = 64.0  # ‖x̃‖² up to which sgd takes the full learning rate (normalize_step)


class Prequential:
    """Cumulative accuracy (a confusion matrix of counts) plus rolling accuracy and log-loss.

    All counters are numpy arrays updated with one vectorised call per batch: this runs for every
    event of both learners, so no per-event Python.  The engine hands its micro-batches over with
    :meth:`defer`, which only predicts and returns the errors; the counting is done for many
    micro-batches at once, before anything reads the metrics (the same counts: integer sums,
    per-event values and ring positions do not depend on how the events are grouped).
    """

    def __init__(self, window: int) -> None:
        self.window = window
        self._confusion = np.zeros((0, 0))  # [true, predicted] counts (weights of restored cells)
        # Ring position = event number mod window (the layout checkpoints store).
        self._correct_ring = Ring(window)
        self._loss_ring = Ring(window)
        self._n = 0
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (P, y, argmax P)
        self._pending_rows = 0

    @property
    def n(self) -> int:
        self._settle()
        return self._n

    @property
    def confusion(self) -> np.ndarray:
        self._settle()
        return self._confusion

    def defer(self, P: np.ndarray, y: np.ndarray) -> np.ndarray:
        """:meth:`update`, counted later (at the latest before any read, and once ``window`` events
        wait); returns the 0/1 errors now.  ``P`` and ``y`` must not change afterwards."""
        if self._pending and self._pending[-1][0].shape[1] != P.shape[1]:
            self._settle()  # the head grew a class: count the narrower predictions first
        pred = P.argmax(axis=1)
        self._pending.append((P, y, pred))
        self._pending_rows += len(y)
        if self._pending_rows >= self.window:
            self._settle()
        return (pred != y).astype(np.float64)

    def _settle(self) -> None:
        if not self._pending:
            return
        pending, self._pending, self._pending_rows = self._pending, [], 0
        if len(pending) == 1:
            P, y, pred = pending[0]
        else:
            P, y, pred = (np.concatenate(part) for part in zip(*pending, strict=True))
        self._add(P, y, pred)

    def _count(
        self, y: np.ndarray, pred: np.ndarray, w: np.ndarray | None = None, k: int | None = None
    ) -> None:
        """Add ``w`` (default 1) at ``[y, pred]``; ``k``: a known bound on both (saves two scans)."""
        k = int(max(y.max(initial=-1), pred.max(initial=-1))) + 1 if k is None else k
        if k > len(self._confusion):
            grown = np.zeros((k, k))
            grown[: len(self._confusion), : len(self._confusion)] = self._confusion
            self._confusion = grown
        k = len(self._confusion)
        self._confusion += np.bincount(y * k + pred, weights=w, minlength=k * k).reshape(k, k)

    def update(self, P: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Score predictions ``P`` against labels ``y``; returns the 0/1 errors."""
        self._settle()
        pred = P.argmax(axis=1)
        correct = self._add(P, y, pred)
        return 1.0 - correct

    def _add(self, P: np.ndarray, y: np.ndarray, pred: np.ndarray) -> np.ndarray:
        m = len(y)
        self._count(y, pred, k=P.shape[1])  # labels index P's columns: both are below its width
        correct = (pred == y).astype(np.float64)
        loss = -np.log(np.clip(P[np.arange(m), y], 1e-15, None))
        self._correct_ring.push(correct, aligned=True)
        self._loss_ring.push(loss, aligned=True)
        self._n += m
        return correct

    @property
    def _correct(self) -> np.ndarray:
        """0/1 correctness of the window's events, at position event number mod window."""
        self._settle()
        assert self._correct_ring.data is not None
        return self._correct_ring.data

    @property
    def _loss(self) -> np.ndarray:
        self._settle()
        assert self._loss_ring.data is not None
        return self._loss_ring.data

    @property
    def filled(self) -> int:
        """Newest events held in the window (fewer than ``n`` after a resize)."""
        self._settle()
        return self._correct_ring.size

    def _recent(self, ring: Ring) -> float:
        self._settle()
        return float(ring.newest(ring.size).mean()) if ring.size else float("nan")

    @property
    def cumulative_accuracy(self) -> float:
        total = float(self.confusion.sum())
        return float(np.trace(self.confusion)) / total if self.n and total else float("nan")

    @property
    def rolling_accuracy(self) -> float:
        return self._recent(self._correct_ring)

    @property
    def rolling_log_loss(self) -> float:
        return self._recent(self._loss_ring)

    def state_dict(self) -> dict[str, Any]:
        # Saved as (true, predicted, count) rows of the non-zero cells, the format of earlier
        # releases (which kept river's confusion matrix): old and new checkpoints load alike.
        t, q = np.nonzero(self.confusion)
        cells = np.column_stack([t, q, self.confusion[t, q]]).astype(np.float64)
        return {
            "n": self.n,
            "correct": self._correct,
            "loss": self._loss,
            "confusion": cells.reshape(-1, 3),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending, self._pending_rows = [], 0
        self._n = int(state["n"])
        # The window may have been resized since the save: keep the newest values that fit, at the
        # ring positions this window expects (index = event number mod window).
        saved_c = np.array(state["correct"], dtype=np.float64)
        saved_l = np.array(state["loss"], dtype=np.float64)
        k = min(self.n, len(saved_c), self.window)
        events = np.arange(self.n - k, self.n)
        for ring, saved in ((self._correct_ring, saved_c), (self._loss_ring, saved_l)):
            data = np.zeros(self.window)
            data[events % self.window] = saved[events % len(saved)]
            ring.restore(data, k, self.n % self.window)
        cells = np.asarray(state["confusion"], dtype=np.float64).reshape(-1, 3)
        self._confusion = np.zeros((0, 0))
        self._count(cells[:, 0].astype(np.int64), cells[:, 1].astype(np.int64), cells[:, 2])


class HeadLearner:
    """A softmax head ``Θ`` (``K × D``) trained online by SGD, Adam or a damped Newton step.

    A polled batch is learned in steps of ``minibatch`` events (one small matrix product each),
    each step the weighted mean cross-entropy gradient plus ``l2`` on the weights (not the bias).
    """

    def __init__(self, settings: LearnerSettings, n_classes: int, dim: int) -> None:
        self.settings = settings
        self.theta = np.zeros((n_classes, dim))
        self._m = np.zeros_like(self.theta)
        self._v = np.zeros_like(self.theta)
        self.steps = 0
        self.updates = 0  # stream events applied
        self.trusted_updates = 0  # trusted reference points learned (warm start), not stream events
        self.sq_norm = 0.0  # running mean of ‖x̃‖² over learned events (normalised sgd)
        self.metrics = Prequential(settings.metrics_window)

    def resize(self, n_classes: int) -> None:
        """Grow the head to ``n_classes`` rows (new classes start at zero)."""
        extra = n_classes - self.theta.shape[0]
        if extra > 0:
            pad = np.zeros((extra, self.theta.shape[1]))
            self.theta = np.vstack([self.theta, pad])
            self._m = np.vstack([self._m, pad])
            self._v = np.vstack([self._v, pad])

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return softmax(X @ self.theta.T)

    def learn(
        self,
        X: np.ndarray,
        y: np.ndarray,
        w: np.ndarray,
        solve: Callable[[np.ndarray], np.ndarray] | None = None,
        *,
        trusted: bool = False,
        alongside: Sequence[tuple[HeadLearner, np.ndarray, np.ndarray, np.ndarray]] = (),
    ) -> None:
        """Learn augmented inputs ``X`` with labels ``y`` and weights ``w``.

        ``solve`` (``v ↦ H⁻¹v``) is required by the ``newton`` optimizer.  ``trusted`` points
        (the warm start on the reference set) are not counted as stream updates.  ``alongside``:
        other learners with the same settings and head shape, each with its own ``(X, y, w)``,
        that learn in the same steps — every learner ends exactly where learning alone would
        leave it, but each step is one batched product for all (the routed learner and its shadow).
        """
        jobs = [(self, X, y, w), *alongside]
        # Identity first: pydantic's __eq__ costs microseconds and the engine passes one object.
        if any(
            (j[0].settings is not self.settings and j[0].settings != self.settings)
            or j[0].theta.shape != self.theta.shape
            for j in jobs
        ):
            raise ValueError("learners that learn alongside share settings and head shape")
        squares: dict[int, float] = {}  # Σ‖x̃‖² per input array (the routed head often gets all rows)
        for learner, Xj, _, _ in jobs:
            if len(Xj):
                sq = squares.get(id(Xj))
                if sq is None:
                    sq = squares[id(Xj)] = float(np.einsum("bd,bd->", Xj, Xj))
                seen = learner.updates + learner.trusted_updates
                learner.sq_norm += (sq - len(Xj) * learner.sq_norm) / (seen + len(Xj))
        _lockstep([j for j in jobs if len(j[1])], solve)
        for learner, Xj, _, _ in jobs:
            if trusted:
                learner.trusted_updates += len(Xj)
            else:
                learner.updates += len(Xj)

    def _step(self, grad: np.ndarray, solve: Callable[[np.ndarray], np.ndarray] | None) -> None:
        """One adam or newton step (sgd steps are batched over learners in :func:`_lockstep`)."""
        s = self.settings
        self.steps += 1
        if s.optimizer == "adam":
            b1, b2 = 0.9, 0.999
            self._m = b1 * self._m + (1 - b1) * grad
            self._v = b2 * self._v + (1 - b2) * grad * grad
            mhat = self._m / (1 - b1**self.steps)
            vhat = self._v / (1 - b2**self.steps)
            self.theta -= s.learning_rate * mhat / (np.sqrt(vhat) + 1e-8)
        else:
            if solve is None:
                raise ValueError("the newton optimizer needs the curvature's solve()")
            self.theta -= s.learning_rate * solve(grad)

    @property
    def step_scale(self) -> float:
        """sgd: wide inputs move every logit by ~lr·‖x̃‖² per step; keep that bounded (see settings)."""
        return min(1.0, WIDTH / max(self.sq_norm, 1.0)) if self.settings.normalize_step else 1.0

    def state_dict(self) -> dict[str, Any]:
        return {
            "theta": self.theta,
            "m": self._m,
            "v": self._v,
            "steps": self.steps,
            "updates": self.updates,
            "trusted_updates": self.trusted_updates,
            "sq_norm": self.sq_norm,
            **{f"metrics_{k}": v for k, v in self.metrics.state_dict().items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.theta = np.array(state["theta"], dtype=np.float64)
        self._m = np.array(state["m"], dtype=np.float64)
        self._v = np.array(state["v"], dtype=np.float64)
        self.steps, self.updates = int(state["steps"]), int(state["updates"])
        self.trusted_updates = int(state.get("trusted_updates", 0))
        self.sq_norm = float(state["sq_norm"])
        self.metrics.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("metrics_")})


def _lockstep(
    jobs: Sequence[tuple[HeadLearner, np.ndarray, np.ndarray, np.ndarray]],
    solve: Callable[[np.ndarray], np.ndarray] | None,
) -> None:
    """Steps of ``minibatch`` events for every learner at once (see :meth:`HeadLearner.learn`).

    Step ``j`` of learner ``i`` is its ``j``-th chunk: the weighted mean cross-entropy gradient
    ``Σ wᵣ (pᵣ − yᵣ) x̃ᵣᵀ / n`` plus ``l2`` on the weights (not the bias).  The learners' heads are
    stacked (each ``theta`` becomes a view of the stack) and their chunks padded to one shape with
    rows of weight 0, so a step is a few batched products; each row of ``X̃`` is scaled once, before
    the loop, by its weight and step size.  A learner with no chunk left in a step is not moved.
    This numpy code is the reference (``learner.kernel: numpy``); with the default ``compiled``
    kernel the sgd steps run in :func:`_compiled_sgd` instead (adam and newton always run here).
    """
    if not jobs:
        return
    first = jobs[0][0]
    s = first.settings
    if s.optimizer == "sgd" and s.kernel == "compiled":
        _compiled_sgd(jobs)
        return
    mb, L = s.minibatch, len(jobs)
    K, D = first.theta.shape
    counts, at_step, at_slot = _step_layout(tuple(len(j[1]) for j in jobs), mb)
    steps = len(counts)
    sgd = s.optimizer == "sgd"
    # sgd folds its step size η = lr · step scale into the rows: θ_w ← θ_w (1 − η l2) − G_w,
    # θ_b ← θ_b − G_b; adam and newton get the plain gradient G + l2 θ_w.
    eta = np.array([s.learning_rate * j[0].step_scale if sgd else 1.0 for j in jobs])
    # Laid out in the (steps, L, mb, ·) layout the loop reads: row r of learner i is step r // mb,
    # slot r % mb (padding rows: zero, weight 0).
    per_row = eta / np.maximum(counts, 1)  # (steps, L): a chunk's rows share η / rows
    ws = _Workspace(steps, L, mb, D, K)
    Xp, Yp, scale, Xw = ws.Xp, ws.Yp, ws.scale, ws.Xw
    Yp.fill(0.0)
    _, X0, y0, w0 = jobs[0]
    if len(X0) == steps * mb and all(j[1] is X0 and j[2] is y0 and j[3] is w0 for j in jobs):
        # Every learner learns the same rows, filling every step (the routed head when nothing
        # of the micro-batch was quarantined): the same arrays, in three calls.
        Xp[...] = X0.reshape(steps, 1, mb, D)
        Yp[at_step, :, at_slot, y0] = 1.0
        np.multiply(w0.reshape(steps, 1, mb), per_row[:, :, None], out=scale)
    else:
        scale.fill(0.0)
        laid_out: dict[tuple[int, int, int], int] = {}  # (X, y, w) ids → the slot that has them
        for i, (_, X, y, w) in enumerate(jobs):
            n = len(X)
            t, r = at_step[:n], at_slot[:n]
            j = laid_out.setdefault((id(X), id(y), id(w)), i)
            if j == i:
                full, rest = divmod(n, mb)  # whole steps as one strided copy, then the last one
                Xp[:full, i] = X[: full * mb].reshape(full, mb, D)
                if full < steps:
                    Xp[full, i, :rest] = X[full * mb :]
                    Xp[full, i, rest:] = 0.0
                    Xp[full + 1 :, i] = 0.0
                Yp[t, i, r, y] = 1.0
            else:  # the same rows as slot j (the fold heads learn the routed head's): a plain copy
                Xp[:, i] = Xp[:, j]
                Yp[:, i] = Yp[:, j]
            scale[t, i, r] = w * per_row[t, i]
    np.multiply(Xp, scale[..., None], out=Xw)
    theta = np.stack([j[0].theta for j in jobs])
    for i, job in enumerate(jobs):
        job[0].theta = theta[i]
    # The step below is ~10 calls on arrays of a few hundred numbers: their overhead is the cost,
    # so views and buffers are made once, the reductions run on a 2-d view with out= (faster in
    # numpy than keepdims on 3-d; the same rows in the same order), and the l2 decay is a
    # full-shape array per pattern of live learners (no broadcast in the step).
    theta_t = theta.transpose(0, 2, 1)
    Z, G, Z2, Z_t, rows, rows_c = ws.Z, ws.G, ws.Z2, ws.Z_t, ws.rows, ws.rows_c
    vmax, vsum, matmul = np.maximum.reduce, np.add.reduce, np.matmul
    exp, sub, div, mul = np.exp, np.subtract, np.divide, np.multiply

    def gradient(Xt: np.ndarray, Yt: np.ndarray, Xwt: np.ndarray) -> None:
        """``G ← (softmax(X̃ₜ θᵀ) − Yₜ)ᵀ (X̃ₜ scaled)`` for every learner, into the buffers."""
        matmul(Xt, theta_t, out=Z)
        vmax(Z2, axis=1, out=rows)
        sub(Z2, rows_c, out=Z2)
        exp(Z, out=Z)
        vsum(Z2, axis=1, out=rows)
        div(Z2, rows_c, out=Z2)
        sub(Z, Yt, out=Z)
        matmul(Z_t, Xwt, out=G)

    if sgd:
        # l2 decays the weights, not the bias: [1 − η l2, …, 1 − η l2, 1] for a learner with
        # rows in the step, 1 for one without (few patterns: the learners run out one by one).
        keep = 1.0 - eta * s.l2
        decays: list[np.ndarray] = []
        pattern: list[bool] | None = None
        for live in (counts > 0).tolist():
            if live != pattern:
                pattern, decay = live, np.ones((L, K, D))
                decay[:, :, :-1] = np.where(live, keep, 1.0)[:, None, None]
            decays.append(decay)
        for Xt, Yt, Xwt, decay_t in zip(Xp, Yp, Xw, decays, strict=True):
            gradient(Xt, Yt, Xwt)
            mul(theta, decay_t, out=theta)
            sub(theta, G, out=theta)
        for job, live_steps in zip(jobs, (counts > 0).sum(axis=0).tolist(), strict=True):
            job[0].steps += live_steps
        return
    for t, (Xt, Yt, Xwt) in enumerate(zip(Xp, Yp, Xw, strict=True)):
        gradient(Xt, Yt, Xwt)
        for i, job in enumerate(jobs):
            if counts[t, i]:
                G[i, :, :-1] += s.l2 * theta[i, :, :-1]
                job[0]._step(G[i], solve)


def load_kernels(settings: LearnerSettings) -> None:
    """Load (or compile, where numba's cache has none) the compiled kernel ``settings`` will use,
    now rather than at the first learning step: a service calls this at start-up, so neither the
    load (~0.5 s cached, seconds uncached) lands on its loop thread mid-stream nor the kernel's
    objects miss start-up's ``gc.freeze``.  Nothing to do for the numpy kernel or adam/newton."""
    if settings.kernel == "compiled" and settings.optimizer == "sgd":
        from stream_influence.core import kernels  # noqa: F401  (importing compiles or loads)


def _compiled_sgd(jobs: Sequence[tuple[HeadLearner, np.ndarray, np.ndarray, np.ndarray]]) -> None:
    """The sgd steps of :func:`_lockstep` by the compiled kernel (``learner.kernel: compiled``):
    the learners' rows go in as they are (one array; distinct inputs are concatenated once), the
    heads stacked as the numpy path stacks them, so both leave the learners in the same layout."""
    from stream_influence.core import kernels  # numba loads on first use, not with the package

    s = jobs[0][0].settings
    mb = s.minibatch
    sources: dict[tuple[int, int, int], int] = {}  # (X, y, w) ids → start row in the stacked input
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    start = np.zeros(len(jobs), dtype=np.int64)
    at = 0
    for i, (_, X, y, w) in enumerate(jobs):
        key = (id(X), id(y), id(w))
        if key not in sources:
            sources[key] = at
            parts.append((X, y, w))
            at += len(X)
        start[i] = sources[key]
    if len(parts) == 1:
        X, y, w = parts[0]
    else:
        X, y, w = (np.concatenate(part) for part in zip(*parts, strict=True))
    n = np.array([len(j[1]) for j in jobs], dtype=np.int64)
    eta = np.array([s.learning_rate * j[0].step_scale for j in jobs])
    theta = np.stack([j[0].theta for j in jobs])
    kernels.sgd_steps(
        theta,
        _writable(X, np.float64),
        _writable(y, np.int64),
        _writable(w, np.float64),
        start,
        n,
        eta,
        1.0 - eta * s.l2,
        mb,
    )
    for i, job in enumerate(jobs):
        job[0].theta = theta[i]
        job[0].steps += -(-int(n[i]) // mb)


def _writable(a: np.ndarray, dtype: type) -> np.ndarray:
    """``a`` as the kernel's signature takes it: C-contiguous, of ``dtype``, and writable — numba
    types a read-only array (``np.frombuffer`` of bytes, a memory-mapped file, a frozen snapshot)
    differently and finds no matching definition; such an input is copied (the kernel only reads
    it), as numpy's reference accepts it."""
    a = np.ascontiguousarray(a, dtype=dtype)
    return a if a.flags.writeable else a.copy()


class _Workspace:
    """:func:`_lockstep`'s arrays for one call, uninitialised (``np.empty``: what is read is
    written first, the padding rows zeroed explicitly — zero-filled allocations of the ~2 MB
    layout cost more than the few slices that need it)."""

    def __init__(self, steps: int, L: int, mb: int, D: int, K: int) -> None:
        self.Xp = np.empty((steps, L, mb, D))
        self.Xw = np.empty((steps, L, mb, D))
        self.Yp = np.empty((steps, L, mb, K))
        self.scale = np.empty((steps, L, mb))
        self.Z, self.G = np.empty((L, mb, K)), np.empty((L, K, D))
        self.Z2, self.Z_t = self.Z.reshape(L * mb, K), self.Z.transpose(0, 2, 1)
        self.rows = np.empty(L * mb)
        self.rows_c = self.rows[:, None]


@functools.lru_cache(maxsize=256)
def _step_layout(n: tuple[int, ...], mb: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For learners with ``n`` rows each in steps of ``mb``: the rows each learner has in each
    step (``steps × L``), and each row's step and slot (the micro-batches repeat these shapes)."""
    rows = np.arange(max(n))
    steps = -(-max(n) // mb)
    counts = np.clip(np.array(n)[None, :] - mb * np.arange(steps)[:, None], 0, mb)
    out = counts, rows // mb, rows % mb
    for a in out:
        a.flags.writeable = False  # shared by every call with these shapes
    return out


def _adwin_step(detector: drift.ADWIN) -> Callable[[float], bool]:
    """``x ↦ detector.update(x); detector.drift_detected`` for a detector that is replaced as soon
    as it detects (as :class:`DriftMonitor` does), one call per error.

    River's ``ADWIN.update`` is a Python wrapper around its compiled window (``_helper``) whose
    only other work is a reset after a detection, which never comes here; calling the window
    directly takes one Python call per event off the hot loop.  Without that attribute (another
    River release) the public API is used.
    """
    helper = getattr(detector, "_helper", None)
    if helper is not None and callable(getattr(helper, "update", None)):
        return helper.update  # type: ignore[no-any-return]

    def step(x: float) -> bool:
        detector.update(x)
        return detector.drift_detected

    return step


class DriftMonitor:
    """``river.drift.ADWIN`` on the routed learner's prequential error.

    River's detector cannot be serialised, so the errors it has seen since its last rebuild are
    kept (at most ``history``; at the cap it is rebuilt from the newest half, identically in every
    run) and replayed into a fresh detector on restore — deterministic, so a restored engine
    detects drift exactly where an uninterrupted one does.
    """

    def __init__(self, settings: DriftSettings) -> None:
        self.settings = settings
        self.detections = 0  # rises of the error rate (drift)
        self.improvements = 0  # significant falls (rebuild only)
        self._history = np.zeros(0, dtype=np.uint8)
        self._detector = self._fresh()

    def _fresh(self) -> drift.ADWIN:
        return drift.ADWIN(delta=self.settings.delta)

    def update(self, errors: np.ndarray) -> bool:
        """Feed a batch of 0/1 errors; True if the error rate *rose* significantly inside it.

        ADWIN flags any change of the mean; a falling error (the model getting better) rebuilds
        the detector but is not drift, so the curvature keeps its evidence.
        """
        if not self.settings.enabled or len(errors) == 0:
            return False
        changed_at = -1
        rising = False
        step = _adwin_step(self._detector)
        values = iter(errors.tolist())
        # any() stops at the first detection, leaving `values` just past it (a loop in C).
        if any(map(step, values)):
            changed_at = j = len(errors) - 1 - sum(1 for _ in values)
            seen = np.concatenate([self._history, errors[: j + 1]])
            rising = self._detector.estimation > float(seen.mean())
            # the detector is replaced below: what it would see next does not matter
        if changed_at >= 0:
            self._detector = self._fresh()
            self._history = np.zeros(0, dtype=np.uint8)
            if rising:
                self.detections += 1
            else:
                self.improvements += 1
            return rising
        self._history = np.concatenate([self._history, errors.astype(np.uint8)])
        if len(self._history) > self.settings.history:
            self._history = self._history[len(self._history) // 2 :]
            self._replay()
        return False

    def _replay(self) -> None:
        self._detector = self._fresh()
        step = _adwin_step(self._detector)
        for e in self._history.tolist():
            step(float(e))

    def state_dict(self) -> dict[str, Any]:
        return {"detections": self.detections, "improvements": self.improvements, "history": self._history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.detections = int(state["detections"])
        self.improvements = int(state.get("improvements", 0))
        self._history = np.array(state["history"], dtype=np.uint8)
        self._replay()

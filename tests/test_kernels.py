"""The compiled learner kernel (``learner.kernel: compiled``) against its numpy reference: the same
sgd steps to ~1e-15 relative, the same engine decisions, interchangeable checkpoints, and no crash
where numba cannot write its cache."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stream_influence.core.engine import InfluenceEngine
from stream_influence.core.learner import HeadLearner
from stream_influence.core.settings import EngineSettings, LearnerSettings, SchemaSettings
from stream_influence.core.state import load_engine, save_engine
from tests.golden.engine_golden import _encode, _stream

ROOT = Path(__file__).resolve().parents[1]


def _learn_both(
    K: int,
    D: int,
    mb: int,
    rows: tuple[int, ...],
    *,
    weighted: bool,
    shared: bool,
    seed: int,
    scale: float = 3.0,
    normalize_step: bool = True,
) -> tuple[list[HeadLearner], list[HeadLearner]]:
    """Learners with ``rows`` rows each (``shared``: the last two start alike and learn the same
    arrays, as the fold heads learn the routed head's), run through both kernels from the same
    random heads."""
    rng = np.random.default_rng(seed)
    s = LearnerSettings(minibatch=mb, learning_rate=0.3, l2=0.01, normalize_step=normalize_step)
    heads = []
    for _ in rows:
        h = HeadLearner(s, K, D)
        h.theta = rng.normal(size=(K, D))
        h.sq_norm, h.updates = float(rng.uniform(10, 200)), 100  # a step scale below 1 for some
        heads.append(h)
    data = []
    for n in rows:
        X = np.hstack([rng.normal(size=(n, D - 1)) * scale, np.ones((n, 1))])
        data.append((X, rng.integers(0, K, n), rng.uniform(0, 2, n) if weighted else np.ones(n)))
    if shared and len(rows) > 2:
        data[-1] = data[-2]
        heads[-1].theta, heads[-1].sq_norm = heads[-2].theta.copy(), heads[-2].sq_norm
    out = []
    for kernel in ("numpy", "compiled"):
        s = heads[0].settings.model_copy(update={"kernel": kernel})
        learners = copy.deepcopy(heads)
        for h in learners:
            h.settings = s
        first, rest = learners[0], learners[1:]
        first.learn(*data[0], alongside=[(h, *d) for h, d in zip(rest, data[1:], strict=True) if len(d[0])])
        out.append(learners)
    return out[0], out[1]


@pytest.mark.parametrize(
    ("K", "D", "mb", "rows", "weighted", "shared"),
    [
        (10, 65, 8, (512, 400), True, False),  # the benchmark's cell: shadow + routed
        (10, 65, 8, (512,), False, False),  # a single learner, every step full
        (10, 65, 8, (512, 371, 371), True, True),  # fold heads sharing the routed head's rows
        (4, 13, 8, (64, 37, 5, 1), True, False),  # learners running out at different steps
        (2, 7, 3, (100, 29), True, False),  # K = 2, a partial last step of 1 and 2 rows
        (3, 5, 1, (17, 16), False, False),  # steps of one row
        (6, 30, 64, (50, 200), True, False),  # one partial step beside four full ones
    ],
)
def test_compiled_steps_equal_the_numpy_reference(
    K: int, D: int, mb: int, rows: tuple[int, ...], weighted: bool, shared: bool
) -> None:
    ref, fast = _learn_both(K, D, mb, rows, weighted=weighted, shared=shared, seed=K * 1000 + sum(rows))
    for a, b in zip(ref, fast, strict=True):
        assert not np.array_equal(a.theta, np.zeros_like(a.theta))
        scale = np.abs(a.theta).max()
        assert np.abs(a.theta - b.theta).max() <= 1e-12 * scale
        assert (a.steps, a.updates, a.sq_norm) == (b.steps, b.updates, b.sq_norm)
    if shared:  # learners on the same rows stay identical
        assert np.array_equal(fast[-1].theta, fast[-2].theta)


def test_the_compiled_kernel_moves_the_head_like_the_reference() -> None:
    """Not a no-op: both kernels move the heads by the same (large) step."""
    ref, fast = _learn_both(10, 65, 8, (512, 400), weighted=True, shared=False, seed=5)
    rng = np.random.default_rng(5)
    start = rng.normal(size=(10, 65))
    moved = np.abs(ref[0].theta - start).max()
    assert moved > 0.1
    assert np.abs(fast[0].theta - ref[0].theta).max() < 1e-12 * moved


def test_overflowing_logits_give_the_reference_non_finite_steps() -> None:
    """No ``nnan``/``ninf`` fast-math: rows whose logits overflow make the same nan/inf heads as the
    numpy reference instead of a silently finite step (the first step's gradient is ~1e300, the
    next step's logits overflow)."""
    with np.errstate(over="ignore", invalid="ignore"):  # the reference's own overflow warnings
        ref, fast = _learn_both(
            4, 9, 8, (24, 24), weighted=False, shared=False, seed=3, scale=1e300, normalize_step=False
        )
    for a, b in zip(ref, fast, strict=True):
        assert not np.isfinite(a.theta).all()
        assert np.array_equal(np.isnan(a.theta), np.isnan(b.theta))
        assert np.array_equal(np.isposinf(a.theta), np.isposinf(b.theta))
        finite = np.isfinite(a.theta)
        np.testing.assert_allclose(b.theta[finite], a.theta[finite], rtol=1e-12)


def test_the_kernels_exp_is_within_an_ulp_of_numpys() -> None:
    """The softmax's ``exp`` on max-shifted logits (x ≤ 0): about one ulp from ``np.exp`` where it is
    normal, 0 where it is below 4e-308, exact at 0, nan for nan, 0 for −inf."""
    from stream_influence.core.kernels import exp_nonpositive

    rng = np.random.default_rng(0)
    x = np.concatenate(
        [-rng.uniform(0, 1, 20_000), -rng.uniform(0, 760, 20_000), -np.logspace(-300, 0, 2000)]
    )
    got = np.array([exp_nonpositive(v) for v in x])
    want = np.exp(x)
    normal = want > 1e-300
    assert normal.sum() > 30_000 and (~normal).sum() > 500
    rel = np.abs(got[normal] - want[normal]) / want[normal]
    assert rel.max() <= 2.3e-16  # ≤ ~1 ulp (eps = 2.2e-16)
    assert np.abs(got[~normal] - want[~normal]).max() < 4e-308
    assert exp_nonpositive(0.0) == 1.0 and exp_nonpositive(-np.inf) == 0.0
    assert np.isnan(exp_nonpositive(np.nan))


def _engine_run(kernel: str, events: int = 4000) -> tuple[InfluenceEngine, list[str]]:
    """Default settings (sgd, micro-batches of 512) on a noisy stream, with the kernel."""
    K, D = 4, 12
    s = EngineSettings(
        schema=SchemaSettings(classes=list(range(K)), n_features=D),
        learner=LearnerSettings(kernel=kernel),  # type: ignore[arg-type]
    )
    X, y = _stream(21, 160 + events)
    engine = InfluenceEngine(s)
    engine.add_reference(_encode(X[:160], y[:160], "r", list(range(K)), extras=False))  # type: ignore[arg-type]
    raws = _encode(X[160:], y[160:], "e", list(range(K)), extras=True)
    decisions: list[str] = []
    for a in range(0, len(raws), 700):
        decisions += [d.decision for d in engine.process(raws[a : a + 700]).decisions()]
    return engine, decisions


def test_a_whole_engine_run_decides_alike_under_both_kernels() -> None:
    ref, ref_decisions = _engine_run("numpy")
    fast, fast_decisions = _engine_run("compiled")
    assert ref_decisions == fast_decisions
    assert {"accept", "quarantine"} <= set(ref_decisions)  # routing was exercised
    for a, b in ((ref.routed, fast.routed), (ref.shadow, fast.shadow)):
        assert a is not None and b is not None
        assert a.steps == b.steps > 0
        assert np.abs(a.theta - b.theta).max() <= 1e-9 * np.abs(a.theta).max()


@pytest.mark.parametrize(("written", "restored"), [("numpy", "compiled"), ("compiled", "numpy")])
def test_a_checkpoint_restores_under_the_other_kernel(tmp_path: Path, written: str, restored: str) -> None:
    s = LearnerSettings(kernel=written)  # type: ignore[arg-type]
    assert LearnerSettings.model_validate(s.model_dump()) == s
    assert (
        EngineSettings.model_validate_json(EngineSettings(learner=s).model_dump_json()).learner.kernel
        == written
    )
    engine, _ = _engine_run(written, events=1200)
    path = tmp_path / "state.safetensors"
    save_engine(engine, path)
    other = engine.settings.model_copy(
        update={"learner": engine.settings.learner.model_copy(update={"kernel": restored})}
    )
    back, _ = load_engine(path, settings=other)
    assert back.settings.learner.kernel == restored
    assert back.routed is not None and engine.routed is not None
    assert np.array_equal(back.routed.theta, engine.routed.theta)
    X, y = _stream(99, 1024)
    raws = _encode(X, y, "n", list(range(4)), extras=False)
    a, b = engine.process(raws), back.process(raws)  # type: ignore[arg-type]
    assert [d.decision for d in a.decisions()] == [d.decision for d in b.decisions()]
    assert np.abs(back.routed.theta - engine.routed.theta).max() <= 1e-9 * np.abs(engine.routed.theta).max()


def test_the_kernel_runs_where_numba_cannot_write_a_cache(tmp_path: Path) -> None:
    """A read-only install: no usable ``__pycache__`` beside the module, no user cache directory,
    no ``NUMBA_CACHE_DIR`` — numba finds no cache locator (it would raise at import), and the
    kernel compiles uncached instead.  The directories are blocked by files in their place, which
    holds for root too (read-only permissions would not)."""
    pkg = tmp_path / "site"
    pkg.mkdir()
    subprocess.run(["cp", "-r", str(ROOT / "stream_influence"), str(pkg)], check=True)
    for cache in pkg.rglob("__pycache__"):
        subprocess.run(["rm", "-r", str(cache)], check=True)
    (pkg / "stream_influence" / "core" / "__pycache__").write_text("not a directory")
    blocked = tmp_path / "blocked"
    blocked.write_text("not a directory")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env.update({"HOME": str(blocked), "XDG_CACHE_HOME": str(blocked / "cache"), "PYTHONPATH": str(pkg)})
    code = (
        "import numpy as np; from stream_influence.core import kernels; "
        "from stream_influence.core.learner import HeadLearner; "
        "from stream_influence.core.settings import LearnerSettings; "
        "h = HeadLearner(LearnerSettings(), 3, 4); "
        "h.learn(np.ones((20, 4)), np.zeros(20, dtype=int), np.ones(20)); "
        "print(kernels.__file__, type(kernels.sgd_steps._cache).__name__, h.theta[0, 0] > 0)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    path, cache, moved = out.stdout.split()
    assert path.startswith(str(pkg)) and moved == "True"
    assert cache == "NullCache"  # numba's dispatcher without a cache
    assert not any((tmp_path / "site").rglob("*.nbi"))  # nothing was cached


def test_read_only_inputs_learn_as_under_the_numpy_kernel() -> None:
    """Rows, labels and weights the caller cannot write (``np.frombuffer`` of bytes, a memory-mapped
    data set): numba types a read-only array apart and the compiled kernel once raised
    ``TypeError`` (no matching definition) where the numpy reference learns."""
    rng = np.random.default_rng(4)
    K, D, n = 3, 6, 40
    X = np.hstack([rng.normal(size=(n, D - 1)), np.ones((n, 1))])
    y = rng.integers(0, K, n)
    w = rng.uniform(0.5, 1.5, n)
    frozen = [np.frombuffer(a.tobytes(), dtype=a.dtype).reshape(a.shape) for a in (X, y, w)]
    assert not any(a.flags.writeable for a in frozen)
    start = rng.normal(size=(K, D))
    ends = []
    for kernel in ("numpy", "compiled"):
        h = HeadLearner(LearnerSettings(minibatch=8, kernel=kernel), K, D)  # type: ignore[arg-type]
        h.theta = start.copy()
        h.learn(*frozen)
        ends.append(h.theta)
    assert np.abs(ends[0] - start).max() > 1e-3  # it learned
    assert np.abs(ends[1] - ends[0]).max() <= 1e-12 * np.abs(ends[0]).max()


def test_load_kernels_loads_the_compiled_kernel_only_where_the_settings_use_it() -> None:
    """The service loads the kernel at start-up (before its ``gc.freeze``), not at the first
    learning step; the numpy kernel and adam never import numba's kernel module."""
    code = (
        "import sys\n"
        "from stream_influence.core.learner import load_kernels\n"
        "from stream_influence.core.settings import LearnerSettings\n"
        "mod = 'stream_influence.core.kernels'\n"
        "load_kernels(LearnerSettings(kernel='numpy'))\n"
        "load_kernels(LearnerSettings(optimizer='adam'))\n"
        "assert mod not in sys.modules, 'loaded for a kernel that does not use it'\n"
        "load_kernels(LearnerSettings())\n"
        "assert mod in sys.modules, 'the default compiled kernel was not loaded'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr

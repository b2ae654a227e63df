"""Verified checkpoints: every corruption is caught, named, counted, and the previous good
checkpoint is restored; with none good the service refuses to start unless told ``--fresh``."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from prometheus_client import CollectorRegistry
from safetensors.numpy import load, save

from stream_influence.config import AppSettings
from stream_influence.core.engine import InfluenceEngine
from stream_influence.core.settings import EngineSettings
from stream_influence.errors import CheckpointCorrupt, CheckpointIncompatible, NoUsableCheckpoint
from stream_influence.observability.metrics import ServiceMetrics
from stream_influence.service.checkpoint import CheckpointStore, manifest_path
from tests.fixtures.service_events import events

ROOT = Path(__file__).resolve().parents[1]
Tensors = dict[str, np.ndarray]
Header = dict[str, str]


def _engine(n: int = 60, seed: int = 0) -> InfluenceEngine:
    e = InfluenceEngine(EngineSettings())
    e.process(events(n, seed=seed)[0])
    assert e.routed is not None
    return e


def _two_checkpoints(directory: Path, keep: int = 2) -> tuple[CheckpointStore, Path, Path]:
    """A good checkpoint at offset 100 and a newer one at offset 200 (the one to corrupt)."""
    store = CheckpointStore(directory, keep=keep)
    good = store.save(_engine(seed=1), {("t", 0): 100}, {0: 7}, {"quarantine": 1})
    newest = store.save(_engine(seed=2), {("t", 0): 200}, {0: 9}, {"quarantine": 2})
    return store, good, newest


def _split_file(path: Path) -> tuple[Tensors, Header]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return dict(load(data)), json.loads(data[8 : 8 + n])["__metadata__"]


def _rewrite(
    path: Path,
    tensors: Callable[[Tensors], None] | None = None,
    header: Callable[[Header], None] | None = None,
) -> None:
    """Change the content and re-seal the manifest, as a buggy writer would: only the structural
    checks can catch it."""
    t, h = _split_file(path)
    if tensors:
        tensors(t)
    if header:
        header(h)
    data = save(t, metadata=h)
    path.write_bytes(data)
    mpath = manifest_path(path)
    manifest = json.loads(mpath.read_text())
    manifest["files"][path.name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    mpath.write_text(json.dumps(manifest))


def _edit_meta(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    def header(h: Header) -> None:
        meta = json.loads(h["meta"])
        edit(meta)
        h["meta"] = json.dumps(meta)

    _rewrite(path, header=header)


def _edit_state(key: str, value: Any) -> Callable[[Header], None]:
    """Set ``state[key]`` (a dict value is merged into the existing one)."""

    def edit(h: Header) -> None:
        state = json.loads(h["state"])
        state[key] = {**state[key], **value} if isinstance(value, dict) else value
        h["state"] = json.dumps(state)

    return edit


def _set(name: str, value: Callable[[np.ndarray], np.ndarray]) -> Callable[[Tensors], None]:
    def edit(t: Tensors) -> None:
        t[name] = value(t[name])

    return edit


def _nan_weight(theta: np.ndarray) -> np.ndarray:
    theta = theta.copy()
    theta[0, 0] = np.nan
    return theta


def _flip_bit(path: Path) -> None:
    """Flip the top exponent bit of routed.theta[0, 0]: 0.69 becomes 1.24e308 (finite!)."""
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    begin = json.loads(data[8 : 8 + n])["routed.theta"]["data_offsets"][0]
    data[8 + n + begin + 7] ^= 0x40  # little-endian float64: byte 7 holds sign + top exponent bits
    path.write_bytes(bytes(data))


CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str]] = {
    "invalid metadata JSON": (
        lambda p: _rewrite(p, header=lambda h: h.update(state=h["state"][:-7] + "{oops")),
        "metadata",
    ),
    "metadata of the wrong type": (
        lambda p: _rewrite(p, header=lambda h: h.update(meta=json.dumps([1, 2]))),
        "metadata",
    ),
    "state value of the wrong type": (
        lambda p: _rewrite(p, header=_edit_state("events_seen", "lots")),
        "metadata",
    ),
    "negative count": (lambda p: _rewrite(p, header=_edit_state("events_seen", -3)), "metadata"),
    "NaN curvature count": (
        lambda p: _rewrite(p, header=_edit_state("curvature", {"n_seen": {"__nan__": True}})),
        "non_finite",
    ),
    "missing tensor": (lambda p: _rewrite(p, tensors=lambda t: t.pop("routed.theta")), "missing_tensor"),
    "wrong dtype": (
        lambda p: _rewrite(p, tensors=_set("routed.theta", lambda a: a.astype(np.float32))),
        "dtype",
    ),
    "integer weights": (
        lambda p: _rewrite(p, tensors=_set("curvature.A", lambda a: a.astype(np.int64))),
        "dtype",
    ),
    "wrong shape": (
        lambda p: _rewrite(p, tensors=_set("routed.theta", lambda a: np.hstack([a, a[:, :1]]))),
        "shape",
    ),
    "curvature of another size": (
        lambda p: _rewrite(p, tensors=_set("curvature.A", lambda a: np.eye(len(a) + 1))),
        "shape",
    ),
    "NaN weights": (lambda p: _rewrite(p, tensors=_set("routed.theta", _nan_weight)), "non_finite"),
    "Inf in the standardiser": (
        lambda p: _rewrite(p, tensors=_set("standardizer.m2", lambda a: np.full_like(a, np.inf))),
        "non_finite",
    ),
    "flipped bit": (_flip_bit, "manifest"),
    "negative offset": (
        lambda p: _edit_meta(p, lambda m: m["extra"]["offsets"]["t"].update({"0": -5})),
        "offsets",
    ),
    "non-integer offset": (
        lambda p: _edit_meta(p, lambda m: m["extra"]["reference_offsets"].update({"0": "9"})),
        "offsets",
    ),
    "truncated file": (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "manifest"),
    "manifest missing (never completed)": (lambda p: manifest_path(p).unlink(), "manifest"),
    "manifest unreadable": (lambda p: manifest_path(p).write_text("{"), "manifest"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_each_corruption_falls_back_to_the_previous_good_checkpoint(
    tmp_path: Path, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    corrupt, reason = CORRUPTIONS[name]
    store, good, newest = _two_checkpoints(tmp_path)
    if name == "flipped bit":
        assert abs(store.load(newest).engine.routed.theta[0, 0]) < 10  # type: ignore[union-attr]
    corrupt(newest)
    with pytest.raises(CheckpointCorrupt) as info:
        store.load(newest)
    assert info.value.reason.value == reason and info.value.path == newest
    with caplog.at_level(logging.ERROR, logger="stream_influence.service.checkpoint"):
        ck = store.latest(EngineSettings())
    assert ck is not None and ck.path == good and ck.seq == 1
    assert ck.offsets == {("t", 0): 100} and ck.reference_offsets == {0: 7}
    assert [e.path for e in ck.skipped] == [newest]
    assert store.fallback_counts() == {reason: 1}
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and newest.name in errors[0] and reason in errors[0]
    # The restored model is the good one and works.
    np.testing.assert_array_equal(ck.engine.routed.theta, _engine(seed=1).routed.theta)  # type: ignore[union-attr]
    ck.engine.process(events(10, seed=3)[0])


def test_flipped_bit_is_finite_and_only_the_manifest_catches_it(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    e = _engine()
    e.routed.theta[0, 0] = 0.69  # type: ignore[union-attr]
    path = store.save(e, {("t", 0): 1}, {}, {})
    _flip_bit(path)
    t, _ = _split_file(path)
    assert t["routed.theta"][0, 0] == pytest.approx(1.24e308, rel=0.01)
    with pytest.raises(CheckpointCorrupt, match="SHA-256"):
        store.load(path)
    manifest_path(path).unlink()
    with pytest.raises(CheckpointCorrupt, match="never completed"):  # no way round the manifest
        store.load(path)


def test_refuses_when_no_checkpoint_is_good(tmp_path: Path) -> None:
    store, good, newest = _two_checkpoints(tmp_path)
    _rewrite(good, tensors=_set("routed.theta", _nan_weight))
    _flip_bit(newest)
    with pytest.raises(NoUsableCheckpoint) as info:
        store.latest()
    msg = str(info.value)
    assert "\n" not in msg and good.name in msg and newest.name in msg and "--fresh" in msg
    assert store.fallback_counts() == {"manifest": 1, "non_finite": 1}


def test_incompatible_settings_are_not_corruption(tmp_path: Path) -> None:
    store, _, _ = _two_checkpoints(tmp_path)
    with pytest.raises(CheckpointIncompatible, match="different curvature"):
        store.latest(EngineSettings(curvature={"kind": "diagonal"}))
    assert store.fallback_counts() == {}


def test_a_corrupt_newest_never_pushes_out_the_last_good_one(tmp_path: Path) -> None:
    """keep=2 with a corrupt newest: after the next save the good previous one is still there,
    so a second corruption (of the new file) still finds a good checkpoint."""
    store, good, newest = _two_checkpoints(tmp_path, keep=2)
    _flip_bit(newest)
    assert store.latest().path == good  # type: ignore[union-attr]
    third = store.save(_engine(seed=3), {("t", 0): 300}, {}, {})
    assert [p for _, p in store.paths()] == [good, third]
    assert (tmp_path / (newest.name + ".corrupt")).exists()  # set aside for inspection, not loaded
    _flip_bit(third)
    ck = CheckpointStore(tmp_path, keep=2).latest()
    assert ck is not None and ck.path == good
    orphan = tmp_path / "checkpoint-000000000001.manifest.json"
    orphan.write_text("{}")  # a crash between pruning a file and its manifest
    fourth = store.save(_engine(seed=4), {("t", 0): 400}, {}, {})
    assert int(fourth.name.split("-")[1].split(".")[0]) == 4  # names are never reused
    assert not orphan.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".corrupt")) == sorted(
        p.name for q in (third, fourth) for p in (q, manifest_path(q))
    )


def test_old_checkpoints_without_manifest_are_accepted_when_sound(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The previous release wrote no manifest and no format key: accepted with a warning if the
    structural checks pass, refused (fallback) if they do not."""
    store, good, newest = _two_checkpoints(tmp_path)
    for path in (good, newest):
        _edit_meta(path, lambda m: m["extra"].pop("format"))
        manifest_path(path).unlink()
    with caplog.at_level(logging.WARNING, logger="stream_influence.service.checkpoint"):
        ck = store.latest()
    assert ck is not None and ck.path == newest and not ck.skipped
    assert any("no manifest" in r.getMessage() for r in caplog.records)
    # Structural checks still apply to them.
    t, h = _split_file(newest)
    t["routed.theta"] = _nan_weight(t["routed.theta"])
    newest.write_bytes(save(t, metadata=h))
    ck = store.latest()
    assert ck is not None and ck.path == good and ck.skipped[0].reason.value == "non_finite"


def test_fallbacks_are_exported_as_a_metric(tmp_path: Path) -> None:
    store, _, newest = _two_checkpoints(tmp_path)
    m = ServiceMetrics(registry=CollectorRegistry(), process_metrics=False)
    m.count_checkpoint_fallbacks(store.fallback_counts)
    g = m.registry.get_sample_value
    assert g("stream_influence_checkpoint_fallbacks_total", {"reason": "manifest"}) == 0
    _flip_bit(newest)
    store.latest()
    assert g("stream_influence_checkpoint_fallbacks_total", {"reason": "manifest"}) == 1
    assert g("stream_influence_checkpoint_fallbacks_total", {"reason": "shape"}) == 0


def _config(tmp_path: Path) -> Path:
    cfg = {
        "checkpoint": {"directory": str(tmp_path / "ck")},
        "metrics": {"enabled": False},
        "kafka": {"bootstrap_servers": "127.0.0.1:1"},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_run_refuses_to_start_with_one_line_and_fresh_sets_the_files_aside(tmp_path: Path) -> None:
    _, good, newest = _two_checkpoints(tmp_path / "ck")
    _flip_bit(good)
    _flip_bit(newest)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "stream_influence", "run", "--config", str(_config(tmp_path))],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    final = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(final) == 1 and "no usable checkpoint" in final[0] and "--fresh" in final[0]
    assert good.exists() and newest.exists()  # refusing touches nothing

    from stream_influence.cli.run import _set_aside_unusable

    cfg = AppSettings.model_validate(yaml.safe_load(_config(tmp_path).read_text()))
    _set_aside_unusable(cfg)  # what `run --fresh` does before starting the service
    assert CheckpointStore(tmp_path / "ck").latest() is None
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == sorted(
        f.name + ".corrupt" for p in (good, newest) for f in (p, manifest_path(p))
    )


def test_fresh_keeps_a_usable_checkpoint(tmp_path: Path) -> None:
    from stream_influence.cli.run import _set_aside_unusable

    _, good, newest = _two_checkpoints(tmp_path / "ck")
    _flip_bit(newest)
    _set_aside_unusable(AppSettings.model_validate(yaml.safe_load(_config(tmp_path).read_text())))
    ck = CheckpointStore(tmp_path / "ck").latest()
    assert ck is not None and ck.path == good


def test_requeue_uses_the_verified_loader(tmp_path: Path) -> None:
    from stream_influence.cli.requeue import requeue

    _, good, newest = _two_checkpoints(tmp_path / "ck")
    _rewrite(good, tensors=_set("routed.theta", _nan_weight))
    _rewrite(newest, tensors=_set("routed.theta", _nan_weight))
    cfg = AppSettings.model_validate(yaml.safe_load(_config(tmp_path).read_text()))
    with pytest.raises(NoUsableCheckpoint, match="non_finite"):
        requeue(cfg, to=None, ledger=tmp_path / "ledger.json", dry_run=True, timeout=1.0)


def test_a_torch_feature_extractor_checkpoint_verifies_with_its_own_widths(tmp_path: Path) -> None:
    """φ maps 4 raw features to 3: the head is 3 + 1 wide, the reference buffer keeps φ (3 wide)."""
    settings = EngineSettings(
        model={"extractor": "torch", "torch_factory": "tests.torch_phi:small_net"},
        reference={"min_size": 5},
    )
    rng = np.random.default_rng(0)
    raws = [
        json.dumps({"id": str(i), "features": rng.normal(size=4).tolist(), "label": i % 2}).encode()
        for i in range(80)
    ]
    e = InfluenceEngine(settings)
    e.add_reference(raws[:20])
    e.process(raws[20:])
    assert e.routed.theta.shape == (2, 4) and e.reference.features.shape[1] == 3  # type: ignore[union-attr]
    store = CheckpointStore(tmp_path)
    store.save(e, {("t", 0): 60}, {}, {})
    newest = store.save(e, {("t", 0): 80}, {}, {})
    ck = store.latest(settings)
    assert ck is not None and ck.path == newest and not ck.skipped
    np.testing.assert_array_equal(ck.engine.routed.theta, e.routed.theta)  # type: ignore[union-attr]
    _rewrite(newest, tensors=_set("reference.features", lambda a: np.hstack([a, a[:, :1]])))  # raw width
    ck = store.latest(settings)
    assert ck is not None and ck.seq == 1 and ck.skipped[0].reason.value == "shape"


PREVIOUS_RELEASE = ROOT / "tests" / "fixtures" / "checkpoint-previous-release.safetensors"


def test_a_checkpoint_written_by_the_previous_release_still_restores(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The fixture was written by the release before manifests (commit fed07bb, 60 events on
    partition events-0): restored with a warning; the next save writes the new format."""
    import shutil

    path = tmp_path / "checkpoint-000000000001.safetensors"
    shutil.copyfile(PREVIOUS_RELEASE, path)
    store = CheckpointStore(tmp_path)
    with caplog.at_level(logging.WARNING, logger="stream_influence.service.checkpoint"):
        ck = store.latest()
    assert ck is not None and not ck.skipped
    assert ck.offsets == {("events", 0): 60} and ck.reference_offsets == {0: 10}
    assert ck.engine.events_seen == 60 and ck.engine.reference.size == 10
    assert any("no manifest" in r.getMessage() for r in caplog.records)
    ck.engine.process(events(20, seed=9)[0])
    new = store.save(ck.engine, {("events", 0): 80}, {0: 10}, ck.outputs)
    assert manifest_path(new).exists() and store.latest().path == new  # type: ignore[union-attr]


def test_the_previous_release_checkpoint_restores_its_prequential_accuracy(tmp_path: Path) -> None:
    """Item 12: the fixture's river confusion cells load into the numpy counters: 60 events,
    cumulative accuracy = the diagonal share of the saved cells, and counting goes on from there."""
    import shutil

    from safetensors.numpy import load_file

    path = tmp_path / "checkpoint-000000000001.safetensors"
    shutil.copyfile(PREVIOUS_RELEASE, path)
    ck = CheckpointStore(tmp_path).latest()
    assert ck is not None and ck.engine.routed is not None
    saved = {k: v for k, v in load_file(str(PREVIOUS_RELEASE)).items() if "metrics_confusion" in k}
    cells = next(v for k, v in saved.items() if k.startswith("routed"))
    expected = cells[cells[:, 0] == cells[:, 1], 2].sum() / cells[:, 2].sum()
    m = ck.engine.routed.metrics
    assert m.confusion.sum() == 60 and m.cumulative_accuracy == pytest.approx(expected, abs=1e-12)
    ck.engine.process(events(20, seed=9)[0])
    assert m.confusion.sum() == 80

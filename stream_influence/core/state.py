"""Safe, bit-exact persistence of engine state: one safetensors file, nothing unpickled.

Arrays of the nested state go into the safetensors tensors (keyed by their dotted path); every
other value (numbers, strings, lists, the effective settings, caller extras such as input
offsets) goes into the header's JSON metadata.  Files are written atomically: temporary file,
fsync, rename, fsync of the directory — a crash leaves the previous checkpoint intact.

Loading checks what it reads (:func:`decode_state`, :func:`restore_engine`): header JSON, every
referenced array present, dtypes, finite float arrays and scalars, non-negative counts, and shapes
equal to those of a fresh engine with the same settings and schema.  Failures raise
:class:`~stream_influence.errors.CheckpointCorrupt` with a reason; the checksum of the whole file
lives in the checkpoint's manifest (:mod:`stream_influence.service.checkpoint`).

>>> import tempfile, pathlib
>>> from stream_influence.core.engine import InfluenceEngine
>>> engine = InfluenceEngine()
>>> _ = engine.process([b'{"id": "a", "features": [1.0], "label": 0}'])
>>> path = pathlib.Path(tempfile.mkdtemp()) / "state.safetensors"
>>> save_engine(engine, path, extra={"offsets": {"t-0": 1}})
>>> restored, extra = load_engine(path)
>>> extra, restored.events_seen
({'offsets': {'t-0': 1}}, 1)
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ValidationError
from safetensors import SafetensorError
from safetensors.numpy import load, save

from stream_influence.core.curvature import make_curvature
from stream_influence.core.engine import InfluenceEngine
from stream_influence.core.events import Schema
from stream_influence.core.influence import InfluenceScorer
from stream_influence.core.model import Standardizer, make_extractor
from stream_influence.core.policy import RoutingPolicy
from stream_influence.core.reference_model import ReferenceModel
from stream_influence.core.settings import CurvatureSettings, EngineSettings, PolicySettings
from stream_influence.core.snapshot import ModelSnapshot
from stream_influence.errors import CheckpointCorrupt, CheckpointIncompatible, CorruptReason

__all__ = [
    "SNAPSHOT_VERSION",
    "atomic_write",
    "decode_snapshot",
    "decode_state",
    "encode_engine",
    "encode_snapshot",
    "encode_state",
    "load_engine",
    "load_state",
    "read_file",
    "restore_engine",
    "save_engine",
    "save_state",
]

FORMAT = "stream-influence/state/1"
# Version of the model-snapshot layout inside that format (encode_snapshot); bump on any change
# a reader of the previous version could not decode.
SNAPSHOT_VERSION = 1
_TENSOR = "__tensor__"


def _split(obj: Any, path: str, tensors: dict[str, np.ndarray]) -> Any:
    if isinstance(obj, np.ndarray):
        tensors[path] = np.ascontiguousarray(obj)
        return {_TENSOR: path}
    if isinstance(obj, dict):
        return {str(k): _split(v, f"{path}.{k}" if path else str(k), tensors) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_split(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and obj != obj:
        return {"__nan__": True}
    return obj


def _join(obj: Any, tensors: dict[str, np.ndarray]) -> Any:
    if isinstance(obj, dict):
        if _TENSOR in obj:
            return tensors[obj[_TENSOR]]
        if "__nan__" in obj:
            return float("nan")
        return {k: _join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def encode_state(state: dict[str, Any], meta: dict[str, Any] | None = None) -> bytes:
    """The safetensors bytes of a nested state dict (arrays + JSON values) and its ``meta``."""
    tensors: dict[str, np.ndarray] = {}
    skeleton = _split(state, "", tensors)
    header = {"format": FORMAT, "state": json.dumps(skeleton), "meta": json.dumps(meta or {})}
    return save(tensors, metadata=header)


def save_state(state: dict[str, Any], path: Path, meta: dict[str, Any] | None = None) -> None:
    """Persist a nested state dict (arrays + JSON values) atomically."""
    atomic_write(path, encode_state(state, meta))


# Every array the engine keeps is one of these; curvature and weights are float64 by design.
_DTYPES = {np.dtype(np.float64), np.dtype(np.int64), np.dtype(np.uint8)}


def decode_state(
    data: bytes, path: Path | str
) -> tuple[dict[str, Any], dict[str, Any], dict[str, np.ndarray]]:
    """Inverse of :func:`encode_state`: ``(state, meta, tensors)``, checked on the way.

    Raises :class:`CheckpointCorrupt` for a file that is not a state file, header JSON that is
    invalid or of the wrong type, an array the state refers to that is absent, an unexpected
    dtype, or a NaN/±Inf in any float array.
    """
    try:
        tensors = load(data)
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
    except (SafetensorError, struct.error, ValueError, AttributeError) as exc:
        raise CheckpointCorrupt(path, CorruptReason.UNREADABLE, f"not a safetensors file: {exc}") from exc
    if header.get("format") != FORMAT:
        raise CheckpointCorrupt(
            path, CorruptReason.UNREADABLE, f"not a {FORMAT} file (format={header.get('format')!r})"
        )
    try:
        skeleton, meta = json.loads(header["state"]), json.loads(header["meta"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointCorrupt(path, CorruptReason.METADATA, f"header JSON is invalid: {exc}") from exc
    if not isinstance(skeleton, dict) or not isinstance(meta, dict):
        raise CheckpointCorrupt(path, CorruptReason.METADATA, "header state/meta are not JSON objects")
    for name, arr in tensors.items():
        if arr.dtype not in _DTYPES:
            raise CheckpointCorrupt(path, CorruptReason.DTYPE, f"array {name} has dtype {arr.dtype}")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise CheckpointCorrupt(
                path, CorruptReason.NON_FINITE, f"array {name} has {bad} NaN/Inf value(s)"
            )
    try:
        state = _join(skeleton, tensors)
    except KeyError as exc:
        raise CheckpointCorrupt(path, CorruptReason.MISSING_TENSOR, f"array {exc} is missing") from exc
    return state, meta, tensors


def load_state(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read and check a file written by :func:`save_state`: ``(state, meta)``."""
    state, meta, _ = decode_state(read_file(path), path)
    return state, meta


def read_file(path: Path) -> bytes:
    """The bytes of a state file; an unreadable one is :class:`CheckpointCorrupt`."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CheckpointCorrupt(
            path, CorruptReason.UNREADABLE, f"cannot read: {exc.strerror or exc}"
        ) from exc


def encode_engine(engine: InfluenceEngine, extra: dict[str, Any] | None = None) -> bytes:
    """The state file bytes of ``engine`` with its effective settings and caller ``extra``."""
    meta = {"settings": engine.settings.model_dump(mode="json", by_alias=True), "extra": extra or {}}
    return encode_state(engine.state_dict(), meta)


def save_engine(engine: InfluenceEngine, path: Path, extra: dict[str, Any] | None = None) -> None:
    """Save the engine's state with its effective settings (and caller ``extra``, e.g. offsets)."""
    atomic_write(path, encode_engine(engine, extra))


def restore_engine(
    state: dict[str, Any],
    meta: dict[str, Any],
    tensors: dict[str, np.ndarray],
    path: Path | str,
    settings: EngineSettings | None = None,
) -> tuple[InfluenceEngine, dict[str, Any]]:
    """Build the engine of a decoded state file and check it against its settings and schema.

    ``settings`` overrides the saved ones (the policy may differ freely, and so may
    ``curvature.refine`` and ``refine_step``: the refinement is derived state); different schema,
    model or curvature settings raise :class:`CheckpointIncompatible`; anything inconsistent
    raises :class:`CheckpointCorrupt`.
    """
    try:
        saved = EngineSettings.model_validate(meta["settings"])
    except (KeyError, ValidationError) as exc:
        raise CheckpointCorrupt(
            path, CorruptReason.METADATA, f"saved settings are unreadable: {exc}"
        ) from exc
    if settings is not None:
        for part in ("schema_", "model", "curvature"):
            if _layout(getattr(settings, part)) != _layout(getattr(saved, part)):
                raise CheckpointIncompatible(
                    f"{path} was written with different {part.rstrip('_')} settings; "
                    "start from an empty checkpoint directory or restore the old settings"
                )
    extra = meta.get("extra", {})
    if not isinstance(extra, dict):
        raise CheckpointCorrupt(path, CorruptReason.METADATA, "extra metadata is not a JSON object")
    engine = InfluenceEngine(settings or saved)
    try:
        engine.load_state_dict(state)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, AssertionError) as exc:
        raise CheckpointCorrupt(
            path, CorruptReason.METADATA, f"state does not fit the engine: {type(exc).__name__}: {exc}"
        ) from exc
    _check_against_template(engine, tensors, path)
    try:
        engine.summary()  # touches every model part: a last guard against an inconsistent state
    except Exception as exc:
        raise CheckpointCorrupt(
            path, CorruptReason.SHAPE, f"restored engine is inconsistent: {exc!r}"
        ) from exc
    return engine, extra


# Settings that change no state a checkpoint holds: the refinement of the reference direction is
# derived (restarted from the estimator's own solve when absent, ignored when refine is off).
_FREE_FIELDS = {CurvatureSettings: {"refine", "refine_step"}}


def _layout(part: BaseModel) -> dict[str, Any]:
    """The settings of ``part`` that a checkpoint's state depends on."""
    return part.model_dump(exclude=_FREE_FIELDS.get(type(part), set()))


def _check_against_template(engine: InfluenceEngine, raw: dict[str, np.ndarray], path: Path | str) -> None:
    """Shapes and dtypes of the restored arrays must be those a fresh engine with the same
    settings, policy and schema has (so a wrong-shape array fails here, not on every restart)."""
    # The identity φ on the restored head's width stands in for the real extractor, so a torch
    # φ is not loaded a second time just to learn array shapes.
    model = engine.settings.model.model_copy(
        update={"extractor": "identity", "torch_factory": None, "torch_weights": None}
    )
    template = InfluenceEngine(
        engine.settings.model_copy(update={"policy": engine.policy.settings, "model": model})
    )
    template.schema.load_state_dict(engine.schema.state_dict())
    if engine.routed is not None:
        template.schema.n_features = engine.updater.dim - 1
        template._ensure_model()
    expected: dict[str, np.ndarray] = {}
    actual: dict[str, np.ndarray] = {}
    _check_scalars(_split(template.state_dict(), "", expected), _split(engine.state_dict(), "", actual), path)
    if "routed.theta" in expected:
        expected["scorer.s"] = expected["routed.theta"]  # s = H⁻¹∇L_R has the head's shape
    n_features = engine.schema.n_features
    if "reference.features" in actual and n_features is not None:  # stored as φ(x)
        width = engine.extractor.out_features(n_features)
        expected["reference.features"] = np.zeros((len(engine.reference.labels), width))
    for name, want in expected.items():
        got = actual.get(name)
        if got is None:
            continue
        if name in raw and raw[name].dtype != want.dtype:
            raise CheckpointCorrupt(
                path, CorruptReason.DTYPE, f"array {name} is {raw[name].dtype}, expected {want.dtype}"
            )
        # A leading length of 0 in the template is data-dependent (drift history, confusion cells).
        ok = (
            got.shape[1:] == want.shape[1:] and got.ndim == want.ndim
            if want.ndim and want.shape[0] == 0
            else got.shape == want.shape
        )
        if not ok:
            raise CheckpointCorrupt(
                path, CorruptReason.SHAPE, f"array {name} has shape {got.shape}, expected {want.shape}"
            )


def _check_scalars(want: Any, got: Any, path: Path | str, where: str = "") -> None:
    """Numbers that are finite in a fresh engine must be finite, and counts non-negative."""
    if isinstance(want, dict) and isinstance(got, dict):
        for key in want.keys() & got.keys():
            _check_scalars(want[key], got[key], path, f"{where}.{key}" if where else key)
        return
    if isinstance(want, bool) or not isinstance(want, int | float) or not np.isfinite(want):
        return
    if isinstance(got, dict) or not np.isfinite(got):  # NaN is stored as {"__nan__": true}
        raise CheckpointCorrupt(path, CorruptReason.NON_FINITE, f"value {where} is {got!r}")
    if isinstance(want, int) and got < 0:
        raise CheckpointCorrupt(path, CorruptReason.METADATA, f"count {where} is negative ({got})")


def load_engine(path: Path, settings: EngineSettings | None = None) -> tuple[InfluenceEngine, dict[str, Any]]:
    """Restore an engine from a state file, checked (see :func:`decode_state`, :func:`restore_engine`)."""
    state, meta, tensors = decode_state(read_file(path), path)
    return restore_engine(state, meta, tensors, path, settings)


# -- model snapshots (what scorer processes receive from the one updater) --------------------------
def _inf_safe(x: np.ndarray) -> dict[str, np.ndarray]:
    """Thresholds may be +inf (a test that is off): stored as finite values and a flag array,
    since state files hold no non-finite floats."""
    x = np.asarray(x, dtype=np.float64)
    return {"values": np.where(np.isfinite(x), x, 0.0), "posinf": (x == np.inf).astype(np.uint8)}


def _from_inf_safe(d: dict[str, Any]) -> np.ndarray:
    values = np.array(d["values"], dtype=np.float64)
    return np.where(np.asarray(d["posinf"]) > 0, np.inf, values)


def encode_snapshot(snapshot: ModelSnapshot) -> bytes:
    """The bytes of a :class:`ModelSnapshot` (this module's safetensors + JSON format, with
    ``SNAPSHOT_VERSION`` in the header); :func:`decode_snapshot` restores it exactly."""
    policy = snapshot.policy
    state: dict[str, Any] = {
        "schema": snapshot.schema.state_dict(),
        "model_version": snapshot.model_version,
        "reference_size": snapshot.reference_size,
        "not_warm_reason": snapshot.not_warm_reason,
        "direction": snapshot.direction.state_dict(),
        "policy": policy.state_dict(),
        "policy_settings": policy.settings.model_dump(mode="json"),
        "policy_threshold": policy.threshold,
        "class_thresholds": _inf_safe(policy.class_thresholds),
        "reference_thresholds": _inf_safe(policy.reference_thresholds),
        # adaptive_fdr: the per-class calibration statistics, concatenated.
        "loss_calibration": {
            "values": np.concatenate([np.zeros(0), *policy.loss_calibration]),
            "sizes": np.array([len(c) for c in policy.loss_calibration], dtype=np.int64),
        },
        "plain_loss_calibration": {
            "values": np.concatenate([np.zeros(0), *policy.plain_loss_calibration]),
            "sizes": np.array([len(c) for c in policy.plain_loss_calibration], dtype=np.int64),
        },
    }
    if snapshot.reference_model is not None:
        state["reference_model"] = snapshot.reference_model.state_dict()
    if snapshot.theta is not None:
        assert snapshot.standardizer is not None and snapshot.curvature is not None
        state["theta"] = snapshot.theta
        state["standardizer"] = snapshot.standardizer.state_dict()
        state["curvature"] = snapshot.curvature.state_dict()
    meta = {
        "snapshot_version": SNAPSHOT_VERSION,
        "settings": snapshot.settings.model_dump(mode="json", by_alias=True),
    }
    return encode_state(state, meta)


def decode_snapshot(data: bytes, source: str = "model snapshot") -> ModelSnapshot:
    """Inverse of :func:`encode_snapshot`.  Bytes that are not a snapshot raise
    :class:`CheckpointCorrupt`; another ``SNAPSHOT_VERSION`` raises :class:`CheckpointIncompatible`."""
    state, meta, _ = decode_state(data, source)
    version = meta.get("snapshot_version")
    if version != SNAPSHOT_VERSION:
        raise CheckpointIncompatible(
            f"{source}: snapshot version {version!r}, this release reads version {SNAPSHOT_VERSION}"
        )
    try:
        settings = EngineSettings.model_validate(meta["settings"])
        schema = Schema(settings.schema_)
        schema.load_state_dict(state["schema"])
        direction = InfluenceScorer(settings.influence)
        direction.load_state_dict(state["direction"])
        policy = RoutingPolicy(PolicySettings(**state["policy_settings"]))
        policy.load_state_dict(state["policy"])
        policy.threshold = float(state["policy_threshold"])
        policy.class_thresholds = _from_inf_safe(state["class_thresholds"])
        policy.reference_thresholds = _from_inf_safe(state["reference_thresholds"])
        if "loss_calibration" in state:  # absent from snapshots before adaptive_fdr
            cal = state["loss_calibration"]
            sizes = np.asarray(cal["sizes"], dtype=np.int64).ravel()
            values = np.array(cal["values"], dtype=np.float64).ravel()
            policy.loss_calibration = np.split(values, np.cumsum(sizes)[:-1]) if len(sizes) else []
        if "plain_loss_calibration" in state:  # absent from snapshots before floor_yield_fdr
            cal = state["plain_loss_calibration"]
            sizes = np.asarray(cal["sizes"], dtype=np.int64).ravel()
            values = np.array(cal["values"], dtype=np.float64).ravel()
            policy.plain_loss_calibration = np.split(values, np.cumsum(sizes)[:-1]) if len(sizes) else []
        reference_model = None
        if "reference_model" in state:
            reference_model = ReferenceModel(settings.influence, settings.seed)
            reference_model.load_state_dict(state["reference_model"])
        theta = standardizer = curvature = None
        if "theta" in state:
            theta = np.array(state["theta"], dtype=np.float64)
            K, D = theta.shape
            standardizer = Standardizer(D - 1, settings.model.standardize_freeze_after)
            standardizer.load_state_dict(state["standardizer"])
            curvature = make_curvature(settings.curvature, K, D)
            curvature.load_state_dict(state["curvature"])
            theta.flags.writeable = False
        reason = state["not_warm_reason"]
        return ModelSnapshot(
            settings=settings,
            schema=schema,
            extractor=make_extractor(settings.model),
            theta=theta,
            standardizer=standardizer,
            curvature=curvature,
            direction=direction,
            reference_model=reference_model,
            policy=policy,
            not_warm_reason=None if reason is None else str(reason),
            model_version=int(state["model_version"]),
            reference_size=int(state["reference_size"]),
        )
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, ValidationError) as exc:
        raise CheckpointCorrupt(
            source, CorruptReason.METADATA, f"not a consistent model snapshot: {type(exc).__name__}: {exc}"
        ) from exc

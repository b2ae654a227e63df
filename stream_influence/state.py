"""Safe, bit-exact persistence of engine state: one safetensors file, nothing unpickled.

Arrays of the nested state go into the safetensors tensors (keyed by their dotted path); every
other value (numbers, strings, lists, the effective settings, caller extras such as input
offsets) goes into the header's JSON metadata.  Files are written atomically: temporary file,
fsync, rename, fsync of the directory — a crash leaves the previous checkpoint intact.

>>> import tempfile, pathlib
>>> from stream_influence.engine import InfluenceEngine
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
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.numpy import load_file, save

from .engine import InfluenceEngine
from .errors import CheckpointError
from .settings import EngineSettings

__all__ = ["atomic_write", "load_engine", "load_state", "save_engine", "save_state"]

FORMAT = "stream-influence/state/1"
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


def save_state(state: dict[str, Any], path: Path, meta: dict[str, Any] | None = None) -> None:
    """Persist a nested state dict (arrays + JSON values) atomically."""
    tensors: dict[str, np.ndarray] = {}
    skeleton = _split(state, "", tensors)
    header = {"format": FORMAT, "state": json.dumps(skeleton), "meta": json.dumps(meta or {})}
    atomic_write(path, save(tensors, metadata=header))


def load_state(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Inverse of :func:`save_state`: ``(state, meta)``."""
    path = Path(path)
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"cannot read state file {path}: {exc}") from exc
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} file (format={header.get('format')!r})")
    return _join(json.loads(header["state"]), tensors), json.loads(header["meta"])


def save_engine(engine: InfluenceEngine, path: Path, extra: dict[str, Any] | None = None) -> None:
    """Save the engine's state with its effective settings (and caller ``extra``, e.g. offsets)."""
    meta = {"settings": engine.settings.model_dump(mode="json", by_alias=True), "extra": extra or {}}
    save_state(engine.state_dict(), path, meta)


def load_engine(path: Path, settings: EngineSettings | None = None) -> tuple[InfluenceEngine, dict[str, Any]]:
    """Restore an engine; ``settings`` overrides the saved ones (the policy may differ freely)."""
    state, meta = load_state(path)
    try:
        saved = EngineSettings.model_validate(meta["settings"])
    except (KeyError, ValidationError) as exc:
        raise CheckpointError(f"{path}: saved settings are unreadable: {exc}") from exc
    if settings is not None:
        for part in ("schema_", "model", "curvature"):
            if getattr(settings, part) != getattr(saved, part):
                raise CheckpointError(
                    f"{path} was written with different {part.rstrip('_')} settings; "
                    "start from an empty checkpoint directory or restore the old settings"
                )
    engine = InfluenceEngine(settings or saved)
    engine.load_state_dict(state)
    return engine, meta.get("extra", {})

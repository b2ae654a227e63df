"""Named exceptions.  Bad *events* never raise: they become rejects with a reason."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

__all__ = [
    "BrokerUnreachableError",
    "CheckpointCorrupt",
    "CheckpointError",
    "CheckpointIncompatible",
    "ConfigError",
    "CorruptReason",
    "CurvatureError",
    "ExtractorError",
    "NoUsableCheckpoint",
    "OutputError",
    "ReplayLimitError",
    "SchemaError",
    "StreamInfluenceError",
]


class StreamInfluenceError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(StreamInfluenceError):
    """A configuration file or value is invalid."""


class SchemaError(StreamInfluenceError):
    """Data that must define the schema (reference set, class list) is inconsistent."""


class CurvatureError(StreamInfluenceError):
    """A curvature re-factorisation failed (the matrix was not positive definite)."""


class ExtractorError(StreamInfluenceError):
    """The feature extractor φ could not be built or loaded."""


class CheckpointError(StreamInfluenceError):
    """A checkpoint is missing, corrupt, or was written by incompatible settings."""


class BrokerUnreachableError(StreamInfluenceError):
    """The Kafka brokers could not be reached (or refused the TLS handshake or the login) at start."""


class CorruptReason(StrEnum):
    """Why a checkpoint file failed verification (the ``reason`` label of the fallback metric)."""

    UNREADABLE = "unreadable"  # cannot be read or is not a safetensors state file
    MANIFEST = "manifest"  # manifest missing (incomplete), unreadable, or size/SHA-256 mismatch
    METADATA = "metadata"  # header JSON invalid, or a value of the wrong type or range
    MISSING_TENSOR = "missing_tensor"
    DTYPE = "dtype"
    SHAPE = "shape"  # inconsistent with the settings, the schema or the other arrays
    NON_FINITE = "non_finite"  # NaN or ±Inf in a float array
    OFFSETS = "offsets"  # stored input/reference offsets not non-negative integers


class CheckpointCorrupt(CheckpointError):
    """One checkpoint file failed verification; the loader falls back to the previous one."""

    def __init__(self, path: Path | str, reason: CorruptReason, detail: str) -> None:
        self.path, self.reason, self.detail = Path(path), CorruptReason(reason), detail
        super().__init__(f"{self.path}: {self.reason.value}: {detail}")


class CheckpointIncompatible(CheckpointError):
    """A checkpoint was written with different schema, model or curvature settings.

    Not corruption: falling back to an older file (or starting fresh) would not help, so the
    operator has to restore the settings or empty the directory."""


class NoUsableCheckpoint(CheckpointError):
    """Checkpoint files exist but none passed verification: the service refuses to start."""


class OutputError(StreamInfluenceError):
    """One output message could not be built or sent (encoding, serialisation, size): that
    message is dead-lettered, the stream goes on."""


class ReplayLimitError(StreamInfluenceError):
    """The same un-checkpointed window failed more than ``kafka.max_window_replays`` times."""


class NotWarmError(StreamInfluenceError):
    """An operation that needs routing to be calibrated (a warm engine) was asked of a cold one."""

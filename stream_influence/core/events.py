"""The training-event contract and batch decoding.

A training event is a JSON object ``{"id": str, "features": [float, ...], "label": int|str}``
with optional ``"ts"`` (epoch seconds or ISO 8601), ``"weight"`` (finite, ≥ 0) and ``"meta"``
(an object the engine never reads).  :meth:`Schema.decode_batch` turns a polled batch of raw
bytes into one :class:`EventBatch` of valid events plus a :class:`Reject` per invalid one; it
never raises on bad input.

The decoder contract (every parser — simdjson, the fast path for typical events, orjson for the
rest, and the standard library's ``json``, the reference — accepts and rejects exactly the same
inputs with the same reasons and values):

- the message is UTF-8 JSON text (RFC 8259): non-UTF-8 bytes, a byte-order mark, a lone
  surrogate anywhere (raw or as a ``\\uD800`` escape, in any key or string), or containers nested
  deeper than :data:`MAX_NESTING` are ``invalid_json``; NaN/Infinity and numbers beyond float64
  are read (so they get their precise reason, e.g. ``non_finite``) but never accepted;
- an object holding the same key twice, at any depth, is ``duplicate_key`` (orjson would keep the
  last value silently);
- ``id`` is a non-empty string; ``label`` a non-empty string or an integer of magnitude at most
  :data:`MAX_LABEL_INT` (2⁵³ − 1: exact in every JSON implementation) — else ``invalid_label``.
  So every accepted id and label round-trips through ``.encode("utf-8")`` and ``str()``.

>>> schema = Schema(SchemaSettings(classes=["cat", "dog"], n_features=2))
>>> batch, rejects = schema.decode_batch([
...     b'{"id": "a", "features": [1, 2], "label": "dog"}',
...     b'{"id": "b", "features": [1], "label": "dog"}',
...     b'not json',
... ])
>>> batch.ids, batch.labels.tolist()
(['a'], [1])
>>> [(r.index, r.reason.value) for r in rejects]
[(1, 'wrong_dimension'), (2, 'invalid_json')]
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

import numpy as np
import orjson
import simdjson

from stream_influence.core.settings import SchemaSettings
from stream_influence.errors import SchemaError

__all__ = ["MAX_LABEL_INT", "MAX_NESTING", "EventBatch", "Reject", "RejectReason", "Schema"]

# An event needs three levels (object → meta → a list in meta); 32 leaves room and keeps both
# parsers far from their recursion limits (orjson refuses 1024 levels, json recurses ~1000 deep).
MAX_NESTING = 32
# Integer labels beyond 2⁵³ − 1 are not exact in JavaScript or as float64, and orjson turns
# integers beyond 64 bits into floats while json keeps them exact: reject them in both.
MAX_LABEL_INT = 2**53 - 1


class RejectReason(StrEnum):
    """Machine-readable reasons an event is dead-lettered."""

    EMPTY = "empty"
    TOO_LARGE = "too_large"
    INVALID_JSON = "invalid_json"  # incl. non-UTF-8, lone surrogates, nesting > MAX_NESTING
    DUPLICATE_KEY = "duplicate_key"  # an object holds the same key twice
    NOT_AN_OBJECT = "not_an_object"
    MISSING_FIELD = "missing_field"
    INVALID_ID = "invalid_id"
    INVALID_FEATURES = "invalid_features"
    WRONG_DIMENSION = "wrong_dimension"
    NON_FINITE = "non_finite"
    OUT_OF_RANGE = "out_of_range"
    INVALID_LABEL = "invalid_label"
    UNKNOWN_LABEL = "unknown_label"
    INVALID_WEIGHT = "invalid_weight"
    INVALID_TIMESTAMP = "invalid_timestamp"
    INVALID_META = "invalid_meta"


@dataclass(frozen=True, slots=True)
class Reject:
    """One invalid event: its position in the decoded input, the reason and a human detail."""

    index: int
    reason: RejectReason
    detail: str


@dataclass(slots=True)
class EventBatch:
    """Valid events of one polled batch, as arrays.  ``index`` maps rows back to the input."""

    ids: list[str]
    features: np.ndarray  # (b, n_features) float64, raw (before φ)
    labels: np.ndarray  # (b,) int64 class indices
    weights: np.ndarray  # (b,) float64
    timestamps: np.ndarray  # (b,) float64 epoch seconds, NaN when absent
    index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, rows: np.ndarray) -> EventBatch:
        """The events at ``rows`` (integer indices or a boolean mask), in order."""
        rows = np.flatnonzero(rows) if rows.dtype == bool else rows
        return EventBatch(
            ids=[self.ids[i] for i in rows.tolist()],
            features=self.features[rows],
            labels=self.labels[rows],
            weights=self.weights[rows],
            timestamps=self.timestamps[rows],
            index=self.index[rows],
        )

    @classmethod
    def from_arrays(cls, features: np.ndarray, labels: np.ndarray) -> EventBatch:
        """Already-valid events from arrays (class indices, weight 1, no timestamps; ids are the
        row numbers), for offline code and tests that need no JSON."""
        n = len(labels)
        return cls(
            ids=[str(i) for i in range(n)],
            features=np.asarray(features, dtype=np.float64),
            labels=np.asarray(labels, dtype=np.int64),
            weights=np.ones(n),
            timestamps=np.full(n, np.nan),
            index=np.arange(n),
        )


def _finite_number(v: Any) -> bool:
    """A JSON number (not a bool) that is finite as a float64; huge ints do not raise."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int beyond float range (JSON allows arbitrarily long integers)
        return False


def _parse_ts(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if _finite_number(value) else None
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value).timestamp()
        except (ValueError, OverflowError, OSError):
            return None
    return None


class _Invalid(Exception):
    """A message that breaks the decoder contract before field validation."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for ``json``: an object, or :class:`_Invalid` on a repeated key."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _Invalid(RejectReason.DUPLICATE_KEY, f"duplicate key {k!r}"[:200])
            seen.add(k)
    return obj


# A surrogate code point written as an escape (\uD800–\uDFFF); pairs are fine, lone ones are not.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _depth(obj: Any) -> int:
    """Container nesting depth (a scalar is 0), level by level without recursion."""
    depth, level = 0, [obj]
    while level := [c for c in level if isinstance(c, dict | list)]:
        depth += 1
        level = [v for c in level for v in (c.values() if isinstance(c, dict) else c)]
    return depth


def _strings_encodable(obj: Any) -> bool:
    stack = [obj]
    try:
        while stack:
            c = stack.pop()
            if isinstance(c, str):
                c.encode("utf-8")
            elif isinstance(c, dict):
                for k, v in c.items():
                    k.encode("utf-8")
                    stack.append(v)
            elif isinstance(c, list):
                stack.extend(c)
    except UnicodeEncodeError:
        return False
    return True


def load_standard(raw: bytes | str) -> Any:
    """The reference decoder: ``json`` plus the contract's rules; raises :class:`_Invalid`.

    The order of the checks is part of the contract (the first broken rule names the reason):
    UTF-8, syntax and duplicate keys (as the parser meets them), nesting, lone surrogates.
    """
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")  # strict: json.loads(bytes) would also take UTF-16/32
        except UnicodeDecodeError as exc:
            raise _Invalid(RejectReason.INVALID_JSON, f"not valid UTF-8: {exc}"[:200]) from None
    else:
        text = raw
        if not _strings_encodable(text):
            raise _Invalid(RejectReason.INVALID_JSON, "text holds a lone surrogate (not valid Unicode)")
    try:
        obj = json.loads(text, object_pairs_hook=_unique_pairs)
    except RecursionError:
        raise _Invalid(RejectReason.INVALID_JSON, f"nested deeper than {MAX_NESTING}") from None
    except ValueError as exc:  # JSONDecodeError, and ints over sys.get_int_max_str_digits()
        raise _Invalid(RejectReason.INVALID_JSON, str(exc)[:200]) from None
    if text.count("[") + text.count("{") > MAX_NESTING and _depth(obj) > MAX_NESTING:
        raise _Invalid(RejectReason.INVALID_JSON, f"nested deeper than {MAX_NESTING}")
    if _SURROGATE_ESCAPE.search(text) and not _strings_encodable(obj):
        raise _Invalid(RejectReason.INVALID_JSON, "a string holds a lone surrogate (not valid Unicode)")
    return obj


def _shape(obj: Any, level: int = 1) -> tuple[int, int, int]:
    """``(quotes, brackets, depth)`` of a parsed value, walking objects but not into lists.

    ``quotes`` counts the quote characters of its keys and string values, ``brackets`` its
    containers (a list counts, its items are not visited).  The source text of a value holds at
    least as many of each; exactly as many only when no key was repeated (a repeat is lost in
    parsing), no list holds a string or a container, and, without a backslash, no string holds
    a quote.  Then ``depth`` is the exact nesting depth.  The walk stops below ``MAX_NESTING``
    (orjson reads 1023 levels, far beyond Python's recursion limit).
    """
    if level > MAX_NESTING:
        return 0, 0, level  # too deep already: the standard decoder rejects it
    tp = type(obj)  # exact types: the hot path, and orjson/json only make these
    if tp is dict:
        quotes, brackets, depth = 2 * len(obj), 1, 0
        for v in obj.values():
            tv = type(v)
            if tv is str:
                quotes += 2
            elif tv is list:
                brackets += 1
                depth = depth or 1
            elif tv is dict:
                q, b, d = _shape(v, level + 1)
                quotes, brackets, depth = quotes + q, brackets + b, max(depth, d)
        return quotes, brackets, depth + 1
    if tp is list:
        return 0, 1, 1
    return (2, 0, 0) if tp is str else (0, 0, 0)


# Deleting every other byte leaves a short string to count the structural characters in.
_NOT_STRUCTURAL = bytes(sorted(set(range(256)) - set(b'"[{\\')))


def _counts(raw: bytes | str) -> tuple[int, int, bool]:
    """``(quotes, brackets, has_backslash)`` of a message's text."""
    if isinstance(raw, bytes):
        k = raw.translate(None, _NOT_STRUCTURAL)
        return k.count(b'"'), k.count(b"[") + k.count(b"{"), b"\\" in k
    return raw.count('"'), raw.count("[") + raw.count("{"), "\\" in raw


def load_fast(raws: Sequence[bytes | str]) -> list[Any]:
    """orjson, with :func:`load_standard` wherever orjson cannot prove the same answer.

    orjson already rejects what the contract rejects for Unicode, NaN and numbers beyond float64
    (those go to the standard decoder for their reason).  What it does not check — repeated keys
    and nesting up to its own limit — is ruled out by counting quotes and brackets (see
    :func:`_shape`), once over the whole batch; only a batch whose counts disagree is counted
    message by message, and only those messages (rare) take the standard decoder.  Returns one
    parsed value or :class:`_Invalid` per message.
    """
    out: list[Any]
    try:
        out = list(map(orjson.loads, raws))
        fast = list(range(len(raws)))
    except (orjson.JSONDecodeError, RecursionError):
        out, fast = [], []
        for i, raw in enumerate(raws):
            try:
                out.append(orjson.loads(raw))
                fast.append(i)
            except (orjson.JSONDecodeError, RecursionError):
                out.append(_standard_or_invalid(raw))
    shapes = [_shape(out[i]) for i in fast]
    if all(type(raws[i]) is bytes for i in fast) and all(d <= MAX_NESTING for _, _, d in shapes):
        text = np.frombuffer(b"".join([raws[i] for i in fast]), np.uint8)  # type: ignore[misc]
        q = int(np.count_nonzero(text == ord('"')))
        b = int(np.count_nonzero(text == ord("["))) + int(np.count_nonzero(text == ord("{")))
        backslash = bool(np.count_nonzero(text == ord("\\")))
        if not backslash and q == sum(s[0] for s in shapes) and b == sum(s[1] for s in shapes):
            return out  # every message's counts match (none can fall below its own)
    for i, (q, b, d) in zip(fast, shapes, strict=True):
        if d > MAX_NESTING or _counts(raws[i]) != (q, b, False):
            out[i] = _standard_or_invalid(raws[i])
    return out


def _standard_or_invalid(raw: bytes | str) -> Any:
    try:
        return load_standard(raw)
    except _Invalid as exc:
        return exc


def load_standard_batch(raws: Sequence[bytes | str]) -> list[Any]:
    """:func:`load_standard` per message: the reference the fast path is tested against."""
    return [_standard_or_invalid(raw) for raw in raws]


class _Floats:
    """A feature list already read as float64 (the simdjson path): its raw bytes and length.

    Every element was a JSON number (simdjson refuses ``true``, ``null``, strings and objects in a
    float buffer; nested lists were ruled out, see :func:`_simd_event`), so the only check left for
    it is the magnitude.
    """

    __slots__ = ("data", "n")

    def __init__(self, data: Any, n: int) -> None:
        self.data, self.n = data, n  # data: a buffer of n float64

    def __len__(self) -> int:
        return self.n

    def tolist(self) -> list[float]:
        return np.frombuffer(self.data, dtype=np.float64).tolist()


_TEXT = (bytes, str)
_BOM = b"\xef\xbb\xbf"
_FIELDS = frozenset(("id", "features", "label", "ts", "weight"))
_SCALARS = (str, int, float, bool, type(None))  # exact types; simdjson's containers are not these
_BUFFER = type(simdjson.Parser().parse(b"[0]").as_buffer(of_type="d"))  # csimdjson.ArrayBuffer
_local = threading.local()  # a simdjson.Parser serves one document at a time: one per thread


def _simd_event(parse: Any, raw: bytes) -> tuple[str, int | str, _Floats] | dict[str, Any] | None:
    """One message through simdjson, or None where it cannot prove the standard decoder's answer.

    simdjson itself rejects what the contract rejects for UTF-8, lone surrogates (raw or escaped),
    NaN/Infinity, numbers beyond float64 or 64-bit integers, control characters and trailing
    text; those messages return None, as does anything it accepts but the contract does not or
    that needs a walk: a byte-order mark, a repeated key, a key outside the event's own fields
    (``meta`` included), a container where a scalar field is expected, and a feature list that
    is not flat (``as_buffer`` would flatten ``[1, [2]]``: the message may hold one ``[`` only).
    A flat list of numbers comes back as :class:`_Floats`, read by simdjson straight into float64
    (correctly rounded, as ``float()`` does) without a Python float per element.

    A *plain* event — exactly ``id``, ``features``, ``label``, a non-empty string id, a label
    :meth:`Schema._label_index` cannot reject for its type or size — comes back as the tuple ``(id, label, features)`` (JSON never parses
    to a tuple), which :meth:`Schema.decode_batch` accepts in a few steps once the label is known
    and the width matches; any other record is a dict for the full rules.
    """
    if raw[:3] == _BOM:
        return None
    try:
        doc = parse(raw)
        if type(doc) is not simdjson.Object:
            return None
        if len(doc) == 3:  # three entries holding the three names: exactly those keys, once each
            try:
                eid, label, feats = doc["id"], doc["label"], doc["features"]
            except KeyError:
                pass
            else:
                tl = type(label)
                if (
                    type(eid) is str
                    and eid
                    and ((tl is str and label) or (tl is int and -MAX_LABEL_INT <= label <= MAX_LABEL_INT))
                    and type(feats) is simdjson.Array
                    and raw.count(b"[") == 1
                ):
                    return eid, label, _Floats(feats.as_buffer(of_type="d"), len(feats))
        keys = list(doc.keys())
        if len(set(keys)) != len(keys) or not _FIELDS.issuperset(keys):
            return None
        out: dict[str, Any] = {}
        for k in keys:
            v = doc[k]
            if k == "features" and type(v) is simdjson.Array:
                if raw.count(b"[") != 1:
                    return None
                v = _Floats(v.as_buffer(of_type="d"), len(v))
            elif type(v) not in _SCALARS:
                return None
            out[k] = v
        return out
    except (ValueError, TypeError, RuntimeError):  # not JSON, or not a flat list of numbers
        return None


@dataclass(slots=True)
class _Plain:
    """The plain events of a batch as columns (no tuple per event): ids, simdjson's float64
    buffers of the features, class indices and input positions; weight 1, no timestamp."""

    ids: list[str] = field(default_factory=list)
    rows: list[Any] = field(default_factory=list)
    codes: list[int] = field(default_factory=list)
    index: list[int] = field(default_factory=list)

    def entries(self, width: int) -> list[tuple[str, Any, int, float, float, int]]:
        """As :meth:`Schema.decode_batch`'s per-event entries (rows wrapped as :class:`_Floats`)."""
        rows = [_Floats(r, width) for r in self.rows]
        n = len(rows)
        return list(zip(self.ids, rows, self.codes, [1.0] * n, [math.nan] * n, self.index, strict=True))


def _plain_labels(known: dict[str, int]) -> dict[str | int, int]:
    """``known`` keyed as the plain pass reads labels: each non-empty string key as itself, and
    each key that is an integer's ``str()`` within ±:data:`MAX_LABEL_INT` also as that integer
    (so an int label is looked up by value, without a ``str()`` per event).  Only exact ``str``
    and ``int`` labels are looked up here, so ``True`` or ``1.0`` never match ``1``; a label
    that is empty, beyond the bound or unknown finds nothing and takes the full rules."""
    out: dict[str | int, int] = {key: code for key, code in known.items() if key}
    for key, code in known.items():
        try:
            value = int(key)
        except ValueError:
            continue
        if str(value) == key and -MAX_LABEL_INT <= value <= MAX_LABEL_INT:
            out[value] = code
    return out


def _plain_events(
    raws: Sequence[bytes | str | None], known: dict[str, int], width: int, max_bytes: int
) -> tuple[_Plain, list[int]]:
    """The plain events of a batch whose label is already known and whose width is ``width``,
    accepted in one pass (the hot path of :meth:`Schema.decode_batch` with simdjson).

    Returns ``(valid, rest)``: the valid events as columns (:class:`_Plain`; the features are
    simdjson's float64 buffer itself, ``width`` numbers; :func:`_floats` wraps it where a row is
    needed), and the input positions of every other message, for the full rules.  An event
    is taken here only where :func:`_simd_event` would return its plain tuple *and* the full rules
    would then accept it whatever came before it in the batch (earlier messages can only add
    labels or set the width, never take one away): the same answer, minus the per-message calls.
    Messages that do not start with ``{`` (whitespace, a byte-order mark, not an object), or are
    empty or too large, go to ``rest``.

    The per-message loop only parses and reads the three fields (each message's document must be
    dropped before the next parse); the checks that need no document — the label's class, and a
    feature list that is flat (``as_buffer`` would flatten ``[1, [2]]``, so the message may hold
    one ``[`` only) — run once over the batch's columns afterwards.
    """
    parser = getattr(_local, "parser", None)
    if parser is None:
        parser = _local.parser = simdjson.Parser()
    parse = parser.parse
    taken: list[tuple[int, str, str | int, Any]] = []  # (position, id, label, float64 buffer)
    take = taken.append
    rest: list[int] = []
    skip = rest.append
    doc = feats = eid = label = None
    for i, raw in enumerate(raws):
        if type(raw) is bytes and 0 < len(raw) <= max_bytes and raw[0] == 123:  # "{"
            try:
                doc = parse(raw)
                feats = doc["features"]
                # Three entries holding the three names: exactly those keys, once each.
                if len(doc) == 3 and len(feats) == width:
                    eid, label = doc["id"], doc["label"]
                    if type(eid) is str and eid and (type(label) is str or type(label) is int):
                        # AttributeError: features is a string or an object, not a list;
                        # ValueError: an element is not a number.
                        take((i, eid, label, feats.as_buffer(of_type="d")))
                        doc = feats = None  # a parser serves one document: drop its views
                        continue
            except (KeyError, ValueError, TypeError, AttributeError, RuntimeError):
                pass
            doc = feats = eid = label = None  # eid or label may be views of the document too
        skip(i)
    valid = _Plain()
    if not taken:
        return valid, rest
    index, ids, labels, rows = (list(c) for c in zip(*taken, strict=True))
    codes = list(map(_plain_labels(known).get, labels))
    texts = raws if len(index) == len(raws) else [raws[i] for i in index]
    # Each taken message holds a "[" (its features): one per message in all proves every one flat.
    flat = np.count_nonzero(np.frombuffer(b"".join(texts), np.uint8) == 91) == len(index)  # type: ignore[arg-type]
    if flat and None not in codes:
        valid.ids, valid.rows, valid.codes, valid.index = ids, rows, codes, index
        return valid, rest
    for k, (i, raw) in enumerate(zip(index, texts, strict=True)):
        # find() is a memchr: the second "[" of a list that is not flat, if any.
        if codes[k] is None or (not flat and raw.find(b"[", raw.find(b"[") + 1) >= 0):  # type: ignore[union-attr]
            rest.append(i)
        else:
            valid.ids.append(ids[k])
            valid.rows.append(rows[k])
            valid.codes.append(codes[k])  # type: ignore[arg-type]
            valid.index.append(i)
    rest.sort()
    return valid, rest


def load_simd(raws: Sequence[bytes | str]) -> list[Any]:
    """simdjson for typical events, :func:`load_fast` for every message it cannot vouch for.

    Typical events (bytes with flat numeric features and scalar fields) skip the Python floats
    that orjson builds, one per feature, which was most of the decoding time (docs/benchmarks.md,
    *engine*).  Returns one parsed value or :class:`_Invalid` per message, like the other loaders.
    """
    parser = getattr(_local, "parser", None)
    if parser is None:
        parser = _local.parser = simdjson.Parser()
    parse = parser.parse
    out: list[Any] = [None] * len(raws)
    rest: list[int] = []
    for i, raw in enumerate(raws):
        rec = _simd_event(parse, raw) if type(raw) is bytes else None
        if rec is None:
            rest.append(i)
        else:
            out[i] = rec
    if rest:
        for i, value in zip(rest, load_fast([raws[i] for i in rest]), strict=True):
            out[i] = value
    return out


_LOADERS = {"simdjson": load_simd, "orjson": load_fast, "json": load_standard_batch}


class Schema:
    """The label space and feature width, configured or learned, and the batch decoder.

    Labels are matched as strings (``1`` and ``"1"`` are the same class).  Until the schema is
    frozen, ``decode_batch(..., learn=True)`` adds new labels in order of first appearance and
    takes the feature width from the first valid event.

    The label space belongs to the trusted side: configured ``classes`` are final; otherwise
    ``decode_batch(..., trusted=True)`` (reference events) adds labels even once frozen, and
    sets :attr:`trusted` — from then on untrusted calls never add one (``learn`` is ignored).

    ``parser`` picks the JSON parser: ``"simdjson"`` (the fast path: simdjson for typical events,
    orjson for the rest), ``"orjson"`` or ``"json"`` (the standard library, the reference the
    others are tested against); all give identical results.
    """

    def __init__(
        self, settings: SchemaSettings, *, parser: Literal["simdjson", "orjson", "json"] = "simdjson"
    ) -> None:
        self.settings = settings
        self.classes: list[int | str] = list(settings.classes or [])
        self._index = {str(c): i for i, c in enumerate(self.classes)}
        self.n_features: int | None = settings.n_features
        self.frozen = settings.classes is not None
        # True once a trusted source (configured classes, a reference set) defines the labels.
        self.trusted = settings.classes is not None
        self._loads = _LOADERS[parser]

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def freeze(self) -> None:
        """Stop learning labels; later unseen labels are ``unknown_label``."""
        if len(self.classes) < 2:
            raise SchemaError(
                f"cannot freeze the label space with {len(self.classes)} class(es) "
                f"{self.classes!r}: configure schema.classes or send more varied warm-up data"
            )
        self.frozen = True

    def state_dict(self) -> dict[str, Any]:
        return {
            "classes": self.classes,
            "n_features": self.n_features,
            "frozen": self.frozen,
            "trusted": self.trusted,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.classes = list(state["classes"])
        self._index = {str(c): i for i, c in enumerate(self.classes)}
        self.n_features = state["n_features"]
        self.frozen = bool(state["frozen"])
        # Older checkpoints: configured classes were the only trusted label source.
        self.trusted = bool(state.get("trusted", self.settings.classes is not None))

    def may_learn(self, learn: bool, trusted: bool = False) -> bool:
        """Whether a decode call with these flags may add labels (and set the width)."""
        if self.settings.classes is not None:
            return False
        return trusted or (learn and not self.frozen and not self.trusted)

    def _label_index(self, label: Any, learn: bool) -> tuple[int, Reject | None]:
        if isinstance(label, bool) or not isinstance(label, int | str) or label == "":
            return -1, Reject(-1, RejectReason.INVALID_LABEL, f"label must be int or str, got {label!r}")
        if isinstance(label, int) and abs(label) > MAX_LABEL_INT:
            return -1, Reject(-1, RejectReason.INVALID_LABEL, f"integer label beyond ±{MAX_LABEL_INT}")
        key = str(label)
        idx = self._index.get(key)
        if idx is not None:
            return idx, None
        if learn and len(self.classes) < self.settings.max_classes:
            self.classes.append(label)
            self._index[key] = len(self.classes) - 1
            return len(self.classes) - 1, None
        return -1, Reject(-1, RejectReason.UNKNOWN_LABEL, f"label {label!r} not in {self.classes!r}")

    def decode_batch(
        self, raws: Sequence[bytes | str | None], *, learn: bool = False, trusted: bool = False
    ) -> tuple[EventBatch, list[Reject]]:
        """Decode raw messages; valid events become an :class:`EventBatch`, the rest rejects.

        ``learn`` lets this call add labels (and set the width) while the schema is neither
        frozen nor trusted; ``trusted`` (reference events) adds labels unless they are
        configured, and makes the label space trusted.  See :meth:`may_learn`.
        """
        learn = self.may_learn(learn, trusted)
        if trusted:
            self.trusted = True
        max_bytes = self.settings.max_event_bytes
        max_abs = self.settings.max_abs_feature
        # One (id, features, class, weight, timestamp, input index) per valid event, in input order.
        valid: list[tuple[str, list[Any] | _Floats, int, float, float, int]] = []
        rejects: list[Reject] = []

        def reject(i: int, reason: RejectReason, detail: str) -> None:
            # Details quote the offending value (an id may be a megabyte-long list): keep them short.
            rejects.append(Reject(i, reason, detail if len(detail) <= 300 else detail[:297] + "..."))

        fast = _Plain()
        todo: Sequence[int] = range(len(raws))
        fast_width = self.n_features
        if self._loads is load_simd and fast_width:
            fast, todo = _plain_events(raws, self._index, fast_width, max_bytes)
        parse: list[int] = []
        for i in todo:
            raw = raws[i]
            # strip() copies the message: only one that starts with whitespace can be all whitespace.
            if (
                raw is None
                or len(raw) == 0
                or (isinstance(raw, _TEXT) and raw[:1].isspace() and not raw.strip())
            ):
                reject(i, RejectReason.EMPTY, "empty message")
            elif len(raw) > max_bytes:
                reject(i, RejectReason.TOO_LARGE, f"{len(raw)} bytes > max_event_bytes={max_bytes}")
            else:
                parse.append(i)
        # The standard parser also reads NaN/Infinity and out-of-range numbers, so such events
        # get their precise reason (non_finite) below instead of invalid_json.
        parsed = self._loads([raws[i] for i in parse])  # type: ignore[misc]
        known = self._index
        for i, obj in zip(parse, parsed, strict=True):
            if type(obj) is tuple:  # a plain event (see _simd_event): accepted in a few steps
                eid, lab, feats = obj
                code = known.get(lab if type(lab) is str else str(lab))
                if code is not None and feats.n == self.n_features:
                    valid.append((eid, feats, code, 1.0, math.nan, i))
                    continue
                obj = {"id": eid, "features": feats, "label": lab}  # learn or reject: the full rules
            raw = raws[i]
            if isinstance(obj, _Invalid):
                reject(i, obj.reason, obj.detail)
                continue
            if not isinstance(obj, dict):
                reject(i, RejectReason.NOT_AN_OBJECT, f"expected a JSON object, got {type(obj).__name__}")
                continue
            missing = [k for k in ("id", "features", "label") if k not in obj]
            if missing:
                reject(i, RejectReason.MISSING_FIELD, f"missing {', '.join(missing)}")
                continue
            eid = obj["id"]
            if not isinstance(eid, str) or not eid:
                reject(i, RejectReason.INVALID_ID, f"id must be a non-empty string, got {eid!r}")
                continue
            feats = obj["features"]
            if not isinstance(feats, list | _Floats) or not feats:
                reject(i, RejectReason.INVALID_FEATURES, "features must be a non-empty list of numbers")
                continue
            width = self.n_features
            if width is not None and len(feats) != width:
                reject(i, RejectReason.WRONG_DIMENSION, f"{len(feats)} features, expected {width}")
                continue
            # numpy would silently read true/false as 1/0 in the vectorised pass below; the byte
            # search keeps the per-element check off the hot path (_Floats hold numbers only).
            if type(feats) is list and _may_hold_bool(raw) and any(isinstance(v, bool) for v in feats):
                reject(i, RejectReason.INVALID_FEATURES, _FEATURE_DETAIL[RejectReason.INVALID_FEATURES])
                continue
            w = obj.get("weight", 1.0)
            if not (_finite_number(w) and w >= 0):
                reject(i, RejectReason.INVALID_WEIGHT, f"weight must be a finite number ≥ 0, got {w!r}")
                continue
            ts = math.nan
            if obj.get("ts") is not None:
                parsed = _parse_ts(obj["ts"])
                if parsed is None:
                    reject(
                        i,
                        RejectReason.INVALID_TIMESTAMP,
                        f"ts must be epoch seconds or ISO 8601, got {obj['ts']!r}",
                    )
                    continue
                ts = parsed
            if "meta" in obj and obj["meta"] is not None and not isinstance(obj["meta"], dict):
                reject(i, RejectReason.INVALID_META, "meta must be an object")
                continue
            # Label last: a valid label may be *learned*, so only learn from otherwise-valid events.
            # Features are checked by the vectorised pass below, which can still reject the row,
            # so that check is repeated here cheaply before a label is learned.
            if learn and str(obj["label"]) not in self._index and not _numeric_finite(feats, max_abs):
                reason = _feature_problem(feats, max_abs)
                reject(i, reason, _FEATURE_DETAIL[reason])
                continue
            label, bad = self._label_index(obj["label"], learn)
            if bad is not None:
                reject(i, bad.reason, bad.detail)
                continue
            if width is None:
                if not _numeric_finite(feats, max_abs):
                    reason = _feature_problem(feats, max_abs)
                    reject(i, reason, _FEATURE_DETAIL[reason])
                    continue
                self.n_features = len(feats)
            valid.append((eid, feats, label, float(w), ts, i))

        width = self.n_features or 0
        if fast.ids and not valid:  # every valid event is plain (the hot path): no entry per event
            n = len(fast.ids)
            rows: list[Any] = fast.rows
            X = _stack(rows, width)
            batch = EventBatch(
                ids=fast.ids,
                features=X,
                labels=np.array(fast.codes, dtype=np.int64),
                weights=np.ones(n),
                timestamps=np.full(n, math.nan),
                index=np.array(fast.index, dtype=np.int64),
            )
        else:
            if fast.ids:  # plain events were accepted first: merge them back into input order
                valid = sorted(fast.entries(width) + valid, key=lambda v: v[5])
            ids, rows, labels, weights, stamps, index = (
                (list(c) for c in zip(*valid, strict=True)) if valid else ([], [], [], [], [], [])
            )
            X = _stack(rows, width)
            batch = EventBatch(
                ids=ids,
                features=X,
                labels=np.asarray(labels, dtype=np.int64),
                weights=np.asarray(weights, dtype=np.float64),
                timestamps=np.asarray(stamps, dtype=np.float64),
                index=np.asarray(index, dtype=np.int64),
            )
        # NaN compares False, so these tests reject non-finite and out-of-range rows alike; the
        # matrix's extremes first (two reductions, no temporaries), rows only when one is off.
        if len(rows) and not (-max_abs <= X.min() and X.max() <= max_abs):
            ok = (np.abs(X) <= max_abs).all(axis=1)
            for pos in np.flatnonzero(~ok).tolist():
                reason = _feature_problem(_floats(rows[pos], width), max_abs)
                reject(int(batch.index[pos]), reason, _FEATURE_DETAIL[reason])
            batch = batch.subset(ok)
        rejects.sort(key=lambda r: r.index)
        return batch, rejects


def _floats(row: Any, width: int) -> Any:
    """A row of :meth:`Schema.decode_batch`: a bare simdjson buffer becomes :class:`_Floats`."""
    return _Floats(row, width) if type(row) is _BUFFER else row


def _may_hold_bool(raw: bytes | str) -> bool:
    if isinstance(raw, str):
        return "true" in raw or "false" in raw
    return b"true" in raw or b"false" in raw


def _numeric_finite(feats: list[Any] | _Floats, limit: float = math.inf) -> bool:
    values = feats.tolist() if type(feats) is _Floats else feats
    return all(_finite_number(v) and abs(v) <= limit for v in values)


_FEATURE_DETAIL = {
    RejectReason.INVALID_FEATURES: "features must be numbers (found a string, bool, null or list)",
    RejectReason.NON_FINITE: "features contain NaN, Infinity or a number beyond float64 range",
    RejectReason.OUT_OF_RANGE: "a feature's magnitude exceeds schema.max_abs_feature",
}


def _feature_problem(feats: list[Any] | _Floats, limit: float = math.inf) -> RejectReason:
    """Why a feature row is unusable: a non-number, a non-finite number, or one too large."""
    values = feats.tolist() if type(feats) is _Floats else feats
    if any(isinstance(v, bool) or not isinstance(v, int | float) for v in values):
        return RejectReason.INVALID_FEATURES
    if not all(_finite_number(v) for v in values):
        return RejectReason.NON_FINITE
    return RejectReason.OUT_OF_RANGE


def _stack(rows: list[list[Any] | _Floats], width: int) -> np.ndarray:
    """Stack feature rows into a float64 matrix; non-numbers become NaN (then rejected).

    Rows already read as float64 (:class:`_Floats`) are joined and viewed in one call.
    """
    if not rows:
        return np.zeros((0, width))
    if type(rows[0]) is _BUFFER:  # the plain-event pass's buffers (never mixed with other rows)
        # Joined into a bytearray: the array is writable without a second copy.
        return np.frombuffer(bytearray().join(rows), dtype=np.float64).reshape(len(rows), width)  # type: ignore[arg-type]
    floats = [r for r, row in enumerate(rows) if type(row) is _Floats]
    if len(floats) == len(rows):
        joined = b"".join([row.data for row in rows])  # type: ignore[union-attr]
        return np.frombuffer(joined, dtype=np.float64).reshape(len(rows), width).copy()
    if not floats:
        return _stack_lists(rows, width)  # type: ignore[arg-type]
    X = np.empty((len(rows), width))
    lists = [r for r, row in enumerate(rows) if type(row) is not _Floats]
    X[floats] = _stack([rows[r] for r in floats], width)
    X[lists] = _stack_lists([rows[r] for r in lists], width)  # type: ignore[misc]
    return X


def _stack_lists(rows: list[list[Any]], width: int) -> np.ndarray:
    try:
        X = np.array(rows)
        # Only plain numbers take the fast path: numpy would silently parse "1.5" or True.
        if X.ndim == 2 and X.dtype.kind in "fiu":
            return X.astype(np.float64, copy=False)
    except (TypeError, ValueError, OverflowError):
        pass
    X = np.empty((len(rows), width))
    for r, feats in enumerate(rows):  # slow path, only for batches holding a malformed row
        X[r] = [float(v) if _finite_number(v) else math.nan for v in feats]
    return X

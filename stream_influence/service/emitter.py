"""The emitter: builds a chunk's output records and produces them.

Every consumed event ends in exactly one place: applied (optionally with an accepted copy),
quarantined (a quarantine copy) or dead-lettered (a dead letter with its reason and original
bytes).  A record that cannot be built or sent dead-letters its own message (reason
``output_failed``); only broker trouble rolls the window back (the loop does that at the next
checkpoint).  What every output of a chunk shares — source topic and partition, policy and model
versions — is encoded once per chunk (:class:`~stream_influence.io.records.ChunkHeaders`).
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from itertools import repeat
from operator import attrgetter, itemgetter
from typing import NamedTuple

import numpy as np

from stream_influence.config import KafkaSettings
from stream_influence.core.engine import BatchResult
from stream_influence.errors import OutputError
from stream_influence.io.broker import (
    BrokerProducer,
    ConsumedRecord,
    Delivery,
    Headers,
    OutputRecord,
    TopicPartition,
)
from stream_influence.io.records import (
    OUTPUT_FAILED,
    ChunkHeaders,
    decision_value,
    encode_key,
    fit_record,
    fit_records,
    header_dict,
    value_proof,
)

__all__ = ["Emitter", "OutputsNotAcknowledged", "Sent"]

log = logging.getLogger(__name__)


class OutputsNotAcknowledged(Exception):
    """Outputs of the window were not acknowledged: the window must be rolled back."""


class Sent(NamedTuple):
    """An output in flight, with the input message it stands for (to dead-letter it instead if
    the broker refuses this one record).  A named tuple: one is made per output."""

    delivery: Delivery
    tp: TopicPartition
    message: ConsumedRecord
    #: The event's one destination (dead letter / quarantine copy), not an audit copy.
    destination: bool


#: Called for an output that cannot be sent, with its position in the batch and why.
Refused = Callable[[int, str], None]

# A chunk's named tuples (outputs, in-flight entries) are built by map(tuple.__new__, ...) over
# their columns: in C, without a Python-level __new__ frame per record.
_new = tuple.__new__
_VALUE, _HEADERS, _OFFSET = attrgetter("value"), attrgetter("headers"), attrgetter("offset")
_DELIVERY, _ERROR = itemgetter(0), attrgetter("error")


def _copy_key(event_id: str | None, tp: TopicPartition, offset: int) -> bytes:
    """Key of an audit copy: the event id, else (none, or not encodable) the source coordinates."""
    if event_id is not None:
        with contextlib.suppress(OutputError):
            return encode_key(event_id)
    return f"{tp.topic}-{tp.partition}-{offset}".encode()


class Emitter:
    """Produces outputs through one :class:`~stream_influence.io.broker.BrokerProducer` (set by the
    loop; replaced after a rollback) and keeps what is in flight until the next :meth:`settle`."""

    def __init__(self, k: KafkaSettings, count: Callable[[str, int], None]) -> None:
        self.k = k
        self._count = count  # (output kind, n) → metrics
        self.producer: BrokerProducer | None = None
        self.inflight: list[Sent] = []
        #: Broker trouble while queueing an output of this window (it is rolled back).
        self.send_error: BaseException | None = None
        self.last_failure = ""  # the latest output failure, named by source topic-partition@offset
        self.outputs: dict[str, int] = defaultdict(int)

    def count(self, kind: str, n: int) -> None:
        """``n`` more outputs of ``kind`` (the checkpoint's counters and the metrics)."""
        if n:
            self.outputs[kind] += n
            self._count(kind, n)

    # -- producing ------------------------------------------------------------------------
    def send_many(
        self,
        recs: Sequence[OutputRecord | str],
        tp: TopicPartition,
        msgs: Sequence[ConsumedRecord],
        *,
        destination: bool,
        refused: Refused,
        header_bound: tuple[int, int] | None = None,
    ) -> None:
        """Queue ``recs[i]`` (cut to the producer's size limit) for input message ``msgs[i]``,
        in order, handing the producer as many at a time as it will take.  An entry that is a
        ``str`` is an output that could not be built (why).  For each output that cannot be
        sent — not built, not cut to fit, or refused by the producer for itself —
        ``refused(i, why)`` is called before the outputs after it are queued, so what it
        produces instead (a dead letter) lands where one-by-one sends would have put it.  Broker
        trouble stops here: the window is rolled back at the next checkpoint.  ``header_bound``:
        (characters, count) that no record's headers exceed, where the caller knows it
        (:func:`~stream_influence.io.records.fit_records`)."""
        if self.send_error is not None:
            return  # this window is rolled back at the next checkpoint anyway
        producer = self.producer
        if producer is None:
            self.send_error = OutputsNotAcknowledged("no producer for the outputs")
            return
        limit = producer.max_request_size
        inflight = self.inflight
        i, n = 0, len(recs)
        # The usual chunk: every output built and the whole chunk provably within the size
        # limit, checked at once; else each output on its own, up to the first that is not.
        whole = str not in map(type, recs) and fit_records(recs, limit, header_bound)  # type: ignore[arg-type]
        while i < n:
            # The outputs up to the next one that cannot be built or cut ...
            ready: Sequence[OutputRecord]
            why: str | None = None
            if whole:
                ready, end = recs, n  # type: ignore[assignment]
            else:
                ready, end = [], i
                while end < n:
                    rec = recs[end]
                    if isinstance(rec, str):
                        why = rec
                        break
                    try:
                        # Cut before produce: the producer must never raise for a size we can know.
                        ready.append(fit_record(rec, limit))  # type: ignore[attr-defined]
                    except Exception as exc:  # a size that cannot fit, an unencodable header
                        why = f"{type(exc).__name__}: {exc}"
                        break
                    end += 1
            # ... go to the producer together, up to each one it refuses.
            k = 0
            while k < len(ready):
                try:
                    queued = producer.produce_many(ready[k:] if k else ready)
                except Exception as exc:  # BrokerTrouble; anything else leaves unknown what was queued
                    m = msgs[i + k]
                    self.last_failure = f"{ready[k].topic} for {tp.topic}-{tp.partition}@{m.offset}: {exc}"
                    log.error(
                        "cannot produce an output (%s): the window will be rolled back", self.last_failure
                    )
                    self.send_error = exc
                    return
                got = len(queued.deliveries)
                inflight.extend(
                    map(
                        _new,
                        repeat(Sent, got),
                        zip(queued.deliveries, repeat(tp), msgs[i + k : i + k + got], repeat(destination)),
                    )
                )
                k += got
                if queued.refused is not None:  # this record only: encoding, serialisation, size
                    refused(i + k, str(queued.refused))
                    k += 1
                    if self.send_error is not None:
                        return
            if why is not None:
                refused(end, why)
                if self.send_error is not None:
                    return
                end += 1
            i = end

    def send(
        self, rec: OutputRecord, tp: TopicPartition, m: ConsumedRecord, *, destination: bool
    ) -> str | None:
        """Queue one output (:meth:`send_many`).  Returns why *this record* cannot be sent (the
        caller dead-letters its message), or None: queued, or broker trouble that rolls the
        whole window back."""
        why: list[str] = []
        self.send_many([rec], tp, [m], destination=destination, refused=lambda _, w: why.append(w))
        return why[0] if why else None

    def _send_copies(self, recs: list[OutputRecord], tp: TopicPartition, msgs: list[ConsumedRecord]) -> None:
        """Accepted copies or decision records: audits, not the events' destinations, so a refused
        one is logged (the event already is in its one place) rather than dead-lettered."""

        def refused(i: int, why: str) -> None:
            m = msgs[i]
            log.error("%s-%d@%d: no copy to %s: %s", tp.topic, tp.partition, m.offset, recs[i].topic, why)

        self.send_many(recs, tp, msgs, destination=False, refused=refused)

    def dead_letters(
        self, tp: TopicPartition, letters: Sequence[tuple[ConsumedRecord, str, str]], h: ChunkHeaders
    ) -> None:
        """Each input message ``m`` of ``letters`` (message, reason, detail) to the dead-letter
        topic, with its original key, value and headers."""
        topic = self.k.dead_letter_topic
        recs = [
            OutputRecord(
                topic, key=m.key, value=m.value, headers=h.dead_letter(m.headers, reason, detail, m.offset)
            )
            for m, reason, detail in letters
        ]

        def refused(i: int, why: str) -> None:  # e.g. an input header that cannot be re-encoded
            m, _, detail = letters[i]
            self.minimal_dead_letter(tp, m, f"{detail}; dead letter refused: {why}")

        self.send_many(recs, tp, [m for m, _, _ in letters], destination=True, refused=refused)
        self.count("dead_letter", len(letters))

    def dead_letter(
        self, tp: TopicPartition, m: ConsumedRecord, reason: str, detail: str, h: ChunkHeaders
    ) -> None:
        """The input message ``m`` to the dead-letter topic (original key, value and headers)."""
        self.dead_letters(tp, [(m, reason, detail)], h)

    def minimal_dead_letter(self, tp: TopicPartition, m: ConsumedRecord, detail: str) -> None:
        """The last resort for a message whose full dead letter cannot be sent: our own headers
        only, an empty value, the original's size and SHA-256.  If even that fails, the window
        is rolled back (bounded by ``kafka.max_window_replays``): nothing is dropped silently."""
        h = ChunkHeaders(tp.topic, tp.partition)
        headers = [*h.dead_letter(None, OUTPUT_FAILED, detail, m.offset), *value_proof(m.value)]
        rec = OutputRecord(self.k.dead_letter_topic, key=None, value=b"", headers=headers)
        why = self.send(rec, tp, m, destination=True)
        if why is not None and self.send_error is None:
            self.last_failure = f"dead letter for {tp.topic}-{tp.partition}@{m.offset}: {why}"
            log.error("cannot produce even a minimal dead letter (%s)", self.last_failure)
            self.send_error = OutputError(self.last_failure)

    def quarantine_copies(
        self,
        tp: TopicPartition,
        msgs: Sequence[ConsumedRecord],
        event_ids: Sequence[str],
        headers: Sequence[Headers],
        h: ChunkHeaders,
        header_bound: tuple[int, int] | None = None,
    ) -> dict[int, str]:
        """The quarantine copy of each message ``msgs[i]`` (its value, keyed by its event id, with
        ``headers[i]``) — the event's one place.  Returns why, by position, for the copies that
        could not be sent: those messages are dead-lettered instead."""
        topic = self.k.quarantine_topic
        recs: list[OutputRecord | str]
        try:
            keys = list(map(str.encode, event_ids))  # a chunk's keys at once
        except UnicodeEncodeError:
            keys = None  # an id that cannot be a key: each on its own, that copy refused below
        if keys is not None:
            n = len(msgs)
            recs = list(
                map(
                    _new,
                    repeat(OutputRecord, n),
                    zip(repeat(topic, n), keys, map(_VALUE, msgs), headers, strict=True),
                )
            )
        else:
            recs = []
            for m, event_id, hs in zip(msgs, event_ids, headers, strict=True):
                try:
                    recs.append(OutputRecord(topic, key=encode_key(event_id), value=m.value, headers=hs))
                except OutputError as exc:
                    recs.append(str(exc))
        failed: dict[int, str] = {}

        def refused(i: int, why: str) -> None:
            m = msgs[i]
            why = f"quarantine copy: {why}"
            log.warning("%s-%d@%d: %s; dead-lettered instead", tp.topic, tp.partition, m.offset, why)
            self.dead_letter(tp, m, OUTPUT_FAILED, why, h)
            failed[i] = why

        self.send_many(recs, tp, msgs, destination=True, refused=refused, header_bound=header_bound)
        return failed

    def emit(
        self,
        tp: TopicPartition,
        msgs: list[ConsumedRecord],
        r: BatchResult,
        *,
        quarantine_copies: bool = True,
    ) -> None:
        """Produce the chunk's outputs: dead letters, quarantine copies (unless a score worker
        leaves them to the updater), then the optional accepted copies and decision records —
        each kind handed to the producer a chunk at a time."""
        k = self.k
        topic, part = tp.topic, tp.partition
        h = ChunkHeaders(topic, part, r.policy_version, r.model_version)
        if r.rejects:
            self.dead_letters(tp, [(msgs[rej.index], rej.reason.value, rej.detail) for rej in r.rejects], h)
        index = r.events.index.tolist()
        ids = r.events.ids
        failed: dict[int, str] = {}  # input index → why its quarantine copy failed
        quarantined = np.flatnonzero(r.quarantine).tolist() if quarantine_copies else []
        if quarantined:
            q_msgs = list(map(msgs.__getitem__, map(index.__getitem__, quarantined)))
            originals = list(map(_HEADERS, q_msgs))
            reasons = list(map(r.reasons.__getitem__, quarantined))
            s = r.scores
            headers = h.quarantine_many(
                originals,
                list(map(_OFFSET, q_msgs)),
                reasons=reasons,
                influence=s.influence[quarantined],
                relative_influence=s.relative_influence[quarantined],
                cosine_influence=s.cosine_influence[quarantined],
                threshold=r.thresholds[quarantined],
            )
            q_ids = list(map(ids.__getitem__, quarantined))
            bound = h.quarantine_bound(originals, reasons)
            why = self.quarantine_copies(tp, q_msgs, q_ids, headers, h, header_bound=bound)
            failed = {index[quarantined[i]]: w for i, w in why.items()}
        self.count("quarantine", len(quarantined) - len(failed))
        if k.accepted_topic:
            accepted = np.flatnonzero(~r.quarantine).tolist()
            a_msgs = [msgs[index[j]] for j in accepted]
            sources = h.source_many([m.offset for m in a_msgs])
            recs = [
                OutputRecord(k.accepted_topic, key=_copy_key(ids[j], tp, m.offset), value=m.value, headers=hs)
                for j, m, hs in zip(accepted, a_msgs, sources, strict=True)
            ]
            self._send_copies(recs, tp, a_msgs)
            self.count("accepted", len(recs))
        if k.decisions_topic:
            recs = []
            for i, rec_d in enumerate(r.records()):
                m = msgs[i]
                if i in failed:  # the audit says where the event really went
                    rec_d = {**rec_d, "decision": "dead_letter", "reason": OUTPUT_FAILED, "detail": failed[i]}
                key = _copy_key(rec_d["id"], tp, m.offset)
                value = decision_value(rec_d, topic, part, m.offset)
                recs.append(OutputRecord(k.decisions_topic, key=key, value=value, headers=[]))
            self._send_copies(recs, tp, msgs)
            self.count("decisions", len(msgs))

    # -- acknowledgement ------------------------------------------------------------------
    def _flush(self, timeout_s: float) -> None:
        if self.producer is not None:
            self.producer.flush(timeout_s)
        elif self.inflight:
            raise OutputsNotAcknowledged("no producer for the pending outputs")

    def settle(self, timeout_s: float) -> None:
        """Flush and check every output of the window was acknowledged.  Records the broker
        refused *themselves* dead-letter their message as a minimal record and are flushed again.
        Raises :class:`OutputsNotAcknowledged` (or :class:`BrokerTrouble`) if outputs are still
        not acknowledged: the caller rolls the window back."""
        if self.send_error is not None:
            raise OutputsNotAcknowledged(f"an output could not be sent: {self.send_error!r}")
        self._flush(timeout_s)
        failed = self._failed()
        if failed and not any(f.delivery.transient for f in failed):
            # The broker refused these records themselves (too large for its limit, invalid):
            # their messages go to the dead-letter topic as a minimal record instead.
            for f in failed:
                self._refused(f)
            self.inflight = [f for f in self.inflight if not f.delivery.failed()]
            if self.send_error is not None:
                raise OutputsNotAcknowledged(f"an output could not be sent: {self.send_error!r}")
            self._flush(timeout_s)
            failed = self._failed()
        if failed:
            f = failed[0]
            self.last_failure = (
                f"{f.delivery.record.topic} for {f.tp.topic}-{f.tp.partition}@{f.message.offset}: "
                f"{f.delivery.error!r}"
            )
            raise OutputsNotAcknowledged(f"{len(failed)} output message(s) failed, first {self.last_failure}")
        self.inflight.clear()

    def _failed(self) -> list[Sent]:
        """The in-flight outputs whose delivery failed.  Usually none: that is made sure of in C
        (any error set?) before a Python step per output looks closer."""
        inflight = self.inflight
        if not any(map(_ERROR, map(_DELIVERY, inflight))):
            return []
        return [f for f in inflight if f.delivery.failed()]

    def _refused(self, f: Sent) -> None:
        """The broker refused one output record (not broker trouble): dead-letter its message."""
        where = f"{f.tp.topic}-{f.tp.partition}@{f.message.offset}"
        why = f"{f.delivery.record.topic} refused the record: {f.delivery.error!r}"
        if not f.destination:
            log.error("%s: no copy to %s", where, why)
            return
        log.warning("%s: %s; dead-lettered instead", where, why)
        was = header_dict(f.delivery.record.headers).get("reason", "quarantine")
        self.minimal_dead_letter(f.tp, f.message, f"{was}: {why}")

    def discard(self) -> None:
        """Forget the window's outputs and the producer (a rollback): the idempotent producer
        cannot survive a broker that lost its state; a fresh one always can."""
        self.inflight.clear()
        self.send_error = None
        if self.producer is not None:
            with contextlib.suppress(Exception):
                self.producer.close(0)
        self.producer = None

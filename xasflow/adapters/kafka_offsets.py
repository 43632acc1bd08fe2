"""Per-partition offset bookkeeping of a Kafka consumer-group member: the at-least-once rule.

The processing thread takes documents (:meth:`PartitionOffsets.take`) and, after each turn,
marks them processed: every document taken by then has gone through the assembler, the
pipeline and the sinks. A partition's *committable* offset is the one after its last
processed document, but never past the start document of a run still open on it (a run's
state lives in memory until its stop, so a restart must see it again from its start).
Each assignment of a partition has its own generation: a document queued under an earlier
one is not taken, a stop taken under one closes nothing in the next, and a commit snapshot
only counts for partitions still in the same one. A partition that goes (revoked or lost)
hands its open runs over to the member that gets it (which may be this one again: the
processor then analyses the run afresh from its replayed start). A run the assembler closed
without its stop (its run timeout: :meth:`PartitionOffsets.runs_ended`) no longer holds the
commit back: it is closed for good, its results are in the store, and a replay of it would
only be rejected as late. Nor does a start that opened no run (a warm-up probe, a start the
assembler refused, e.g. with an empty uid): no stop or run timeout would ever release it.
Lag is the broker's high watermark less the processed offset (:func:`broker_lag`).

Nothing here locks: :class:`~xasflow.adapters.kafka_input.KafkaDocumentSource` calls it
under its one lock, which also guards its counters, so bookkeeping and counts change together.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from xasflow.adapters.wire import DECODE_ERROR_REASONS, DOCUMENT_NAMES

__all__ = ["INPUT_COUNTERS", "TP", "PartitionOffsets", "broker_lag", "committed_offsets"]

logger = logging.getLogger(__name__)

TP = tuple[str, int]  # (topic, partition)

#: The Kafka input's counters (``KafkaDocumentSource.stats()``), kept beside the bookkeeping
#: they count: both change under the input's one lock.
INPUT_COUNTERS: tuple[str, ...] = (
    "received",
    "bytes_received",
    "decoded",
    "decode_errors",
    "enqueued",
    "delivered",
    "dropped_overflow",  # always 0: a full queue stops polling instead
    "dropped_revoked",
    "dropped_on_close",  # always 0: what a close leaves unqueued is released, not lost
    "released_on_close",  # fetched, not queued at close: uncommitted, delivered again
    "consumer_errors",
    "rebalances",
    "partitions_assigned",
    "partitions_revoked",
    "partitions_lost",
    "commits",
    "commit_failures",
    "flush_timeouts",
    "commits_held",
    "runs_handed_over",
    *(f"decode_errors.{r}" for r in (*DECODE_ERROR_REASONS, "internal")),
    *(f"documents.{n}" for n in sorted(DOCUMENT_NAMES)),
)


class PartitionOffsets:
    """Offsets taken, processed and committed, open runs and lag, per assigned partition."""

    def __init__(self) -> None:
        self.gen: dict[TP, int] = {}  # assigned partitions and their assignment generation
        self._next_gen = 0
        self.taken: dict[TP, int] = {}  # next offset after the last document taken
        self.processed: dict[TP, int] = {}  # ... after the last one processed
        self.open: dict[TP, dict[str, int]] = {}  # runs open per partition: start offset
        self._closing: list[tuple[TP, int, str]] = []  # stops taken, not yet processed
        self._ended: list[str] = []  # runs closed without a stop, not yet processed
        self.committed: dict[TP, int] = {}
        self.start: dict[TP, int] = {}  # the group's committed offset when assigned
        self.lag: dict[TP, int] = {}
        self._abandon: list[tuple[str, str]] = []

    def assign(self, tps: list[TP], starts: dict[TP, int] | None = None) -> None:
        """Partitions assigned here: each gets a new generation and starts afresh (reading
        from ``starts``, the group's committed offsets, where it has one)."""
        for tp in tps:
            self._next_gen += 1
            self.gen[tp] = self._next_gen
            for state in (self.taken, self.processed, self.open, self.committed, self.start):
                state.pop(tp, None)
            if starts and tp in starts:
                self.start[tp] = starts[tp]

    def take(self, tp: TP, gen: int, offset: int, name: str | None, doc: dict[str, Any]) -> bool:
        """Record a document the processing thread takes (``name`` None: an undecodable
        message, passed over); False if it was queued under an assignment that has since
        gone (the partition's new owner has it)."""
        if self.gen.get(tp) != gen:
            return False
        self.taken[tp] = offset + 1
        if name == "start" and isinstance(doc.get("uid"), str):
            self.open.setdefault(tp, {}).setdefault(doc["uid"], offset)
        elif name == "stop" and isinstance(doc.get("run_start"), str):
            self._closing.append((tp, gen, doc["run_start"]))
        return True

    def runs_ended(self, uids: list[str]) -> None:
        """Runs the assembler closed without their stop (run timeout), or whose start opened
        no run (a probe, a refused start): done at the next :meth:`mark_processed`, wherever
        they are open."""
        self._ended.extend(uids)

    def mark_processed(self) -> None:
        """Everything taken so far has gone to the sinks; runs whose stop was taken (under
        the partition's present assignment) or that ended without one are done."""
        for tp, offset in self.taken.items():
            if tp in self.gen:
                self.processed[tp] = offset
        for tp, gen, run in self._closing:
            if self.gen.get(tp) == gen:  # not a stop of an earlier assignment's copy
                self.open.get(tp, {}).pop(run, None)
        self._closing.clear()
        for run in self._ended:
            for runs in self.open.values():
                runs.pop(run, None)
        self._ended.clear()

    def committable(self, tps: list[TP] | None = None) -> dict[TP, int]:
        """Offsets (of ``tps``, default all assigned) past what is committed that the rule allows."""
        out: dict[TP, int] = {}
        for tp in self.gen if tps is None else tps:
            done = self.processed.get(tp)
            if done is None:
                continue
            offset = min([done, *self.open.get(tp, {}).values()])
            if offset > self.committed.get(tp, -1):
                out[tp] = offset
        return out

    def gens(self, offsets: dict[TP, int]) -> dict[TP, int]:
        """The current generation of each partition of ``offsets`` still assigned here."""
        return {tp: self.gen[tp] for tp in offsets if tp in self.gen}

    def still_assigned(self, offsets: dict[TP, int], gens: dict[TP, int]) -> dict[TP, int]:
        """The part of ``offsets`` whose partitions are still in the generation of ``gens``."""
        return {tp: o for tp, o in offsets.items() if self.gen.get(tp) == gens.get(tp)}

    def committed_at(self, tp: TP, offset: int) -> None:
        """The broker confirmed a commit of ``offset`` (kept while ``tp`` is assigned here)."""
        if tp in self.gen:
            self.committed[tp] = max(self.committed.get(tp, -1), offset)

    def hand_over(self, tps: list[TP], how: str, group: str) -> int:
        """Forget partitions that went (``how``: revoked or lost); their open runs are queued
        for :meth:`abandoned`. Returns how many runs were handed over."""
        n = 0
        for tp in tps:
            for uid in self.open.pop(tp, {}):
                reason = (
                    f"{how}: partition {tp[0]}[{tp[1]}] moved to another member of group "
                    f"{group!r}, which analyses this run from its start"
                )
                self._abandon.append((uid, reason))
                n += 1
            for state in (self.gen, self.taken, self.processed, self.committed, self.lag):
                state.pop(tp, None)
            self.start.pop(tp, None)
        return n

    def abandoned(self) -> list[tuple[str, str]]:
        """Runs handed over since the last call, as ``(uid, reason)``."""
        out, self._abandon = self._abandon, []
        return out

    def set_lag(self, lag: dict[TP, int]) -> None:
        """Store measured lag, for partitions still assigned."""
        self.lag = {tp: n for tp, n in lag.items() if tp in self.gen}

    def view(self) -> dict[str, dict[str, int | None]]:
        """Per assigned partition (``topic[p]``): lag, committed, processed and open runs."""
        return {
            f"{t}[{p}]": {
                "lag": self.lag.get((t, p)),
                "committed": self.committed.get((t, p)),
                "processed": self.processed.get((t, p)),
                "open_runs": len(self.open.get((t, p), {})),
            }
            for t, p in sorted(self.gen)
        }


def broker_lag(
    consumer: Any,
    tps: list[TP],
    processed: Callable[[TP], int | None],
    starts: dict[TP, int] | None = None,
    earliest: bool = True,
) -> dict[TP, int]:
    """Per partition of ``tps``: messages on the broker past ``processed(tp)``, from its
    cached watermarks. Before anything is processed there: past the consumer's position,
    which librdkafka leaves invalid until a message is returned, so then past where reading
    starts (``starts``: the group's committed offsets at assignment; without one the low
    watermark, or the high one when ``earliest`` is False: ``auto.offset.reset``). An idle
    partition committed to its end has no lag, not its whole length."""
    from confluent_kafka import TopicPartition

    lag: dict[TP, int] = {}
    for topic, part in tps:
        tp = TopicPartition(topic, part)
        low, high = consumer.get_watermark_offsets(tp, cached=True)
        if high is None or high < 0:
            continue
        done = processed((topic, part))
        if done is None:
            done = consumer.position([tp])[0].offset
        if done is None or done < 0:
            start = (starts or {}).get((topic, part))
            done = start if start is not None else (low if earliest and low >= 0 else high)
        lag[(topic, part)] = max(int(high) - max(int(done), 0), 0)
    return lag


def committed_offsets(consumer: Any, partitions: list[Any], timeout: float) -> dict[TP, int]:
    """The group's committed offsets of newly assigned ``partitions`` (where reading starts;
    partitions without one start at ``auto.offset.reset``), or none if the broker does not
    answer: the lag of a partition nothing was read from yet counts from there."""
    if not partitions:
        return {}
    try:
        found = consumer.committed(partitions, timeout=timeout)
    except Exception as exc:  # lag is then measured from the reset policy's end
        logger.warning("committed offsets of assigned partitions not read: %s", exc)
        return {}
    return {(tp.topic, tp.partition): int(tp.offset) for tp in found if tp.offset >= 0}

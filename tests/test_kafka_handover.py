"""The Kafka commit rule through the real processing loop, no broker needed: documents are
queued as the receive thread queues them, and rebalances are the consumer's callbacks.

What must hold: a partition that comes back to the same daemon replays its handed-over runs
as new runs, analysed in full; a stop taken under an earlier assignment closes nothing in the
next; a run closed by its run timeout no longer holds the partition's commit; and the
durability check behind every commit waits for the documents the commit gate still holds.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

pytest.importorskip("confluent_kafka", reason="the kafka extra is not installed")

from helpers import RecordingPipeline, fly_scan

from xasflow.adapters.commit_gate import CommitGate
from xasflow.adapters.kafka_bus import KafkaInputSettings
from xasflow.adapters.kafka_input import KafkaDocumentSource, _Item
from xasflow.adapters.kafka_offsets import PartitionOffsets
from xasflow.adapters.probes import PROBE_KEY
from xasflow.daemon.assembly import RunAssembler
from xasflow.daemon.config import AnalysisConfig, DaemonConfig
from xasflow.daemon.counters import Counters
from xasflow.daemon.outputs import Rejected, RunClosed, RunOpened, SpectrumReady
from xasflow.daemon.processor import Processor
from xasflow.daemon.service import Daemon

TP = ("t", 0)
PARTITION = [SimpleNamespace(topic="t", partition=0)]


def _setup() -> tuple[KafkaDocumentSource, Processor, RecordingPipeline]:
    source = KafkaDocumentSource(KafkaInputSettings(topics=("t",)), durable=lambda t: True)
    rec = RecordingPipeline()
    proc = Processor(source.get, RunAssembler(), rec, Counters(), AnalysisConfig())  # type: ignore[arg-type]
    proc.on_processed = source.mark_processed
    proc.abandoned = source.abandoned
    proc.runs_ended = source.runs_ended
    return source, proc, rec


def _queue(source: KafkaDocumentSource, docs: list[tuple[str, Any]], first: int = 0) -> None:
    gen = source._offsets.gen[TP]
    for offset, (name, doc) in enumerate(docs, start=first):
        source._queue.put(_Item(name, doc, TP, offset, gen))


def _turn(proc: Processor, rec: RecordingPipeline, *, check: bool = False) -> list[Any]:
    """One pass of the processing loop; the outputs it handed to the pipeline."""
    before = len(rec.outputs)
    proc._turn(proc._take(1000), check=check)
    proc._after_turn()
    return rec.outputs[before:]


def _back_with(proc: Processor, source: KafkaDocumentSource, taken: Any, docs: list) -> None:
    """The partition is lost and assigned here again, its documents redelivered; one turn
    feeds ``taken`` (a document taken under the first assignment) and then the replay."""
    source._on_lost(None, PARTITION)
    source._on_assign(None, PARTITION)
    _queue(source, docs)
    proc._turn([taken, *proc._take(1000)], check=False)
    proc._after_turn()


def _spectra(n: int) -> tuple[str, list[tuple[str, Any]]]:
    energy = np.linspace(8800.0, 9120.0, 50)
    return fly_scan(energy, [{"I0": np.full(50, 1e9), "It": np.full(50, 5e8)}] * n)


def test_a_partition_that_comes_back_replays_its_runs_as_new_runs() -> None:
    """Lost mid-run and assigned to this daemon again: the partial run is closed with the
    hand-over's reason, then the replay from its start is analysed in full (it was rejected
    ``duplicate_start`` and ``late_document`` while the commit went past it), and the commit
    passes the run only once it is done."""
    source, proc, rec = _setup()
    uid, docs = _spectra(4)
    source._on_assign(None, PARTITION)
    _queue(source, docs[:4])  # start, descriptor, two events
    first = _turn(proc, rec)
    assert [type(o) for o in first] == [RunOpened, SpectrumReady, SpectrumReady]
    assert source.committable() == {TP: 0}
    source._on_lost(None, PARTITION)
    source._on_assign(None, PARTITION)  # back here: the broker redelivers from the commit
    _queue(source, docs)
    replay = _turn(proc, rec)
    assert not [o for o in replay if isinstance(o, Rejected)]
    closed, opened = replay[0], replay[1]
    assert isinstance(closed, RunClosed) and closed.raw_uid == uid
    assert closed.exit_status == "abort" and closed.reason.startswith("lost: partition t[0]")
    assert isinstance(opened, RunOpened) and opened.raw_uid == uid
    assert sum(isinstance(o, SpectrumReady) for o in replay) == 4
    assert isinstance(replay[-1], RunClosed) and replay[-1].exit_status == "success"
    assert source.committable() == {TP: len(docs)}
    assert source.stats()["runs_handed_over"] == 1


def test_documents_taken_before_the_hand_over_still_go_to_the_old_copy() -> None:
    """The hand-over is acted on before the replay's start, not before the turn: events of
    the first assignment taken in the same turn still reach their run (no ``unknown_run``)."""
    source, proc, rec = _setup()
    uid, docs = _spectra(3)
    source._on_assign(None, PARTITION)
    _queue(source, docs[:3])  # start, descriptor, one event
    _turn(proc, rec)
    _queue(source, docs[3:4])  # the second event, queued under the first assignment
    item = source.get(0)  # taken before the partition is lost, processed in the next turn
    assert item is not None
    _back_with(proc, source, item, docs)
    out = rec.outputs
    assert not [o for o in out if isinstance(o, Rejected)]
    kinds = [type(o).__name__ for o in out]
    assert kinds[:4] == ["RunOpened", "SpectrumReady", "SpectrumReady", "RunClosed"]
    assert kinds[4] == "RunOpened" and kinds[-1] == "RunClosed"
    assert sum(isinstance(o, SpectrumReady) for o in out[4:]) == 3
    assert all(o.raw_uid == uid for o in out if isinstance(o, RunOpened | RunClosed))


def test_a_run_whose_start_was_taken_before_the_hand_over_is_still_closed() -> None:
    """The old assignment's start, taken before the hand-over and fed in the next turn,
    opens the old copy; the hand-over then closes it with its reason (it stayed open until
    its run timeout), and the replay that follows in the same turn opens it afresh."""
    source, proc, rec = _setup()
    uid, docs = _spectra(2)
    source._on_assign(None, PARTITION)
    _queue(source, docs[:1])
    start = source.get(0)  # taken under the first assignment
    assert start is not None
    _back_with(proc, source, start, docs)
    kinds = [type(o).__name__ for o in rec.outputs]
    # the old copy got no spectrum: closed with the hand-over's reason, and no empty_run row
    # (it would take the seq_num of the replay's first result: test_kafka_replay_rows.py)
    assert kinds[:3] == ["RunOpened", "RunClosed", "RunOpened"], kinds
    first_close = rec.outputs[1]
    assert first_close.exit_status == "abort" and first_close.reason.startswith("lost:")
    assert not [o for o in rec.outputs if isinstance(o, Rejected)]
    assert rec.outputs[-1].exit_status == "success" and rec.outputs[-1].raw_uid == uid
    assert source.committable() == {TP: len(docs)}


def test_a_stop_taken_under_an_earlier_assignment_closes_nothing_in_the_next() -> None:
    offsets = PartitionOffsets()
    offsets.assign([TP])
    g1 = offsets.gen[TP]
    offsets.take(TP, g1, 0, "start", {"uid": "R"})
    offsets.take(TP, g1, 1, "stop", {"run_start": "R"})  # taken, not yet processed
    offsets.hand_over([TP], "lost", "group")
    offsets.assign([TP])
    g2 = offsets.gen[TP]
    offsets.take(TP, g2, 0, "start", {"uid": "R"})  # the replay: R is open again
    offsets.take(TP, g2, 1, "descriptor", {"uid": "d", "run_start": "R"})
    offsets.mark_processed()
    assert offsets.committable() == {TP: 0}  # held at R's start, not past it


def test_a_run_closed_by_its_timeout_no_longer_holds_the_commit() -> None:
    """A run whose stop never comes is closed by the run timeout; later complete runs on the
    partition are then committable (the commit stayed at its start for good)."""
    source, proc, rec = _setup()
    _, stopless = _spectra(2)
    source._on_assign(None, PARTITION)
    _queue(source, stopless[:-1])
    _turn(proc, rec)
    asm = proc.assembler
    asm.check_timeouts = lambda: RunAssembler.check_timeouts(asm, now=asm.clock() + 1e4)  # type: ignore[method-assign]
    out = _turn(proc, rec, check=True)
    assert [(type(o), o.exit_status) for o in out] == [(RunClosed, "timeout")]
    _, complete = _spectra(1)
    _queue(source, complete, first=len(stopless) - 1)
    _turn(proc, rec)
    assert source.committable() == {TP: len(stopless) - 1 + len(complete)}


def test_starts_that_open_no_run_do_not_hold_the_commit() -> None:
    """A warm-up probe's start whose stop never comes, a raw start with an empty uid and a
    start repeating a run already closed open no run here, so no stop and no run timeout
    would ever release them: they must not hold the partition's commit at their offsets.
    Before, the commit stayed at the probe's offset for good (lag grew without end and every
    restart replayed everything after it). A repeated start of a run still open keeps the
    commit at that run's first start."""
    source, proc, rec = _setup()
    _, docs = _spectra(1)
    source._on_assign(None, PARTITION)
    probe = ("start", {"uid": "probe-1", "time": 0.0, PROBE_KEY: "token"})
    blank = ("start", {"uid": "", "time": 0.0})
    _queue(source, [probe, blank, *docs, docs[0]])  # docs[0]: the run's start after its stop
    out = _turn(proc, rec)
    assert [o.reason for o in out if isinstance(o, Rejected)] == [
        "malformed_document",  # the empty uid
        "duplicate_start",  # the closed run's start again
    ]
    assert proc.probes.health()["tokens"] == ["token"]
    assert source.committable() == {TP: 2 + len(docs) + 1}  # past all of them
    start = _spectra(1)[1][0]
    first = 2 + len(docs) + 1
    _queue(source, [start, start], first=first)  # the second: refused, the run is open
    _turn(proc, rec)
    assert source.committable() == {TP: first}  # held at the open run's first start


class _Publisher:
    def __init__(self) -> None:
        self.sent: list[str] = []

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        self.sent.append(name)

    def flush(self, timeout: float) -> bool:
        return True  # nothing produced is pending: the gate still holds it


def test_durability_waits_for_what_the_commit_gate_holds() -> None:
    """With ``output.after_store`` a document waits in the gate for its row; the check every
    Kafka commit waits for is false while it is held, true once it has gone out."""
    pub = _Publisher()
    gate = CommitGate(pub, timeout_s=30.0)
    daemon = Daemon(DaemonConfig())
    daemon.parts.publisher, daemon.parts.gate = pub, gate  # type: ignore[assignment]
    try:
        gate.row_submitted()
        gate("event", {"seq_num": [1]})
        assert daemon._durable(0.2) is False and pub.sent == []
        gate.row_resolved()  # the store committed the row: the gate lets the document go
        assert daemon._durable(5.0) is True and pub.sent == ["event"]
    finally:
        gate.close(2.0)


def test_commits_are_held_once_the_store_refused_results() -> None:
    """A result the store refused (full past ``storage.full_wait_s``) must not be committed
    past: from then on no offset is committed, at any of the three commit sites (the
    committer, a revoke, the end), the reason is in /health, every held commit is counted,
    and a restart (redelivery) is what brings the results back."""
    refused = SimpleNamespace(refused=0, write_lost=0)
    daemon = Daemon(DaemonConfig.model_validate({"input": {"kind": "kafka"}}))
    daemon.parts.store = refused  # type: ignore[assignment]
    source = KafkaDocumentSource(
        KafkaInputSettings(topics=("t",)), durable=lambda t: True, hold=daemon._commit_hold
    )
    commits: list[dict[Any, int]] = []
    source._commit = lambda consumer, offsets, gens, sync=True: commits.append(offsets)  # type: ignore[method-assign]
    source.committable = lambda tps=None: {TP: 5}  # type: ignore[method-assign]
    source._on_assign(None, PARTITION)
    assert source._may_commit(1.0) is True and source.health()["commit_hold"] is None
    source._on_revoke(None, PARTITION)
    assert commits == [{TP: 5}]  # not held: the revoke commits
    refused.refused = 3
    reason = source.health()["commit_hold"]
    assert "refused 3 results" in reason and "restart" in reason
    assert source._may_commit(1.0) is False
    source._on_assign(None, PARTITION)
    source._on_revoke(None, PARTITION)
    source._consumer = SimpleNamespace(close=lambda: None)
    source.finish(1.0)
    assert commits == [{TP: 5}]  # neither the revoke nor the end committed
    assert source.stats()["commits_held"] == 3 and source.stats()["flush_timeouts"] == 0
    counters = Counters()
    counters.sync_kafka(source.stats(), {}, held=source.commit_hold() is not None)
    assert counters.kafka_held and counters.kafka["commits_held"] == 3
    # a Kafka-fed store waits for room before it refuses; a 0MQ-fed one refuses at once
    kafka = {"input": {"kind": "kafka"}}
    assert (
        DaemonConfig.model_validate(kafka).store_full_wait(),
        DaemonConfig().store_full_wait(),
    ) == (60.0, 0.0)
    assert DaemonConfig().with_updates({"storage": {"full_wait_s": 5.0}}).store_full_wait() == 5.0
    with pytest.raises(ValueError, match="240"):
        DaemonConfig().with_updates({"storage": {"full_wait_s": 1e9}})


@pytest.mark.parametrize("answer", [True, False])
def test_a_result_lost_while_it_was_made_durable_holds_that_very_commit(answer: bool) -> None:
    """Making the results durable can be what loses one (a store write failing for good while
    the store flushes): the hold is asked again afterwards, so that commit is held too, not
    only later ones (no later commit is tried for offsets already committed). Whether the
    flush then answers True or, as the store's does since, False, the commit is counted
    held, not as a flush timeout (none timed out)."""
    lost = {"n": 0}

    def durable(timeout: float) -> bool:
        lost["n"] = 1  # the flush gave a batch up
        return answer

    source = KafkaDocumentSource(
        KafkaInputSettings(topics=("t",)),
        durable=durable,
        hold=lambda: f"the store lost {lost['n']} results" if lost["n"] else None,
    )
    assert source._may_commit(1.0) is False
    assert (source.stats()["commits_held"], source.stats()["flush_timeouts"]) == (1, 0)
    assert source.health()["commit_hold"] == "the store lost 1 results"


def test_a_revoke_whose_commit_fails_still_hands_the_runs_over() -> None:
    """The partition goes whatever the commit at revoke did: a durability check that raises
    is counted and the open run is handed over (closed with the revoke's reason), not left
    open here with its documents still taken."""
    source, proc, rec = _setup()

    def broken(timeout: float) -> bool:
        raise RuntimeError("store gone")

    source.durable = broken
    uid, docs = _spectra(2)
    source._on_assign(None, PARTITION)
    _queue(source, docs[:3])  # start, descriptor, one event
    _turn(proc, rec)
    source._on_revoke(None, PARTITION)
    stats = source.stats()
    assert stats["consumer_errors"] == 1 and stats["runs_handed_over"] == 1
    assert "store gone" in (source.last_error or "")
    closed = _turn(proc, rec)
    assert isinstance(closed[0], RunClosed) and closed[0].raw_uid == uid
    assert closed[0].reason.startswith("revoked: partition t[0]")

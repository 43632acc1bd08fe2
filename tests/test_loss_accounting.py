"""Loss accounting of raw events: what a raw stop may claim missing, an input-queue drop
counted once, and raw metadata the analysis run carries onward.

Each test failed before its fix (the docstring says what the code did then)."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from event_model import compose_run, pack_event_page
from helpers import wait_for

from xasflow.adapters.input_drops import DropLedger
from xasflow.adapters.recovery import InterruptedRuns
from xasflow.adapters.stop_claims import MAX_STOP_MISSING
from xasflow.adapters.wire import encode_message
from xasflow.adapters.zmq_bus import ZmqDocumentPublisher, ZmqDocumentSource, ZmqInputConfig
from xasflow.daemon.assembly import Rejected, RunAssembler, RunClosed
from xasflow.daemon.config import DaemonConfig
from xasflow.daemon.counters import Counters, register_prometheus
from xasflow.daemon.documents import AnalysisRun
from xasflow.daemon.parts import Parts, build_processor
from xasflow.daemon.pipeline import Pipeline
from xasflow.daemon.registry import ModelRegistry
from xasflow.daemon.status import DaemonStatus

KEYS = ("energy", "I0", "It")


def step_run(n: int, **stop: Any) -> tuple[str, list[tuple[str, dict]]]:
    """A step scan of ``n`` points (seq_nums 1..n) whose stop carries ``stop``."""
    run = compose_run(metadata={"element": "Cu", "edge": "K"})
    keys = {k: {"source": "sim", "dtype": "number", "shape": []} for k in KEYS}
    desc = run.compose_descriptor(name="primary", data_keys=keys)
    docs: list[tuple[str, dict]] = [("start", run.start_doc), ("descriptor", desc.descriptor_doc)]
    for i in range(n):
        e = 8900.0 + 10 * i
        data = {"energy": e, "I0": e / 10, "It": e / 100}
        docs.append(("event", desc.compose_event(data=data, timestamps=dict.fromkeys(KEYS, 1.0))))
    docs.append(("stop", {**run.compose_stop(), **stop}))
    return run.start_doc["uid"], docs


def analysis(tmp_path: Path) -> tuple[Pipeline, Counters]:
    """A pipeline with no bundle (every spectrum is rejected ``no_model``) and its counters."""
    counters = Counters()
    (tmp_path / "models").mkdir()
    registry = ModelRegistry(tmp_path / "models", counters)
    return Pipeline(registry, counters, validate=True), counters


def feed(asm: RunAssembler, docs: list[tuple[str, dict]]) -> list[Any]:
    return [o for name, doc in docs for o in asm.feed(name, doc)]


# --------------------------------------------------------------------------- 1. num_events

HOSTILE_NUM_EVENTS: list[Any] = [
    {"primary": 2**70},  # beyond int64
    {"primary": 2**63},  # just beyond int64 (seq_nums are refused there too)
    {"primary": 3 + MAX_STOP_MISSING + 1},  # an int64, but more missing than one stop may claim
    {"primary": -1},
    {"primary": 5.0},
    {"primary": "5"},
    {"primary": {"a": 1}},
    {"primary": None},
    {"primary": [5]},
    5,  # num_events itself not a mapping
    "primary",
]


@pytest.mark.parametrize("num_events", HOSTILE_NUM_EVENTS, ids=repr)
def test_a_stop_cannot_claim_implausible_missing_events(num_events: Any) -> None:
    """Before: a stop's ``num_events`` was trusted: ``{"primary": 2**70}`` after 3 events
    made ``RunClosed.missing_events`` 2**70 - 3 (then the ``seq_gap`` loss counter and the
    analysis stop's ``raw_missing_events``), and a malformed value was ignored without a
    word. Now such a claim adds nothing and is refused visibly (``malformed_document``)."""
    uid, docs = step_run(3, num_events=num_events)
    out = feed(RunAssembler(), docs)
    (closed,) = [o for o in out if isinstance(o, RunClosed)]
    assert (closed.seq_gaps, closed.missing_events) == (0, 0)
    refused = [o for o in out if isinstance(o, Rejected)]
    assert [(r.raw_uid, r.reason) for r in refused] == [(uid, "malformed_document")]
    assert "num_events" in refused[0].detail


def test_a_bool_num_events_is_not_one_event() -> None:
    """Before: ``True`` is an ``int``: a stop with ``{"primary": True}`` after a descriptor
    but no event counted one missing event."""
    _, docs = step_run(0, num_events={"primary": True})
    out = feed(RunAssembler(), docs)
    (closed,) = [o for o in out if isinstance(o, RunClosed)]
    assert closed.missing_events == 0
    assert any(isinstance(o, Rejected) and "num_events" in o.detail for o in out)


def test_a_plausible_num_events_still_reveals_trailing_losses() -> None:
    """The bound keeps what a real stop says: up to ``MAX_STOP_MISSING`` events beyond the
    last seen, and a numpy integer (a pickled stop) like an int."""
    np = pytest.importorskip("numpy")
    for claim, missing in ((5, 2), (np.int64(6), 3), (3 + MAX_STOP_MISSING, MAX_STOP_MISSING)):
        _, docs = step_run(3, num_events={"primary": claim, "baseline": 2})
        out = feed(RunAssembler(), docs)
        (closed,) = [o for o in out if isinstance(o, RunClosed)]
        assert (closed.seq_gaps, closed.missing_events) == (1, missing)
        assert not [o for o in out if isinstance(o, Rejected)]


def test_a_seq_num_cannot_claim_implausible_missing_events() -> None:
    """Before: an event with seq_num 2**62 after seq 1 and 2 left a hole of 2**62 - 3 events
    in ``seq_gap`` and ``raw_missing_events`` (the way round the ``num_events`` bound). Now
    a row whose seq_num leaves more than ``MAX_STOP_MISSING`` missing is refused visibly;
    the run goes on from its own sequence, and a plausible hole still counts."""
    uid, docs = step_run(4)
    events = [d for n, d in docs if n == "event"]
    events[2]["seq_num"] = 2**62  # the third event, forged
    events[3]["seq_num"] = 3 + MAX_STOP_MISSING  # a hole of exactly the bound: believed
    out = feed(RunAssembler(), docs)
    refused = [o for o in out if isinstance(o, Rejected)]
    assert [(r.raw_uid, r.reason) for r in refused] == [(uid, "malformed_document")]
    assert str(2**62) in refused[0].detail and "may go missing at once" in refused[0].detail
    (closed,) = [o for o in out if isinstance(o, RunClosed)]
    assert (closed.seq_gaps, closed.missing_events) == (1, MAX_STOP_MISSING)
    # the first row of a descriptor is bounded the same way (its sequence begins at 1)
    uid, docs = step_run(2)
    first = next(d for n, d in docs if n == "event")
    first["seq_num"] = 2 + MAX_STOP_MISSING
    out = feed(RunAssembler(), docs)
    assert [r.reason for r in out if isinstance(r, Rejected)] == ["malformed_document"]
    (closed,) = [o for o in out if isinstance(o, RunClosed)]
    assert closed.missing_events == 1  # seq_num 1, whose row came forged: not 1e6 + 1


class _Store:
    def __init__(self) -> None:
        self.finished: list[dict] = []

    def finish_run(self, raw_uid: str, stop: dict) -> None:
        self.finished.append(stop)


@pytest.mark.parametrize(
    "num_events", [{"primary": 2**70}, {"primary": 2 + MAX_STOP_MISSING + 1}, {"primary": True}]
)
def test_an_interrupted_runs_stop_cannot_claim_implausible_losses(num_events: Any) -> None:
    """Before: a run left open by a killed daemon was closed with ``raw_missing_events`` =
    the raw stop's ``num_events`` - the spectra stored, trusted as is (2**70 went into the
    ``interrupted`` loss counter and the store). Now such a count is unknown (None)."""
    store = _Store()
    runs = InterruptedRuns(store)
    runs._open["raw-1"] = {
        "raw_uid": "raw-1",
        "start": {"uid": "an-1"},
        "descriptor": {"name": "primary"},
        "rows": 2,
        "spectra": 2,
        "n_ok": 2,
        "n_rejected": 0,
    }
    stop = runs.close("raw-1", {"exit_status": "success", "num_events": num_events})
    assert stop is not None and stop["raw_missing_events"] is None
    assert "num_events" in stop["reason"]
    assert store.finished == [stop]


def test_a_refused_num_events_reaches_no_loss_counter_nor_the_analysis_stop(
    tmp_path: Path,
) -> None:
    """End to end through the pipeline: the hostile stop of ``test_a_stop_cannot_claim...``
    leaves ``events_lost`` at 0 and the analysis stop whole; its refusal is counted."""
    _, docs = step_run(3, num_events={"primary": 2**70})
    pipeline, counters = analysis(tmp_path)
    out = pipeline.handle_batch(feed(RunAssembler(), docs))
    (stop,) = [doc for name, doc in out if name == "stop"]
    assert (stop["raw_missing_events"], stop["partial"]) == (0, False)
    snap = counters.snapshot()
    assert snap["events_lost_total"] == 0
    assert snap["rejected_by_stage"]["assembly"] == {"malformed_document": 1}


# --------------------------------------------------------------------------- 2. overflow


class Daemon0MQ:
    """The daemon's input-to-analysis chain without its threads: a real 0MQ source (its
    receive step driven here, one message at a time, unless ``source`` is one started on a
    socket), the processor ``build_processor`` wires, a pipeline with no bundle, and the view
    ``/health`` and ``/metrics`` read."""

    def __init__(
        self,
        tmp_path: Path,
        overflow: str,
        queue_size: int = 2,
        interrupted: InterruptedRuns | None = None,
        source: ZmqDocumentSource | None = None,
    ) -> None:
        self.config = DaemonConfig(
            storage={"directory": str(tmp_path / "store")},  # type: ignore[arg-type]
            input={"overflow": overflow, "queue_size": queue_size},  # type: ignore[arg-type]
        )
        tmp_path.mkdir(exist_ok=True)
        pipeline, self.counters = analysis(tmp_path)
        if source is None:
            source = ZmqDocumentSource(ZmqInputConfig(queue_size=queue_size, overflow=overflow))
        self.source = source
        self.parts = Parts(
            source=self.source,
            assembler=RunAssembler(),
            pipeline=pipeline,
            interrupted=interrupted,
        )
        self.status = DaemonStatus(self.config, self.counters, self.parts)
        self.docs: list[tuple[str, dict]] = []
        self.proc = build_processor(
            self.parts,
            self.config,
            self.counters,
            [lambda name, doc: self.docs.append((name, doc))],
            self.status.sync_stats,
        )

    def receive(self, *docs: tuple[str, dict]) -> None:
        """Messages off the socket, as the receive thread handles them."""
        for name, doc in docs:
            self.source._handle([encode_message(name, doc)])

    def turn(self) -> None:
        """One pass of the processing loop over what is queued."""
        self.proc._turn(self.proc._take(1000), check=False)

    def stop_doc(self) -> dict:
        (stop,) = [doc for name, doc in self.docs if name == "stop"]
        return stop

    def lost(self) -> tuple[dict[str, int], int, str]:
        """Events lost by cause and in all, as /health says, and /metrics' text."""
        from prometheus_client import CollectorRegistry, generate_latest

        health = self.status.health()["events_lost"]
        registry = CollectorRegistry()
        register_prometheus(self.counters, registry)
        by_cause = {k: v for k, v in health.items() if k != "total"}
        return by_cause, health["total"], generate_latest(registry).decode()


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[Callable[[str], Daemon0MQ]]:
    """``make_daemon(overflow)``: a :class:`Daemon0MQ`; its source is closed afterwards."""
    made: list[Daemon0MQ] = []

    def make(overflow: str) -> Daemon0MQ:
        made.append(Daemon0MQ(tmp_path / f"d{len(made)}", overflow))
        return made[-1]

    yield make
    for d in made:
        d.source.close()


def assert_lost_once(d: Daemon0MQ, overflow: int, seq_gap: int = 0) -> None:
    by_cause, total, metrics = d.lost()
    assert by_cause.get("overflow", 0) == overflow and by_cause.get("seq_gap", 0) == seq_gap
    assert total == overflow + seq_gap
    assert f'xasflow_events_lost_total{{cause="overflow"}} {overflow:.1f}' in metrics
    assert f'xasflow_events_lost_total{{cause="seq_gap"}} {seq_gap:.1f}' in metrics


def test_an_event_the_input_queue_dropped_is_lost_once(
    make_daemon: Callable[[str], Daemon0MQ],
) -> None:
    """Before: event 5, dropped by a full input queue (``drop_newest``), was counted as
    ``overflow`` and again as ``seq_gap`` when event 6 showed the hole: 2 events lost in
    /health and /metrics for 1. Its run's stop still says it is partial."""
    _, docs = step_run(6)
    start, desc, e1, e2, e3, e4, e5, e6, stop = docs
    d = make_daemon("drop_newest")
    for batch in ((start, desc), (e1, e2), (e3, e4, e5), (e6, stop)):
        d.receive(*batch)
        d.turn()
    assert_lost_once(d, overflow=1)
    assert d.source.stats()["dropped_overflow"] == 1
    stop_doc = d.stop_doc()
    assert (stop_doc["raw_missing_events"], stop_doc["raw_seq_gaps"]) == (1, 1)
    assert stop_doc["partial"] is True and stop_doc["raw_dropped_events"] == 1
    assert "1 of them dropped by the input queue" in stop_doc["reason"]


def test_a_trailing_event_the_input_queue_dropped_is_lost_once(
    make_daemon: Callable[[str], Daemon0MQ],
) -> None:
    """Before: the run's last event, dropped at the input, came back through the stop's
    ``num_events`` as a ``seq_gap`` loss on top of its ``overflow`` count."""
    _, docs = step_run(5, num_events={"primary": 5})
    start, desc, e1, e2, e3, e4, e5, stop = docs
    d = make_daemon("drop_newest")
    for batch in ((start, desc), (e1, e2), (e3, e4, e5), (stop,)):
        d.receive(*batch)
        d.turn()
    assert d.stop_doc()["raw_missing_events"] == 1
    assert_lost_once(d, overflow=1)


def test_a_dropped_page_counts_its_events_and_other_documents_count_none(
    make_daemon: Callable[[str], Daemon0MQ],
) -> None:
    """``drop_oldest`` evicts a page of 3 events (and, at another moment, a resource
    document). Before: ``overflow`` counted documents (1 for the page, 1 for the resource,
    which is no event) and ``seq_gap`` the page's 3 events again: 5 for 3."""
    _, docs = step_run(6, num_events={"primary": 6})
    start, desc, e1, e2, e3, e4, e5, e6, stop = docs
    resource = {"uid": "res-1", "spec": "AD_HDF5", "root": "/", "resource_path": "x.h5"}
    resource.update(resource_kwargs={}, path_semantics="posix", run_start=start[1]["uid"])
    d = make_daemon("drop_oldest")
    d.receive(("resource", resource), start, desc)  # the resource is evicted
    d.turn()
    d.receive(e1)
    d.turn()
    d.receive(("event_page", pack_event_page(e2[1], e3[1], e4[1])), e5, e6)  # the page goes
    d.turn()
    d.receive(stop)
    d.turn()
    assert_lost_once(d, overflow=3)
    assert d.source.stats()["dropped_overflow"] == 2  # documents, in xasflow_input_dropped
    assert d.source.stats()["dropped_overflow_events"] == 3
    stop_doc = d.stop_doc()
    assert (stop_doc["raw_missing_events"], stop_doc["raw_dropped_events"]) == (3, 3)


def test_a_drop_before_its_descriptor_is_processed_is_still_counted_once(
    make_daemon: Callable[[str], Daemon0MQ],
) -> None:
    """The first event is dropped while its descriptor still waits in the queue: the drop
    is known before the run knows the descriptor, and is kept for it."""
    _, docs = step_run(3, num_events={"primary": 3})
    start, desc, e1, e2, e3, stop = docs
    d = make_daemon("drop_newest")
    d.receive(start, desc, e1)  # e1 does not fit
    d.turn()
    d.receive(e2, e3)
    d.turn()
    d.receive(stop)
    d.turn()
    assert d.stop_doc()["raw_missing_events"] == 1
    assert_lost_once(d, overflow=1)


def test_a_waiting_descriptors_drop_outlives_drops_of_descriptors_never_queued(
    make_daemon: Callable[[str], Daemon0MQ],
) -> None:
    """S's first event is dropped while S's descriptor waits in the queue, then events of
    10,000 descriptors this input never queued (runs it cannot follow). Before: the
    assembler kept drops of descriptors not fed yet in a map trimmed to 10,000 entries
    oldest-first, so S's went before S's descriptor came, and its event was lost twice
    (``overflow``, then ``seq_gap``)."""
    _, docs = step_run(3, num_events={"primary": 3})
    start, desc, e1, e2, e3, stop = docs
    strays = [("event", {**e2[1], "descriptor": f"never-queued-{i}"}) for i in range(10_000)]
    d = make_daemon("drop_newest")
    d.receive(start, desc, e1, *strays)  # e1 and the strays do not fit
    d.turn()
    for batch in ((e2, e3), (stop,)):
        d.receive(*batch)
        d.turn()
    assert d.stop_doc()["raw_missing_events"] == 1
    assert_lost_once(d, overflow=10_001)


def test_drops_held_for_a_waiting_descriptor_live_as_long_as_its_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Drops held for descriptors not fed yet: a run open here keeps its own past the
    bound, a run that closed takes its own with it, and past the bound the oldest of runs
    not open here are forgotten, counted and logged."""
    uid, docs = step_run(3, num_events={"primary": 3})
    start, desc, _, e2, e3, stop = docs
    gone_uid, (gone_start, gone_desc, _, gone_stop) = step_run(1)
    asm = RunAssembler()
    feed(asm, [start, gone_start])
    asm.dropped(gone_desc[1]["uid"], [1, 2, 3, 4, 5], gone_uid)  # its descriptor never comes
    asm.dropped(desc[1]["uid"], [1], uid)  # it waits in the queue
    feed(asm, [gone_stop])
    with caplog.at_level(logging.WARNING, logger="xasflow.daemon.assembly"):
        for i in range(10_001):  # runs whose start is not fed (yet)
            asm.dropped(f"d{i}", [7], f"not-started-{i}")
    assert asm.early_drops_forgotten == 2  # d0 and d1, not the 5 rows of the closed run
    forgotten = [r.getMessage() for r in caplog.records if "forgot" in r.getMessage()]
    assert len(forgotten) == 2 and "descriptor d0 (run not-started-0" in forgotten[0]
    (closed,) = [o for o in feed(asm, [desc, e2, e3, stop]) if isinstance(o, RunClosed)]
    assert (closed.missing_events, closed.dropped_events) == (1, 1)


def test_forgotten_drop_records_reach_metrics_and_health(tmp_path: Path) -> None:
    """Before: rows of input-queue drops the assembler forgot past its bound were counted in
    ``RunAssembler.early_drops_forgotten`` and only logged. They are no lost event (each is
    in ``events_lost{cause="overflow"}`` already) but a lost reason: if their run still
    comes, their holes count as ``seq_gap`` too. Now /metrics and /health say how many,
    from 0, under a name that says what was forgotten."""
    from prometheus_client import CollectorRegistry, generate_latest

    asm = RunAssembler()
    config = DaemonConfig(storage={"directory": str(tmp_path / "store")})  # type: ignore[arg-type]
    status = DaemonStatus(config, Counters(), Parts(assembler=asm))
    reg = CollectorRegistry()
    register_prometheus(status.counters, reg)
    status.sync_stats()
    assert "xasflow_drop_records_forgotten_total 0.0" in generate_latest(reg).decode()
    for i in range(10_001):  # runs whose start is not fed (yet): the oldest is forgotten
        asm.dropped(f"d{i}", [7, 8, 9], f"not-started-{i}")
    assert asm.early_drops_forgotten == 3
    assert status.health()["counters"]["drop_records_forgotten"] == 3
    text = generate_latest(reg).decode()
    assert "xasflow_drop_records_forgotten_total 3.0" in text
    assert 'xasflow_events_lost_total{cause="seq_gap"} 0.0' in text  # no event counted lost


def test_a_gap_the_input_did_not_make_is_still_a_seq_gap(
    make_daemon: Callable[[str], Daemon0MQ],
) -> None:
    """An event the bus lost (never received) stays ``seq_gap`` next to an overflow drop."""
    _, docs = step_run(6)
    start, desc, e1, _, e3, e4, e5, e6, stop = docs  # the second event never comes
    d = make_daemon("drop_newest")
    for batch in ((start, desc), (e1, e3), (e4, e5, e6), (stop,)):
        d.receive(*batch)
        d.turn()
    assert d.stop_doc()["raw_missing_events"] == 2
    assert_lost_once(d, overflow=1, seq_gap=1)


class _LeftOpen(_Store):
    """A store holding one analysis run a killed daemon left open: ``rows`` results stored
    of raw run ``raw_uid`` (seq_nums 1..rows)."""

    def __init__(self, raw_uid: str, rows: int) -> None:
        super().__init__()
        self.info = {
            "raw_uid": raw_uid,
            "start": {"uid": "analysis-" + raw_uid},
            "descriptor": {"name": "primary"},
            "rows": rows,
            "spectra": rows,
            "n_ok": rows,
            "n_rejected": 0,
            "max_seq": rows,
        }

    def unfinished_runs(self) -> list[dict]:
        return [self.info]


def test_an_interrupted_runs_event_the_input_queue_dropped_is_lost_once(
    tmp_path: Path,
) -> None:
    """A killed daemon stored events 1-2 of a 6-event run; its successor receives 3-6 (it
    never saw the run's descriptor) and its full input queue drops event 5. Before: event 5
    was counted as ``overflow`` and again in the run's ``interrupted`` count (6 - 2 stored):
    5 events lost in /health and /metrics for 4. Now it is ``overflow`` only, like a drop of
    a run the daemon follows, and the interrupted stop says it was dropped here."""
    uid, docs = step_run(6, num_events={"primary": 6})
    _start, _desc, _e1, _e2, e3, e4, e5, e6, stop = docs
    interrupted = InterruptedRuns(_LeftOpen(uid, rows=2))
    assert interrupted.find() == 1
    d = Daemon0MQ(tmp_path, "drop_newest", interrupted=interrupted)
    try:
        for batch in ((e3, e4, e5), (e6, stop)):  # e5 does not fit
            d.receive(*batch)
            d.turn()
    finally:
        d.source.close()
    assert d.source.stats()["dropped_overflow_events"] == 1
    by_cause, total, metrics = d.lost()
    assert by_cause == {"overflow": 1, "interrupted": 3} and total == 4
    assert 'xasflow_events_lost_total{cause="overflow"} 1.0' in metrics
    assert 'xasflow_events_lost_total{cause="interrupted"} 3.0' in metrics
    stop_doc = d.stop_doc()
    assert stop_doc["interrupted"] is True and stop_doc["raw_missing_events"] == 4
    assert stop_doc["raw_dropped_events"] == 1


def test_a_drop_of_a_run_this_daemon_follows_stays_off_an_interrupted_runs_count(
    tmp_path: Path,
) -> None:
    """Run S starts on the new daemon while run R, left open by the killed one (event 1
    stored), still streams. S's event 2, dropped by the full input queue, has a seq_num R
    counts missing, but its descriptor was queued here: it is S's (``overflow`` once, in S's
    stop), not taken off R's ``interrupted`` count."""
    r_uid, r_docs = step_run(3, num_events={"primary": 3})
    _, s_docs = step_run(3, num_events={"primary": 3})
    r2, r3, r_stop = r_docs[3:]
    s_start, s_desc, s1, s2, s3, s_stop = s_docs
    interrupted = InterruptedRuns(_LeftOpen(r_uid, rows=1))
    interrupted.find()
    d = Daemon0MQ(tmp_path, "drop_newest", interrupted=interrupted)
    try:
        for batch in ((s_start, s_desc), (r2, s1, s2), (r3, r_stop), (s3, s_stop)):
            d.receive(*batch)  # s2 does not fit
            d.turn()
    finally:
        d.source.close()
    r_doc, s_doc = [doc for name, doc in d.docs if name == "stop"]
    assert (r_doc["raw_missing_events"], r_doc["raw_dropped_events"]) == (2, 0)
    assert (s_doc["raw_missing_events"], s_doc["raw_dropped_events"]) == (1, 1)
    by_cause, total, _ = d.lost()
    assert by_cause == {"overflow": 1, "interrupted": 2} and total == 3


def test_the_ledger_tells_rows_of_descriptors_never_queued() -> None:
    """Rows of a descriptor the input queued go to the assembler only; those of one never
    queued, or evicted before them (``drop_oldest``), are unseen too. The assembler's rows
    carry the run each descriptor was queued for, None for the unseen."""
    ledger = DropLedger()
    ledger.queued("descriptor", {"uid": "d1", "run_start": "r1"})
    ledger.record("event", {"descriptor": "d1", "seq_num": 4})
    ledger.record("event", {"descriptor": "d2", "seq_num": 5})
    ledger.record("descriptor", {"uid": "d1"})  # evicted
    ledger.record("event_page", {"descriptor": "d1", "seq_num": [6, 7]})
    assert ledger.take() == [("d1", [4], "r1"), ("d2", [5], None), ("d1", [6, 7], None)]
    assert ledger.take_unseen() == [("d2", [5]), ("d1", [6, 7])]
    assert ledger.take_unseen() == []


def test_an_event_dropped_at_close_under_block_is_lost_once(tmp_path: Path) -> None:
    """Under ``overflow: block`` the receive thread holds a page of 2 events while the queue
    is full; the input closes and drops it (``dropped_on_close``). Before: /health and
    /metrics counted 0 events lost. Now its rows are lost as ``on_close``, once: the runs
    closed at shutdown do not count them again."""
    _, docs = step_run(4)
    start, desc, e1, e2, e3, e4, _stop = docs
    d = Daemon0MQ(tmp_path, "block")
    d.receive(start, desc)
    d.turn()
    d.receive(e1, e2)  # the queue (2) is full
    d.source.close()  # stop receiving: what the thread holds cannot be queued any more
    d.receive(("event_page", pack_event_page(e3[1], e4[1])))
    stats = d.source.stats()
    assert (stats["dropped_on_close"], stats["dropped_overflow"]) == (1, 0)
    d.proc.drain.set()
    d.proc.run()  # the queue's documents, then the shutdown: the run closes (abort)
    by_cause, total, metrics = d.lost()
    assert by_cause == {"on_close": 2} and total == 2
    assert 'xasflow_events_lost_total{cause="on_close"} 2.0' in metrics
    assert 'xasflow_events_lost_total{cause="seq_gap"} 0.0' in metrics


def test_events_left_in_the_socket_at_close_are_lost_as_on_close(tmp_path: Path) -> None:
    """Under ``overflow: block`` the queue (2) is full, the receive thread holds event 1 and
    events 2-4 and the stop wait in its 0MQ socket when the input closes. Before: only the
    held event was counted (``on_close`` 1); what the socket held was lost uncounted. Now
    the thread takes those off the socket too: no room, so each is dropped on close and its
    rows are lost as ``on_close``, once (the run closed at shutdown does not count them)."""
    ctx = zmq.Context()
    address = f"inproc://left-at-close-{uuid.uuid4().hex}"
    pub = ZmqDocumentPublisher(address, bind=True, context=ctx)
    source = ZmqDocumentSource(
        ZmqInputConfig(address=address, queue_size=2, overflow="block"), context=ctx
    )
    try:
        source.start()
        _warm_up(source, pub)
        before = source.stats()
        _, docs = step_run(4)
        for name, doc in docs:  # inproc: each is in the source's socket once sent
            pub(name, doc)
        wait_for(lambda: source.stats()["backpressure_waits"] > before["backpressure_waits"])
        d = Daemon0MQ(tmp_path, "block", source=source)
        assert source.close()
        stats = source.stats()
        assert stats["received"] - before["received"] == len(docs)  # nothing left uncounted
        assert (stats["dropped_on_close"], stats["dropped_on_close_events"]) == (5, 4)
        assert stats["decoded"] == stats["delivered"] + stats["dropped_on_close"] + 2
        d.proc.drain.set()
        d.proc.run()  # start and descriptor, then the shutdown: the run closes (abort)
        by_cause, total, metrics = d.lost()
        assert by_cause == {"on_close": 4} and total == 4
        assert 'xasflow_events_lost_total{cause="seq_gap"} 0.0' in metrics
    finally:
        source.close()
        pub.close()
        ctx.term()


def test_nothing_is_queued_after_a_drop_at_close(tmp_path: Path) -> None:
    """Closing under ``block``, event 1 finds the queue full and is dropped; the processing
    thread then makes room, but events 2-3 and the stop, taken off the socket after it, are
    dropped too: queued, they would leave a hole at event 1 that the run counts again as
    ``seq_gap`` (its stop says 3 events). Each row is lost once, as ``on_close``."""
    _, docs = step_run(3)
    start, desc, e1, e2, e3, stop = docs
    d = Daemon0MQ(tmp_path, "block")
    d.receive(start, desc)  # the queue (2) is full
    d.source.close()
    d.receive(e1)  # no room, and the input no longer waits for it: dropped on close
    d.turn()  # start and descriptor taken: room again
    d.receive(e2, e3, stop)
    stats = d.source.stats()
    assert (stats["dropped_on_close"], stats["dropped_on_close_events"]) == (4, 3)
    assert stats["queue_depth"] == 0
    d.proc.drain.set()
    d.proc.run()
    by_cause, total, metrics = d.lost()
    assert by_cause == {"on_close": 3} and total == 3
    assert 'xasflow_events_lost_total{cause="seq_gap"} 0.0' in metrics


def _warm_up(source: ZmqDocumentSource, pub: ZmqDocumentPublisher) -> None:
    """Probe documents until one arrives (0MQ's slow joiner), then a fence; every document
    read up to the fence, so the queue is empty and what follows arrives in order."""
    token = uuid.uuid4().hex
    wait_for(
        lambda: pub("start", {"uid": token, "time": 0.0}) or source.get(timeout=0.05),
        "a probe to arrive",
    )
    pub("start", {"uid": f"fence-{token}", "time": 0.0})
    wait_for(
        lambda: (
            (item := source.get(timeout=0.05)) is not None and item[1]["uid"] == f"fence-{token}"
        ),
        "the fence to arrive",
    )


# --------------------------------------------------------------------------- 3. raw scan_id


@pytest.mark.parametrize(
    ("scan_id", "carried"),
    [
        (7, 7),
        (2**63 - 1, 2**63 - 1),
        (-(2**63), -(2**63)),
        (2**63, None),
        (2**70, None),
        (-(2**63) - 1, None),
        pytest.param(10**5000, None, id="10**5000"),  # more digits than str() of an int has
        (True, None),
        ("7", None),
    ],
    ids=lambda v: repr(v) if v is None or v.__class__ is not int else hex(v),
)
def test_the_analysis_start_carries_only_an_int64_raw_scan_id(scan_id: Any, carried: Any) -> None:
    """Before: any ``int`` scan_id of the raw start was copied into the analysis start's
    ``raw_scan_id``: 2**70 made the start unencodable as msgpack (the output's ``fmt:
    msgpack`` dropped it) and refused by the tiled store (``Integer exceeds 64-bit range``:
    the whole run's results lost); ``True`` became ``raw_scan_id: true``."""
    run = AnalysisRun("raw-s", {"uid": "raw-s", "time": 0.0, "scan_id": scan_id}, validate=True)
    start = run.close("success")[0][1]
    assert start.get("raw_scan_id") == carried and type(start.get("raw_scan_id")) is type(carried)
    encode_message("start", start, fmt="msgpack")  # raised TypeError beyond int64
    json.loads(json.dumps(start))


def test_a_numpy_scan_id_is_carried_as_an_int() -> None:
    np = pytest.importorskip("numpy")
    run = AnalysisRun("raw-n", {"uid": "raw-n", "time": 0.0, "scan_id": np.int64(12)})
    start = run.close("success")[0][1]
    assert start["raw_scan_id"] == 12 and type(start["raw_scan_id"]) is int


def test_the_store_keeps_a_run_whose_raw_scan_id_is_beyond_int64(tmp_path: Path) -> None:
    """The analysis store (tiled) refused the run's start, so none of its rows were kept."""
    pytest.importorskip("tiled")
    from helpers import STORE_DESCRIPTOR, store_row

    from xasflow.adapters.tiled_store import AnalysisStore

    run = AnalysisRun("raw-t", {"uid": "raw-t", "time": 0.0, "scan_id": 2**70})
    start = run.close("success")[0][1]
    with AnalysisStore(tmp_path / "store") as store:
        store.open_run("raw-t", start, STORE_DESCRIPTOR)
        assert store.add_event("raw-t", store_row(1))
        assert store.flush(timeout=60)
        stats = store.stats()
    assert (stats["stored"], stats["errors"]) == (1, 0)


def test_a_dropped_event_of_an_interrupted_runs_descriptor_queued_here_is_lost_once(
    tmp_path: Path,
) -> None:
    """The killed daemon saw run R's start (its table made ahead, nothing stored); R's
    descriptor reaches the successor, which queues it (the assembler refuses it: its run
    never started here), and its full input queue drops event 2. Before: the row was tied
    to R by the input, so the assembler held it (for a run that never opens there, until
    its 10,000-descriptor bound) and the interrupted runs never saw it: counted ``overflow``
    and again in R's ``interrupted`` count (3 - 0 stored), 4 events lost for 3."""
    uid, docs = step_run(3, num_events={"primary": 3})
    _start, desc, e1, e2, e3, stop = docs
    interrupted = InterruptedRuns(_LeftOpen(uid, rows=0))
    assert interrupted.find() == 1
    d = Daemon0MQ(tmp_path, "drop_newest", interrupted=interrupted)
    try:
        for batch in ((desc, e1, e2), (e3, stop)):  # e2 does not fit
            d.receive(*batch)
            d.turn()
    finally:
        d.source.close()
    assert d.source.stats()["dropped_overflow_events"] == 1
    stop_doc = d.stop_doc()
    assert (stop_doc["raw_missing_events"], stop_doc["raw_dropped_events"]) == (3, 1)
    by_cause, total, metrics = d.lost()
    assert by_cause == {"overflow": 1, "interrupted": 2} and total == 3
    assert 'xasflow_events_lost_total{cause="interrupted"} 2.0' in metrics
    assert d.parts.assembler is not None and d.parts.assembler.drops_held == 0


def test_drops_held_for_a_run_whose_start_never_comes_are_given_up_after_start_wait(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Run R's start was lost upstream; its descriptor is queued (and refused here as
    ``unknown_run``) and its events 1-3 dropped by the full input queue. Before: the
    assembler held their record for R, which never opens here, until 10,000 descriptors
    had been held after it. Now a run's held drops wait ``start_wait`` (the run timeout by
    default) on the assembler's clock for its start, then are given up: logged with the
    reason and counted in /health and /metrics (``drop_records_forgotten``: their events
    are lost as ``overflow`` already, so ``events_lost`` does not count them again). A run
    open here keeps its own until it closes."""
    from prometheus_client import CollectorRegistry, generate_latest

    now = [0.0]
    asm = RunAssembler(run_timeout=600.0, clock=lambda: now[0], start_wait=60.0)
    config = DaemonConfig(storage={"directory": str(tmp_path / "store")})  # type: ignore[arg-type]
    status = DaemonStatus(config, Counters(), Parts(assembler=asm))
    reg = CollectorRegistry()
    register_prometheus(status.counters, reg)
    status.counters.sync_lost("overflow", 4)  # what the input counted for the rows below
    lost_uid, lost_docs = step_run(3)
    open_uid, open_docs = step_run(2)
    (refused,) = asm.feed(*lost_docs[1])  # R's descriptor, its start never seen
    assert isinstance(refused, Rejected) and refused.reason == "unknown_run"
    asm.dropped(lost_docs[1][1]["uid"], [1, 2, 3], lost_uid)
    feed(asm, open_docs[:1])  # S is open here; its descriptor still waits in the queue
    asm.dropped(open_docs[1][1]["uid"], [1], open_uid)
    now[0] = 60.0
    asm.check_timeouts()
    assert (asm.drops_held, asm.early_drops_forgotten) == (4, 0)  # not yet
    now[0] = 61.0
    with caplog.at_level(logging.WARNING, logger="xasflow.daemon.assembly"):
        asm.check_timeouts()
    assert (asm.drops_held, asm.early_drops_forgotten) == (1, 3)  # S keeps its own
    (log,) = [r.getMessage() for r in caplog.records if "gave up" in r.getMessage()]
    assert "did not come within 60 s" in log and lost_uid in log
    assert status.health()["counters"]["drop_records_forgotten"] == 3
    text = generate_latest(reg).decode()
    assert "xasflow_drop_records_forgotten_total 3.0" in text
    assert 'xasflow_events_lost_total{cause="overflow"} 4.0' in text  # once, not again
    s_desc, _, s_e2, s_stop = open_docs[1:]  # its event 1 was the one dropped
    (closed,) = [o for o in feed(asm, [s_desc, s_e2, s_stop]) if isinstance(o, RunClosed)]
    assert (closed.missing_events, closed.dropped_events) == (1, 1)  # S's own drop kept


def test_the_start_wait_defaults_to_the_run_timeout() -> None:
    assert RunAssembler(run_timeout=42.0).start_wait == 42.0
    with pytest.raises(ValueError, match="start_wait"):
        RunAssembler(start_wait=0)


class _TwoLeftOpen(_LeftOpen):
    """A store holding two analysis runs a killed daemon left open (see :class:`_LeftOpen`)."""

    def __init__(self, first: _LeftOpen, second: _LeftOpen) -> None:
        super().__init__(first.info["raw_uid"], first.info["rows"])
        self.second = second.info

    def unfinished_runs(self) -> list[dict]:
        return [self.info, self.second]


@pytest.mark.parametrize("backlog", [False, True], ids=["same_turn", "turn_before"])
def test_a_drop_of_a_resumed_run_is_its_own(tmp_path: Path, backlog: bool) -> None:
    """Runs R and Q were left open by a killed daemon (nothing stored). R is delivered again
    from its start, and its event 1 is dropped by the full input queue while its start and
    descriptor wait there; the processor takes the drop in the turn that feeds R's start,
    or (``backlog``: the queue holds more than a turn takes) in a turn before it. Before:
    the drop was handed out while R was still left open, so it went to the interrupted
    runs: R's stop counted it again as ``seq_gap`` (2 events lost for 1), and Q's stop,
    whose seq_nums 1-2 are missing, took it as its own input drop (Q's ``interrupted``
    count 1 for 2). Now R's start takes it back: ``overflow`` once, in R's stop."""
    r_uid, r_docs = step_run(3, num_events={"primary": 3})
    q_uid, q_docs = step_run(2, num_events={"primary": 2})
    r_start, r_desc, r1, r2, r3, r_stop = r_docs
    q_stop = q_docs[-1]
    store = _TwoLeftOpen(_LeftOpen(r_uid, rows=0), _LeftOpen(q_uid, rows=0))
    interrupted = InterruptedRuns(store)
    assert interrupted.find() == 2
    d = Daemon0MQ(tmp_path, "drop_newest", interrupted=interrupted)
    try:
        d.receive(r_start, r_desc, r1)  # r1 does not fit
        if backlog:
            d.proc._turn([], check=False)  # the drops are taken, R's start still queued
        d.turn()
        for batch in ((r2, r3), (r_stop,), (q_stop,)):
            d.receive(*batch)
            d.turn()
    finally:
        d.source.close()
    assert d.source.stats()["dropped_overflow_events"] == 1
    r_doc, q_doc = [doc for name, doc in d.docs if name == "stop"]
    assert (r_doc["raw_missing_events"], r_doc["raw_dropped_events"]) == (1, 1)
    assert q_doc["interrupted"] is True
    assert (q_doc["raw_missing_events"], q_doc["raw_dropped_events"]) == (2, 0)
    by_cause, total, metrics = d.lost()
    assert by_cause == {"overflow": 1, "interrupted": 2} and total == 3
    assert 'xasflow_events_lost_total{cause="seq_gap"} 0.0' in metrics


def test_a_drop_queued_for_one_interrupted_run_stays_off_anothers_stop(tmp_path: Path) -> None:
    """Runs R and Q were left open by a killed daemon (nothing stored). R's descriptor is
    queued here (refused: R never started here) and its event 2 dropped by the full input
    queue. Before: Q's stop, which comes first and counts its seq_nums 1-2 missing, took
    the row as its own input drop (``raw_dropped_events`` 1, R's 0): the input had tied
    the row to R, and that was thrown away. Now Q takes only its own rows and those of no
    known run, and R's stop says the drop."""
    r_uid, r_docs = step_run(3, num_events={"primary": 3})
    q_uid, q_docs = step_run(2, num_events={"primary": 2})
    _start, r_desc, r1, r2, r3, r_stop = r_docs
    store = _TwoLeftOpen(_LeftOpen(r_uid, rows=0), _LeftOpen(q_uid, rows=0))
    interrupted = InterruptedRuns(store)
    assert interrupted.find() == 2
    d = Daemon0MQ(tmp_path, "drop_newest", interrupted=interrupted)
    try:
        for batch in ((r_desc, r1, r2), (q_docs[-1],), (r3, r_stop)):  # r2 does not fit
            d.receive(*batch)
            d.turn()
    finally:
        d.source.close()
    q_doc, r_doc = [doc for name, doc in d.docs if name == "stop"]
    assert (q_doc["raw_missing_events"], q_doc["raw_dropped_events"]) == (2, 0)
    assert (r_doc["raw_missing_events"], r_doc["raw_dropped_events"]) == (3, 1)
    by_cause, total, _ = d.lost()
    assert by_cause == {"overflow": 1, "interrupted": 4} and total == 5


def test_a_flood_of_drops_held_for_a_run_not_open_is_capped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Run F's start was lost upstream (its descriptor refused as ``unknown_run``) and the
    full input queue drops its events by the page: 1.5 million rows in one ``start_wait``.
    Before: the assembler held every row for F until ``start_wait`` was up (no row cap:
    memory grew with the flood). Now it holds 1,000,000 rows in all at most (about one step
    run's ``MAX_STEP_POINTS`` in memory); past that it forgets the largest record of a run
    not open here, counted in ``drop_records_forgotten`` and logged. Runs S (open, its
    descriptor still queued) and T (its start still queued) keep their one row each, and
    close with it counted once."""
    s_uid, s_docs = step_run(3, num_events={"primary": 3})
    t_uid, t_docs = step_run(3, num_events={"primary": 3})
    f_uid, f_docs = step_run(1)
    asm = RunAssembler()
    (refused,) = asm.feed(*f_docs[1])  # F's descriptor, its start never seen
    assert isinstance(refused, Rejected) and refused.reason == "unknown_run"
    feed(asm, s_docs[:1])
    asm.dropped(s_docs[1][1]["uid"], [1], s_uid)
    asm.dropped(t_docs[1][1]["uid"], [1], t_uid)
    page = list(range(1, 10_001))
    with caplog.at_level(logging.WARNING, logger="xasflow.daemon.assembly"):
        for _ in range(150):
            asm.dropped(f_docs[1][1]["uid"], page, f_uid)
    assert asm.drops_held <= 1_000_000
    assert (asm.drops_held, asm.early_drops_forgotten) == (500_002, 1_000_000)
    (log,) = [r.getMessage() for r in caplog.records if "1000000 rows held" in r.getMessage()]
    assert "forgot 1000000 input-queue drop(s)" in log and f_uid in log
    t_start, t_desc, _, t2, t3, t_stop = t_docs
    _, s_desc, _, s2, s3, s_stop = s_docs  # event 1 of each was dropped
    out = feed(asm, [t_start, t_desc, s_desc, t2, s2, t3, s3, t_stop, s_stop])
    closed = [
        (o.raw_uid, o.missing_events, o.dropped_events) for o in out if isinstance(o, RunClosed)
    ]
    assert closed == [(t_uid, 1, 1), (s_uid, 1, 1)]
    assert asm.drops_held == 500_000  # F's, until start_wait gives them up

"""The analysis store under faults that leave the catalog changed although the call failed,
under a run replayed while its predecessor's end is still queued, and with tables made at
raw starts whose runs never reach a spectrum.

The first two broke "every result is in the catalog exactly once, nothing lost unseen"
before their fixes (a reviewer's suspicions, shown with these tests; each docstring says
what happened); the third suspicion did not hold, and its test shows why.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("tiled")

from helpers import STORE_DESCRIPTOR as DESCRIPTOR
from helpers import store_row as _row

from xasflow.adapters.store_journal import JOURNAL_FILE, Journal
from xasflow.adapters.tiled_store import AnalysisStore, read_analysis


def _seqs(store: AnalysisStore, raw_uid: str) -> list[Any]:
    """The run's stored seq_nums in table order (None for a row stored without one)."""
    frame = read_analysis(store, raw_uid)[1]
    return [None if s != s else int(s) for s in frame["seq_num"]]


@pytest.mark.parametrize(
    ("journal", "keyed", "committed"),
    [
        (True, True, True),
        (False, True, True),
        (True, False, True),
        (False, False, True),
        (True, True, False),  # a failure before the commit is still retried
        (False, False, False),
    ],
    ids=lambda v: str(int(v)),
)
def test_an_append_that_committed_before_it_failed_is_not_written_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, journal: bool, keyed: bool, committed: bool
) -> None:
    """``append_partition`` commits, then raises (a connection dropped after the commit, a
    timeout on its answer). Before, the store's retry appended the same rows again: each
    result was in the catalog twice, with or without the journal and seq_nums. Now a retry
    first looks at what the failed try left; one that did not commit is written again."""
    from tiled.adapters.sql import SQLAdapter

    real = SQLAdapter.append_partition
    faults = {"left": 1}

    def commit_then_fail(self: Any, *args: Any, **kwargs: Any) -> Any:
        if committed:
            real(self, *args, **kwargs)
        if faults["left"] > 0:
            faults["left"] -= 1
            raise OSError("connection reset" + (" after the commit" if committed else ""))
        if not committed:
            real(self, *args, **kwargs)

    monkeypatch.setattr(SQLAdapter, "append_partition", commit_then_fail)
    rows = [_row(s) for s in (1, 2, 3)]
    if not keyed:
        for row in rows:
            del row["seq_num"]
    stored: list[int] = []
    lost: list[int] = []
    with AnalysisStore(tmp_path / "s", journal=journal) as store:
        store.open_run("R", {"uid": "a"}, DESCRIPTOR)
        store.add_events(
            "R", rows, on_stored=lambda: stored.append(1), on_lost=lambda: lost.append(1)
        )
        assert store.flush(30)
        assert faults["left"] == 0  # the fault did happen
        got = _seqs(store, "R")
        stats = store.stats()
    assert got == ([1, 2, 3] if keyed else [None, None, None])  # once each
    assert (len(stored), len(lost), stats["errors"]) == (3, 0, 0)


def test_a_finished_run_replayed_before_its_finish_is_written_keeps_its_journal_record(
    tmp_path: Path,
) -> None:
    """The daemon closes a run a killed predecessor left open (``finish_run``) and, before
    the writer has written that stop, Kafka redelivers the run's start: it is opened again
    and its rows journalled. Before, the writer's finish forgot the journal's record of the
    run whatever it held, the reopened copy's included: the rows journalled next had no run
    to be replayed under, so a crash then lost results already acknowledged."""
    directory = tmp_path / "s"
    with AnalysisStore(directory) as store:  # a predecessor killed with run R open
        store.open_run("R", {"uid": "a1"}, DESCRIPTOR)
        store.add_events("R", [_row(1), _row(2)])
        assert store.flush(30)
    acked: list[int] = []
    with AnalysisStore(directory, journal=True, flush_interval=30.0) as store:
        assert [u["raw_uid"] for u in store.unfinished_runs()] == ["R"]
        go, busy = threading.Event(), threading.Event()
        blocker = threading.Thread(target=store._call, args=(lambda: (busy.set(), go.wait(30)), 60))
        blocker.start()
        assert busy.wait(10)  # the writer is busy: what follows waits in its queue
        store.finish_run("R", {"uid": "stop-x", "exit_status": "fail", "interrupted": True})
        store.open_run("R", {"uid": "a2"}, DESCRIPTOR)  # the start redelivered
        go.set()
        blocker.join()
        store._call(lambda: None, 30)  # the writer has handled the finish and the reopen
        for seq in (3, 4):  # journalled and acknowledged; the catalog takes them in 30 s
            store.add_event("R", _row(seq), on_stored=lambda s=seq: acked.append(s))
        assert acked == [3, 4]
        # what the next start would replay if the process were killed now
        replay = {run.raw_uid: run for run in Journal(directory / JOURNAL_FILE).pending()}
        assert "R" in replay and replay["R"].stop is None
        in_journal = {int(r["seq_num"]) for r in replay["R"].rows}
        assert set(acked) <= in_journal | set(_seqs(store, "R"))  # a crash now loses none
        store.close_run("R", {"uid": "stop-2", "exit_status": "success"})
        assert store.flush(30)
        meta = read_analysis(store, "R")[0]
        assert _seqs(store, "R") == [1, 2, 3, 4] and meta["stop"]["uid"] == "stop-2"
    assert Journal(directory / JOURNAL_FILE).counts() == {"journal_runs": 0, "journal_rows": 0}


def _raw_docs(uid_hint: str) -> tuple[str, list[tuple[str, dict]]]:
    """A raw step run (start, descriptor, one event, stop), as bluesky sends it."""
    from event_model import compose_run

    keys = {k: {"source": "sim", "dtype": "number", "shape": []} for k in ("energy", "I0", "It")}
    run = compose_run(uid=uid_hint, metadata={"element": "Cu", "edge": "K"})
    desc = run.compose_descriptor(name="primary", data_keys=keys)
    event = desc.compose_event(
        data={"energy": 8900.0, "I0": 1.0, "It": 0.5}, timestamps=dict.fromkeys(keys, 1.0)
    )
    docs = [("start", run.start_doc), ("descriptor", desc.descriptor_doc), ("event", event)]
    return run.start_doc["uid"], [*docs, ("stop", run.compose_stop())]


class _Daemon:
    """The daemon's processing chain without its threads: ``build_processor`` over a real
    store (its table made at each raw start), a pipeline with no bundle, and a turn driven
    here; ``kill()`` leaves the store as SIGKILL would (no processor end). ``recover``: the
    runs a predecessor left open are found at start, as ``build_store`` does."""

    def __init__(self, tmp_path: Path, *, recover: bool = False) -> None:
        from xasflow.adapters.recovery import InterruptedRuns
        from xasflow.adapters.store_writer import StoreWriter
        from xasflow.daemon.assembly import RunAssembler
        from xasflow.daemon.config import DaemonConfig
        from xasflow.daemon.counters import Counters
        from xasflow.daemon.parts import Parts, build_processor
        from xasflow.daemon.pipeline import Pipeline
        from xasflow.daemon.registry import ModelRegistry

        self.directory = tmp_path / "store"
        config = DaemonConfig(storage={"directory": str(self.directory)})  # type: ignore[arg-type]
        self.counters = counters = Counters()
        (tmp_path / "models").mkdir(parents=True, exist_ok=True)
        pipeline = Pipeline(ModelRegistry(tmp_path / "models", counters), counters)
        self.store = AnalysisStore(self.directory, journal=True)
        source = type("Source", (), {"get": lambda self, timeout: None})()
        interrupted = InterruptedRuns(self.store) if recover else None
        if interrupted is not None:
            interrupted.find()
        parts = Parts(
            interrupted=interrupted,
            source=source,
            assembler=RunAssembler(),
            pipeline=pipeline,
            store=self.store,
            writer=StoreWriter(self.store),
        )
        self.proc = build_processor(parts, config, counters, [], lambda: None)

    def turn(self, docs: list[tuple[str, dict]], *, timeouts: bool = False) -> None:
        if timeouts:
            self.proc.assembler.run_timeout = -1.0  # every open run has waited too long
        self.proc._turn(docs, check=timeouts)

    def shutdown(self) -> None:
        self.proc._finish()
        assert self.store.flush(30)
        self.store.close()

    def kill(self) -> None:
        assert self.store.flush(30)
        self.store.close()


def _left_open(directory: Path) -> list[str]:
    """What the next daemon's start finds left open (``InterruptedRuns.find``)."""
    from xasflow.adapters.recovery import InterruptedRuns

    with AnalysisStore(directory, journal=True) as store:
        interrupted = InterruptedRuns(store)
        interrupted.find()
        return sorted(interrupted.pending())


def test_a_raw_run_that_never_reaches_a_spectrum_is_closed_in_its_own_process(
    tmp_path: Path,
) -> None:
    """Not a defect (a reviewer's suspicion, disproved): a table made at a raw start
    (``prepare_run``) is closed in the same process whenever its raw run ends there, with or
    without a spectrum (the assembler opens and closes an analysis run for every run, and
    its close writes start, descriptor and stop), so the next start finds nothing to call
    interrupted. Only a process killed before the run's end leaves the table open: that run
    was interrupted, and is reported so."""
    daemon = _Daemon(tmp_path / "a")
    rejected, docs = _raw_docs("all-rejected")  # its events refer to an unknown descriptor
    daemon.turn([d for d in docs if d[0] != "descriptor"])
    silent, docs = _raw_docs("start-only")  # its start arrives, nothing else: run timeout
    daemon.turn(docs[:1])
    daemon.turn([], timeouts=True)
    at_shutdown, docs = _raw_docs("shutdown")  # open when the daemon stops
    daemon.turn(docs[:1])
    daemon.shutdown()
    assert _left_open(tmp_path / "a" / "store") == []
    for uid, status in ((rejected, "success"), (silent, "fail"), (at_shutdown, "abort")):
        meta, _ = read_analysis(tmp_path / "a" / "store", uid)
        assert meta["start"]["raw_uid"] == uid and meta["stop"]["exit_status"] == status
        assert not meta["stop"].get("interrupted")

    daemon = _Daemon(tmp_path / "b")
    killed, docs = _raw_docs("killed")
    daemon.turn(docs[:1])  # its table is made; the process dies before its first result
    daemon.kill()
    assert _left_open(tmp_path / "b" / "store") == [killed]


def test_a_run_killed_before_its_first_result_counts_its_spectra_lost(tmp_path: Path) -> None:
    """A daemon killed after a raw start (its table made, no analysis start stored yet)
    leaves a run its successor closes as interrupted when the raw stop comes. Before, that
    stop was recorded (``raw_missing_events`` 1) but, with no analysis start to publish it
    under, the processor returned before counting the loss: /health and /metrics said no
    event was lost. Now the run's missing spectra count ``interrupted`` like any other's;
    its stop is still not published (no analysis start went out for it)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from xasflow.daemon.counters import register_prometheus

    killed, docs = _raw_docs("killed-early")
    first = _Daemon(tmp_path)
    first.turn(docs[:1])  # the raw start: its table is made; then SIGKILL
    first.kill()
    successor = _Daemon(tmp_path, recover=True)
    published: list[str] = []
    successor.proc.outlet.sinks.append(lambda name, doc: published.append(name))
    successor.turn(docs[-1:])  # the raw stop: num_events {"primary": 1}, nothing stored
    successor.shutdown()
    assert published == []
    assert successor.counters.events_lost == {"interrupted": 1}
    assert successor.counters.runs_closed == {"interrupted": 1}
    registry = CollectorRegistry()
    register_prometheus(successor.counters, registry)
    assert (
        'xasflow_events_lost_total{cause="interrupted"} 1.0' in generate_latest(registry).decode()
    )
    meta, rows = read_analysis(tmp_path / "store", killed)
    assert len(rows) == 0 and meta["stop"]["interrupted"] is True
    assert meta["stop"]["raw_missing_events"] == 1
    assert "0 of 1 raw spectra have stored results" in meta["stop"]["reason"]


def test_a_run_killed_between_its_container_and_its_table_reads_back_empty(
    tmp_path: Path,
) -> None:
    """A daemon SIGKILLed between a run's container and its table (seen with the real
    ``xasflow serve`` killed right after a raw start) leaves a container alone; recovery
    finds it (0 rows) and records its stop. Before, ``read_analysis`` of that run raised
    KeyError('primary'), so the run's stop and its reason could not be read back; now it
    gives the metadata and no rows."""
    from xasflow.adapters.recovery import InterruptedRuns
    from xasflow.adapters.tiled_schema import SPEC, run_metadata

    directory = tmp_path / "store"
    with AnalysisStore(directory, journal=True) as store:  # what the killed process left
        store.client().create_container(
            key="R", metadata=run_metadata(None, DESCRIPTOR, "primary"), specs=[SPEC]
        )
    with AnalysisStore(directory, journal=True) as store:
        interrupted = InterruptedRuns(store)
        assert interrupted.find() == 1
        interrupted.close("R", {"exit_status": "success", "num_events": {"primary": 3}})
        assert store.flush(30)
    meta, frame = read_analysis(directory, "R")
    assert len(frame) == 0 and "seq_num" in frame
    assert meta["stop"]["raw_missing_events"] == 3 and meta["stop"]["interrupted"] is True


def _left_closed(directory: Path) -> dict[str, Any]:
    """The journal a process killed once run R's stop was journalled left (R: rows 1, 2 and
    its stop, nothing in the catalog); the stop."""
    directory.mkdir()
    journal = Journal(directory / JOURNAL_FILE)
    journal.open_run("R", {"uid": "a"}, DESCRIPTOR)
    assert journal.add("R", [_row(1), _row(2)]) == [True, True]
    stop = {"uid": "z", "run_start": "a", "exit_status": "success"}
    assert journal.close_run("R", stop)
    journal.close()
    return stop


@pytest.mark.parametrize("refusals", [4, 10**6], ids=["catalog back", "catalog refusing"])
def test_a_replayed_run_whose_close_failed_keeps_its_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refusals: int
) -> None:
    """A process killed once a run's stop was journalled: the next start replays it, and
    the catalog refuses that close (every retry). Before, recovery then found the run
    without a stop, closed it as interrupted and put that stop over the real one in the
    journal's record: the 'success' the run ended with was gone from catalog and journal.
    Now a run whose record holds its stop is no interrupted run: its stop is written again
    when recovery looks (``catalog back``: the close's four tries refused, then none),
    else kept for the next start's replay (``catalog refusing``: every stop write refused,
    the writer's own later tries too, however long the session takes)."""
    from store_helpers import wrap_metadata_writes

    from xasflow.adapters.recovery import InterruptedRuns

    directory = tmp_path / "s"
    stop = _left_closed(directory)
    left = {"n": refusals}

    def refusing(real: Any, node: Any, metadata_patch: Any, *args: Any, **kwargs: Any) -> Any:
        if any(op["path"] == "/stop" for op in metadata_patch or []) and left["n"] > 0:
            left["n"] -= 1
            raise OSError("the catalog refused it")
        return real(node, metadata_patch, *args, **kwargs)

    wrap_metadata_writes(monkeypatch, refusing)
    with AnalysisStore(directory, journal=True) as store:
        interrupted = InterruptedRuns(store)
        found = interrupted.find()
        for raw_uid in interrupted.pending():  # what the daemon does once they time out
            interrupted.close(raw_uid, why="no raw stop")
        assert store.flush(30)
        first = read_analysis(store, "R")[0]["stop"]
        errors = store.stats()["errors"]
        kept = Journal(directory / JOURNAL_FILE).pending()
    left["n"] = 0  # the catalog takes writes again
    with AnalysisStore(directory, journal=True) as store:
        again = InterruptedRuns(store)
        assert again.find() == 0
        assert store.flush(30)
        meta, frame = read_analysis(store, "R")
    assert meta["stop"] == stop and [int(s) for s in frame["seq_num"]] == [1, 2]
    assert found == 0 and first == (stop if refusals == 4 else None)
    assert [r.stop for r in kept] == ([] if refusals == 4 else [stop])  # for the next start
    assert errors == (1 if refusals == 4 else 2)  # each refused close counted
    assert Journal(directory / JOURNAL_FILE).counts() == {"journal_runs": 0, "journal_rows": 0}


def test_a_replayed_close_the_catalog_refused_is_retried_while_the_store_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process killed once a run's stop was journalled: the next start replays it and
    the catalog refuses that close (every retry of the call), then its next write too, and
    takes the one after. Before, the writer gave the stop up until recovery asked for
    unfinished runs, or the next start: a daemon past its start kept the run stopless in
    the catalog, and its record in the journal. Now the writer tries it again itself after
    1 s, then 2 s (doubling, as a dead catalog process is retried), one request each: the
    store's retries of a call (0.05, 0.25, 1 s) held the writer, and every run's rows, for
    1.3 s at each refusal, and took the stop 0.05 s after the refused retry. Counted once
    in ``errors``."""
    from helpers import wait_for
    from store_helpers import wrap_metadata_writes

    directory = tmp_path / "s"
    directory.mkdir()
    journal = Journal(directory / JOURNAL_FILE)  # what the killed process left
    journal.open_run("R", {"uid": "a"}, DESCRIPTOR)
    assert journal.add("R", [_row(1), _row(2)]) == [True, True]
    stop = {"uid": "z", "run_start": "a", "exit_status": "success"}
    assert journal.close_run("R", stop)
    journal.close()
    refused: list[float] = []
    taken: list[float] = []

    def refusing(real: Any, node: Any, metadata_patch: Any, *args: Any, **kwargs: Any) -> Any:
        if any(op["path"] == "/stop" for op in metadata_patch or []):
            if len(refused) < 5:  # the close's four tries, then the first retry's one
                refused.append(time.monotonic())
                raise OSError("the catalog refused it")
            taken.append(time.monotonic())
        return real(node, metadata_patch, *args, **kwargs)

    wrap_metadata_writes(monkeypatch, refusing)
    with AnalysisStore(directory, journal=True) as store:
        wait_for(lambda: store.stats()["journal_runs"] == 0, "the stop retried and taken")
        meta, frame = read_analysis(store, "R")
        errors = store.stats()["errors"]
    assert meta["stop"] == stop and [int(s) for s in frame["seq_num"]] == [1, 2]
    assert (len(refused), len(taken), errors) == (5, 1, 1)
    assert refused[4] - refused[3] >= 0.9  # the first retry waited for its back-off (1 s)
    assert taken[0] - refused[4] >= 1.5  # and, refused, the next (2 s): no quick retries


@pytest.mark.parametrize("column", ["start", "stop"])
def test_a_damaged_record_is_kept_when_recovery_finishes_its_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, column: str
) -> None:
    """A killed process left run R open, all its rows moved to the catalog, and its journal
    record is damaged (its start or stop not JSON): the replay says so, counts it and keeps
    it for a person. Recovery then finds R stopless in the catalog and finishes it. Before,
    ``finish_run`` wrote its stop into that record and the writer, the catalog holding the
    stop, forgot it (no rows kept it): the record a person was told to look at was gone,
    and the next start said nothing. Now a record the store found damaged is left as it
    is; the catalog takes the stop, and the next start says the record again."""
    import sqlite3

    from xasflow.adapters.recovery import InterruptedRuns

    directory = tmp_path / "s"
    with AnalysisStore(directory, journal=True) as store:  # closed with R open, as if killed
        store.open_run("R", {"uid": "a"}, DESCRIPTOR)
        assert store.add_events("R", [_row(1), _row(2)]) == [True, True]
    with sqlite3.connect(directory / JOURNAL_FILE) as db:
        db.execute(f"UPDATE runs SET {column} = '{{\"uid\": ' WHERE raw_uid = 'R'")
        before = db.execute("SELECT * FROM runs").fetchall()
    with AnalysisStore(directory, journal=True) as store:
        interrupted = InterruptedRuns(store)
        assert interrupted.find() == 1
        stop = interrupted.close("R", {"exit_status": "success", "num_events": {"primary": 2}})
        assert stop is not None and store.flush(30)
        errors = store.stats()["errors"]
    with sqlite3.connect(directory / JOURNAL_FILE) as db:
        kept = db.execute("SELECT * FROM runs").fetchall()
    caplog.clear()
    with AnalysisStore(directory, journal=True) as store:  # the next start
        again = InterruptedRuns(store).find()
        assert store.flush(30)
        meta, frame = read_analysis(store, "R")
        said = store.stats()["errors"]
    assert (errors, kept, again, said) == (1, before, 0, 1)
    assert meta["stop"]["uid"] == stop["uid"] and [int(s) for s in frame["seq_num"]] == [1, 2]
    assert any("run R's record" in r.getMessage() for r in caplog.records)

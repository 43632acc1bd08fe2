"""Calls under way while the analysis store closes: what they were told is what happened.

``add_events``, ``close_run`` and ``finish_run`` each check that the store is open, write the
journal outside the lock, then queue their work for the writer thread. ``close()`` may begin
in between; whatever such a call then accepted must still reach the writer ahead of its stop
(stored and acknowledged, or reported lost), never be left behind it unseen.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("tiled")

from helpers import wait_for
from store_helpers import STORE_DESCRIPTOR, store_row

from xasflow.adapters.tiled_store import AnalysisStore, StoreError, read_analysis


def _held(store: AnalysisStore, name: str) -> tuple[threading.Event, threading.Event]:
    """Hold ``store.<name>`` (its journal step, run outside the store's lock) until the
    second event is set; the first is set once a call waits there."""
    entered, release = threading.Event(), threading.Event()
    real = getattr(store, name)

    def held(*args: Any) -> Any:
        entered.set()
        assert release.wait(60)
        return real(*args)

    setattr(store, name, held)
    return entered, release


def _stop_not_queued(store: AnalysisStore) -> bool:
    """close() has begun and no stop waits in the writer's queue: the writer has taken it
    (and may be gone), or close() holds it back for the calls under way."""
    with store._cond:
        return store._closing and not any(item[0] == "stop" for item in store._items)


def _into(out: list[Any], call: Any) -> Any:
    """A thread's target: ``call()``, its result (or exception) appended to ``out``."""

    def run() -> None:
        try:
            out.append(call())
        except Exception as exc:  # the test reads it
            out.append(exc)

    return run


def _close_while(
    store: AnalysisStore,
    step: str,
    call: Any,
    meanwhile: Any = None,
    closed: list[Any] | None = None,
) -> list[Any]:
    """Run ``call`` in a thread until it waits in its journal step ``store.<step>``
    (:func:`_held`), begin ``close()`` in another, wait until it has marked the store closing
    and its stop is not queued (taken by the writer, or held back by close()), run
    ``meanwhile()`` if given, then let ``call`` go on; returns the call's result (or
    exception). ``closed`` gets close()'s (None, or its exception)."""
    entered, release = _held(store, step)
    out: list[Any] = []
    caller = threading.Thread(target=_into(out, call))
    caller.start()
    assert entered.wait(30)
    closer = threading.Thread(target=_into([] if closed is None else closed, store.close))
    closer.start()
    wait_for(lambda: _stop_not_queued(store), "close() to begin, its stop not queued")
    if meanwhile is not None:
        meanwhile()
    release.set()
    caller.join(30)
    closer.join(30)
    assert not caller.is_alive() and not closer.is_alive()
    return out


def _failing_journal(store: AnalysisStore) -> None:
    """Make the callers' journal refuse every row write from now on (a full disk): the rows
    are then acknowledged by the catalog's commit, as without a journal."""

    def add(*args: Any) -> list[bool]:
        raise OSError("no space left on device")

    assert store._journal is not None
    store._journal.add = add  # type: ignore[method-assign]


@pytest.mark.parametrize("journal", ["off", "on", "failing"])
def test_rows_accepted_while_the_store_begins_closing_are_stored(
    tmp_path: Path, journal: str
) -> None:
    """Rows 3-4 accepted (add_events said True) while close() began are in the catalog once
    close() returns, and their callbacks ran: stored, never lost. Before, they were queued
    behind the writer's stop: without the journal (or with one whose write failed) neither
    callback ever ran and the rows were gone, counted nowhere; with it close() shut the
    journal under their write, and they were lost the same way."""
    directory = tmp_path / "s"
    store = AnalysisStore(directory, journal=journal != "off", flush_interval=30.0)
    store.open_run("R", {"uid": "a"}, STORE_DESCRIPTOR)
    store.add_events("R", [store_row(s) for s in (1, 2)])
    if journal == "failing":
        _failing_journal(store)
    stored, lost = [], []
    out = _close_while(
        store,
        "_journalled",
        lambda: store.add_events(
            "R",
            [store_row(3), store_row(4)],
            lambda: stored.append(1),
            on_lost=lambda: lost.append(1),
        ),
    )
    stats = store.stats()
    with AnalysisStore(directory, journal=journal != "off") as again:
        _, frame = read_analysis(again, "R")
        replayed = again.stats()["replayed"]
    assert out == [[True, True]]
    assert (len(stored), len(lost), stats["queued"]) == (2, 0, 0)
    assert sorted(int(s) for s in frame["seq_num"]) == [1, 2, 3, 4]
    assert replayed == 0


def test_a_stop_recorded_while_the_store_begins_closing_is_stored(tmp_path: Path) -> None:
    """close_run under way when close() begins records the stop (it is not refused after its
    journal write): the catalog holds it once close() returns, and the next start finds no
    unfinished run. Before, close_run raised StoreError after journalling the stop, and the
    run stayed open in the catalog until a later start's replay ended it."""
    directory = tmp_path / "s"
    store = AnalysisStore(directory, journal=True, flush_interval=30.0)
    store.open_run("R", {"uid": "a"}, STORE_DESCRIPTOR)
    store.add_events("R", [store_row(s) for s in (1, 2)])
    out = _close_while(
        store,
        "_journal_stop",
        lambda: store.close_run("R", {"uid": "a-stop", "exit_status": "success"}),
    )
    with AnalysisStore(directory, journal=True) as again:
        unfinished = [u["raw_uid"] for u in again.unfinished_runs()]
        replayed = again.stats()["replayed"]
        meta, frame = read_analysis(again, "R")
    assert out == [None]
    assert (unfinished, replayed) == ([], 0)
    assert (meta["stop"] or {}).get("uid") == "a-stop"
    assert sorted(int(s) for s in frame["seq_num"]) == [1, 2]


def test_a_finish_recorded_while_the_store_begins_closing_is_stored(tmp_path: Path) -> None:
    """finish_run (the stop of a run a killed process left open) under way when close()
    begins is recorded: the catalog holds the stop once close() returns, before any replay,
    and the next start finds no unfinished run. Before, finish_run raised StoreError after
    its journal step (close() had shut the journal under it), and the run stayed unfinished."""
    directory = tmp_path / "s"
    with AnalysisStore(directory, journal=True) as first:  # closed without the run's stop
        first.open_run("R", {"uid": "a"}, STORE_DESCRIPTOR)
        first.add_events("R", [store_row(1)])
    store = AnalysisStore(directory, journal=True, flush_interval=30.0)
    assert [u["raw_uid"] for u in store.unfinished_runs()] == ["R"]
    out = _close_while(
        store,
        "_journal_stop",
        lambda: store.finish_run("R", {"uid": "a-stop", "exit_status": "abort"}),
    )
    with AnalysisStore(directory) as plain:  # no journal: the catalog as close() left it
        meta, frame = read_analysis(plain, "R")
    with AnalysisStore(directory, journal=True) as again:
        unfinished = [u["raw_uid"] for u in again.unfinished_runs()]
        replayed = again.stats()["replayed"]
    assert out == [None]
    assert (meta["stop"] or {}).get("uid") == "a-stop"
    assert sorted(int(s) for s in frame["seq_num"]) == [1]
    assert (unfinished, replayed) == ([], 0)


def _waiting(store: AnalysisStore) -> set[str]:
    """The names of the threads waiting on the store's condition now (its wait wrapped)."""
    names: set[str] = set()
    real = store._cond.wait

    def wait(timeout: float | None = None) -> bool:
        name = threading.current_thread().name
        names.add(name)
        try:
            return real(timeout)
        finally:
            names.discard(name)

    store._cond.wait = wait  # type: ignore[method-assign]
    return names


def _second_close(store: AnalysisStore, out: list[Any]) -> Any:
    """What to run while the first close() waits: a second close() in a thread named
    ``second-close``, let run until it waits on the store or has returned; ``out`` gets its
    exception (or None) and, once it returned, the writer's state and the rows' counts."""
    waiting = _waiting(store)

    def second() -> None:
        try:
            store.close()
        except Exception as exc:  # the test reads it
            out.append(exc)
        else:
            out.append(None)
        stats = store.stats()
        out.append((store._writer.is_alive(), stats["queued"], stats["stored"]))

    def meanwhile() -> None:
        closer = threading.Thread(target=second, name="second-close")
        closer.start()
        wait_for(lambda: out or "second-close" in waiting, "the second close() to wait")
        out.append(closer)

    return meanwhile


def test_a_second_close_returns_once_the_first_has_written_everything(tmp_path: Path) -> None:
    """close() called while another close() waits for a call under way returns only once
    that one has ended: the rows the call accepted are stored and the writer is gone, as a
    caller of close() relies on. Before, it returned at once: the writer alive, queued 2,
    stored 0."""
    store = AnalysisStore(tmp_path / "s", flush_interval=30.0)
    store.open_run("R", {"uid": "a"}, STORE_DESCRIPTOR)
    second: list[Any] = []
    out = _close_while(
        store,
        "_journalled",
        lambda: store.add_events("R", [store_row(1), store_row(2)]),
        _second_close(store, second),
    )
    closer = next(x for x in second if isinstance(x, threading.Thread))
    closer.join(30)
    assert not closer.is_alive()
    assert out == [[True, True]]
    assert [x for x in second if not isinstance(x, threading.Thread)] == [None, (False, 0, 2)]


def test_a_second_close_raises_when_the_first_failed(tmp_path: Path) -> None:
    """A close() waiting for another that then fails (here the catalog's release raises) is
    let go and raises StoreError: it neither hangs nor says that all went well. Before, it
    returned at once while the first still waited."""
    store = AnalysisStore(tmp_path / "s", flush_interval=30.0)
    store.open_run("R", {"uid": "a"}, STORE_DESCRIPTOR)
    real = store._release

    def failing() -> None:
        real()
        raise OSError("the catalog would not shut down")

    store._release = failing  # type: ignore[method-assign]
    second: list[Any] = []
    closed: list[Any] = []
    _close_while(
        store,
        "_journalled",
        lambda: store.add_events("R", [store_row(1)]),
        _second_close(store, second),
        closed,
    )
    closer = next(x for x in second if isinstance(x, threading.Thread))
    closer.join(30)
    assert not closer.is_alive()
    assert [type(x) for x in closed] == [OSError]
    assert [type(x) for x in second if not isinstance(x, threading.Thread)] == [StoreError, tuple]
    store.close()  # one ended: a later close() returns at once


class _Down:
    """A catalog supervisor whose process is down and never comes back."""

    restarts = failures = 0

    def __call__(self) -> bool:
        return False

    def poll(self, now: float) -> Any:
        return None

    def next_check(self, now: float) -> float:
        return now + 1000.0


@pytest.mark.parametrize("journal", [False, True])
def test_a_flush_while_closing_says_whether_rows_were_given_up(
    tmp_path: Path, journal: bool
) -> None:
    """Rows waiting for a catalog whose process is down when the store closes are given up
    at the writer's end (told lost, counted in write_lost) unless the journal holds them
    (replayed at the next start): a flush() called while the store closes answers False
    for the first, True for the second. Before, it answered True for both (nothing queued)."""
    store = AnalysisStore(tmp_path / "s", journal=journal, flush_interval=30.0)
    store.open_run("R", {"uid": "a"}, STORE_DESCRIPTOR)
    assert store.flush(30)
    with store._cond:
        store._supervisor = _Down()  # type: ignore[assignment]
    stored: list[int] = []
    lost: list[int] = []
    store.add_events(
        "R",
        [store_row(1), store_row(2)],
        lambda: stored.append(1),
        on_lost=lambda: lost.append(1),
    )
    if journal:  # settled: the journal holds them
        wait_for(lambda: store.stats()["queued"] == 0, "the rows left to the journal")
    else:
        wait_for(lambda: len(store._held) == 2, "the rows held for the catalog")
    closer = threading.Thread(target=store.close)
    closer.start()
    wait_for(lambda: store._closing, "close() to begin")
    flushed = store.flush(30)
    closer.join(30)
    assert not closer.is_alive()
    stats = store.stats()
    assert flushed is journal
    assert (len(stored), len(lost), stats["write_lost"]) == ((2, 0, 0) if journal else (0, 2, 2))

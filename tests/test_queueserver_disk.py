"""The queueserver submitter's memory and the daemon's processing thread: ``enqueue`` (called
there) never waits on the memory's disk, and what a call records is on disk when it returns."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from feedback_helpers import REC, FakeApi, HeldApi
from helpers import wait_for
from queueserver_helpers import daemon, queued_runs, quick_config

from xasflow.adapters.queueserver_memory import SUBMITTED_FILE, SubmittedRuns

K1, K2 = ("raw-1", "run_end"), ("raw-2", "run_end")


class _HeldFsync:
    """``os.fsync`` held on ``thread`` (by name; every thread when None) until ``release``
    (``held`` set once one waits there), recording each file's text at its fsync."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, thread: str | None = None) -> None:
        self.thread = thread
        self.held = threading.Event()
        self.release = threading.Event()
        self.durable: dict[Path, str] = {}
        self._lock = threading.Lock()
        fsync = os.fsync

        def holding(fd: int) -> None:
            name = threading.current_thread().name
            if not self.release.is_set() and self.thread in (None, name):
                self.held.set()
                self.release.wait(60.0)  # past any wait_for's 20 s
            path = Path(os.readlink(f"/proc/self/fd/{fd}"))
            text = None if path.is_dir() else path.read_text(encoding="utf-8")
            fsync(fd)
            if text is not None:
                with self._lock:
                    self.durable[path] = text

        monkeypatch.setattr(os, "fsync", holding)


def test_enqueue_does_not_wait_for_the_memory_fsync_in_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker records raw-1's intent and its fsync is slow (held here); the daemon's
    processing thread then enqueues raw-2's plan. Before, the memory held its lock across
    the fsync and ``enqueue`` looked at the memory under that lock, so the processing
    thread waited on the disk. Now ``enqueue`` answers while the fsync is in progress; both
    plans go in once it ends."""
    path = tmp_path / "store" / SUBMITTED_FILE
    fake = FakeApi()
    sub = daemon(quick_config(), fake, path)
    disk = _HeldFsync(monkeypatch, "xasflow-queueserver")
    accepted: list[bool] = []
    processing = threading.Thread(target=lambda: accepted.append(sub.enqueue(REC, "raw-2")))
    try:
        assert sub.enqueue(REC, "raw-1")
        assert disk.held.wait(10.0), "the worker never wrote raw-1's intent"
        processing.start()
        wait_for(lambda: accepted, what="enqueue while the worker's fsync is in progress")
        assert accepted == [True] and fake.items == []
        disk.release.set()
        wait_for(lambda: queued_runs(fake) == ["raw-1", "raw-2"], what="both plans in")
        assert sub.join(10.0) and K1 in sub._memory and K2 in sub._memory
    finally:
        disk.release.set()
        processing.join(20.0)
        sub.close()
    with SubmittedRuns(path) as memory:
        assert memory.keys() == [K1, K2]


def test_a_line_recorded_during_another_threads_fsync_is_on_disk_when_its_call_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One thread's ``add`` is in its fsync (held) when another thread adds raw-2's key.
    The second one's change is made at once (the memory answers for raw-2 while the first
    fsync is in progress: before, it waited for that fsync under the lock), and its call
    returns only once its line is on disk: the file's text at the last fsync before it
    returned holds it, after raw-1's."""
    path = tmp_path / SUBMITTED_FILE
    with SubmittedRuns(path) as memory:
        memory.took()  # the file exists: no directory fsync in the way
        disk = _HeldFsync(monkeypatch)
        first = threading.Thread(target=lambda: memory.add(K1))
        at_return: list[str] = []

        def second() -> None:
            memory.add(K2)
            at_return.append(disk.durable.get(path, ""))

        other = threading.Thread(target=second)
        answered = threading.Event()  # the memory answered for raw-2 (looked at off this thread)

        def ask() -> None:
            while not disk.release.is_set() and K2 not in memory:
                time.sleep(0.01)
            if not disk.release.is_set():
                answered.set()

        asker = threading.Thread(target=ask)
        try:
            first.start()
            assert disk.held.wait(10.0), "raw-1's line was never fsync'd"
            other.start()
            asker.start()
            wait_for(answered.is_set, what="raw-2 recorded while raw-1's fsync is held")
            disk.release.set()
            first.join(20.0)
            other.join(20.0)
        finally:
            disk.release.set()
            for thread in (first, other, asker):
                thread.join(20.0)
        assert at_return and at_return[0].splitlines()[1:] == [
            '["raw-1", "run_end"]',
            '["raw-2", "run_end"]',
        ]
    with SubmittedRuns(path) as memory:
        assert memory.keys() == [K1, K2] and memory.slot_age() is not None


def test_a_line_whose_write_failed_is_on_disk_after_the_next_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """raw-1's line cannot be written (the disk refuses it once): that is logged, and the
    next write rewrites the file with all that is kept, raw-1's key with raw-2's."""
    from xasflow.adapters.queueserver_journal import Journal

    path = tmp_path / SUBMITTED_FILE
    append = Journal.append
    refused: list[list[str]] = []

    def once(self: Journal, lines: list[str]) -> None:
        if not refused:
            refused.append(lines)
            raise OSError(28, "No space left on device")
        append(self, lines)

    with SubmittedRuns(path) as memory:
        memory.took()
        monkeypatch.setattr(Journal, "append", once)
        with caplog.at_level("WARNING", logger="xasflow.adapters.queueserver_memory"):
            memory.add(K1)
        assert "cannot remember" in caplog.text and "No space left" in caplog.text
        assert refused == [['["raw-1", "run_end"]']] and "raw-1" not in path.read_text()
        memory.add(K2)
    with SubmittedRuns(path) as memory:
        assert memory.keys() == [K1, K2] and memory.slot_age() is not None


class _FsyncThreads:
    """The threads that called ``os.fsync``, in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.threads: list[threading.Thread] = []
        fsync = os.fsync

        def recording(fd: int) -> None:
            self.threads.append(threading.current_thread())
            fsync(fd)

        monkeypatch.setattr(os, "fsync", recording)


def test_a_replay_of_a_plan_whose_replays_are_spent_writes_nothing_on_the_processing_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """raw-1's plan was given up and tried again for its ``given_up_replays`` (2) replays:
    the next replay gives it up for good. Before, the processing thread (this one) wrote and
    fsync'd its ``abandoned`` line in ``enqueue``; now the worker writes it. It is counted at
    once (``abandoned_replays``), and a further replay is a repeat, counted nowhere else."""
    path = tmp_path / "store" / SUBMITTED_FILE
    with SubmittedRuns(path) as memory:
        memory.give_up(K1, {"regions": REC["regions"]}, False)
        memory.replayed(K1)
        memory.replayed(K1)
    fake = FakeApi()
    sub = daemon(quick_config(), fake, path)
    disk = _FsyncThreads(monkeypatch)
    try:
        assert not sub.enqueue(REC, "raw-1")
        assert sub.stats["abandoned_replays"] == 1
        wait_for(lambda: '"abandoned"' in path.read_text(), what="raw-1 given up for good")
        assert not sub.enqueue(REC, "raw-1")
        assert sub.stats["abandoned_replays"] == 1 and sub.stats["skipped_repeat"] == 1
        assert disk.threads and threading.current_thread() not in disk.threads
    finally:
        sub.close()
    assert fake.items == []
    with SubmittedRuns(path) as memory:
        assert K1 in memory and memory.given_up() == []


def test_a_plan_enqueued_while_close_runs_is_remembered_off_the_processing_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """raw-1's request is with the server when close begins (the daemon's shutdown, on
    another thread); the processing thread (this one) then enqueues raw-2's plan. Before,
    ``enqueue`` wrote and fsync'd raw-2's ``gave_up`` line itself; now it is counted
    (``dropped_closed``) and close writes it before it lets go of the memory: the next
    daemon finds it given up."""
    path = tmp_path / "store" / SUBMITTED_FILE
    fake = HeldApi()
    sub = daemon(quick_config(), fake, path)
    disk = _FsyncThreads(monkeypatch)
    closer = threading.Thread(target=lambda: sub.close(timeout=10.0))
    try:
        assert sub.enqueue(REC, "raw-1")
        assert fake.sending.wait(10.0), "raw-1's try never reached the server"
        closer.start()
        wait_for(lambda: sub._closing, what="close begun")
        assert not sub.enqueue(REC, "raw-2") and sub.stats["dropped_closed"] == 1
        on_this_thread = threading.current_thread() in disk.threads
        fake.release.set()
        closer.join(20.0)
        assert not closer.is_alive()
        assert not on_this_thread, "enqueue wrote to disk on the processing thread"
    finally:
        fake.release.set()
        closer.join(20.0)
    assert queued_runs(fake) == ["raw-1"] and sub.stats["dropped_closed"] == 1
    with SubmittedRuns(path) as memory:
        assert [plan.key for plan in memory.given_up()] == [K2] and K1 in memory

"""The queueserver submitter's memory and the daemon's processing thread: ``enqueue`` (called
there) never waits on the memory's disk, and what a call records is on disk when it returns."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from feedback_helpers import REC, FakeApi
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

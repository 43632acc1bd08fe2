"""The preparation process: stacks of spectra aligned, prepared and run through their
bundle's graphs in a child process, so the processing thread's GIL is free for assembly,
documents and the store while the numbers are crunched (``analysis.prep_process``).

Why a process: at 1,000 spectra/s the processing thread needs ~0.8 ms of CPU per spectrum
and the receive, store and dashboard threads ~0.2 ms more, all under one GIL: more than
one core's worth, on a machine with cores to spare. The child runs
:func:`~xasflow.daemon.stack_job.run_job` (the very function the thread runs without it) on
:class:`~xasflow.daemon.stack_job.StackJob` arrays sent through a pipe, and sends back the
flags, shifts, prepared spectra and raw graph outputs; the thread decodes them.

Nothing is lost to it: a job the child cannot run (its bundle changed on disk, a bug) comes
back as a failure and the thread runs it itself; if the child dies or stalls past
``timeout_s``, it is killed, every job it held is run in the thread, and a new child is
started (at most one start per ``restart_s``; until it is ready the thread does the work).
Each fallback and restart is counted in :attr:`PrepWorker.stats`. The child exits when the
daemon's end of the pipe closes, so a SIGKILLed daemon leaves no orphan behind.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from xasflow.daemon.stack_job import StackJob, StackResult, run_job

__all__ = ["JobFailed", "PrepWorker", "Ticket"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobFailed:
    """A job the child did not run, and why (the thread then runs it)."""

    why: str


@dataclass
class Ticket:
    """Jobs sent together; their results come back in the order sent."""

    seq: int
    jobs: list[StackJob]


def _serve(conn: Connection, threads: int) -> None:
    """The child's loop: ``(seq, jobs)`` in, ``(seq, results)`` out, until the pipe closes."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when its child ends
    predictors: dict[tuple[str, str], Any] = {}  # (path, manifest digest) -> Predictor | why
    inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def read() -> None:  # requests are taken as they come, so a sender never waits on a
        try:  # child that is itself waiting to send its answers (a full pipe both ways)
            while True:
                inbox.put(conn.recv())
        except (EOFError, OSError):
            inbox.put(None)

    threading.Thread(target=read, name="xasflow-prep-read", daemon=True).start()
    conn.send("ready")
    while True:
        request = inbox.get()
        if request is None:
            return
        seq, jobs = request
        results: list[StackResult | JobFailed] = []
        for job in jobs:
            predictor = _predictor(predictors, job, threads)
            if isinstance(predictor, str):
                results.append(JobFailed(predictor))
                continue
            try:
                results.append(run_job(job, predictor))
            except Exception as exc:  # the thread runs it instead
                results.append(JobFailed(f"{type(exc).__name__}: {exc}"))
        try:
            conn.send((seq, results))
        except (BrokenPipeError, OSError):
            return


#: Seconds a bundle the child refused is not tried again.
_RETRY_S = 30.0


def _predictor(cache: dict[tuple[str, str], Any], job: StackJob, threads: int) -> Any:
    """The job's bundle as the registry serves it, or why not (a str).

    Loaded from disk here, so it must be the very manifest the registry verified (with its
    digest, signature and bundle-id rules): a bundle changed on disk since, or one the
    registry refused, is never run. A refusal is remembered for ``_RETRY_S`` (a copy in
    progress may settle), so the bundle is not loaded again for every job.
    """
    from xasflow.models.predictor import Predictor

    key = (job.bundle_path, job.manifest_digest)
    entry = cache.get(key)
    if entry is None or (isinstance(entry, tuple) and time.monotonic() > entry[1]):
        try:
            loaded = Predictor(
                job.bundle_path,
                threads=threads,
                require_digest=False,
                max_graph_bytes=job.max_graph_bytes,
            )
        except Exception as exc:
            entry = (f"{type(exc).__name__}: {exc}", time.monotonic() + _RETRY_S)
        else:
            same = loaded.manifest_digest == job.manifest_digest
            why = f"the bundle in {job.bundle_path} is not the one served"
            entry = loaded if same else (why, time.monotonic() + _RETRY_S)
        cache.pop(key, None)
        cache[key] = entry
        while len(cache) > 8:  # a few swaps' worth
            cache.pop(next(iter(cache)))
    return entry[0] if isinstance(entry, tuple) else entry


class PrepWorker:
    """The daemon's handle on its preparation process (one caller thread)."""

    def __init__(self, threads: int = 1, timeout_s: float = 5.0, restart_s: float = 5.0) -> None:
        self.threads = threads
        self.timeout_s = timeout_s
        self.restart_s = restart_s
        self.stats: dict[str, int] = {"started": 0, "restarts": 0, "jobs": 0, "fallbacks": 0}
        self._proc: Any = None
        self._conn: Connection | None = None
        self._ready = False
        self._seq = 0
        self._sent: deque[int] = deque()
        self._next_start = 0.0
        self._closed = False
        self._lock = threading.Lock()  # start/close from the composition root vs the thread
        self._deadline: float | None = None  # a send or receive in progress must end by then
        self._watchdog: threading.Thread | None = None

    def start(self) -> None:
        """Start the child (it reports ready once its imports are done)."""
        with self._lock:
            if self._proc is not None or self._closed:
                return
            ctx = multiprocessing.get_context("spawn")  # never fork a threaded daemon
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_serve, args=(child, self.threads), name="xasflow-prep", daemon=True
            )
            proc.start()
            child.close()  # only the child holds its end: the pipe closes when either dies
            self._proc, self._conn, self._ready = proc, parent, False
            self._sent.clear()
            self.stats["started"] += 1
            self._next_start = time.monotonic() + self.restart_s
            if self._watchdog is None:
                self._watchdog = threading.Thread(
                    target=self._watch, name="xasflow-prep-watchdog", daemon=True
                )
                self._watchdog.start()

    def _watch(self) -> None:
        """Kill a child that holds a send or receive past its deadline: the pipe then breaks
        and the waiting thread takes over (a stopped child reads nothing, and a large batch
        does not fit the pipe)."""
        while not self._closed:
            time.sleep(0.1)
            deadline, proc = self._deadline, self._proc
            if deadline is not None and proc is not None and time.monotonic() > deadline:
                logger.error("preparation process (pid %s) stalled; killing it", proc.pid)
                proc.kill()
                self._deadline = None

    def wait_ready(self, timeout: float) -> bool:
        """Wait until the child is ready (its imports done); False after ``timeout`` s. For
        tests and tools: the daemon never waits, its thread prepares until the child is up."""
        deadline = time.monotonic() + timeout
        while not self._usable():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def health(self) -> dict[str, Any]:
        """For ``/health``: the child's pid, whether it takes work, and :attr:`stats`."""
        return {"pid": self.pid, "ready": self._check_ready(), **self.stats}

    @property
    def pid(self) -> int | None:
        """The child's process id (None when none runs)."""
        proc = self._proc  # read once: another thread may clear it
        return proc.pid if proc is not None else None

    def submit(self, jobs: list[StackJob]) -> Ticket | None:
        """Send ``jobs``; None when the child is not there or not ready (run them here)."""
        if not jobs or not self._usable():
            return None
        assert self._conn is not None
        self._seq += 1
        self._deadline = time.monotonic() + self.timeout_s
        try:
            self._conn.send((self._seq, jobs))
        except (BrokenPipeError, OSError, ValueError) as exc:
            self._deadline = None
            self._lost(f"sending failed: {exc}")
            self.stats["fallbacks"] += len(jobs)
            return None
        self._deadline = None
        self._sent.append(self._seq)
        self.stats["jobs"] += len(jobs)
        return Ticket(self._seq, jobs)

    def ready(self, ticket: Ticket) -> bool:
        """Whether :meth:`collect` of ``ticket`` (the oldest) would return without waiting."""
        conn = self._conn
        if conn is None or not self._sent or self._sent[0] != ticket.seq:
            return True
        try:
            return conn.poll(0)
        except (EOFError, OSError):
            return True

    def collect(self, ticket: Ticket) -> list[StackResult | JobFailed]:
        """The results of ``ticket`` (every ticket is collected, oldest first); a job the
        child did not run comes back as :class:`JobFailed`."""
        failed = [JobFailed("the preparation process is gone")] * len(ticket.jobs)
        conn = self._conn
        if conn is None or not self._sent or self._sent[0] != ticket.seq:
            self.stats["fallbacks"] += len(ticket.jobs)
            return list(failed)
        self._sent.popleft()
        self._deadline = time.monotonic() + self.timeout_s  # for all of the answer
        try:
            if not conn.poll(self.timeout_s):
                self._lost(f"no answer within {self.timeout_s:g} s")
                self.stats["fallbacks"] += len(ticket.jobs)
                return list(failed)
            seq, results = conn.recv()
        except (EOFError, OSError) as exc:
            self._deadline = None
            self._lost(f"the pipe broke: {exc}")
            self.stats["fallbacks"] += len(ticket.jobs)
            return list(failed)
        self._deadline = None
        if seq != ticket.seq or len(results) != len(ticket.jobs):
            self._lost(f"answer {seq} to request {ticket.seq}")
            self.stats["fallbacks"] += len(ticket.jobs)
            return list(failed)
        self.stats["fallbacks"] += sum(isinstance(r, JobFailed) for r in results)
        return list(results)

    def abandon(self, ticket: Ticket, why: str) -> None:
        """``ticket``'s results could not be collected (a bug): its jobs are run in the
        thread (counted as fallbacks) and the child, whose answers may be out of step now,
        is replaced."""
        self.stats["fallbacks"] += len(ticket.jobs)
        self._lost(why)

    def close(self, timeout: float = 5.0) -> None:
        """End the child: close the pipe (it exits), then terminate it if it lingers."""
        with self._lock:
            proc, conn = self._proc, self._conn
            self._proc, self._conn, self._ready, self._closed = None, None, False, True
            self._sent.clear()
        if conn is not None:
            conn.close()
        if proc is not None:
            proc.join(timeout)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout)

    def _usable(self) -> bool:
        if self._proc is None or self._conn is None:
            due = time.monotonic() >= self._next_start
            if self._proc is None and not self._closed and self.stats["started"] and due:
                self.stats["restarts"] += 1
                logger.warning("restarting the preparation process")
                self.start()
            return False
        return self._ready or self._check_ready()

    def _check_ready(self) -> bool:
        """Read the child's "ready" if it came (from the caller thread or ``/health``)."""
        with self._lock:
            conn = self._conn
            if self._ready or conn is None:
                return self._ready
            try:
                if conn.poll(0):
                    self._ready = conn.recv() == "ready"
                return self._ready
            except (EOFError, OSError) as exc:
                why = f"it did not start: {exc}"
        self._lost(why, conn)
        return False

    def _lost(self, why: str, conn: Connection | None = None) -> None:
        """The child is gone or stuck: kill it; the caller runs its jobs; start anew later.
        With ``conn``: only if that is still the child's pipe (the health thread may have
        seen the same failure, and a new child may be up already)."""
        with self._lock:
            if conn is not None and conn is not self._conn:
                return
            proc, conn = self._proc, self._conn
            self._proc, self._conn, self._ready, self._deadline = None, None, False, None
            self._sent.clear()
        logger.error(
            "preparation process (pid %s): %s; the processing thread takes over",
            proc.pid if proc is not None else None,
            why,
        )
        if conn is not None:
            conn.close()
        if proc is not None:
            proc.kill()
            proc.join(1.0)

"""0MQ document input and output, wire-compatible with bluesky's ``Publisher``/``Proxy``
(the output, :class:`ZmqDocumentPublisher`, lives in :mod:`xasflow.adapters.zmq_publisher`
and is named here too).

``ZmqDocumentSource`` is our own SUB consumer (not ``RemoteDispatcher``, which drops messages
under a slow callback): a receive thread that only receives, decodes (``xasflow.adapters.wire``)
and enqueues into a bounded queue with an explicit overflow policy, counting every outcome.
Its settings (:class:`ZmqInputConfig`) are in :mod:`xasflow.adapters.zmq_config`, named here too.

Overflow policies (``ZmqInputConfig.overflow``):

* ``"block"``: stop receiving while the queue is full. 0MQ then buffers up to ``rcvhwm``
  messages in this SUB socket and further messages are dropped *upstream* by the PUB side
  (the proxy), where we cannot count them. Nothing is dropped inside this process.
* ``"drop_newest"``: keep what is queued, discard the message that does not fit.
* ``"drop_oldest"``: evict the oldest queued message to make room for the new one.

Ignored prefixes (``ZmqInputConfig.ignore_prefixes``): 0MQ topic filters can only *include*,
so a consumer that subscribes to every prefix (``prefix=b""``) also receives what it publishes
itself through the same proxy (the daemon's analysis runs). Messages published under one of
``ignore_prefixes`` are dropped before decoding and counted as ``ignored``: they are neither
documents nor decode errors.

Closing (``close()``): the receive thread stops receiving, then takes off its socket what 0MQ
still holds for it (at most ``rcvhwm`` messages; :data:`DRAIN_MOST` when that is 0) before
the socket closes with it, each counted as received and decoded as any other. Nothing waits
for room any more, whatever the policy: a document is queued if it fits, none was dropped
before it and ``close()`` is still waiting for the thread, else it is dropped
(``dropped_on_close``, its event rows lost as ``on_close``). What 0MQ handed this socket is
never lost uncounted; what a publisher sends after that is dropped by its PUB side.

Counters (``stats()``): ``received`` (messages off the socket), ``bytes_received``,
``ignored``, ``decoded``, ``decode_errors`` and ``decode_errors.<reason>``,
``documents.<name>``, ``enqueued``, ``delivered`` (returned by ``get``), ``dropped_overflow``
(documents), ``dropped_overflow_events`` and ``dropped_unattributed`` (their event rows,
see :mod:`xasflow.adapters.input_drops`), ``dropped_on_close`` and ``dropped_on_close_events``
(documents not queued once the input closed: the one ``block`` held, those taken off the
socket then; and their event rows), ``backpressure_waits``
(messages that had to wait for room under ``block``), ``receive_errors``, and the gauge
``queue_depth``. Once quiescent,
``received == ignored + decoded + decode_errors`` and
``decoded == delivered + dropped_overflow + dropped_on_close + queue_depth``.

Dropped events wait in ``dropped_events()`` for the processing thread, so that each is lost
once (``overflow``), not again as a gap in its run (``seq_gap``); those of descriptors never
queued here also in ``unseen_drops()``, not to be counted again as ``interrupted``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import zmq

from xasflow.adapters.input_drops import DropLedger, dropped_at_close
from xasflow.adapters.wire import (
    DECODE_ERROR_REASONS,
    DOCUMENT_NAMES,
    WireError,
    decode_message,
)
from xasflow.adapters.zmq_config import (
    OVERFLOW_POLICIES,
    LockedCounters,
    ZmqInputConfig,
    normalize_address,
)
from xasflow.adapters.zmq_publisher import ZmqDocumentPublisher

__all__ = [
    "DRAIN_MOST",
    "OVERFLOW_POLICIES",
    "ZmqDocumentPublisher",
    "ZmqDocumentSource",
    "ZmqInputConfig",
    "normalize_address",
]

logger = logging.getLogger(__name__)

#: Messages taken off the socket at close when ``rcvhwm`` is 0 (0MQ's buffer unbounded): a
#: bound, so that a publisher faster than the decoding cannot keep a closing input open.
DRAIN_MOST = 1_000_000

_COUNTERS: tuple[str, ...] = (
    "received",
    "bytes_received",
    "ignored",
    "decoded",
    "decode_errors",
    "enqueued",
    "delivered",
    "dropped_overflow",
    "dropped_overflow_events",
    "dropped_unattributed",
    "dropped_on_close",
    "dropped_on_close_events",
    "backpressure_waits",
    "receive_errors",
    *(f"decode_errors.{r}" for r in (*DECODE_ERROR_REASONS, "internal")),
    *(f"documents.{n}" for n in sorted(DOCUMENT_NAMES)),
)


class ZmqDocumentSource:
    """Receive bluesky documents from a 0MQ proxy into a bounded, counted queue.

    Use ``start()``, then ``get(timeout)`` from the consumer; ``close()`` stops and joins the
    receive thread. The 0MQ socket lives entirely in the receive thread.
    """

    def __init__(self, cfg: ZmqInputConfig, context: zmq.Context | None = None) -> None:
        self.cfg = cfg
        self._address = normalize_address(cfg.address)
        self._own_context = context is None
        self._context = context if context is not None else zmq.Context()
        self._queue: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue(cfg.queue_size)
        self._counters = LockedCounters(_COUNTERS)
        self._stop = threading.Event()
        self._setup_done = threading.Event()
        self._setup_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._term_lock = threading.Lock()
        self._warned: set[str] = set()
        self._ignored_topics = cfg.ignored_topics
        self._dropped = DropLedger()
        self._dropped_at_close = False  # closing: a document was not queued, none will be
        self._close_lock = threading.Lock()  # orders queuing at close against close() giving up
        #: Set once the SUB socket is subscribed and connected (delivery may still lag:
        #: 0MQ's slow-joiner means a publisher should not assume we are seen yet).
        self.ready = threading.Event()
        self.last_error: str | None = None  # the most recent decode error's text
        self.last_document_at: float | None = None  # monotonic: the last document decoded

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 5.0) -> None:
        """Start the receive thread and wait until its socket is connected; raise if that fails.

        Returns or raises within ``timeout`` plus a thread start: a failed start does not wait
        for the receive thread (one still setting up its socket ends by itself, and closes
        what it made, including the context the source owns).
        """
        if self._thread is not None or self._closed:
            raise RuntimeError("ZmqDocumentSource can be started once")
        self._thread = threading.Thread(target=self._run, name="xasflow-zmq-in", daemon=True)
        self._thread.start()
        if not self._setup_done.wait(timeout):
            self.close(timeout=0)  # no join: the thread may be making its socket still
            raise TimeoutError(f"0MQ input did not connect to {self._address} within {timeout}s")
        if self._setup_error is not None:
            err = self._setup_error
            self.close(timeout=1.0)  # the thread has ended, or is returning
            raise RuntimeError(f"0MQ input could not connect to {self._address}: {err}") from err

    def close(self, timeout: float = 5.0) -> bool:
        """Stop receiving and join the thread; return True if it ended within ``timeout``.

        The thread first takes what 0MQ still holds for its socket (queued while there is
        room, else counted ``dropped_on_close``: module docstring). Documents queued stay
        readable with ``get``. Never blocks past ``timeout``: if the thread did not end, it
        queues nothing more (each document it still takes is dropped on close) and
        terminates the owned context itself once it ends.
        """
        self._stop.set()
        self._closed = True
        joined = True
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            joined = not self._thread.is_alive()
        if joined:
            self._term_context()
            return True
        with self._close_lock:  # nobody may take what it queues after this returns
            self._dropped_at_close = True
        if timeout > 0:
            logger.warning("0MQ input thread did not stop within %.1fs", timeout)
        return False

    def _term_context(self) -> None:
        """Terminate the owned context once no socket of it is open (by close, or by the
        receive thread on its way out after a close that did not wait for it)."""
        with self._term_lock:
            if self._own_context and not self._context.closed:
                self._context.term()  # the socket is closed by now, so term() returns at once

    def __enter__(self) -> ZmqDocumentSource:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def address(self) -> str:
        """The normalised address the SUB socket connects to."""
        return self._address

    @property
    def closed(self) -> bool:
        """True once ``close()`` has been called."""
        return self._closed

    # ------------------------------------------------------------------ consumer side

    def get(self, timeout: float | None = None) -> tuple[str, dict[str, Any]] | None:
        """Next ``(name, doc)``, or None after ``timeout`` seconds (or once closed and drained)."""
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        while True:
            if deadline is None:
                wait = self.cfg.poll_interval_s
            else:
                wait = min(self.cfg.poll_interval_s, deadline - time.monotonic())
            try:
                item = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                if (deadline is not None and time.monotonic() >= deadline) or self._closed:
                    return None
                continue
            self._counters.inc("delivered")
            return item

    def dropped_events(self) -> list[tuple[Any, list[Any], str | None]]:
        """Event rows the overflow policy dropped since the last call, oldest first:
        ``(descriptor uid, seq_nums, its run or None)`` per document (``DropLedger.take``)."""
        return self._dropped.take()

    def unseen_drops(self) -> list[tuple[Any, list[Any]]]:
        """Of those, the rows whose descriptor this input never queued (a run a killed
        predecessor followed: :class:`~xasflow.adapters.recovery.InterruptedRuns`)."""
        return self._dropped.take_unseen()

    def stats(self) -> dict[str, int]:
        """Snapshot of all counters plus the ``queue_depth`` gauge."""
        snap = self._counters.snapshot()
        snap["queue_depth"] = self._queue.qsize()
        return snap

    # ------------------------------------------------------------------ receive thread

    def _run(self) -> None:
        cfg = self.cfg
        try:
            sock = self._context.socket(zmq.SUB)
        except zmq.ZMQError as exc:
            self._setup_error = exc
            self._setup_done.set()
            return
        try:
            try:
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.RCVHWM, cfg.rcvhwm)  # must precede connect to take effect
                if cfg.max_message_bytes > 0:
                    sock.setsockopt(zmq.MAXMSGSIZE, cfg.max_message_bytes)
                sock.setsockopt(zmq.SUBSCRIBE, cfg.topic)
                sock.connect(self._address)
                self.ready.set()
            except zmq.ZMQError as exc:
                self._setup_error = exc
                return
            finally:
                self._setup_done.set()
            self._receive_loop(sock)
        finally:
            sock.close(linger=0)
            if self._closed:  # a close that did not wait for this thread left the context
                self._term_context()

    def _receive_loop(self, sock: zmq.Socket) -> None:
        # A blocking receive bounded by RCVTIMEO instead of poll + non-blocking receives: one
        # call (and one GIL hand-over) per message, and no zmq.Again raised at each wake-up.
        sock.setsockopt(zmq.RCVTIMEO, max(1, int(self.cfg.poll_interval_s * 1000)))
        while not self._stop.is_set():
            try:
                frames = sock.recv_multipart()
            except zmq.Again:
                continue  # idle for poll_interval_s: look at the stop flag
            except zmq.ContextTerminated:
                return
            except zmq.ZMQError as exc:
                self._counters.inc("receive_errors")
                logger.warning("0MQ receive error on %s: %s", self._address, exc)
                self._stop.wait(self.cfg.poll_interval_s)
                continue
            self._handle(frames)
        self._drain(sock)

    def _drain(self, sock: zmq.Socket) -> None:
        """Closing: take what 0MQ still holds for ``sock`` the counted way before it closes
        with it (module docstring); what comes meanwhile is taken too, up to the bound."""
        most = self.cfg.rcvhwm or DRAIN_MOST
        for _ in range(most):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return  # nothing more held
            except zmq.ZMQError as exc:  # the context was terminated: nothing can be read
                logger.warning("0MQ input %s: cannot read what is left: %s", self._address, exc)
                return
            self._handle(frames)
        logger.warning("0MQ input %s: stopped reading at close after %d", self._address, most)

    def _handle(self, frames: list[bytes]) -> None:
        counts = {"received": 1, "bytes_received": sum(len(f) for f in frames)}
        if self._ignored_topics and frames and frames[0].startswith(self._ignored_topics):
            counts["ignored"] = 1
            self._counters.add(counts)
            return
        try:
            name, doc = decode_message(frames, self.cfg.prefix, formats=self.cfg.formats)
        except WireError as exc:
            self._counters.add(counts)
            self._count_decode_error(exc.reason, str(exc))
            return
        except Exception as exc:  # a decoder bug must not kill the receive thread
            self._counters.add(counts)
            self._count_decode_error("internal", f"{type(exc).__name__}: {exc}")
            return
        counts["decoded"], counts[f"documents.{name}"] = 1, 1
        self.last_document_at = time.monotonic()  # the input hears documents (/health)
        self._counters.add(counts)  # received before a full queue holds it back
        if self._enqueue((name, doc)):
            self._counters.inc("enqueued")
            self._dropped.queued(name, doc)  # a descriptor: its events' drops are not unseen

    def _count_decode_error(self, reason: str, text: str) -> None:
        self._counters.inc("decode_errors")
        self._counters.inc(f"decode_errors.{reason}")
        self.last_error = text
        level = logging.DEBUG if reason in self._warned else logging.WARNING
        self._warned.add(reason)
        logger.log(level, "dropped undecodable 0MQ message from %s: %s", self._address, text)

    def _enqueue(self, item: tuple[str, dict[str, Any]]) -> bool:
        """Queue ``item`` by the overflow policy; False when it was dropped."""
        policy = self.cfg.overflow
        if self._stop.is_set():
            return self._enqueue_closing(item)
        if policy == "block":
            waited = False
            while True:
                try:
                    self._queue.put(item, timeout=self.cfg.poll_interval_s)
                    break
                except queue.Full:
                    if not waited:
                        waited = True
                        self._counters.inc("backpressure_waits")
                    if self._stop.is_set():
                        self._drop_at_close(item)
                        return False
        elif policy == "drop_newest":
            try:
                self._queue.put_nowait(item)
            except queue.Full:
                self._dropped_overflow(item)
                return False
        else:  # drop_oldest; this thread is the only producer, so one eviction makes room
            while True:
                try:
                    self._queue.put_nowait(item)
                    break
                except queue.Full:
                    try:
                        evicted = self._queue.get_nowait()
                    except queue.Empty:
                        continue
                    self._dropped_overflow(evicted)
        return True

    def _enqueue_closing(self, item: tuple[str, dict[str, Any]]) -> bool:
        """Closing, by any policy: queue ``item`` if it fits, none was dropped at close before
        it and ``close()`` still waits for this thread; else it is dropped on close."""
        with self._close_lock:
            if not self._dropped_at_close:
                try:
                    self._queue.put_nowait(item)
                    return True
                except queue.Full:
                    pass
            self._drop_at_close(item)
            return False

    def _drop_at_close(self, item: tuple[str, dict[str, Any]]) -> None:
        """Count a document not queued once closing; none is queued after it, so no run sees
        a hole where it was (its rows are lost once, as ``on_close``)."""
        self._dropped_at_close = True
        self._counters.add(dropped_at_close(*item))

    def _dropped_overflow(self, item: tuple[str, dict[str, Any]]) -> None:
        """Count a document the overflow policy dropped; remember its event rows."""
        self._counters.add(self._dropped.record(*item))

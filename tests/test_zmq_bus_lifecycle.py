"""The 0MQ source's lifecycle: its context, its config, a start that times out, a close."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest
import zmq
from helpers import wait_for
from zmq_helpers import DEADLINE_S, delta, sync

from xasflow.adapters.zmq_bus import ZmqDocumentPublisher, ZmqDocumentSource, ZmqInputConfig


def test_shared_context_is_left_open_and_bad_address_raises() -> None:
    ctx = zmq.Context()
    try:
        src = ZmqDocumentSource(ZmqInputConfig(address="tcp://127.0.0.1:9"), context=ctx)
        src.start()
        assert src.close()
        assert not ctx.closed
        bad = ZmqDocumentSource(ZmqInputConfig(address="nonsense://x"), context=ctx)
        with pytest.raises(RuntimeError, match="could not connect"):
            bad.start()
        assert not [t for t in threading.enumerate() if t.name == "xasflow-zmq-in"]
    finally:
        ctx.term()


def test_config_validation() -> None:
    assert ZmqInputConfig(prefix=b"bl").topic == b"bl "
    assert ZmqInputConfig().topic == b""
    assert ZmqInputConfig(ignore_prefixes=[b"out"]).ignored_topics == (b"out ",)
    for bad in (
        {"prefix": b"a b"},
        {"prefix": "str"},
        {"overflow": "drop_all"},
        {"queue_size": 0},
        {"formats": ("json",)},
        {"formats": ()},
        {"ignore_prefixes": b"echo"},
        {"ignore_prefixes": (b"",)},
        {"ignore_prefixes": (b"a b",)},
        {"prefix": b"raw", "ignore_prefixes": (b"raw",)},
    ):
        with pytest.raises(ValueError):
            ZmqInputConfig(**bad)


def test_a_start_that_times_out_returns_within_its_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A receive thread slow to make its socket (1.5 s here): ``start(timeout=0.2)`` raises
    within its timeout, not after ``close()`` joined that thread for up to 5 s more; the
    thread then ends by itself and terminates the context the source made."""
    import xasflow.adapters.zmq_bus as zmq_bus

    class SlowContext(zmq.Context):  # type: ignore[misc,type-arg]
        def socket(self, *args: Any, **kwargs: Any) -> Any:
            time.sleep(1.5)
            return super().socket(*args, **kwargs)

    monkeypatch.setattr(zmq_bus.zmq, "Context", SlowContext)
    source = ZmqDocumentSource(ZmqInputConfig(address="tcp://127.0.0.1:1"))
    context = source._context
    assert isinstance(context, SlowContext)
    threads = set(threading.enumerate())
    began = time.monotonic()
    with pytest.raises(TimeoutError, match=r"within 0\.2s"):
        source.start(timeout=0.2)
    took = time.monotonic() - began
    assert took < 0.7, f"start(timeout=0.2) took {took:.2f} s"
    (receiver,) = [t for t in threading.enumerate() if t not in threads]
    wait_for(lambda: not receiver.is_alive(), "the receive thread ended", 10)
    assert context.closed, "the receive thread left the source's context open"


class HeldSource:
    """A source on an inproc publisher (a document sent is in the source's socket at once)
    whose receive thread, once :meth:`hold` is called, stops in the decoding of the next
    document until :attr:`release` is set."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, **cfg: Any) -> None:
        import xasflow.adapters.zmq_bus as zmq_bus

        self.ctx = zmq.Context()
        address = f"inproc://held-{uuid.uuid4().hex}"
        self.pub = ZmqDocumentPublisher(address, bind=True, context=self.ctx)
        self.source = ZmqDocumentSource(ZmqInputConfig(address=address, **cfg), context=self.ctx)
        self.source.start()
        sync(self.source, self.pub)
        self.decoding, self.release = threading.Event(), threading.Event()
        self._monkeypatch, self._module = monkeypatch, zmq_bus

    def hold(self) -> None:
        decode, decoding, release = self._module.decode_message, self.decoding, self.release

        def held(*args: Any, **kwargs: Any) -> tuple[str, dict[str, Any]]:
            if not decoding.is_set():
                decoding.set()
                release.wait(DEADLINE_S)
            return decode(*args, **kwargs)

        self._monkeypatch.setattr(self._module, "decode_message", held)

    def hold_with_events(self, n: int) -> dict[str, int]:
        """Publish ``n`` events with the thread held decoding the first (the rest wait in the
        socket); the source's stats before them."""
        before = self.source.stats()
        self.hold()
        for i in range(n):
            self.pub("event", {"uid": f"e{i}", "seq_num": i})
        assert self.decoding.wait(DEADLINE_S)  # e0 is being decoded; e1.. wait in the socket
        return before

    def close(self) -> None:
        self.release.set()
        self.source.close()
        self.pub.close()
        self.ctx.term()


def test_documents_left_in_the_socket_at_close_are_queued(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: ``close()`` ended the receive thread and closed its socket with the documents
    0MQ still held for it: they were lost, counted nowhere (not even as received). Now the
    thread takes them off the socket before it ends and queues them (the counted path); the
    consumer reads them after the close, in order. Here the thread is held decoding the first
    of 20 documents while the source closes."""
    held = HeldSource(monkeypatch, queue_size=100)
    try:
        source = held.source
        n = 20
        before = held.hold_with_events(n)
        closer = threading.Thread(target=source.close)
        closer.start()
        wait_for(lambda: source.closed, "close() to have begun")
        held.release.set()
        closer.join(DEADLINE_S)
        assert not closer.is_alive()
        got = [source.get(timeout=0) for _ in range(n)]
        assert None not in got, f"{got.count(None)} of {n} documents lost at close"
        assert [doc["seq_num"] for _, doc in got] == list(range(n))  # type: ignore[index]
        assert source.get(timeout=0) is None
        after = source.stats()
        assert delta(after, before, "received") == n
        assert delta(after, before, "delivered") == n
        assert (after["dropped_on_close"], after["queue_depth"]) == (0, 0)
    finally:
        held.close()


def test_a_close_that_gives_up_on_the_thread_leaves_nothing_queued_after_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``close(timeout)`` returns when the thread has not ended (here: held decoding); the
    daemon then takes the queue's last documents and stops taking any. So what the thread
    takes after that (the held document, those left in the socket) is not queued, where no
    one would read it, but dropped on close: counted, every one."""
    held = HeldSource(monkeypatch, queue_size=100)
    try:
        source = held.source
        n = 20
        before = held.hold_with_events(n)
        assert source.close(timeout=0.2) is False  # the thread is still decoding e0
        held.release.set()
        wait_for(
            lambda: not [t for t in threading.enumerate() if t.name == "xasflow-zmq-in"],
            "the receive thread to end",
        )
        after = source.stats()
        assert source.get(timeout=0) is None  # nothing queued after close() returned
        assert delta(after, before, "received") == n
        assert delta(after, before, "dropped_on_close") == n
        assert delta(after, before, "dropped_on_close_events") == n
    finally:
        held.close()

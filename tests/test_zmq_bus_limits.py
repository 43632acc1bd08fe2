"""The 0MQ source under stress: hostile input, a full queue's policies, closing while blocked.

Every test runs its own ``bluesky.callbacks.zmq.Proxy`` in a subprocess on loopback. 0MQ's
slow-joiner problem is handled by publishing probe documents until the source sees one, then a
fence; everything the test publishes afterwards on that path is delivered in order.
"""

from __future__ import annotations

import os
import pickle
import random
import shlex
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import wait_for
from zmq_helpers import (
    DEADLINE_S,
    bluesky_proxy,
    bluesky_publisher,
    collect,
    delta,
    start_source,
    sync,
)

from xasflow.adapters.wire import WireError, decode_message
from xasflow.adapters.zmq_bus import ZmqDocumentPublisher, ZmqDocumentSource, ZmqInputConfig


@pytest.fixture
def proxy() -> Iterator[tuple[str, str]]:
    """A real bluesky 0MQ Proxy: yields (address publishers connect to, address to subscribe)."""
    with bluesky_proxy() as addresses:
        yield addresses


# --------------------------------------------------------------------------- hostile input


class _Shell:
    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (self.cmd,))


class Gadget:
    """A custom class: refused by the restricted unpickler."""


def test_garbage_and_malicious_pickles_are_counted_not_executed(
    proxy, closing, tmp_path: Path
) -> None:
    in_address, out_address = proxy
    source = start_source(closing, address=out_address)
    raw = closing(ZmqDocumentPublisher(in_address))
    target = tmp_path / "pwned"
    evil = pickle.dumps({"uid": "x", "data": _Shell(f"touch {shlex.quote(str(target))}")})

    def evil_serializer(doc: dict[str, Any]) -> bytes:
        return evil if doc.get("uid") == "evil" else pickle.dumps(doc)

    def gadget_serializer(doc: dict[str, Any]) -> bytes:
        return pickle.dumps({"g": Gadget()}) if doc.get("uid") == "gadget" else pickle.dumps(doc)

    # bluesky's own Publisher framing around the hostile bodies.
    evil_pub = bluesky_publisher(closing, in_address, serializer=evil_serializer)
    gadget_pub = bluesky_publisher(closing, in_address, serializer=gadget_serializer)
    for pub in (raw, evil_pub, gadget_pub):
        sync(source, pub)
    before = source.stats()

    rng = random.Random(1449)
    garbage: list[bytes | list[bytes]] = [
        b" \x80abc ",
        b" start ",
        b" start abc",
        b"",
        b"GET / HTTP/1.1\r\n\r\n",
        b" start " + pickle.dumps([1, 2, 3]),
        b" bulk_events " + pickle.dumps({}),
        [b"too", b"many", b"frames", b"here"],
        *(bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300))) for _ in range(40)),
    ]
    expected: dict[str, int] = {}
    for msg in garbage:
        with pytest.raises(WireError) as info:
            decode_message(msg)
        expected[info.value.reason] = expected.get(info.value.reason, 0) + 1
        raw.send_raw(msg)
    raw("start", {"uid": "after-garbage"})  # same pipe, so it arrives after all the garbage
    assert collect(source, 1) == [("start", {"uid": "after-garbage"})]

    evil_pub("event", {"uid": "evil"})
    evil_pub("stop", {"uid": "evil"})
    gadget_pub("event", {"uid": "gadget"})
    evil_pub("start", {"uid": "after-evil"})
    gadget_pub("start", {"uid": "after-gadget"})
    assert {doc["uid"] for _, doc in collect(source, 2)} == {"after-evil", "after-gadget"}

    after = source.stats()
    expected["forbidden_global"] = expected.get("forbidden_global", 0) + 3
    n_bad = len(garbage) + 3
    assert delta(after, before, "decode_errors") == n_bad
    for reason, count in expected.items():
        assert delta(after, before, f"decode_errors.{reason}") == count, reason
    assert delta(after, before, "received") == delta(after, before, "decoded") + n_bad
    assert delta(after, before, "decoded") == 3
    assert not target.exists()

    raw("stop", {"uid": "still-alive", "exit_status": "success"})
    assert collect(source, 1) == [("stop", {"uid": "still-alive", "exit_status": "success"})]


# --------------------------------------------------------------------------- overflow


@pytest.mark.parametrize("policy", ["drop_newest", "drop_oldest"])
def test_drop_policies_count_exactly(proxy, closing, policy: str) -> None:
    in_address, out_address = proxy
    source = start_source(closing, address=out_address, queue_size=4, overflow=policy)
    pub = closing(ZmqDocumentPublisher(in_address))
    sync(source, pub)
    before = source.stats()
    source.dropped_events()  # what sync left (nothing, unless a probe found the queue full)
    n = 50
    for i in range(n):
        pub("event", {"uid": f"e{i}", "seq_num": i, "data": {"mu": np.full(256, float(i))}})
    wait_for(
        lambda: (
            delta(source.stats(), before, "dropped_overflow") + source.stats()["queue_depth"] == n
        ),
        "all messages to be handled",
    )
    got = [source.get(timeout=0) for _ in range(4)]
    assert source.get(timeout=0) is None
    seqs = [doc["seq_num"] for _, doc in got]  # type: ignore[index]
    assert seqs == ([0, 1, 2, 3] if policy == "drop_newest" else [46, 47, 48, 49])
    for _, doc in got:  # type: ignore[misc]
        np.testing.assert_array_equal(doc["data"]["mu"], np.full(256, float(doc["seq_num"])))

    after = source.stats()
    received = delta(after, before, "received")
    delivered = delta(after, before, "delivered")
    dropped = delta(after, before, "dropped_overflow")
    assert (received, delivered, dropped) == (n, 4, n - 4)
    assert received == delivered + dropped
    assert after["queue_depth"] == 0 and after["backpressure_waits"] == 0
    # each dropped event is one lost event row, and which one waits for the processing thread
    assert delta(after, before, "dropped_overflow_events") == n - 4
    lost = [seq for _, seqs, _ in source.dropped_events() for seq in seqs]
    assert sorted(lost) == sorted(set(range(n)) - set(seqs)) and source.dropped_events() == []


def test_block_policy_stops_receiving_and_loses_nothing(proxy, closing) -> None:
    in_address, out_address = proxy
    source = start_source(closing, address=out_address, queue_size=2, overflow="block")
    pub = closing(ZmqDocumentPublisher(in_address))
    sync(source, pub)
    before = source.stats()
    n = 30
    for i in range(n):
        pub("event", {"uid": f"e{i}", "seq_num": i, "data": {"mu": np.arange(1000.0) + i}})

    wait_for(lambda: source.stats()["backpressure_waits"] > before["backpressure_waits"], "block")
    # While blocked the thread holds exactly one decoded message and receives nothing more.
    time.sleep(0.1)
    held = source.stats()
    assert delta(held, before, "received") == 3 and held["queue_depth"] == 2

    got = []
    for _ in range(n):
        item = source.get(timeout=DEADLINE_S)
        assert item is not None
        got.append(item)
        time.sleep(0.002)  # a slow consumer
    assert [d["seq_num"] for _, d in got] == list(range(n))
    np.testing.assert_array_equal(got[-1][1]["data"]["mu"], np.arange(1000.0) + n - 1)
    after = source.stats()
    assert delta(after, before, "received") == n
    assert delta(after, before, "delivered") == n
    assert after["dropped_overflow"] == 0 and after["dropped_on_close"] == 0


def test_close_is_prompt_when_idle_or_blocked(proxy, closing) -> None:
    in_address, out_address = proxy
    idle = closing(ZmqDocumentSource(ZmqInputConfig(address="tcp://127.0.0.1:9")))  # no peer
    idle.start()
    assert idle.close(timeout=5.0)
    assert idle.close(timeout=5.0)  # idempotent
    with pytest.raises(RuntimeError):
        idle.start()

    blocked = closing(ZmqDocumentSource(ZmqInputConfig(address=out_address, queue_size=1)))
    blocked.start()
    pub = closing(ZmqDocumentPublisher(in_address))
    sync(blocked, pub)
    before = blocked.stats()
    for i in range(3):
        pub("event", {"uid": f"e{i}"})
    wait_for(lambda: blocked.stats()["backpressure_waits"] == 1, "the receiver to block")
    assert blocked.close(timeout=5.0)
    stats = blocked.stats()
    # e0 is queued; e1, held for room, and e2 if it reached the socket are dropped on close
    assert stats["dropped_on_close"] == delta(stats, before, "received") - 1 >= 1
    assert stats["decoded"] == stats["delivered"] + stats["dropped_on_close"] + stats["queue_depth"]
    assert blocked.get(timeout=0) == ("event", {"uid": "e0"})  # queued documents stay readable
    assert blocked.get(timeout=1.0) is None  # closed and drained: returns, does not wait
    assert not [t for t in threading.enumerate() if t.name == "xasflow-zmq-in"]

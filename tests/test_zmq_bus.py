"""0MQ input/output against real bluesky parts (Proxy, Publisher, RunEngine, RemoteDispatcher).

Every test runs its own ``bluesky.callbacks.zmq.Proxy`` in a subprocess on loopback. 0MQ's
slow-joiner problem is handled by publishing probe documents until the source sees one, then a
fence; everything the test publishes afterwards on that path is delivered in order.
"""

from __future__ import annotations

import os
import pickle
import random
import selectors
import shlex
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import event_model
import msgpack_numpy
import numpy as np
import pytest
import zmq
from helpers import wait_for

from xasflow.adapters.wire import WireError, decode_message, encode_message, encode_msgpack
from xasflow.adapters.zmq_bus import ZmqDocumentPublisher, ZmqDocumentSource, ZmqInputConfig

DEADLINE_S = 15.0

PROXY_SCRIPT = """
from bluesky.callbacks.zmq import Proxy
proxy = Proxy("tcp://127.0.0.1", "tcp://127.0.0.1")
print(proxy.in_port, proxy.out_port, flush=True)
proxy.start()
"""

# A RunEngine scan in its own process (ophyd starts caproto threads on import that never stop).
RUN_ENGINE_SCRIPT = """
import copy, pickle, select, sys, time
import numpy as np
from bluesky import RunEngine
from bluesky.callbacks.zmq import Publisher
from bluesky.plans import scan
from ophyd.sim import SynSignal, det, motor

in_address, out_file, token = sys.argv[1:4]
pub = Publisher(in_address)
spectrum = SynSignal(func=lambda: np.linspace(0.0, 1.0, 500) ** 2, name="spectrum")
RE = RunEngine({}, context_managers=[])
docs = []
RE.subscribe(pub)
RE.subscribe(lambda name, doc: docs.append((name, copy.deepcopy(doc))))
deadline = time.monotonic() + 60
i = 0
while not select.select([sys.stdin], [], [], 0.02)[0] and time.monotonic() < deadline:
    pub("event", {"uid": f"probe-{i}", "probe": token})
    i += 1
sys.stdin.readline()
pub("event", {"uid": "fence", "probe": token, "fence": True})
RE(scan([det, spectrum], motor, -1, 1, 5))
with open(out_file, "wb") as f:
    pickle.dump(docs, f)
pub.close()
"""


# --------------------------------------------------------------------------- fixtures/helpers


def assert_docs_equal(a: Any, b: Any, path: str = "doc") -> None:
    """Deep equality that compares numpy arrays by dtype, shape and values."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray), path
        assert a.dtype == b.dtype and a.shape == b.shape, path
        np.testing.assert_array_equal(a, b, err_msg=path)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            assert_docs_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_docs_equal(x, y, f"{path}[{i}]")
    else:
        assert type(a) is type(b) and a == b, f"{path}: {a!r} != {b!r}"


def make_run(n_events: int, n_points: int) -> list[tuple[str, dict[str, Any]]]:
    """An XAS-like run from event-model: start, descriptor, events carrying spectra, stop."""
    bundle = event_model.compose_run(metadata={"plan_name": "xas_scan"})
    desc = bundle.compose_descriptor(
        name="primary",
        data_keys={
            "energy": {"source": "sim", "dtype": "array", "shape": [n_points]},
            "i0": {"source": "sim", "dtype": "array", "shape": [n_points]},
        },
    )
    docs: list[tuple[str, dict[str, Any]]] = [("start", bundle.start_doc)]
    docs.append(("descriptor", desc.descriptor_doc))
    energy = np.linspace(8800.0, 9500.0, n_points)
    for i in range(n_events):
        data = {"energy": energy, "i0": np.exp(-energy / 1e4) * (i + 1)}
        ts = dict.fromkeys(data, 1.0)
        docs.append(("event", desc.compose_event(data=data, timestamps=ts, validate=False)))
    docs.append(("stop", bundle.compose_stop(exit_status="success")))
    return docs


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise TimeoutError("subprocess printed nothing")
    return proc.stdout.readline()


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture
def proxy() -> Iterator[tuple[str, str]]:
    """A real bluesky 0MQ Proxy: yields (address publishers connect to, address to subscribe)."""
    proc = subprocess.Popen([sys.executable, "-c", PROXY_SCRIPT], stdout=subprocess.PIPE, text=True)
    try:
        in_address, out_address = _read_line(proc, DEADLINE_S).split()
        yield in_address, out_address
    finally:
        _stop(proc)
        assert proc.stdout is not None
        proc.stdout.close()


@pytest.fixture
def closing() -> Iterator[Callable[[Any], Any]]:
    """Register sources/publishers for teardown; asserts sources' threads really ended."""
    objs: list[Any] = []
    yield lambda obj: objs.append(obj) or obj
    for obj in reversed(objs):
        if isinstance(obj, ZmqDocumentSource):
            assert obj.close(timeout=5.0)
        else:
            obj.close()
    alive = [t.name for t in threading.enumerate() if t.name == "xasflow-zmq-in"]
    assert alive == []


def start_source(closing: Callable[[Any], Any], **cfg: Any) -> ZmqDocumentSource:
    """Create, register and start a source."""
    src = closing(ZmqDocumentSource(ZmqInputConfig(**cfg)))
    src.start()
    assert src.ready.is_set()
    return src


def bluesky_publisher(closing: Callable[[Any], Any], address: str, **kw: Any) -> Any:
    """A real ``bluesky.callbacks.zmq.Publisher`` registered for teardown."""
    from bluesky.callbacks.zmq import Publisher

    return closing(Publisher(address, **kw))


def sync(source: ZmqDocumentSource, send: Callable[[str, dict[str, Any]], Any], **tag: Any) -> None:
    """Publish probes until one arrives, then a fence; return once the fence is consumed."""
    token = uuid.uuid4().hex
    deadline = time.monotonic() + DEADLINE_S
    i = 0
    while True:
        assert time.monotonic() < deadline, "no probe arrived: subscription never propagated"
        send("event", {"uid": f"probe-{token}-{i}", "probe": token, **tag})
        i += 1
        item = source.get(timeout=0.05)
        if item is not None and item[1].get("probe") == token:
            break
    send("event", {"uid": f"fence-{token}", "probe": token, "fence": True, **tag})
    while True:
        item = source.get(timeout=max(0.0, deadline - time.monotonic()))
        assert item is not None, "fence did not arrive"
        if item[1].get("probe") == token and item[1].get("fence"):
            return


def collect(source: ZmqDocumentSource, n: int) -> list[tuple[str, dict[str, Any]]]:
    """Exactly the next ``n`` documents (skipping nothing)."""
    out = []
    deadline = time.monotonic() + DEADLINE_S
    while len(out) < n:
        item = source.get(timeout=max(0.0, deadline - time.monotonic()))
        assert item is not None, f"only {len(out)} of {n} documents arrived"
        out.append(item)
    return out


def delta(after: dict[str, int], before: dict[str, int], key: str) -> int:
    return after[key] - before[key]


# --------------------------------------------------------------------------- document flow


def test_bluesky_publisher_run_arrives_intact_through_proxy(proxy, closing) -> None:
    in_address, out_address = proxy
    source = start_source(closing, address=out_address)
    pub = bluesky_publisher(closing, in_address)
    sync(source, pub)
    before = source.stats()

    run = make_run(n_events=20, n_points=2000)
    for name, doc in run:
        pub(name, doc)
    got = collect(source, len(run))

    assert [n for n, _ in got] == ["start", "descriptor"] + ["event"] * 20 + ["stop"]
    for (name, doc), (got_name, got_doc) in zip(run, got, strict=True):
        assert got_name == name
        assert_docs_equal(got_doc, doc)
    assert got[2][1]["data"]["energy"].shape == (2000,)
    after = source.stats()
    assert delta(after, before, "received") == len(run)
    assert delta(after, before, "decoded") == len(run)
    assert delta(after, before, "delivered") == len(run)
    assert delta(after, before, "documents.event") == 20
    assert delta(after, before, "documents.stop") == 1
    assert after["decode_errors"] == 0 and after["dropped_overflow"] == 0
    assert after["queue_depth"] == 0


def test_run_engine_scan_through_proxy(proxy, closing, tmp_path: Path) -> None:
    in_address, out_address = proxy
    source = start_source(closing, address=out_address)
    token = uuid.uuid4().hex
    out_file = tmp_path / "emitted.pkl"
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN_ENGINE_SCRIPT, in_address, str(out_file), token],
        stdin=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60  # includes importing ophyd in the child
        while True:
            item = source.get(timeout=max(0.0, deadline - time.monotonic()))
            assert item is not None, "no probe from the RunEngine process"
            if item[1].get("probe") == token:
                break
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        got = []
        while not got or got[-1][0] != "stop":
            item = source.get(timeout=max(0.0, deadline - time.monotonic()))
            assert item is not None, f"run incomplete after {[n for n, _ in got]}"
            if item[1].get("probe") != token:
                got.append(item)
        assert proc.wait(DEADLINE_S) == 0
    finally:
        _stop(proc)
        if proc.stdin is not None:
            proc.stdin.close()

    emitted = pickle.loads(out_file.read_bytes())
    assert [n for n, _ in got] == ["start", "descriptor"] + ["event"] * 5 + ["stop"]
    assert [n for n, _ in got] == [n for n, _ in emitted]
    for (_, doc), (_, sent) in zip(got, emitted, strict=True):
        assert_docs_equal(doc, sent)
    spectrum = got[2][1]["data"]["spectrum"]
    assert isinstance(spectrum, np.ndarray) and spectrum.shape == (500,)
    np.testing.assert_array_equal(spectrum, np.linspace(0.0, 1.0, 500) ** 2)
    assert got[-1][1]["exit_status"] == "success" and got[-1][1]["num_events"] == {"primary": 5}
    assert source.stats()["decode_errors"] == 0


def test_prefix_filtering_is_exact_and_done_in_zmq(proxy, closing) -> None:
    in_address, out_address = proxy
    only_alpha = start_source(closing, address=out_address, prefix=b"alpha")
    everyone = start_source(closing, address=out_address)
    pubs = {
        p: bluesky_publisher(closing, in_address, prefix=p) for p in (b"alpha", b"alphabet", b"")
    }
    for p, pub in pubs.items():
        sync(everyone, pub, src=p.decode())
    sync(only_alpha, pubs[b"alpha"], src="alpha")

    for i in range(5):
        for p, pub in pubs.items():
            pub("event", {"uid": f"{p.decode()}-{i}", "src": p.decode(), "seq_num": i})
    for pub in pubs.values():  # a final fence per publisher
        pub("event", {"uid": "end", "fence": True, "src": "end"})

    everyone_docs = []  # skip the probes of only_alpha's sync, which everyone also sees
    while sum(d.get("src") == "end" for _, d in everyone_docs) < 3:
        everyone_docs += [item for item in collect(everyone, 1) if "probe" not in item[1]]
    assert len(everyone_docs) == 18
    for p in ("alpha", "alphabet", ""):
        seqs = [d["seq_num"] for _, d in everyone_docs if d.get("src") == p]
        assert seqs == list(range(5)), p
    alpha_docs = collect(only_alpha, 6)
    assert [d["uid"] for _, d in alpha_docs] == [f"alpha-{i}" for i in range(5)] + ["end"]

    wait_for(lambda: everyone.stats()["queue_depth"] == 0, "drain")
    stats = only_alpha.stats()
    # Nothing from "alphabet" or the empty prefix ever reached this socket: 0MQ filtered it.
    assert stats["received"] == stats["delivered"] + stats["queue_depth"]
    assert stats["decode_errors"] == 0 and stats["decode_errors.wrong_prefix"] == 0
    assert only_alpha.get(timeout=0.2) is None


def test_ignored_prefixes_are_dropped_before_decoding(proxy, closing) -> None:
    """A subscribe-to-all input ignoring its own output prefix: exact match, counted apart."""
    in_address, out_address = proxy
    source = start_source(closing, address=out_address, ignore_prefixes=(b"echo",))
    watcher = start_source(closing, address=out_address, prefix=b"echo")  # sees what is ignored
    pubs = {p: bluesky_publisher(closing, in_address, prefix=p) for p in (b"echo", b"echoes", b"")}
    echo = closing(ZmqDocumentPublisher(in_address, prefix=b"echo"))
    for pub in (pubs[b"echo"], echo):
        sync(watcher, pub)
    # The proxy forwards in one order to every subscriber: once this fence is consumed, every
    # echo probe above has reached ``source`` too (and was ignored).
    for p in (b"echoes", b""):
        sync(source, pubs[p], src=p.decode())
    before = source.stats()
    for i in range(4):
        for p, pub in pubs.items():
            pub("event", {"uid": f"{p.decode()}-{i}", "src": p.decode(), "seq_num": i})
        echo.send_raw(b"echo event \x00not-a-pickle")  # never decoded, so no decode error
    collect(watcher, 4)  # the 4 decodable echoes (the raw ones are the watcher's decode errors)
    wait_for(lambda: watcher.stats()["decode_errors"] == 4, "the raw echoes")
    for p in (b"echoes", b""):  # fences, forwarded after every echo message above
        pubs[p]("event", {"uid": "end", "fence": True, "src": p.decode()})
    docs = collect(source, 10)
    assert sorted((d["src"], d.get("seq_num", -1)) for _, d in docs) == sorted(
        [(src, i) for src in ("echoes", "") for i in range(4)] + [("echoes", -1), ("", -1)]
    )
    after = source.stats()
    assert delta(after, before, "ignored") == 8
    assert delta(after, before, "decode_errors") == 0
    assert delta(after, before, "decoded") == 10
    assert after["received"] == after["ignored"] + after["decoded"] + after["decode_errors"]
    assert source.get(timeout=0.1) is None


def test_msgpack_publishers_are_decoded(proxy, closing) -> None:
    in_address, out_address = proxy
    source = start_source(closing, address=out_address, prefix=b"mp")
    ours = bluesky_publisher(closing, in_address, prefix=b"mp", serializer=encode_msgpack)
    theirs = bluesky_publisher(closing, in_address, prefix=b"mp", serializer=msgpack_numpy.packb)
    native = closing(ZmqDocumentPublisher(in_address, prefix=b"mp", fmt="msgpack"))
    run = make_run(n_events=2, n_points=300)
    for pub in (ours, theirs, native):
        sync(source, pub)
        for name, doc in run:
            pub(name, doc)
        got = collect(source, len(run))
        assert [n for n, _ in got] == [n for n, _ in run]
        for (_, sent), (_, doc) in zip(run, got, strict=True):
            assert_docs_equal(doc, msgpack_numpy.unpackb(msgpack_numpy.packb(sent)))
        np.testing.assert_array_equal(got[2][1]["data"]["energy"], run[2][1]["data"]["energy"])
    assert source.stats()["decode_errors"] == 0
    assert native.stats()["sent"] >= len(run)


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


# --------------------------------------------------------------------------- lifecycle


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


# --------------------------------------------------------------------------- our publisher


def test_our_publisher_is_read_by_bluesky_remote_dispatcher(proxy, closing) -> None:
    from bluesky.callbacks.zmq import RemoteDispatcher

    in_address, out_address = proxy
    dispatcher = RemoteDispatcher(out_address)
    received: list[tuple[str, dict[str, Any]]] = []
    dispatcher.subscribe(lambda name, doc: received.append((name, doc)))
    errors: list[BaseException] = []

    def run() -> None:
        try:
            dispatcher.start()
        except BaseException as exc:  # CancelledError is how we stop it
            errors.append(exc)

    thread = threading.Thread(target=run, name="remote-dispatcher", daemon=True)
    thread.start()
    pub = closing(ZmqDocumentPublisher(in_address))
    try:
        deadline = time.monotonic() + DEADLINE_S
        while not received:
            assert time.monotonic() < deadline, "RemoteDispatcher never received a probe"
            pub("event", {"uid": "probe", "probe": True})
            time.sleep(0.02)
        run_docs = make_run(n_events=3, n_points=100)
        for name, doc in run_docs:
            pub(name, doc)
        wait_for(lambda: received[-1][0] == "stop", "the stop document")
    finally:
        wait_for(lambda: dispatcher._task is not None, "the dispatcher task")
        dispatcher.loop.call_soon_threadsafe(dispatcher._task.cancel)
        thread.join(DEADLINE_S)
    assert not thread.is_alive()
    docs = [(n, d) for n, d in received if not d.get("probe")]
    assert [n for n, _ in docs] == [n for n, _ in run_docs]
    for (_, doc), (_, sent) in zip(docs, run_docs, strict=True):
        assert_docs_equal(doc, sent)


def test_bound_publisher_feeds_source_directly(closing) -> None:
    pub = closing(ZmqDocumentPublisher("tcp://127.0.0.1:*", bind=True, prefix=b"xas"))
    assert pub.endpoint.startswith("tcp://127.0.0.1:") and not pub.endpoint.endswith("*")
    source = start_source(closing, address=pub.endpoint, prefix=b"xas")
    sync(source, pub)
    pub("start", {"uid": "r1", "mu": np.arange(3.0)})
    name, doc = collect(source, 1)[0]
    assert name == "start" and doc["uid"] == "r1"
    np.testing.assert_array_equal(doc["mu"], np.arange(3.0))
    assert decode_message(encode_message("start", {"uid": "r1"}, b"xas"), b"xas")[1] == {
        "uid": "r1"
    }


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

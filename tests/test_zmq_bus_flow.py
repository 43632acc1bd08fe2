"""0MQ documents through real bluesky parts: intact, filtered by prefix, msgpack, read back.

Every test runs its own ``bluesky.callbacks.zmq.Proxy`` in a subprocess on loopback. 0MQ's
slow-joiner problem is handled by publishing probe documents until the source sees one, then a
fence; everything the test publishes afterwards on that path is delivered in order.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import event_model
import msgpack_numpy
import numpy as np
import pytest
from document_helpers import assert_docs_equal
from helpers import wait_for
from zmq_helpers import (
    DEADLINE_S,
    _stop,
    bluesky_proxy,
    bluesky_publisher,
    collect,
    delta,
    start_source,
    sync,
)

from xasflow.adapters.wire import decode_message, encode_message, encode_msgpack
from xasflow.adapters.zmq_bus import ZmqDocumentPublisher

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


@pytest.fixture
def proxy() -> Iterator[tuple[str, str]]:
    """A real bluesky 0MQ Proxy: yields (address publishers connect to, address to subscribe)."""
    with bluesky_proxy() as addresses:
        yield addresses


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

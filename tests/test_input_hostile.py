"""Hostile or odd input on the daemon's input and processing path: a forged numpy dtype in a
pickle, object arrays with pickle turned off, 64-bit seq_nums, values ``str()`` cannot print,
unhashable uids, a descriptor that cannot be read, one bad row of a page, a start no run can
take. Each test failed before its fix (found by a read-only review of bd69e6a); where a
docstring says what the code does wrong, it tells what it did then."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from event_model import compose_run
from helpers import RecordingPipeline

from xasflow.adapters.recovery import InterruptedRuns
from xasflow.adapters.wire import WireError, decode_body, decode_message, encode_msgpack
from xasflow.daemon.assembly import Rejected, RunAssembler, RunClosed, SpectrumReady
from xasflow.daemon.config import AnalysisConfig
from xasflow.daemon.counters import Counters
from xasflow.daemon.processor import Processor

ROOT = Path(__file__).resolve().parents[1]


class FakeClock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def fly_run(n: int = 4) -> tuple[Any, Any, list[tuple[str, dict]]]:
    run = compose_run(metadata={"element": "Cu", "edge": "K"})
    keys = {k: {"source": "sim", "dtype": "array", "shape": [n]} for k in ("energy", "I0", "It")}
    desc = run.compose_descriptor(name="primary", data_keys=keys)
    return run, desc, [("start", run.start_doc), ("descriptor", desc.descriptor_doc)]


def fly_event(desc: Any, n: int = 4, **kw: Any) -> dict:
    e = np.linspace(8900.0, 9100.0, n)
    data = {"energy": e, "I0": np.full(n, 1000.0), "It": e / 20.0}
    return desc.compose_event(data=data, timestamps=dict.fromkeys(data, 0.0), validate=False, **kw)


def full_fly_run() -> tuple[str, list[tuple[str, dict]]]:
    run, desc, docs = fly_run()
    docs += [("event", fly_event(desc)), ("stop", run.compose_stop())]
    return run.start_doc["uid"], docs


def closed_uids(outputs: list[Any]) -> list[str]:
    return [o.raw_uid for o in outputs if isinstance(o, RunClosed)]


def processor(asm: RunAssembler, **kw: Any) -> tuple[Processor, RecordingPipeline]:
    rec = RecordingPipeline()
    proc = Processor(lambda timeout: None, asm, rec, Counters(), AnalysisConfig(), **kw)  # type: ignore[arg-type]
    return proc, rec


def turn_as_run_does(proc: Processor, items: list[tuple[str, dict]], check: bool = False) -> None:
    """One pass of ``Processor.run``'s loop body: an exception is counted and swallowed there."""
    try:
        proc._turn(items, check=check)
    except Exception:
        proc.counters.internal_error("processing")


# --------------------------------------------------------------------------- 1. unpickler


def _forged_object_dtype_array(rows: int = 3) -> np.ndarray:
    """A structured array whose one field is ``object`` but whose dtype flags (set through
    ``numpy.dtype.__setstate__``, i.e. a pickle BUILD) say it holds no object: numpy then
    builds it from raw bytes, which become PyObject pointers."""
    forged = np.dtype("V8", False, True)
    forged.__setstate__((3, "|", None, ("a",), {"a": (np.dtype("O"), 0)}, 8, 1, 0))
    return np.frombuffer(b"\x41" * 8 * rows, dtype=forged)


def test_unpickler_refuses_a_dtype_with_forged_flags() -> None:
    """The pickle uses only allowed globals (_reconstruct, ndarray, dtype, _codecs.encode),
    but BUILD on the ``numpy.dtype`` it made rewrites the dtype's flags: the result is an
    array of object pointers read from the message's bytes."""
    body = pickle.dumps({"uid": "x", "data": {"energy": _forged_object_dtype_array()}}, protocol=2)
    with pytest.raises(WireError):
        _name, doc = decode_message(b" event " + body)
        arr = doc["data"]["energy"]
        # what was let through: an object field numpy believes is not one
        assert arr.dtype.fields["a"][0] == np.dtype("O") and not arr.dtype.hasobject


_CRASH_SCRIPT = textwrap.dedent(
    """
    import pickle, sys
    import numpy as np
    from event_model import compose_run
    from xasflow.adapters.wire import decode_message, encode_message
    from xasflow.daemon.assembly import RunAssembler

    forged = np.dtype("V8", False, True)
    forged.__setstate__((3, "|", None, ("a",), {"a": (np.dtype("O"), 0)}, 8, 1, 0))
    evil = np.frombuffer(b"\\x41" * 32, dtype=forged)

    run = compose_run(metadata={"element": "Cu", "edge": "K"})
    keys = {k: {"source": "s", "dtype": "array", "shape": [4]} for k in ("energy", "I0", "It")}
    desc = run.compose_descriptor(name="primary", data_keys=keys)
    data = {"energy": evil, "I0": np.ones(4), "It": np.ones(4)}
    event = desc.compose_event(data=data, timestamps=dict.fromkeys(data, 0.0), validate=False)
    messages = [
        encode_message("start", run.start_doc),
        encode_message("descriptor", desc.descriptor_doc),
        b" event " + pickle.dumps(event, protocol=2),
    ]
    asm = RunAssembler()
    for m in messages:
        try:
            name, doc = decode_message(m)
        except Exception as exc:  # refused on the wire, as it should be
            print("refused", exc)
            continue
        print(name, [type(o).__name__ for o in asm.feed(name, doc)], flush=True)
    print("survived")
    """
)


def test_a_forged_dtype_pickle_does_not_crash_the_process() -> None:
    """Decode (receive thread) + assembly (processing thread) of the message above: the
    assembler's ``np.asarray(value, float64)`` dereferences 0x4141414141414141."""
    proc = subprocess.run(
        [sys.executable, "-c", _CRASH_SCRIPT],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, (
        f"process died with {proc.returncode}; stdout: {proc.stdout!r}; "
        f"stderr tail: {proc.stderr[-400:]!r}"
    )


def test_pickle_disabled_still_unpickles_msgpack_object_arrays() -> None:
    """``formats=("msgpack",)`` ("drop pickle to refuse it") still runs the unpickler on a
    msgpack-numpy ``kind: O`` array, so the forged array above gets through a daemon that
    refuses pickle bodies."""
    payload = pickle.dumps(_forged_object_dtype_array(), protocol=4)
    arr = {b"nd": True, b"type": "|O", b"kind": b"O", b"shape": [3], b"data": payload}
    body = msgpack.packb({"uid": "x", "data": {"energy": arr}}, use_bin_type=True)
    with pytest.raises(WireError):
        decode_body(body, formats=("msgpack",))


# --------------------------------------------------------------------------- 2. seq_num >= 2**63


def test_a_run_with_a_64_bit_seq_num_still_closes() -> None:
    """A fly event with seq_num 2**63 (a msgpack uint64): the stop raises OverflowError in
    ``seq_stats`` (np.fromiter(..., int64)), the run stays open, and every later close of it
    (timeout, shutdown) raises out of ``check_timeouts`` / ``flush_all``."""
    clock = FakeClock()
    asm = RunAssembler(run_timeout=10.0, clock=clock)
    run, desc, docs = fly_run()
    docs += [("event", fly_event(desc, seq_num=2**63)), ("stop", run.compose_stop())]
    # the wire delivers it: msgpack carries it as uint64
    name, event = decode_message(b" event " + encode_msgpack(docs[2][1]))
    assert event["seq_num"] == 2**63
    out: list[Any] = []
    for name, doc in docs:
        out += asm.feed(name, doc)
    clock.t = 100.0
    try:
        out += asm.check_timeouts()
        out += asm.flush_all("shutdown")
    except OverflowError as exc:
        pytest.fail(f"closing the run raised {exc!r}; open runs: {asm.open_runs}")
    assert closed_uids(out) == [run.start_doc["uid"]]


def test_a_run_that_cannot_close_does_not_take_other_runs_with_it() -> None:
    """Processor level: once such a run exists, each turn that checks timeouts raises after
    feeding its documents, so that turn's outputs (here another run's spectrum and its
    RunClosed) never reach the pipeline; and ``run()`` dies in ``_finish`` at shutdown."""
    clock = FakeClock()
    asm = RunAssembler(run_timeout=10.0)
    proc, rec = processor(asm)
    asm.clock = clock  # the processor installed its LiveClock; drive time by hand
    run, desc, bad = fly_run()
    bad += [("event", fly_event(desc, seq_num=2**63)), ("stop", run.compose_stop())]
    turn_as_run_does(proc, bad)
    clock.t = 100.0
    good_uid, good = full_fly_run()
    turn_as_run_does(proc, good, check=True)
    assert good_uid in closed_uids(rec.outputs), "the other run's outputs were lost"
    assert proc.internal_errors == 0


def test_shutdown_closes_every_run_despite_a_64_bit_seq_num() -> None:
    asm = RunAssembler(run_timeout=10.0)
    _run, desc, bad = fly_run()
    bad += [("event", fly_event(desc, seq_num=2**63))]
    other, odesc, other_docs = fly_run()
    other_docs += [("event", fly_event(odesc))]  # still open at shutdown
    queue = [*bad, *other_docs]
    rec = RecordingPipeline()
    proc = Processor(
        lambda timeout: queue.pop(0) if queue else None, asm, rec, Counters(), AnalysisConfig()
    )
    proc.drain.set()
    try:
        proc.run()
    except OverflowError as exc:
        pytest.fail(f"Processor.run raised {exc!r} at shutdown (the thread would die)")
    assert other.start_doc["uid"] in closed_uids(rec.outputs)


# --------------------------------------------------------------------------- 3. probe filter


@pytest.mark.parametrize("fmt", ["pickle", "msgpack"])
def test_a_stop_the_probe_filter_cannot_print_does_not_lose_the_turn(fmt: str) -> None:
    """``ProbeFilter`` calls ``str()`` on the stop's ``run_start`` (and a start's probe token)
    outside any per-document guard: a 5,000-digit int (pickle; Python's int->str limit) or a
    list nested 1,000 deep (msgpack) raises, ``_turn`` aborts, and the other documents of the
    same batch, decoded and fed already, never reach the pipeline."""
    if fmt == "pickle":
        body = pickle.dumps({"uid": "s", "time": 1.0, "run_start": 10**5000})
    else:
        body = b"\x83\xa3uid\xa1s\xa4time\x01\xa9run_start" + b"\x91" * 1000 + b"\xc0"
    name, evil_stop = decode_message(b" stop " + body)  # decoded and queued by zmq_bus
    asm = RunAssembler()
    proc, rec = processor(asm)
    good_uid, good = full_fly_run()
    turn_as_run_does(proc, [*good, (name, evil_stop)])
    assert good_uid in closed_uids(rec.outputs), "the good run's spectrum and stop were lost"
    assert any(isinstance(o, SpectrumReady) for o in rec.outputs)


# --------------------------------------------------------------------------- 4. unhashable uids


def test_an_unhashable_run_start_with_interrupted_runs_pending_does_not_lose_the_turn() -> None:
    """After a crash restart (``InterruptedRuns`` non-empty) ``interrupted.owns(run_start)``
    runs ``run_start in dict`` on whatever the stop carries: a list raises TypeError."""
    interrupted = InterruptedRuns(store=None)
    interrupted._open["left-open-by-predecessor"] = {"raw_uid": "left-open-by-predecessor"}
    asm = RunAssembler()
    proc, rec = processor(asm, interrupted=interrupted)
    good_uid, good = full_fly_run()
    turn_as_run_does(proc, [*good, ("stop", {"uid": "s", "time": 1.0, "run_start": ["x"]})])
    assert good_uid in closed_uids(rec.outputs)


def test_an_unhashable_start_uid_with_a_kafka_input_does_not_lose_the_turn() -> None:
    """With ``abandoned`` set (Kafka input) ``_handed_over(doc.get("uid"))`` runs
    ``uid in dict`` before the assembler sees the start."""
    asm = RunAssembler()
    proc, rec = processor(asm)
    proc.abandoned = lambda: []
    good_uid, good = full_fly_run()
    turn_as_run_does(proc, [*good, ("start", {"uid": ["x"], "time": 1.0})])
    assert good_uid in closed_uids(rec.outputs)


# --------------------------------------------------------------------------- 5. silent losses


def test_events_of_a_descriptor_that_failed_to_resolve_are_counted() -> None:
    """A descriptor whose resolution raises (here a data key's ``dtype`` is an array, so
    ``dk.get("dtype") == "array"`` has no truth value) is registered in ``_descriptors`` and
    the RunRouter before ``_Run.descriptor`` raises; its events then reach ``event_page``,
    find no ``_Stream`` and vanish as "another stream": no rejection, n_spectra 0,
    missing_events 0."""
    run = compose_run(metadata={"element": "Cu", "edge": "K"})
    keys = {k: {"source": "s", "dtype": np.array(["a", "b"])} for k in ("energy", "I0", "It")}
    desc = run.compose_descriptor(name="primary", data_keys=keys, validate=False)
    asm = RunAssembler()
    asm.feed("start", run.start_doc)
    asm.feed("descriptor", desc.descriptor_doc)
    event_outputs: list[Any] = []
    for k in range(3):
        event_outputs += asm.feed("event", fly_event(desc, seq_num=k + 1))
    assert len([o for o in event_outputs if isinstance(o, Rejected)]) == 3, event_outputs


def test_one_bad_row_does_not_lose_the_rest_of_a_fly_page() -> None:
    """``_fly_row`` catches TypeError/ValueError/IndexError/KeyError only: a row whose value
    overflows float64 (a pickled int > 1e308) raises OverflowError out of the page, and the
    rows after it are lost with no count of their own."""
    _run, desc, docs = fly_run()
    e = list(np.linspace(8900.0, 9100.0, 4))
    rows = [e, [10**400, *e[1:]], e]
    page = desc.compose_event_page(
        data={"energy": rows, "I0": [[1000.0] * 4] * 3, "It": [[v / 20 for v in e]] * 3},
        timestamps={k: [0.0] * 3 for k in ("energy", "I0", "It")},
        seq_num=[1, 2, 3],
        validate=False,
    )
    name, page = decode_message(b" event_page " + pickle.dumps(page))
    asm = RunAssembler()
    for n, d in docs:
        asm.feed(n, d)
    out = asm.feed(name, page)
    assert len([o for o in out if isinstance(o, SpectrumReady)]) == 2, out


def test_a_start_with_an_array_element_opens_a_run_without_one() -> None:
    """``element`` an array (a crafted start): read as no element, as any non-text value
    is, not evaluated for truth (which raised inside the run's constructor)."""
    asm = RunAssembler()
    out = asm.feed("start", {"uid": "u", "time": 1.0, "element": np.array([1, 2]), "edge": "K"})
    assert out == [] and asm.open_runs == 1


def test_a_start_the_run_cannot_take_leaves_no_router_state_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A start whose run cannot be made is refused with a reason and leaves nothing in
    event-model's RunRouter: it used to keep the start and its filler until a stop that
    never comes (a leak per crafted start), and refuse a proper start under that uid."""
    import xasflow.daemon.assembly as assembly

    real = assembly._Run

    def broken(*args: Any) -> Any:
        raise RuntimeError("cannot take this start")

    monkeypatch.setattr(assembly, "_Run", broken)
    asm = RunAssembler()
    for i in range(100):
        out = asm.feed("start", {"uid": f"u{i}", "time": 1.0})
        assert [o.reason for o in out] == ["internal_error"]
    assert asm.open_runs == 0
    assert len(asm._router._start_to_start_doc) == 0, "RunRouter keeps the refused starts"
    monkeypatch.setattr(assembly, "_Run", real)
    assert asm.feed("start", {"uid": "u0", "time": 1.0}) == [] and asm.open_runs == 1

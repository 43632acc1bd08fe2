"""Run assembly: real RunEngine step/fly scans and hand-built documents into ScanSpectrum."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import event_model
import numpy as np
import pytest
from event_model import compose_run, pack_event_page

from xasflow.daemon import assembly
from xasflow.daemon.assembly import (
    REASONS,
    ChannelMap,
    Output,
    Rejected,
    RunAssembler,
    RunClosed,
    RunOpened,
    ScanSpectrum,
    SpectrumReady,
)

STEP_KEYS = ("energy", "I0", "It")


# --------------------------------------------------------------------------- helpers


class FakeClock:
    """A settable monotonic clock."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def feed_all(asm: RunAssembler, docs: Iterable[tuple[str, dict]]) -> list[Output]:
    out: list[Output] = []
    for name, doc in docs:
        out.extend(asm.feed(name, doc))
    return out


def spectra(outputs: list[Output]) -> list[ScanSpectrum]:
    return [o.spectrum for o in outputs if isinstance(o, SpectrumReady)]


def rejected(outputs: list[Output]) -> list[Rejected]:
    return [o for o in outputs if isinstance(o, Rejected)]


def closed(outputs: list[Output]) -> list[RunClosed]:
    return [o for o in outputs if isinstance(o, RunClosed)]


def reasons(outputs: list[Output]) -> list[str]:
    return [r.reason for r in rejected(outputs)]


def scalar_keys(*names: str, units: str | None = None) -> dict[str, dict[str, Any]]:
    keys: dict[str, dict[str, Any]] = {
        n: {"source": "sim", "dtype": "number", "shape": []} for n in names
    }
    if units:
        keys["energy"]["units"] = units
    return keys


def array_keys(n: int, *names: str) -> dict[str, dict[str, Any]]:
    return {k: {"source": "sim", "dtype": "array", "shape": [n]} for k in names}


def step_docs(
    energies: list[float],
    *,
    md: dict | None = None,
    seq: list[int] | None = None,
    stop: bool = True,
    keys: tuple[str, ...] = STEP_KEYS,
) -> tuple[str, list[tuple[str, dict]]]:
    """A step scan with I0 = E/10 and It = E/100 per point."""
    run = compose_run(metadata=md or {})
    desc = run.compose_descriptor(name="primary", data_keys=scalar_keys(*keys))
    docs: list[tuple[str, dict]] = [("start", run.start_doc), ("descriptor", desc.descriptor_doc)]
    for i, e in enumerate(energies):
        values = {"energy": e, "I0": e / 10, "It": e / 100}
        data = {k: values[k] for k in keys}
        ev = desc.compose_event(
            data=data, timestamps=dict.fromkeys(keys, 1.0), seq_num=None if seq is None else seq[i]
        )
        docs.append(("event", ev))
    if stop:
        docs.append(("stop", run.compose_stop()))
    return run.start_doc["uid"], docs


def fly_arrays(k: int, n: int = 50) -> dict[str, np.ndarray]:
    energy = np.linspace(8900.0, 9100.0, n) + k
    return {"energy": energy, "I0": np.full(n, 1000.0 + k), "It": energy / 20.0}


# --------------------------------------------------------------------------- real RunEngine


@pytest.fixture(scope="module")
def RE():
    bluesky = pytest.importorskip("bluesky")
    pytest.importorskip("ophyd")
    engine = bluesky.RunEngine({}, call_returns_result=False)
    yield engine
    engine.loop.call_soon_threadsafe(engine.loop.stop)


def _i0(e: float) -> float:
    return 1.0e5 + 0.5 * (e - 8900.0)


def _it(e: float) -> float:
    return _i0(e) * math.exp(-(1.0 + (0.8 if e >= 8979.0 else 0.0)))


def _ir(e: float) -> float:
    return 2.0e4 + e / 7.0


def run_re(RE, plan, **md) -> list[tuple[str, dict]]:
    docs: list[tuple[str, dict]] = []
    token = RE.subscribe(lambda name, doc: docs.append((name, doc)))
    try:
        RE(plan, **md)
    finally:
        RE.unsubscribe(token)
    return docs


def test_step_scan_from_run_engine(RE):
    import bluesky.plans as bp
    import bluesky.preprocessors as bpp
    from ophyd.sim import SynAxis, SynSignal

    energy = SynAxis(name="energy")
    i0 = SynSignal(func=lambda: _i0(energy.readback.get()), name="I0")
    it = SynSignal(func=lambda: _it(energy.readback.get()), name="It")
    ir = SynSignal(func=lambda: _ir(energy.readback.get()), name="Ir")
    points = [8950.0, 8970.0, 8978.0, 8980.0, 8990.0, 9020.0, 8960.0]  # last one out of order
    plan = bpp.baseline_wrapper(bp.list_scan([i0, it, ir], energy, points), [energy, i0])
    docs = run_re(RE, plan, element="cu", edge="k")
    assert {n for n, _ in docs} >= {"start", "descriptor", "event", "stop"}

    asm = RunAssembler()
    out = feed_all(asm, docs)
    uid = docs[0][1]["uid"]
    assert [type(o) for o in out] == [RunOpened, SpectrumReady, RunClosed]
    assert out[0] == RunOpened(uid, docs[0][1], "step")
    (spec,) = spectra(out)
    # acquisition order (seq_num), not energy order; baseline readings are ignored
    np.testing.assert_array_equal(spec.energy, points)
    np.testing.assert_array_equal(spec.channels["i0"], [_i0(e) for e in points])
    np.testing.assert_array_equal(spec.channels["it"], [_it(e) for e in points])
    np.testing.assert_array_equal(spec.channels["ir"], [_ir(e) for e in points])
    assert set(spec.channels) == {"i0", "it", "ir"}
    assert (spec.raw_uid, spec.index, spec.mode) == (uid, 0, "transmission")
    assert (spec.element, spec.edge) == ("Cu", "K")
    assert spec.seq_nums == tuple(range(1, 8))
    assert spec.flags == ()
    primary = next(d["uid"] for n, d in docs if n == "descriptor" and d["name"] == "primary")
    events = [d for n, d in docs if n == "event" and d["descriptor"] == primary]
    assert spec.event_time == max(e["time"] for e in events)
    assert out[-1] == RunClosed(uid, "success", "", 1, 0, 0, 0)
    assert asm.open_runs == 0

    # the same run as one event_page gives the same spectrum
    page = pack_event_page(*events)
    paged = [(n, d) for n, d in docs if not (n == "event" and d["descriptor"] == primary)]
    paged.insert(next(i for i, (n, _) in enumerate(paged) if n == "stop"), ("event_page", page))
    (spec2,) = spectra(feed_all(RunAssembler(), paged))
    np.testing.assert_array_equal(spec2.energy, spec.energy)
    np.testing.assert_array_equal(spec2.channels["it"], spec.channels["it"])


def test_fly_scan_from_run_engine(RE):
    import bluesky.plan_stubs as bps
    import bluesky.preprocessors as bpp
    from ophyd import Signal

    n = 200
    energy = Signal(name="energy", value=np.zeros(n))
    i0 = Signal(name="I0", value=np.zeros(n))
    fluor = Signal(name="If", value=np.zeros(n))
    temp = Signal(name="sample_temp", value=295.0)  # a scalar riding along
    sweeps = []
    for k in range(3):
        e = np.linspace(8900.0, 9200.0, n)
        e = e if k % 2 == 0 else e[::-1]  # up/down quick-XAS
        sweeps.append((e, 5.0e4 + 10.0 * k + np.arange(n), 0.01 * e + k))

    @bpp.run_decorator(md={"XDI": {"Element": {"symbol": "Cu", "edge": "K"}}})
    def fly():
        for e, a, f in sweeps:
            energy.put(e)
            i0.put(a)
            fluor.put(f)
            yield from bps.trigger_and_read([energy, i0, fluor, temp])

    docs = run_re(RE, fly())
    out = feed_all(RunAssembler(), docs)
    uid = docs[0][1]["uid"]
    assert [type(o) for o in out] == [RunOpened, *[SpectrumReady] * 3, RunClosed]
    assert out[0].kind == "fly"
    for k, spec in enumerate(spectra(out)):
        e, a, f = sweeps[k]
        np.testing.assert_array_equal(spec.energy, e)
        np.testing.assert_array_equal(spec.channels["i0"], a)
        np.testing.assert_array_equal(spec.channels["if"], f)
        assert set(spec.channels) == {"i0", "if"}
        assert (spec.index, spec.seq_nums, spec.mode) == (k, (k + 1,), "fluorescence")
        assert (spec.element, spec.edge, spec.flags) == ("Cu", "K", ())
    assert out[-1] == RunClosed(uid, "success", "", 3, 0, 0, 0)


# --------------------------------------------------------------------------- step scans by hand


def test_step_points_sorted_by_seq_num_and_received_from_clock():
    clock = FakeClock(5.0)
    asm = RunAssembler(clock=clock)
    uid, docs = step_docs([9000.0, 8990.0, 9010.0])
    start, desc, e1, e2, e3, stop = docs
    out = feed_all(asm, [start, desc, e3, e1, e2])
    assert out == [RunOpened(uid, start[1], "step")]  # nothing until the stop
    clock.t = 7.5
    (spec,) = spectra(asm.feed(*stop))
    np.testing.assert_array_equal(spec.energy, [9000.0, 8990.0, 9010.0])
    np.testing.assert_array_equal(spec.channels["it"], [90.0, 89.9, 90.1])
    assert spec.seq_nums == (1, 2, 3)
    assert spec.received == 7.5
    assert spec.flags == ("seq_disorder",)  # e1, e2 came after e3


def test_step_seq_gap_counted_and_flagged():
    uid, docs = step_docs([1.0, 2.0, 4.0, 5.0, 9.0], seq=[1, 2, 4, 5, 9])
    out = feed_all(RunAssembler(), docs)
    (spec,) = spectra(out)
    assert spec.seq_nums == (1, 2, 4, 5, 9)
    assert spec.flags == ("seq_gap",)
    assert closed(out) == [RunClosed(uid, "success", "", 1, 0, 2, 4)]


def test_trailing_events_lost_are_seen_in_stop_num_events():
    _, docs = step_docs([1.0, 2.0, 3.0])
    docs[-1] = ("stop", {**docs[-1][1], "num_events": {"primary": 5}})
    out = feed_all(RunAssembler(), docs)
    assert spectra(out)[0].flags == ("seq_gap",)
    assert closed(out)[0].seq_gaps == 1 and closed(out)[0].missing_events == 2


def test_duplicate_event_rejected_once():
    _, docs = step_docs([1.0, 2.0, 3.0])
    docs.insert(4, docs[3])  # event 2 twice
    out = feed_all(RunAssembler(), docs)
    assert reasons(out) == ["duplicate_event"]
    np.testing.assert_array_equal(spectra(out)[0].energy, [1.0, 2.0, 3.0])
    assert closed(out)[0].n_rejected == 1


def test_a_rewind_retakes_step_points_and_the_new_readings_win():
    """bluesky's rewind (a suspender tripped) takes points again under the same seq_num:
    the re-taken readings replace the old (flagged ``points_retaken``); an identical copy is
    a redelivery and is rejected as a duplicate, as before."""
    _, docs = step_docs([1.0, 2.0, 3.0])
    glitch = {**docs[3][1], "data": {**docs[3][1]["data"], "I0": 0.04}}  # beam dumped at 2
    retake = {**docs[3][1], "uid": "retaken-2"}
    docs[3] = ("event", glitch)
    docs.insert(4, ("event", retake))  # after the resume: point 2 again, beam back
    docs.insert(5, docs[2])  # and point 1 again, read the same (a redelivered copy)
    out = feed_all(RunAssembler(), docs)
    (spec,) = spectra(out)
    np.testing.assert_array_equal(spec.energy, [1.0, 2.0, 3.0])
    np.testing.assert_allclose(spec.channels["i0"], [0.1, 0.2, 0.3])
    assert "points_retaken" in spec.flags and spec.seq_nums == (1, 2, 3)
    assert reasons(out) == ["duplicate_event"]


def test_a_step_run_keeps_a_bounded_number_of_points(monkeypatch: pytest.MonkeyPatch) -> None:
    """A monitoring count with the mono in primary never ends a spectrum: past the cap the
    points are rejected once (too_many_points) and flagged, not kept for ever."""
    from xasflow.daemon import assembly_run

    monkeypatch.setattr(assembly_run, "MAX_STEP_POINTS", 3)
    _, docs = step_docs([1.0, 2.0, 3.0, 4.0, 5.0])
    out = feed_all(RunAssembler(), docs)
    (spec,) = spectra(out)
    assert list(spec.energy) == [1.0, 2.0, 3.0] and "points_dropped" in spec.flags
    assert reasons(out) == ["too_many_points"]


def _mixed_step_run(
    first_keys: tuple[str, ...], first: list[dict], second_keys: tuple[str, ...], second: list[dict]
) -> list[tuple[str, dict]]:
    """One step run whose primary stream has two descriptors with different detectors (no
    bluesky plan does it, event-model's composer refuses it; other producers may)."""
    run = compose_run()
    docs: list[tuple[str, dict]] = [("start", run.start_doc)]
    seq = 0
    for n, (keys, rows) in enumerate(((first_keys, first), (second_keys, second))):
        desc = {
            "uid": f"{run.start_doc['uid']}-d{n}",
            "run_start": run.start_doc["uid"],
            "name": "primary",
            "time": 1.0,
            "data_keys": scalar_keys(*keys),
            "object_keys": {},
            "configuration": {},
            "hints": {},
        }
        docs.append(("descriptor", desc))
        for data in rows:
            seq += 1
            event = {"uid": f"{desc['uid']}-e{seq}", "descriptor": desc["uid"], "seq_num": seq}
            event.update(time=1.0, data=data, timestamps=dict.fromkeys(data, 1.0), filled={})
            docs.append(("event", event))
    docs.append(("stop", run.compose_stop()))
    return docs


def test_a_step_run_whose_descriptors_name_different_detectors():
    """Points of the first descriptor have I0/It only, of the second also If: the spectrum
    takes the newest mode whose channels every point has (transmission), and a run with no
    such mode is rejected with a reason, never left open."""
    asm = RunAssembler(ChannelMap(mode="auto"))
    docs = _mixed_step_run(
        ("energy", "I0", "It"),
        [{"energy": e, "I0": e / 10, "It": e / 100} for e in (1.0, 2.0)],
        ("energy", "I0", "It", "If"),
        [{"energy": e, "I0": 0.3, "It": 0.03, "If": 0.01} for e in (3.0, math.nan)],
    )
    out = feed_all(asm, docs)
    (spec,) = spectra(out)
    assert spec.mode == "transmission" and list(spec.energy) == [1.0, 2.0, 3.0]
    assert closed(out)[0].exit_status == "success" and asm.open_runs == 0
    docs = _mixed_step_run(
        ("energy", "I0", "If"),
        [{"energy": 1.0, "I0": 0.1, "If": 0.01}],
        ("energy", "I0", "It"),
        [{"energy": 2.0, "I0": 0.2, "It": 0.02}],
    )
    out = feed_all(asm, docs)
    assert spectra(out) == [] and reasons(out) == ["bad_channel"]
    assert "no mode has its channels in every point" in rejected(out)[0].detail
    assert asm.open_runs == 0


def test_step_event_page_unpacked():
    run = compose_run()
    desc = run.compose_descriptor(name="primary", data_keys=scalar_keys(*STEP_KEYS))
    page = desc.compose_event_page(
        data={"energy": [3.0, 1.0, 2.0], "I0": [30.0, 10.0, 20.0], "It": [3.0, 1.0, 2.0]},
        timestamps={k: [0.0] * 3 for k in STEP_KEYS},
        seq_num=[1, 2, 3],
        time=[10.0, 11.0, 12.0],
    )
    out = feed_all(
        RunAssembler(),
        [
            ("start", run.start_doc),
            ("descriptor", desc.descriptor_doc),
            ("event_page", page),
            ("stop", run.compose_stop()),
        ],
    )
    (spec,) = spectra(out)
    np.testing.assert_array_equal(spec.energy, [3.0, 1.0, 2.0])
    np.testing.assert_array_equal(spec.channels["i0"], [30.0, 10.0, 20.0])
    assert spec.event_time == 12.0


def test_kev_energy_is_scaled_to_ev():
    run = compose_run()
    desc = run.compose_descriptor(name="primary", data_keys=scalar_keys(*STEP_KEYS, units="keV"))
    docs = [("start", run.start_doc), ("descriptor", desc.descriptor_doc)]
    for e in (8.97, 8.98, 8.99):
        docs.append(
            (
                "event",
                desc.compose_event(
                    data={"energy": e, "I0": 1.0, "It": 0.5},
                    timestamps=dict.fromkeys(STEP_KEYS, 0.0),
                ),
            )
        )
    docs.append(("stop", run.compose_stop()))
    np.testing.assert_allclose(
        spectra(feed_all(RunAssembler(), docs))[0].energy, [8970, 8980, 8990]
    )


def test_nonfinite_points_dropped_and_all_nan_rejected():
    uid, docs = step_docs([1.0, 2.0, 3.0, 4.0])
    docs[3][1]["data"]["It"] = float("nan")  # point 2
    out = feed_all(RunAssembler(), docs)
    (spec,) = spectra(out)
    np.testing.assert_array_equal(spec.energy, [1.0, 3.0, 4.0])
    assert spec.seq_nums == (1, 3, 4)
    assert spec.flags == ("nonfinite_dropped",)

    uid, docs = step_docs([1.0, 2.0])
    for _, d in docs[2:4]:
        d["data"]["I0"] = float("nan")
    out = feed_all(RunAssembler(), docs)
    assert spectra(out) == []
    assert rejected(out) == [Rejected(uid, 0, "nan_data", rejected(out)[0].detail)]


def test_aborted_step_scan_rejected_as_incomplete():
    uid, docs = step_docs([1.0, 2.0], stop=False)
    run_stop = {"uid": "s", "time": 1.0, "run_start": uid, "exit_status": "abort", "reason": "user"}
    out = feed_all(RunAssembler(), [*docs, ("stop", run_stop)])
    assert reasons(out) == ["incomplete_run"]
    assert closed(out) == [RunClosed(uid, "abort", "user", 0, 1, 0, 0)]


def test_fluorescence_mode_forced_and_missing_channel():
    _uid, docs = step_docs([1.0, 2.0])  # has I0 and It, no If
    out = feed_all(RunAssembler(ChannelMap(mode="fluorescence")), docs)
    assert [type(o) for o in out] == [RunOpened, Rejected, RunClosed]
    assert rejected(out)[0].reason == "missing_channel"
    assert rejected(out)[0].index == 0 and "if" in rejected(out)[0].detail

    _, docs = step_docs([1.0, 2.0], keys=("energy", "I0"))
    assert reasons(feed_all(RunAssembler(), docs)) == ["missing_channel"]


def test_a_stream_with_no_known_key_is_rejected_not_dropped():
    """A mono called ``mono_e`` and detectors ``ion0``/``ion1`` match no channel name: the
    run's spectrum is rejected once, naming the keys, instead of its events vanishing."""
    run = compose_run()
    keys = ("mono_e", "ion0", "ion1")
    desc = run.compose_descriptor(name="primary", data_keys=scalar_keys(*keys))
    docs = [("start", run.start_doc), ("descriptor", desc.descriptor_doc)]
    for e in (8980.0, 8981.0, 8982.0):
        data = dict(zip(keys, (e, 1e5, 5e4), strict=True))
        docs.append(("event", desc.compose_event(data=data, timestamps=dict.fromkeys(keys, 1.0))))
    docs.append(("stop", run.compose_stop()))
    out = feed_all(RunAssembler(), docs)
    assert reasons(out) == ["missing_channel"]
    detail = rejected(out)[0].detail
    assert "lacks energy" in detail and "'mono_e'" in detail
    assert closed(out)[0].exit_status == "success"


def test_custom_channel_names_and_stream():
    run = compose_run()
    desc = run.compose_descriptor(name="scan", data_keys=scalar_keys("dcm", "ic0", "ic1"))
    other = run.compose_descriptor(name="primary", data_keys=scalar_keys(*STEP_KEYS))
    docs = [
        ("start", run.start_doc),
        ("descriptor", desc.descriptor_doc),
        ("descriptor", other.descriptor_doc),
    ]
    for e in (1.0, 2.0, 3.0):
        docs.append(
            (
                "event",
                desc.compose_event(
                    data={"dcm": e, "ic0": 2 * e, "ic1": 3 * e},
                    timestamps={"dcm": 0, "ic0": 0, "ic1": 0},
                ),
            )
        )
        docs.append(
            (
                "event",
                other.compose_event(
                    data={"energy": -e, "I0": 0.0, "It": 0.0},
                    timestamps=dict.fromkeys(STEP_KEYS, 0),
                ),
            )
        )
    docs.append(("stop", run.compose_stop()))
    cmap = ChannelMap(energy=("dcm",), i0=("ic0",), it=("ic1",), stream="scan")
    (spec,) = spectra(feed_all(RunAssembler(cmap), docs))
    np.testing.assert_array_equal(spec.energy, [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(spec.channels["it"], [3.0, 6.0, 9.0])
    with pytest.raises(ValueError):
        ChannelMap(mode="absorbance")


# --------------------------------------------------------------------------- fly scans by hand


def fly_run(n: int = 50, *, configuration: dict | None = None, keys=("energy", "I0", "It")):
    run = compose_run(metadata={"element": "Cu", "edge": "K"})
    desc = run.compose_descriptor(
        name="primary", data_keys=array_keys(n, *keys), configuration=configuration or {}
    )
    return run, desc


def fly_event(desc, k: int, n: int = 50, **kw) -> dict:
    data = fly_arrays(k, n)
    data = {key: data[key] for key in desc.descriptor_doc["data_keys"]}
    return desc.compose_event(data=data, timestamps=dict.fromkeys(data, 0.0), validate=False, **kw)


def test_fly_events_emitted_at_once_with_seq_gap_flag():
    run, desc = fly_run()
    asm = RunAssembler()
    assert asm.feed("start", run.start_doc) == []
    (opened,) = asm.feed("descriptor", desc.descriptor_doc)
    assert opened.kind == "fly"
    got = []
    for k, seq in enumerate([1, 2, 5, 6]):
        (ready,) = asm.feed("event", fly_event(desc, k, seq_num=seq))
        got.append(ready.spectrum)
    assert [s.flags for s in got] == [(), (), ("seq_gap",), ()]
    assert [s.index for s in got] == [0, 1, 2, 3]
    for k, s in enumerate(got):
        ref = fly_arrays(k)
        np.testing.assert_array_equal(s.energy, ref["energy"])
        np.testing.assert_array_equal(s.channels["it"], ref["It"])
    assert asm.feed("stop", run.compose_stop()) == [
        RunClosed(run.start_doc["uid"], "success", "", 4, 0, 1, 2)
    ]


def test_fly_arrays_are_not_copied():
    run, desc = fly_run()
    asm = RunAssembler()
    feed_all(asm, [("start", run.start_doc), ("descriptor", desc.descriptor_doc)])
    ev = fly_event(desc, 0)
    (ready,) = asm.feed("event", ev)
    assert ready.spectrum.energy is ev["data"]["energy"]
    assert ready.spectrum.channels["i0"] is ev["data"]["I0"]


def test_fly_event_page_rows_are_spectra():
    run, desc = fly_run(n=4)
    rows = [fly_arrays(k, 4) for k in range(3)]
    page = desc.compose_event_page(
        data={key: [r[key] for r in rows] for key in ("energy", "I0", "It")},
        timestamps={key: [0.0] * 3 for key in ("energy", "I0", "It")},
        seq_num=[1, 2, 3],
        validate=False,
    )
    out = feed_all(
        RunAssembler(),
        [("start", run.start_doc), ("descriptor", desc.descriptor_doc), ("event_page", page)],
    )
    got = spectra(out)
    assert [s.seq_nums for s in got] == [(1,), (2,), (3,)]
    for s, r in zip(got, rows, strict=True):
        np.testing.assert_array_equal(s.energy, r["energy"])
        np.testing.assert_array_equal(s.channels["i0"], r["I0"])


def test_fly_energy_from_descriptor_configuration():
    n = 5
    energy = np.linspace(7100.0, 7140.0, n)
    config = {
        "mono": {
            "data": {"mono_energy": energy},
            "timestamps": {"mono_energy": 0.0},
            "data_keys": {
                "mono_energy": {"source": "x", "dtype": "array", "shape": [n], "units": "eV"}
            },
        }
    }
    run, desc = fly_run(n, configuration=config, keys=("I0", "It"))
    asm = RunAssembler()
    out = feed_all(asm, [("start", run.start_doc), ("descriptor", desc.descriptor_doc)])
    assert out[0].kind == "fly"
    for k in range(2):
        (ready,) = asm.feed("event", fly_event(desc, k, n))
        s = ready.spectrum
        np.testing.assert_array_equal(s.energy, energy)
        np.testing.assert_array_equal(s.channels["it"], fly_arrays(k, n)["It"])


def opened(run, desc) -> RunAssembler:
    """An assembler that has seen the run's start and descriptor."""
    asm = RunAssembler()
    feed_all(asm, [("start", run.start_doc), ("descriptor", desc.descriptor_doc)])
    return asm


def test_fly_partial_nan_and_bad_optional_channel():
    run, desc = fly_run(n=4, keys=("energy", "I0", "It", "Ir"))
    asm = opened(run, desc)
    data = {
        "energy": np.array([1.0, 2.0, 3.0, 4.0]),
        "I0": np.array([1.0, np.nan, 1.0, 1.0]),
        "It": np.array([0.5, 0.5, 0.5, 0.5]),
        "Ir": np.array([0.1, 0.1, np.inf, 0.1]),
    }
    (ready,) = asm.feed(
        "event", desc.compose_event(data=data, timestamps=dict.fromkeys(data, 0), validate=False)
    )
    s = ready.spectrum
    np.testing.assert_array_equal(s.energy, [1.0, 3.0, 4.0])
    assert set(s.channels) == {"i0", "it"}
    assert s.flags == ("nonfinite_dropped", "channel_dropped")


# --------------------------------------------------------------------------- runs


def test_interleaved_runs_kept_apart():
    uid_a, a = step_docs([1.0, 2.0, 3.0], md={"element": "Fe"})
    run_b, desc_b = fly_run()
    b = [("start", run_b.start_doc), ("descriptor", desc_b.descriptor_doc)]
    b += [("event", fly_event(desc_b, k)) for k in range(2)] + [("stop", run_b.compose_stop())]
    # start A, start B, interleave, stop B before A
    order = [a[0], b[0], a[1], b[1], a[2], b[2], a[3], b[3], b[4], a[4], a[5]]
    asm = RunAssembler()
    out = feed_all(asm, order[:2])
    assert asm.open_runs == 2
    out += feed_all(asm, order[2:])
    assert asm.open_runs == 0
    by_run: dict[str, list[ScanSpectrum]] = {}
    for s in spectra(out):
        by_run.setdefault(s.raw_uid, []).append(s)
    assert len(by_run[uid_a]) == 1 and len(by_run[run_b.start_doc["uid"]]) == 2
    np.testing.assert_array_equal(by_run[uid_a][0].energy, [1.0, 2.0, 3.0])
    assert by_run[uid_a][0].element == "Fe"
    assert [c.raw_uid for c in closed(out)] == [run_b.start_doc["uid"], uid_a]
    assert [c.n_spectra for c in closed(out)] == [2, 1]


def test_missing_stop_timeout_step_and_fly():
    clock = FakeClock(100.0)
    asm = RunAssembler(run_timeout=30.0, clock=clock)
    uid_s, step = step_docs([1.0, 2.0], stop=False)
    run_f, desc_f = fly_run()
    feed_all(asm, step)
    fly = [
        ("start", run_f.start_doc),
        ("descriptor", desc_f.descriptor_doc),
        ("event", fly_event(desc_f, 0)),
    ]
    clock.t = 120.0
    assert len(spectra(feed_all(asm, fly))) == 1
    assert asm.check_timeouts() == []  # 20 s idle
    out = asm.check_timeouts(now=131.0)  # step idle 31 s, fly 11 s
    assert out == [
        Rejected(uid_s, 0, "missing_stop", out[0].detail),
        RunClosed(uid_s, "timeout", out[1].reason, 0, 1, 0, 0),
    ]
    assert asm.open_runs == 1
    clock.t = 151.0
    out = asm.check_timeouts()
    assert out == [RunClosed(run_f.start_doc["uid"], "timeout", out[0].reason, 1, 0, 0, 0)]
    assert asm.open_runs == 0
    # documents after the close are late, not new runs
    late_stop = {"uid": "x", "time": 1.0, "run_start": uid_s, "exit_status": "success"}
    assert reasons(asm.feed("stop", late_stop)) == ["late_document"]
    assert reasons(asm.feed("event", fly_event(desc_f, 1))) == ["late_document"]
    assert reasons(asm.feed("start", run_f.start_doc)) == ["duplicate_start"]


def test_activity_postpones_timeout():
    clock = FakeClock(0.0)
    asm = RunAssembler(run_timeout=10.0, clock=clock)
    _, docs = step_docs([1.0, 2.0, 3.0])
    for t, doc in zip([0.0, 8.0, 16.0, 24.0, 32.0], docs[:5], strict=True):
        clock.t = t
        asm.feed(*doc)
        assert asm.check_timeouts() == []
    clock.t = 40.0
    assert len(spectra(asm.feed(*docs[5]))) == 1


def test_flush_all_closes_everything():
    asm = RunAssembler()
    _, step = step_docs([1.0], stop=False)
    run_n = compose_run()
    feed_all(asm, [*step, ("start", run_n.start_doc)])
    out = asm.flush_all("shutdown")
    assert [type(o) for o in out] == [Rejected, RunClosed, RunOpened, Rejected, RunClosed]
    assert [r.reason for r in rejected(out)] == ["missing_stop", "empty_run"]
    assert [(c.exit_status, c.reason) for c in closed(out)] == [("abort", "shutdown")] * 2
    assert out[2].kind == "unknown"
    assert asm.open_runs == 0


def test_run_without_configured_stream_is_empty():
    run = compose_run()
    desc = run.compose_descriptor(name="baseline", data_keys=scalar_keys(*STEP_KEYS))
    ev = desc.compose_event(
        data={"energy": 1.0, "I0": 1.0, "It": 1.0}, timestamps=dict.fromkeys(STEP_KEYS, 0)
    )
    out = feed_all(
        RunAssembler(),
        [
            ("start", run.start_doc),
            ("descriptor", desc.descriptor_doc),
            ("event", ev),
            ("stop", run.compose_stop()),
        ],
    )
    assert [type(o) for o in out] == [RunOpened, Rejected, RunClosed]
    assert (out[0].kind, out[1].reason) == ("unknown", "empty_run")


@pytest.mark.parametrize(
    ("md", "expected"),
    [
        ({"element": "cu", "edge": "k"}, ("Cu", "K")),
        ({"XDI": {"Element": {"symbol": "Fe", "edge": "K"}}}, ("Fe", "K")),
        ({"XDI": {"Element": {"symbol": "pt", "edge": "l3"}}}, ("Pt", "L3")),
        ({"sample": {"element": "Ni", "edge": "K"}}, ("Ni", "K")),
        ({"edge": "Zn-K"}, ("Zn", "K")),
        ({"element": "Mn"}, ("Mn", None)),
        ({"sample": "pellet 3"}, (None, None)),
        ({"element": "copper!", "edge": 3}, (None, None)),
        ({}, (None, None)),
    ],
)
def test_element_and_edge_from_start(md, expected):
    _, docs = step_docs([1.0, 2.0], md=md)
    s = spectra(feed_all(RunAssembler(), docs))[0]
    assert (s.element, s.edge) == expected


def test_dotted_xdi_keys_fail_the_start_schema_but_are_still_read():
    """XDI's flat ``Element.symbol`` cannot reach a validated start document: event-model
    forbids dots in metadata keys, so it must be nested. A producer that skips validation
    can still send it, and the assembler still reads it."""
    import jsonschema

    with pytest.raises(jsonschema.ValidationError, match=r"Element\.symbol"):
        compose_run(metadata={"XDI": {"Element.symbol": "Pt", "Element.edge": "L3"}})
    _, docs = step_docs([1.0, 2.0])
    name, start = docs[0]
    docs[0] = (name, {**start, "XDI": {"Element.symbol": "Pt", "Element.edge": "L3"}})
    s = spectra(feed_all(RunAssembler(), docs))[0]
    assert (s.element, s.edge) == ("Pt", "L3")


# --------------------------------------------------------------------------- malformed input


def test_run_router_itself_chokes_on_these():
    """Pins event-model's own behaviour, the reason ``RunAssembler`` validates documents before
    routing them (next test): a bare ``RunRouter`` raises on a repeated start, an event of an
    unknown descriptor and a descriptor of an unknown run. Fails if an event-model release
    changes that, which would make the assembler's guards worth a second look."""
    router = event_model.RunRouter([lambda name, doc: ([], [])])
    run = compose_run()
    router("start", run.start_doc)
    with pytest.raises(ValueError):
        router("start", run.start_doc)
    with pytest.raises(KeyError):
        router(
            "event",
            {
                "descriptor": "nope",
                "uid": "u",
                "time": 0,
                "seq_num": 1,
                "data": {},
                "timestamps": {},
            },
        )
    with pytest.raises(KeyError):
        router("descriptor", {"uid": "d", "run_start": "nope", "data_keys": {}, "name": "primary"})


def test_malformed_documents_are_rejected_and_assembly_goes_on():
    asm = RunAssembler()
    run, desc = fly_run(n=3)
    uid = run.start_doc["uid"]
    good = fly_event(desc, 0, 3)
    assert len(feed_all(asm, [("start", run.start_doc), ("descriptor", desc.descriptor_doc)])) == 1

    def event(**changes) -> dict:
        ev = {**good, "uid": f"u{len(changes)}", **changes}
        return {k: v for k, v in ev.items() if v is not ...}

    cases: list[tuple[Any, Any, str]] = [
        ("start", {"time": 1.0}, "malformed_document"),
        ("start", ["not", "a", "dict"], "malformed_document"),
        ("start", run.start_doc, "duplicate_start"),
        (None, run.start_doc, "malformed_document"),
        ("__init__", {"uid": "x"}, "malformed_document"),
        ("bogus", {}, "malformed_document"),
        (
            "descriptor",
            {"uid": "d1", "run_start": "nope", "data_keys": {}, "name": "primary"},
            "unknown_run",
        ),
        ("descriptor", {"uid": "d2", "run_start": uid, "name": "primary"}, "malformed_document"),
        ("descriptor", desc.descriptor_doc, "malformed_document"),  # seen before
        ("event", {**good, "descriptor": "nope"}, "unknown_descriptor"),
        ("event", event(seq_num=...), "malformed_document"),
        ("event", event(seq_num="7", uid="s7"), "malformed_document"),
        ("event", event(data=[1, 2]), "malformed_document"),
        ("event", event(seq_num=30, data={**good["data"], "I0": np.ones(4)}), "length_mismatch"),
        ("event", event(seq_num=31, data={**good["data"], "It": np.full(3, np.nan)}), "nan_data"),
        (
            "event",
            event(seq_num=32, data={k: v for k, v in good["data"].items() if k != "It"}),
            "missing_channel",
        ),
        (
            "event",
            event(seq_num=33, data={**good["data"], "energy": np.ones((3, 3))}),
            "malformed_document",
        ),
        ("event", event(seq_num=34, data={**good["data"], "I0": "abc"}), "malformed_document"),
        (
            "event_page",
            {
                "descriptor": desc.descriptor_doc["uid"],
                "uid": ["a", "b"],
                "time": [1.0],
                "seq_num": [40, 41],
                "data": {},
                "timestamps": {},
            },
            "malformed_document",
        ),
        (
            "stop",
            {"uid": "s", "time": 1.0, "run_start": "nope", "exit_status": "success"},
            "unknown_run",
        ),
        ("stop", {"uid": "s", "time": 1.0}, "malformed_document"),
    ]
    for name, doc, reason in cases:
        out = asm.feed(name, doc)
        assert [type(o) for o in out] == [Rejected], (name, reason, out)
        assert out[0].reason == reason, (name, doc, out[0])
        assert out[0].reason in REASONS
    # the run still assembles and counts what was rejected against it
    (ready,) = asm.feed("event", {**good, "seq_num": 50})
    np.testing.assert_array_equal(ready.spectrum.energy, good["data"]["energy"])
    (done,) = asm.feed("stop", run.compose_stop())
    # against it: its two bad descriptors, eight bad events and the bad page (the duplicate
    # start is refused without counting against the open run)
    assert done.n_spectra == 1 and done.n_rejected == 11
    # passive document kinds are accepted and ignored
    assert asm.feed("resource", {"uid": "r", "spec": "AD_HDF5"}) == []


def test_step_point_with_array_value_is_rejected_not_fatal():
    _, docs = step_docs([1.0, 2.0, 3.0])
    docs[3][1]["data"]["I0"] = [1.0, 2.0]
    out = feed_all(RunAssembler(), docs)
    assert reasons(out) == ["malformed_document"]
    (spec,) = spectra(out)
    np.testing.assert_array_equal(spec.energy, [1.0, 3.0])
    assert spec.flags == ("points_rejected",)


def test_internal_error_is_contained(monkeypatch):
    run, desc = fly_run()
    asm = opened(run, desc)

    def boom(self, doc):
        raise RuntimeError("bug")

    monkeypatch.setattr(assembly._Run, "event_page", boom)
    (out,) = asm.feed("event", fly_event(desc, 0))
    assert (out.reason, out.raw_uid) == ("internal_error", run.start_doc["uid"])

"""The simulated beamline: channel physics, real RunEngine plans, and a real 0MQ proxy end to end.

Core tests use synthetic spectra and the packaged FEFF10 demo spectra; the library tests use
the shared XDI data (skipped when absent). Importing ophyd starts caproto threads that never
stop; that is known and accepted.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from xasflow.adapters.zmq_bus import ZmqDocumentSource, ZmqInputConfig
from xasflow.sim.beamline import (
    PROBE_KEY,
    BeamlineModel,
    BeamlineRangeError,
    QuickXasDetector,
    SimBeamline,
    default_md,
    default_reference,
    demo_spectra,
    fly_energies,
    fly_scan_plan,
    is_probe,
    library_spectra,
    make_devices,
    sample_spectra,
    start_proxy,
    step_energies,
    step_scan_plan,
    synthetic_foil,
)
from xasflow.sim.feff_demo import load_demo_spectra
from xasflow.spectra import Spectrum, alignment_shift, find_e0, mu_from_channels
from xasflow.spectra.process import PrepParams, prepare

CU_K = 8978.9
DEADLINE_S = 15.0
Docs = list[tuple[str, dict[str, Any]]]


def sample_spectrum(with_reference: bool = False) -> Spectrum:
    """A synthetic Cu(II)-like edge: arctan step 4 eV above Cu metal, a white line, wiggles."""
    energy = np.arange(8700.0, 9700.0, 0.25)
    x = energy - (CU_K + 4.0)
    mu = (
        0.1
        + 1.2 * (0.5 + np.arctan(x / 2.0) / np.pi)
        + 0.5 * np.exp(-0.5 * ((x - 8.0) / 3.0) ** 2)
        + 0.05 * np.sin(x / 12.0) * (x > 0)
    )
    meta: dict[str, Any] = {"name": "synthetic CuO", "source": "test"}
    if with_reference:
        foil = synthetic_foil("Cu")
        meta["reference_mu"] = np.interp(energy, foil.energy, foil.mu) + 0.7
    return Spectrum(energy=energy, mu=mu, element="Cu", edge="K", meta=meta)


@pytest.fixture(scope="module")
def foil() -> Spectrum:
    return synthetic_foil("Cu")


@pytest.fixture(scope="module")
def model(foil: Spectrum) -> BeamlineModel:
    """Enormous flux: counting noise far below 1e-9 in ln(I0/It)."""
    return BeamlineModel(
        sample_spectrum(), foil, i0_flux=1e30, energy_offset=1.7, sample_thickness=1.3, seed=3
    )


def collector() -> tuple[Docs, Any]:
    docs: Docs = []
    return docs, lambda name, doc: docs.append((name, copy.deepcopy(doc)))


# --------------------------------------------------------------------------- channel physics


def test_noise_free_limit_is_beer_lambert_at_shifted_energy(model: BeamlineModel) -> None:
    energy = step_energies()
    assert (energy[0], energy[-1]) == (8800.0, 9500.0)
    assert np.allclose(np.diff(energy[(energy >= 8960) & (energy < 9040)]), 0.3)
    ch = model.channels(energy)
    true = energy + 1.7
    s, ref = model.sample, model.reference
    assert ref is not None
    expected = 1.3 * np.interp(true, s.energy, s.mu) + 0.3 * (true / CU_K) ** -3
    np.testing.assert_allclose(np.log(ch["I0"] / ch["It"]), expected, rtol=0, atol=1e-9)
    np.testing.assert_allclose(
        mu_from_channels("reference", ch["It"], ch["Ir"]),
        np.interp(true, ref.energy, ref.mu),
        rtol=0,
        atol=1e-9,
    )
    # the offset is real: the same formula at the nominal energy misses the edge
    at_nominal = 1.3 * np.interp(energy, s.energy, s.mu) + 0.3 * (energy / CU_K) ** -3
    assert np.max(np.abs(np.log(ch["I0"] / ch["It"]) - at_nominal)) > 0.2


def test_i0_drift_runs_end_to_end(model: BeamlineModel) -> None:
    energy = np.linspace(8900.0, 9100.0, 201)
    i0 = model.channels(energy, dwell=2.0)["I0"] / (1e30 * 2.0)
    assert i0[0] == pytest.approx(1 - 0.01, abs=1e-12)
    assert i0[-1] == pytest.approx(1 + 0.01, abs=1e-12)
    assert i0[100] == pytest.approx(1 - 0.25 * 0.02, abs=1e-12)  # wobble: sin(1.5 pi) = -1
    assert i0.max() - i0.min() >= 0.02
    flat = BeamlineModel(model.sample, model.reference, i0_flux=1e30, i0_drift=0.0)
    np.testing.assert_allclose(flat.channels(energy)["I0"], 1e30, rtol=1e-12)


def test_counting_noise_is_poisson(foil: Spectrum) -> None:
    m = BeamlineModel(sample_spectrum(), foil, i0_flux=1e5, i0_drift=0.0, seed=11)
    energy = np.full(40_000, 9000.0)
    ch = m.channels(energy)
    mean = m.expected(energy)
    for name in ("I0", "It", "Ir"):
        assert np.all(ch[name] == np.round(ch[name]))  # whole counts
        assert ch[name].mean() == pytest.approx(mean[name][0], rel=0.01)
        assert ch[name].var() == pytest.approx(mean[name][0], rel=0.05)
    resid = np.log(ch["I0"] / ch["It"]) - np.log(mean["I0"] / mean["It"])
    assert resid.std() == pytest.approx(np.sqrt(1 / mean["I0"][0] + 1 / mean["It"][0]), rel=0.05)


def test_seeded_reproducibility(foil: Spectrum) -> None:
    energy = fly_energies(300)
    a = BeamlineModel(sample_spectrum(), foil, seed=5)
    b = BeamlineModel(sample_spectrum(), foil, seed=5)
    c = BeamlineModel(sample_spectrum(), foil, seed=6)
    for name in ("I0", "It", "Ir"):
        np.testing.assert_array_equal(a.channels(energy)[name], b.channels(energy)[name])
        assert not np.array_equal(a.channels(energy)[name], c.channels(energy)[name])
    rng = np.random.default_rng(5)
    first, second = a.channels(energy, rng=rng), a.channels(energy, rng=rng)
    assert not np.array_equal(first["It"], second["It"])  # a shared stream moves on
    np.testing.assert_array_equal(first["It"], a.channels(energy)["It"])


def test_energy_range_is_enforced(foil: Spectrum) -> None:
    m = BeamlineModel(sample_spectrum(), foil, energy_offset=5.0)
    assert m.energy_range == (8695.0, 9695.0 - 0.25)
    with pytest.raises(BeamlineRangeError, match=r"sample spectrum 'synthetic CuO'.*8695\.0"):
        m.channels(np.array([8650.0, 9000.0]))
    with pytest.raises(BeamlineRangeError, match=r"model\.energy_range"):
        step_scan_plan(m, [9000.0, 9800.0])
    with pytest.raises(BeamlineRangeError):
        fly_scan_plan(m, np.linspace(9000.0, 9800.0, 10), 2)
    narrow = Spectrum(np.linspace(8950.0, 9100.0, 301), np.linspace(0.0, 1.0, 301), element="Cu")
    nm = BeamlineModel(narrow, foil, energy_offset=-2.0)
    grid = step_energies(within=nm)
    assert (grid[0], grid[-1]) == (8955.0, 9102.0)
    assert grid.size == 1 + 267 + 32  # 8955; 8960-9039.8 by 0.3; 9040-9102 by 2
    fly = fly_energies(100, within=nm)
    assert (fly[0], fly[-1]) == (8952.0, 9102.0)
    with pytest.raises(ValueError, match="i0_flux"):
        BeamlineModel(narrow, foil, i0_flux=0.0)


def test_reference_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XASFLOW_SHARED_DATA", str(tmp_path))  # no library: synthetic foil
    ref = default_reference("Cu")
    assert ref.meta["source"] == "synthetic"
    assert find_e0(ref) == pytest.approx(CU_K, abs=0.05)
    assert ref.energy[0] < 8800 and ref.energy[-1] > 9500
    assert BeamlineModel(sample_spectrum()).reference_source == "synthetic"
    own = BeamlineModel(sample_spectrum(with_reference=True))
    assert own.reference_source == "sample reference channel"
    np.testing.assert_array_equal(own.reference.energy, own.sample.energy)  # type: ignore[union-attr]
    given = BeamlineModel(sample_spectrum(with_reference=True), ref)
    assert given.reference is ref and given.reference_source == "given"


def test_default_md(model: BeamlineModel) -> None:
    md = default_md(model)
    assert md["element"] == "Cu" and md["edge"] == "K" and md["edge_energy"] == CU_K
    assert md["sample_name"] == "synthetic CuO"
    assert md["xas_mode"] == "transmission"
    assert md["xas_channels"] == {"energy": "energy", "i0": "I0", "it": "It", "ir": "Ir"}
    assert (md["reference_element"], md["reference_edge"]) == ("Cu", "K")
    assert md["simulation"]["energy_offset"] == 1.7 and md["simulation"]["seed"] == 3


# --------------------------------------------------------------------------- RunEngine plans


@pytest.fixture
def offline() -> Iterator[tuple[SimBeamline, Docs]]:
    """A SimBeamline that publishes nowhere; documents are collected with RE.subscribe."""
    docs, collect = collector()
    beamline = SimBeamline(publish_to=None, extra_callbacks=[collect])
    try:
        yield beamline, docs
    finally:
        beamline.close()
        assert not beamline.RE._th.is_alive()


def test_step_scan_documents(offline: tuple[SimBeamline, Docs], model: BeamlineModel) -> None:
    beamline, docs = offline
    energies = step_energies()[::9]
    uids = beamline.run(step_scan_plan(model, energies, md={"operator": "sim"}))
    n = energies.size
    assert [name for name, _ in docs] == ["start", "descriptor", *["event"] * n, "stop"]
    start, desc, stop = docs[0][1], docs[1][1], docs[-1][1]
    assert uids == [start["uid"]]
    assert start["plan_name"] == "list_scan" and start["xas_scan"] == "step"
    assert start["operator"] == "sim" and start["element"] == "Cu" and start["edge"] == "K"
    assert start["xas_channels"]["i0"] == "I0"
    for key in ("energy", "I0", "It", "Ir"):
        assert desc["data_keys"][key]["shape"] == [] and desc["data_keys"][key]["dtype"] == "number"
        assert desc["data_keys"][key]["units"] == ("eV" if key == "energy" else "counts")
    events = [doc for name, doc in docs if name == "event"]
    assert [e["seq_num"] for e in events] == list(range(1, n + 1))
    col = {k: np.array([e["data"][k] for e in events]) for k in ("energy", "I0", "It", "Ir")}
    np.testing.assert_allclose(col["energy"], energies)
    mean = model.expected(energies)  # drift progress 0..1 over the points, as in the scan
    np.testing.assert_allclose(col["I0"], mean["I0"], rtol=1e-9)
    np.testing.assert_allclose(np.log(col["I0"] / col["It"]), np.log(mean["I0"] / mean["It"]))
    assert stop["exit_status"] == "success" and stop["num_events"] == {"primary": n}


def test_fly_scan_documents(offline: tuple[SimBeamline, Docs], foil: Spectrum) -> None:
    beamline, docs = offline
    m = BeamlineModel(sample_spectrum(), foil, i0_drift=0.05, seed=2)
    energies = fly_energies(1000)
    assert (energies[0], energies[-1], energies.size) == (8800.0, 9500.0, 1000)
    uids = beamline.run(fly_scan_plan(m, energies, 4, md={"sample_name": "override"}))
    assert [name for name, _ in docs] == ["start", "descriptor", *["event"] * 4, "stop"]
    start, desc = docs[0][1], docs[1][1]
    assert uids == [start["uid"]] and start["num_points"] == 4
    assert start["xas_scan"] == "fly" and start["sample_name"] == "override"
    assert start["num_points_per_spectrum"] == 1000
    for key in ("energy", "I0", "It", "Ir"):
        assert desc["data_keys"][key]["dtype"] == "array"
        assert desc["data_keys"][key]["shape"] == [1000]
        assert desc["data_keys"][key]["units"] == ("eV" if key == "energy" else "counts")
    events = [doc["data"] for name, doc in docs if name == "event"]
    for data in events:
        np.testing.assert_array_equal(data["energy"], energies)
        assert all(np.shape(data[k]) == (1000,) for k in ("I0", "It", "Ir"))
    # drift over the run: spectrum k spans progress k/4..(k+1)/4
    levels = [float(np.mean(d["I0"])) for d in events]
    expected = [np.mean(m.i0_scale((k + np.arange(1000) / 1000) / 4)) * 1e6 for k in range(4)]
    np.testing.assert_allclose(levels, expected, rtol=2e-4)
    assert not np.array_equal(events[0]["It"], events[1]["It"])
    mu = [mu_from_channels("transmission", d["I0"], d["It"]) for d in events]
    mean = m.expected(energies)
    sigma2 = 1 / mean["I0"] + 1 / mean["It"]  # Poisson variance of ln(I0/It) per point
    assert np.std(mu[0] - mu[1]) == pytest.approx(np.sqrt(2 * sigma2.mean()), rel=0.1)


def test_bidirectional_fly_and_devices(foil: Spectrum) -> None:
    m = BeamlineModel(sample_spectrum(), foil, i0_flux=1e30, seed=1)
    grid = np.linspace(8900.0, 9100.0, 50)
    det = QuickXasDetector(m, grid, n_spectra=2, bidirectional=True)
    det.trigger()
    up = {k: v["value"] for k, v in det.read().items()}
    det.trigger()
    down = {k: v["value"] for k, v in det.read().items()}
    assert set(up) == {"energy", "I0", "It", "Ir"}
    np.testing.assert_array_equal(down["energy"], grid[::-1])
    np.testing.assert_allclose(np.log(down["I0"] / down["It"])[::-1], np.log(up["I0"] / up["It"]))
    motor, step = make_devices(m)
    motor.set(9000.0).wait(5)
    step.trigger()
    reading = step.read()
    assert set(reading) == {"I0", "It", "Ir"}
    at = m.expected(np.array([9000.0]), progress=0.0)
    assert reading["It"]["value"] == pytest.approx(at["It"][0], rel=1e-9)


# --------------------------------------------------------------------------- demo samples


def test_demo_spectra_are_the_packaged_feff_spectra_with_a_pre_edge() -> None:
    packaged = {d.name: d for d in load_demo_spectra()}
    demos = demo_spectra()
    assert [s.label for s in demos] == sorted(packaged) and len(demos) >= 4
    for spec in demos:
        feff = packaged[spec.label]
        assert (spec.element, spec.edge) == ("Cu", "K")
        assert spec.meta["source"] == "feff_demo" and spec.meta["expected"] == feff.labels
        # FEFF's own points are kept exactly; below them, a tail down to edge - 200 eV
        first = float(feff.energy[0])
        assert spec.meta["extended_below"] == first
        kept = spec.energy >= first
        np.testing.assert_array_equal(spec.energy[kept], feff.energy)
        np.testing.assert_array_equal(spec.mu[kept], feff.mu)
        tail = spec.mu[~kept]
        assert spec.energy[0] == pytest.approx(CU_K - 200.0)
        assert np.all(np.diff(tail) > 0) and 0 < tail[0] < tail[-1] < feff.mu[0]
        assert tail[0] < 0.03 * feff.mu[0]  # the edge's Lorentzian tail is gone 200 eV below
    raw = demo_spectra(["CuCl"], pre_edge=None)[0]
    np.testing.assert_array_equal(raw.energy, packaged["CuCl"].energy)
    with pytest.raises(KeyError, match="no packaged demo spectrum"):
        demo_spectra(["unobtainium"])


def test_sample_spectra_demos_first_library_optional(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    names = sorted(d.name for d in load_demo_spectra())
    monkeypatch.setenv("XASFLOW_SHARED_DATA", str(tmp_path))  # no shared library here
    assert [s.label for s in sample_spectra()] == names
    assert [s.label for s in sample_spectra("cu", "k", library=False)] == names
    assert sample_spectra("Fe") == [] and sample_spectra("Cu", "L3") == []


def test_sample_spectra_with_library(xdi_library: Path) -> None:
    samples = sample_spectra("Cu")
    n_demo = len(load_demo_spectra())
    assert all(s.meta["source"] == "feff_demo" for s in samples[:n_demo])
    assert [s.label for s in samples[n_demo:]] == [s.label for s in library_spectra("Cu")]
    assert len(samples) > n_demo


@pytest.mark.parametrize("name", sorted(d.name for d in load_demo_spectra()))
def test_demo_sample_scans_prepare_like_the_feff_spectrum(name: str) -> None:
    """A noisy step or fly scan of a demo sample gives the model input FEFF's own spectrum
    gives: same E0 and shape. The edge-step scale is not compared: prepare()'s post-edge fit
    depends on how densely the grid samples E0+40..110 eV (up to ~20 % for step grids)."""
    sample = demo_spectra([name])[0]
    feff = prepare(demo_spectra([name], pre_edge=None)[0], PrepParams())
    model = BeamlineModel(sample, energy_offset=0.0, seed=7)
    md = default_md(model)
    assert md["sample_name"] == name and md["demo_expected"] == sample.meta["expected"]
    for grid in (step_energies(within=model), fly_energies(1000, within=model)):
        assert grid[0] == 8800.0 and grid[-1] <= sample.energy[-1]
        ch = model.channels(grid)
        measured = Spectrum(grid, mu_from_channels("transmission", ch["I0"], ch["It"]), "Cu")
        got = prepare(measured, PrepParams())
        assert got.e0 == pytest.approx(feff.e0, abs=0.1)
        assert np.corrcoef(got.y, feff.y)[0, 1] > 0.999
        # shape, scaled at the window's end: left over are counting noise and linear
        # interpolation across sharp white lines (up to ~0.03 for Cu_MgO's, at y ~ 2)
        tail = slice(-20, None)
        np.testing.assert_allclose(
            got.y / got.y[tail].mean(), feff.y / feff.y[tail].mean(), rtol=0, atol=0.05
        )


def test_default_md_only_demo_samples_carry_expected_labels(model: BeamlineModel) -> None:
    assert "demo_expected" not in default_md(model)
    cuo = BeamlineModel(demo_spectra(["CuO"])[0], seed=1)
    assert default_md(cuo)["demo_expected"] == {
        "cn": 4,
        "motif": "square co-planar",
        "oxidation_state": 2,
    }


def test_fly_scan_of_a_demo_sample(offline: tuple[SimBeamline, Docs]) -> None:
    beamline, docs = offline
    m = BeamlineModel(demo_spectra(["Cu2O"])[0], energy_offset=1.0, seed=9)
    energies = fly_energies(500, within=m)
    beamline.run(fly_scan_plan(m, energies, 2))
    start = docs[0][1]
    assert start["sample_name"] == "Cu2O" and start["demo_expected"]["cn"] == 2
    assert start["simulation"]["sample_source"] == "feff_demo"
    events = [doc["data"] for name, doc in docs if name == "event"]
    assert len(events) == 2
    mu = mu_from_channels("transmission", events[0]["I0"], events[0]["It"])
    assert np.all(np.isfinite(mu)) and mu.max() - mu.min() > 1.0  # the edge is in the scan


# --------------------------------------------------------------------------- through a proxy


@pytest.fixture
def proxy() -> Iterator[Any]:
    proc = start_proxy(0, 0)
    try:
        yield proc
    finally:
        proc.stop()
        assert proc.poll() is not None


def test_end_to_end_through_bluesky_proxy(proxy: Any, model: BeamlineModel) -> None:
    assert proxy.in_address.startswith("tcp://127.0.0.1:")
    source = ZmqDocumentSource(ZmqInputConfig(address=proxy.out_address))
    source.start()
    local, collect = collector()
    beamline = SimBeamline(publish_to=proxy.in_address, extra_callbacks=[collect])
    try:

        def seen(token: str) -> bool:
            while (item := source.get(timeout=0.05)) is not None:
                if item[0] == "start" and item[1].get(PROBE_KEY) == token:
                    return True
            return False

        assert beamline.warm_up(seen, timeout=DEADLINE_S) >= 1
        uids = beamline.run(fly_scan_plan(model, fly_energies(400), 5))
        uids += beamline.run(step_scan_plan(model, step_energies()[::25]))
        remote: Docs = []
        stops: set[str] = set()
        while stops != set(uids):
            item = source.get(timeout=DEADLINE_S)
            assert item is not None, f"run documents missing; got {[n for n, _ in remote]}"
            if is_probe(*item):
                continue
            remote.append(item)
            if item[0] == "stop":
                stops.add(item[1]["run_start"])
    finally:
        beamline.close()
        assert source.close()
    assert not beamline.RE._th.is_alive()
    assert [n for n, _ in remote] == [n for n, _ in local]
    n_step = step_energies()[::25].size
    assert [n for n, _ in remote].count("event") == 5 + n_step
    assert remote[0][1]["uid"] == uids[0] and remote[0][1]["element"] == "Cu"
    assert remote[1][1]["data_keys"]["I0"]["shape"] == [400]
    for (_, got), (_, sent) in zip(remote, local, strict=True):
        assert got["uid"] == sent["uid"]
        if "data" in sent:
            for key, value in sent["data"].items():
                np.testing.assert_array_equal(got["data"][key], value)
    stats = source.stats()
    assert stats["decode_errors"] == 0 and stats["dropped_overflow"] == 0


def test_start_proxy_reports_a_busy_port(proxy: Any) -> None:
    port = int(proxy.in_address.rsplit(":", 1)[1])
    with pytest.raises(RuntimeError, match="proxy"):
        start_proxy(port, 0, timeout=DEADLINE_S)


# --------------------------------------------------------------------------- library replay


def test_library_replay(xdi_library: Path) -> None:
    spectra = library_spectra("Cu")
    names = {s.label for s in spectra}
    assert {"Cu2S_13K_01", "CuO_tenorite_13K_01", "cu_metal_rt"} <= names
    assert all(s.element == "Cu" for s in spectra)
    calibrated = [s for s in spectra if "calibration_shift" in s.meta]
    assert len(calibrated) >= 4 and all(abs(s.meta["calibration_shift"]) < 2 for s in calibrated)

    foil = default_reference("Cu")
    assert foil.meta["source"].endswith("Cu_Foil_rt_2016Foils.xdi")
    assert find_e0(foil) == pytest.approx(CU_K, abs=0.05)
    assert foil.energy[0] <= 8800 and foil.meta["extrapolated_below"] > 8800

    metal = next(s for s in spectra if s.label == "cu_metal_rt")  # no reference channel
    m = BeamlineModel(metal, energy_offset=2.0, seed=4)
    assert m.reference_source.endswith("Cu_Foil_rt_2016Foils.xdi")
    energy = step_energies(within=m)
    ch = m.channels(energy)
    ref = Spectrum(energy, mu_from_channels("reference", ch["It"], ch["Ir"]), element="Cu")
    assert alignment_shift(ref, "Cu") == pytest.approx(2.0, abs=0.3)

    tenorite = next(s for s in spectra if s.label == "CuO_tenorite_13K_01")
    m2 = BeamlineModel(tenorite, energy_offset=-1.5, seed=4)
    assert m2.reference_source == "sample reference channel"
    ch = m2.channels(fly_energies(1000, within=m2))
    assert np.all(ch["It"] > 0) and np.all(ch["Ir"] > 0)

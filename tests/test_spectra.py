"""Behaviour of the shared preprocessing path on synthetic spectra with known answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xasflow.spectra import (
    AugmentParams,
    FeatureSpec,
    PrepParams,
    Spectrum,
    SpectrumError,
    align,
    alignment_shift,
    augment_grid,
    feature_energies,
    feature_names,
    featurize,
    find_e0,
    infer_edge,
    linear_matrix,
    model_input,
    mu_from_channels,
    normalize,
    prepare,
)
from xasflow.spectra.batch import find_e0_batch


def edge_spectrum(
    e0: float = 8985.0,
    step: float = 1.0,
    pre: tuple[float, float] = (0.0, 0.0),
    energy: np.ndarray | None = None,
) -> Spectrum:
    """A tanh edge at ``e0`` with a white line, on a pre-edge line ``pre`` (offset, slope)."""
    if energy is None:
        energy = np.arange(e0 - 200, e0 + 300, 0.5)
    rel = energy - e0
    mu = step * (0.5 + 0.5 * np.tanh(rel / 1.5) + 0.4 * np.exp(-0.5 * ((rel - 8) / 3) ** 2))
    mu = mu + pre[0] + pre[1] * rel
    return Spectrum(energy=energy, mu=mu, element="Cu")


def test_spectrum_sorts_and_rejects_bad_values() -> None:
    s = Spectrum(energy=[3.0, 1.0, 2.0, 2.0], mu=[30.0, 10.0, 20.0, 21.0], element="cu")
    assert s.energy.tolist() == [1.0, 2.0, 3.0]
    assert s.mu.tolist() == [10.0, 20.0, 30.0]
    assert s.element == "Cu"
    with pytest.raises(SpectrumError) as err:
        Spectrum(energy=[1.0, 2.0, 3.0], mu=[1.0, np.nan, 2.0])
    assert err.value.reason == "not_finite"
    with pytest.raises(SpectrumError):
        Spectrum(energy=[1.0, 2.0], mu=[1.0, 2.0, 3.0])


def test_a_refused_nan_says_how_many_points_and_at_which_energies() -> None:
    """'1 points are NaN': the count with its grammar, and where, so the point can be found."""
    energy = np.arange(8970.0, 8990.0, 0.5)
    mu = np.linspace(0.0, 1.0, energy.size)
    one = mu.copy()
    one[11] = np.nan
    with pytest.raises(
        SpectrumError, match=r"^not_finite: 1 point is NaN or infinite, at 8975.5 eV$"
    ):
        Spectrum(energy, one)
    many = mu.copy()
    many[[1, 3, 5, 7, 9, 11, 13]] = [np.nan, np.inf, np.nan, np.nan, np.nan, np.nan, -np.inf]
    bad_energy = energy.copy()
    bad_energy[0] = np.nan
    with pytest.raises(SpectrumError) as err:
        Spectrum(bad_energy, many)
    assert err.value.message == (
        "8 points are NaN or infinite, at 8970.5, 8971.5, 8972.5, 8973.5 eV, point 1 and 3 more"
    )
    i0 = np.full(energy.size, 2.0)
    i0[[4, 6]] = np.nan
    with pytest.raises(SpectrumError) as err:
        mu_from_channels("transmission", i0, np.ones(energy.size), ("I0", "It"), energy)
    assert err.value.reason == "not_finite"
    assert err.value.message == "2 points of I0 are NaN or infinite, at 8972, 8973 eV"


def test_find_e0_on_regular_and_irregular_grids() -> None:
    assert find_e0(edge_spectrum(e0=8985.0)) == pytest.approx(8985.0, abs=0.1)
    rng = np.random.default_rng(1)
    irregular = np.sort(rng.uniform(8900, 9100, 400))
    assert find_e0(edge_spectrum(e0=8991.3, energy=irregular)) == pytest.approx(8991.3, abs=0.3)
    flat = Spectrum(energy=np.arange(8900, 9100, 1.0), mu=np.ones(200), element="Cu")
    with pytest.raises(SpectrumError) as err:
        find_e0(flat)
    assert err.value.reason == "no_edge"


@pytest.mark.parametrize(
    ("energy", "cause"),
    [
        (np.linspace(8.90, 9.10, 200), "energies in keV?"),  # a keV column read as eV
        (np.linspace(-30.0, 70.0, 200), "relative to E0?"),  # not "keV?": -30..70 x 1000
        (np.linspace(8700.0, 8900.0, 200), "below the edge"),
        # stops 19 eV short of the edge: the pre-edge slope is no E0 (it used to be taken
        # for one, and the spectrum failed later as "data end at E0+15 eV")
        (np.linspace(8800.0, 8960.0, 200), "below the edge"),
        (np.linspace(9100.0, 9300.0, 200), "above the edge"),
    ],
)
def test_no_data_near_the_edge_says_why(energy: np.ndarray, cause: str) -> None:
    """find_e0 and the daemon's batched search name the edge, the data's range and the
    likely cause, the same way."""
    spectrum = Spectrum(energy=energy, mu=np.linspace(0.0, 1.0, 200), element="Cu")
    with pytest.raises(SpectrumError) as err:
        find_e0(spectrum)
    assert err.value.reason == "no_edge"
    assert "Cu K edge at 8978.9 eV" in err.value.message and cause in err.value.message
    _, errors = find_e0_batch(energy, spectrum.mu[None, :], "Cu", "K")
    assert errors[0] is not None and errors[0].message == err.value.message


def test_data_ending_just_short_of_the_edge_are_still_searched() -> None:
    """Within 10 eV of the tabulated edge the data are searched as before: an edge 14 eV
    below it (a miscalibrated monochromator) in data that end 9 eV short is found."""
    short = np.arange(8850.0, 8970.0, 0.5)  # ends 8.9 eV below Cu K (8978.9 eV)
    assert find_e0(edge_spectrum(e0=8965.0, energy=short)) == pytest.approx(8965.0, abs=0.3)
    _, errors = find_e0_batch(short, edge_spectrum(e0=8965.0, energy=short).mu[None], "Cu")
    assert errors == [None]


def test_edge_step_normalisation_removes_background_and_step() -> None:
    s = edge_spectrum(step=2.5, pre=(0.7, -0.001))
    params = PrepParams()
    y, step = normalize(s, 8985.0, params)
    # post-edge far from the white line sits at 1 after normalisation
    rel = s.energy - 8985.0
    far = (rel > 60) & (rel < 100)
    assert np.allclose(y[far], 1.0, atol=0.02)
    assert np.allclose(y[rel < -60], 0.0, atol=0.01)
    assert step == pytest.approx(2.5, rel=0.02)


def test_max_normalisation_puts_window_maximum_at_one() -> None:
    s = edge_spectrum(step=3.0)
    prep = prepare(s, PrepParams(normalization="max"))
    # the maximum over the data points is 1; the gridded curve may sit a hair below it
    assert 0.999 <= prep.y.max() <= 1.0


@pytest.mark.parametrize(
    "background",
    [
        lambda e: np.ones_like(e),  # flat
        lambda e: 1.0 + 1e-4 * (e - 8800.0),  # a rising ramp
        lambda e: (e / 8800.0) ** -3,  # the E^-3 fall of an absorber without this edge
    ],
    ids=["flat", "ramp", "e-3"],
)
def test_noise_on_a_background_without_an_edge_is_refused(background) -> None:
    """Before the check about a third of these were prepared (and predicted), only the
    out-of-domain score standing between them and an answer."""
    energy = np.linspace(8800.0, 9300.0, 700)
    reasons = set()
    for seed in range(40):
        mu = background(energy) + 1e-3 * np.random.default_rng(seed).standard_normal(energy.size)
        with pytest.raises(SpectrumError) as err:
            prepare(Spectrum(energy, mu, "Cu"), PrepParams())
        reasons.add(err.value.reason)
        if "point noise" in str(err.value):
            assert "no clear absorption edge" in str(err.value)
    assert reasons <= {"edge_step", "weak_edge"} and "weak_edge" in reasons


def test_a_declared_herfd_spectrum_is_judged_on_its_measured_noise() -> None:
    """Broadening to the conventional resolution smooths the point noise away; the check
    looks at the measured mu, so noise declared HERFD is refused like any other."""
    energy = np.linspace(8800.0, 9300.0, 700)
    for seed in range(20):
        mu = (energy / 8800.0) ** -3 + 1e-3 * np.random.default_rng(seed).standard_normal(700)
        with pytest.raises(SpectrumError):
            prepare(Spectrum(energy, mu, "Cu", meta={"herfd": True}), PrepParams())


def test_a_noisy_edge_is_kept_and_a_buried_one_refused() -> None:
    """The step against the point noise: 10x (noisy, still an edge) is prepared, 2x is not;
    ``min_edge_snr=0`` turns the check off."""
    clean = edge_spectrum(step=1.0, pre=(0.5, 0.0))
    rng = np.random.default_rng(3)
    noise = rng.standard_normal(clean.energy.size)
    noisy = Spectrum(clean.energy, clean.mu + 0.1 * noise, "Cu")
    assert prepare(noisy, PrepParams()).edge_step == pytest.approx(1.0, rel=0.1)
    buried = Spectrum(clean.energy, clean.mu + 0.5 * noise, "Cu")
    with pytest.raises(SpectrumError, match="times the point noise") as err:
        prepare(buried, PrepParams())
    assert err.value.reason == "weak_edge"
    assert prepare(buried, PrepParams(min_edge_snr=0.0)).edge_step > 0


def test_prepare_grid_and_window_tolerance() -> None:
    params = PrepParams(window_start=-5.0, window_stop=45.0, n_points=101, max_extrapolation=2.0)
    full = prepare(edge_spectrum(), params)
    assert full.y.shape == (101,)
    assert full.extrapolated == 0.0
    # data start 4 eV below E0: 1 eV of the window is held constant, and said so
    short = edge_spectrum(energy=np.arange(8981.0, 9200.0, 0.5))
    prep = prepare(short, params)
    assert prep.extrapolated == pytest.approx(1.0, abs=0.15)
    # data start 2 eV below E0: beyond tolerance, refused with a reason
    with pytest.raises(SpectrumError) as err:
        prepare(edge_spectrum(energy=np.arange(8983.0, 9200.0, 0.5)), params)
    assert err.value.reason == "window"


def test_polynomial_features_recover_piecewise_cubics() -> None:
    prep = PrepParams(n_points=200)
    spec = FeatureSpec(spectrum=False, derivative=False, poly_partitions=(4,), whiteline=False)
    m = linear_matrix(spec, prep)
    assert m.shape == (200, 16)
    grid = prep.grid
    y = 0.3 + 0.01 * grid - 2e-4 * grid**2 + 1e-6 * grid**3
    coefs = (y @ m).reshape(4, 4)
    edges = np.linspace(0, 200, 5).round().astype(int)
    for p in range(4):
        xs = grid[edges[p] : edges[p + 1]]
        t = (xs - xs.mean()) / (np.ptp(xs) / 2)
        rebuilt = np.vander(t, 4, increasing=True) @ coefs[p]
        assert np.allclose(rebuilt, y[edges[p] : edges[p + 1]], atol=1e-10)


def test_feature_blocks_and_names_line_up() -> None:
    prep = PrepParams(n_points=64)
    spec = FeatureSpec()
    y = prepare(edge_spectrum(), prep).y
    x = model_input(y, spec, prep)
    assert x.dtype == np.float32 and x.shape == (1, 66)
    # white-line scalars: position and height of the maximum
    assert x[0, 64] == pytest.approx(prep.grid[np.argmax(y)], abs=1e-4)
    assert x[0, 65] == pytest.approx(y.max(), abs=1e-6)
    feats = featurize(y, spec, prep)
    names = feature_names(spec, prep)
    assert len(names) == feats.shape[1] == feature_energies(spec, prep).size
    # each block against its own definition, on the float32 input the graphs get
    y32 = y.astype(np.float32).astype(np.float64)
    assert names[0].startswith("mu@") and np.allclose(feats[0, :64], y32, atol=1e-12)
    assert names[-2:] == ["whiteline_energy", "whiteline_height"]
    assert np.allclose(feats[0, -2:], x[0, 64:66], atol=1e-12)
    # the first partition's cubic (4 pieces over the 64 points), refitted by numpy
    first = [k for k, name in enumerate(names) if name.startswith("poly4[")][:4]
    xs = prep.grid[:16]
    t = (xs - xs.mean()) / (np.ptp(xs) / 2)
    coefs = np.linalg.lstsq(np.vander(t, 4, increasing=True), y32[:16], rcond=None)[0]
    assert np.allclose(feats[0, first], coefs, atol=1e-8)
    # the derivative block equals a centred finite difference
    d = feats[0, 64:128]
    assert np.allclose(d[1:-1], np.gradient(y, prep.grid)[1:-1], atol=1e-4)


def test_augmentation_identity_and_shift() -> None:
    grid = np.linspace(-5, 45, 201)
    y = np.exp(-0.5 * ((grid - 10) / 2) ** 2)[None, :]
    rng = np.random.default_rng(0)
    same = augment_grid(
        y, grid, AugmentParams(stretch_fraction=0, shift_sigma=0, noise_sigma=0), rng
    )
    assert np.allclose(same, y)
    shifted = augment_grid(
        y, grid, AugmentParams(copies=3, stretch_fraction=0, shift_sigma=1.0, noise_sigma=0), rng
    )
    assert shifted.shape == (3, 201)
    peaks = grid[np.argmax(shifted, axis=1)]
    assert np.all(np.abs(peaks - 10) < 4) and np.ptp(peaks) > 0
    stretched = augment_grid(
        y, grid, AugmentParams(stretch_fraction=1.0, shift_sigma=0, noise_sigma=0), rng
    )
    peak = grid[np.argmax(stretched[0])]
    assert 10 * (1 - 5 / 45) - 0.3 <= peak <= 10 * (1 + 5 / 45) + 0.3


def test_channels_and_reference_alignment() -> None:
    i0 = np.array([100.0, 200.0])
    it = np.array([50.0, 20.0])
    assert np.allclose(mu_from_channels("transmission", i0, it), np.log([2.0, 10.0]))
    assert np.allclose(mu_from_channels("fluorescence", i0, it), [0.5, 0.1])
    with pytest.raises(SpectrumError) as err:
        mu_from_channels("transmission", i0, np.array([1.0, 0.0]))
    assert err.value.reason == "bad_channel"
    # a Cu foil whose edge reads 3.9 eV low: the shift puts it on 8978.9
    foil = edge_spectrum(e0=8975.0)
    shift = alignment_shift(foil, "Cu")
    assert shift == pytest.approx(3.9, abs=0.1)
    moved = align(edge_spectrum(e0=8980.0), shift)
    assert find_e0(moved) == pytest.approx(8983.9, abs=0.15)
    assert moved.meta["energy_shift"] == pytest.approx(shift)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Cu/cu_metal_10K.xdi", ("Cu", "K")),  # 8786-11362 eV: the range rule said Hf L3
        ("As/as2o3_100K_scan1.xdi", ("As", "K")),  # every As K scan was Au L3
        ("Fe/Fe2O3_rt_01.xdi", ("Fe", "K")),
        ("Pt/" + "*", ("Pt", "L3")),
        ("W/" + "*", ("W", "L3")),
    ],
)
def test_infer_edge_from_data_on_measured_scans(
    xdi_library: Path, name: str, expected: tuple[str, str]
) -> None:
    """The element and edge of a measured scan, from where its mu jumps across a tabulated
    edge, is the file's own (Element.symbol / Element.edge): the range rule was wrong for 62
    of the library's 272 scans, EXAFS scans above all."""
    from xasflow.adapters.columns import read_spectrum_file
    from xasflow.adapters.xdi import read_xdi
    from xasflow.spectra import infer_edge_from_data

    path = next(iter(sorted(xdi_library.glob(name))))
    fields = {k.lower(): v.strip() for k, v in read_xdi(path).fields.items()}
    s = read_spectrum_file(path)
    assert (fields["element.symbol"], fields["element.edge"]) == expected
    assert infer_edge_from_data(s.energy, s.mu) == expected


def test_infer_edge_from_energy_range() -> None:
    assert infer_edge(8800.0, 9800.0) == ("Cu", "K")
    assert infer_edge(6900.0, 7600.0) == ("Fe", "K")
    assert infer_edge(100.0, 200.0) is None


def test_edge_step_falls_back_when_quadratic_dives() -> None:
    """A concave post-edge whose quadratic is negative at E0 still gets a positive edge step."""
    from xasflow.spectra import PrepParams, Spectrum, normalize

    e0 = 8980.0
    energy = np.arange(e0 - 20, e0 + 130, 0.5)
    rel = energy - e0
    mu = np.where(rel < 0, 0.0, 1.2 - 0.0004 * (rel - 80.0) ** 2)
    params = PrepParams()
    quad = np.polyval(
        np.polyfit(rel[(rel >= 40) & (rel <= 110)], mu[(rel >= 40) & (rel <= 110)], 2), 0
    )
    assert quad < 0  # the case the fallback exists for
    spectrum = Spectrum(energy=energy, mu=mu, element="Cu")
    # the legacy fit (+40..+110 eV, degree 2) falls back to the straight line there
    window = (rel >= 40) & (rel <= 110)
    line = np.polyval(np.polyfit(rel[window], mu[window], 1), 0)
    y, step = normalize(spectrum, e0, PrepParams(method="legacy"))
    assert step == pytest.approx(line, abs=0.01) and np.all(np.isfinite(y))
    # Larch's rules (the default) choose their own range and degree: a positive step too
    y, step = normalize(spectrum, e0, params)
    assert step > 0 and np.all(np.isfinite(y))


def test_edge_step_does_not_depend_on_sampling() -> None:
    """One spectrum sampled three ways (FEFF's k grid, a coarse step scan, a 1000-point fly
    scan) gets the same edge step within 3 %; fitting raw points gave steps 10 % apart."""
    from xasflow.spectra import PrepParams, Spectrum, normalize

    e0 = 8980.0

    def mu(e: np.ndarray) -> np.ndarray:
        rel = e - e0
        k = np.sqrt(0.2625 * np.clip(rel, 0, None))
        return 0.5 + np.arctan(rel / 1.5) / np.pi + 0.15 * np.sin(2 * k * 1.9) * np.exp(-rel / 80)

    k = np.arange(0.0, 6.0, 0.05)
    grids = (
        np.concatenate([np.arange(e0 - 20, e0, 0.5), e0 + k**2 / 0.2625]),
        np.concatenate([np.arange(e0 - 20, e0 + 30, 0.5), np.arange(e0 + 30, e0 + 137, 5.0)]),
        np.linspace(e0 - 20, e0 + 137, 1000),
    )
    steps = [
        normalize(Spectrum(energy=e, mu=mu(e), element="Cu"), e0, PrepParams())[1] for e in grids
    ]
    assert max(steps) / min(steps) - 1 < 0.03


def test_broaden_lorentzian_widths_add_and_area_is_kept() -> None:
    """A Lorentzian line of FWHM 0.5 broadened by 1.0 eV is a Lorentzian of FWHM 1.5 eV."""
    from xasflow.spectra import broaden

    energy = np.arange(8900.0, 9100.0, 0.05)

    def line(fwhm: float) -> np.ndarray:
        half = fwhm / 2
        return half / np.pi / ((energy - 9000.0) ** 2 + half**2)

    out = broaden(Spectrum(energy, line(0.5), "Cu"), 1.0)
    np.testing.assert_allclose(out.mu, line(1.5), atol=0.01 * line(1.5).max())
    assert out.meta["broadened_fwhm"] == 1.0
    gauss = broaden(Spectrum(energy, line(0.5), "Cu"), 2.0, shape="gaussian")
    assert np.trapezoid(gauss.mu, energy) == pytest.approx(np.trapezoid(line(0.5), energy), 1e-3)
    with pytest.raises(SpectrumError) as err:
        broaden(Spectrum(energy, line(0.5), "Cu"), 0.0)
    assert err.value.reason == "bad_broadening"


def test_herfd_spectrum_is_broadened_to_conventional_resolution() -> None:
    """A Cu edge of HERFD width (0.53 eV) prepares like the same edge at the K width
    (1.55 eV) once declared HERFD; match_broadening finds that width from the two spectra."""
    from xasflow.spectra import herfd_fwhm, match_broadening

    e0 = 8985.0
    energy = np.arange(e0 - 150, e0 + 300, 0.1)

    def edge(width: float) -> np.ndarray:
        rel = energy - e0
        half = width / 2
        peak = 1.5 * half / np.pi / ((rel - 4.0) ** 2 + half**2)  # a 1s->4p line, area 1.5
        return 0.5 + np.arctan(rel / half) / np.pi + peak

    g_eff = (1.55**-2 + 0.56**-2) ** -0.5
    assert herfd_fwhm("Cu") == pytest.approx(1.55 - g_eff, abs=1e-9)
    sharp = Spectrum(energy, edge(g_eff), "Cu")
    conventional = Spectrum(energy, edge(1.55), "Cu")
    prep = PrepParams()
    target = prepare(conventional, prep).y
    plain = prepare(sharp, prep).y
    herfd = prepare(sharp.with_(meta={"herfd": True}), prep)
    assert np.abs(plain - target).max() > 0.1
    assert np.abs(herfd.y - target).max() < 0.02
    assert herfd.spectrum.meta["broadened_fwhm"] == pytest.approx(herfd_fwhm("Cu"))
    best, rms = match_broadening(sharp, conventional, [0.0, 0.5, 1.0, 1.5])
    assert best == 1.0 and rms[2] < rms[0] / 5
    with pytest.raises(SpectrumError) as err:
        prepare(Spectrum(energy, edge(0.5), "Cd", meta={"herfd": True}), prep)
    assert err.value.reason == "herfd_width"


def test_find_e0_searches_the_whole_scan_without_an_element_or_a_window() -> None:
    """No element, or ``search`` 0: the steepest point over the whole scan, the same alone and
    in a stack (alone it raised UnboundLocalError; the daemon rejected the spectrum
    ``internal_error`` while its stacked neighbours were predicted)."""
    energy = np.linspace(8900.0, 9100.0, 801)
    mu = 0.5 + np.arctan((energy - 8983.0) / 1.5) / np.pi
    for element, search in ((None, 40.0), ("Cu", 0.0)):
        single = find_e0(Spectrum(energy, mu, element), search=search)
        stacked, errors = find_e0_batch(energy, mu[None], element, search=search)
        assert errors == [None] and single == stacked[0]
        assert single == pytest.approx(8983.0, abs=0.1)
    prepare(Spectrum(energy, mu, "Cu"), PrepParams(e0_search=0.0))  # prepares, no exception


@pytest.mark.parametrize("fwhm", [1e-4, 0.1, 200.0, float("nan")])
def test_a_declared_herfd_width_outside_the_range_is_refused(fwhm: float) -> None:
    """Wherever a width comes from (start document, file, configuration, command line): too
    small a width made the broadening grid explode (1e-4 eV: 15 s per spectrum)."""
    from xasflow.daemon.config import AnalysisConfig
    from xasflow.spectra.herfd import FWHM_RANGE, check_fwhm, herfd_width

    energy = np.linspace(8900.0, 9100.0, 801)
    spectrum = Spectrum(energy, np.ones_like(energy), "Cu", meta={"herfd": fwhm})
    with pytest.raises(SpectrumError) as err:
        herfd_width(spectrum)
    assert err.value.reason == "bad_broadening" and "0.2..50 eV" in str(err.value)
    with pytest.raises(ValueError, match="HERFD FWHM"):
        AnalysisConfig(herfd=fwhm)
    assert check_fwhm(FWHM_RANGE[0]) == 0.2 and check_fwhm(1.02) == 1.02


def test_prepare_sets_the_stray_ends_apart_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """prepare() finds a measured scan's stray end points once and hands the bulk to the E0
    search, the calculation guess, the pre-edge start check, the fits and the gridding
    (each found them again: about 6 times per spectrum); the strays still stay out of all."""
    import xasflow.spectra.norm as norm

    clean = edge_spectrum(pre=(0.3, 1e-4))
    stray = clean.with_(
        energy=np.concatenate(([0.0], clean.energy)),  # a trailing "0 0" row, sorted first
        mu=np.concatenate(([0.0], clean.mu)),
        meta={"calculated": False},
    )
    calls: list[int] = []
    real = norm._stray_ends_1d

    def counted(rel: np.ndarray) -> tuple[int, int]:
        calls.append(rel.size)
        return real(rel)

    monkeypatch.setattr(norm, "_stray_ends_1d", counted)
    params = PrepParams()
    got = prepare(stray, params)
    assert calls == [stray.energy.size]
    want = prepare(clean.with_(meta={"calculated": False}), params)
    assert got.e0 == want.e0
    np.testing.assert_allclose(got.y, want.y, rtol=0, atol=1e-12)

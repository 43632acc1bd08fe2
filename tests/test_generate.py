"""FEFF training-data generation: unique sites, cards, structure input, dask jobs, resume,
failure accounting, the written tree read back, and dask labels equal to the old pool's."""

from __future__ import annotations

import json
import multiprocessing
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pymatgen.core")
pytest.importorskip("distributed")

from synthetic_feff import XMU_HEADER, model_mu, write_tree

from xasflow.adapters.feff import read_feff_tree
from xasflow.sim.feff_demo import cu2o_cuprite, cual2o4_spinel
from xasflow.training import label_cache
from xasflow.training import labels as L
from xasflow.training.feff_inputs import (
    PRESETS,
    FeffPreset,
    feff_input,
    read_structures,
    unique_sites,
)
from xasflow.training.feff_site import SiteTask, run_site
from xasflow.training.generate import generate, generation_record

# --- a FEFF stand-in: writes a model xmu.dat, or fails the way FEFF can -------------------

CALLS: list[str] = []
_LOCK = threading.Lock()


def fake_runner(feff_inp: str, work_dir: Path) -> str:
    """Spectrum whose edge depends on the first-shell distance; 'Bad' titles fail."""
    title = next(line for line in feff_inp.splitlines() if "Source:" in line)
    with _LOCK:
        CALLS.append(title.split("Source:")[1].strip())
    if "Bad" in title:
        raise RuntimeError("FEFF stage pot failed: Cannot determine Norman radius")
    atoms = feff_inp.split("ATOMS")[1].splitlines()[4]  # the first neighbour row
    nn = float(atoms.split()[-2])
    energy = np.arange(8320.0, 8470.0, 0.5)
    mu = model_mu(energy, 8333.0, 1.0, 3.0, nn)
    rows = np.column_stack([energy, energy - 8333.0, energy * 0, mu, mu * 0 + 1, mu - 1])
    text = "\n".join(" ".join(f"{v:.6f}" for v in row) for row in rows)
    if "Short" in title:
        text = "\n".join(text.splitlines()[:5])  # FEFF stopped early: truncated xmu.dat
    (work_dir / "xmu.dat").write_text(XMU_HEADER + text + "\n")
    return "fake FEFF log\n"


def _spinel_all_cu():
    """CuAl2O4's spinel with Al replaced by Cu: Cu on the 8a and 16d sites."""
    s = cual2o4_spinel()
    s.replace_species({"Al": "Cu"})
    return s


def _cuprite_and_spinel(root: Path) -> Path:
    """``root`` made, holding Cu2O and the all-Cu spinel as CIFs."""
    root.mkdir()
    cu2o_cuprite().to(filename=str(root / "Cu2O.cif"))
    _spinel_all_cu().to(filename=str(root / "spinel.cif"))
    return root


def _write_structures(root: Path) -> Path:
    from pymatgen.core import Lattice, Structure

    root.mkdir()
    cu2o_cuprite().to(filename=str(root / "Cu2O.cif"))
    (root / "spinel").mkdir()
    _spinel_all_cu().to(filename=str(root / "spinel" / "POSCAR"), fmt="poscar")
    bad = cu2o_cuprite()
    bad.scale_lattice(bad.volume * 1.1)
    bad.to(filename=str(root / "Bad.cif"))  # the fake runner fails this one
    short = cu2o_cuprite()
    short.scale_lattice(short.volume * 0.9)
    short.to(filename=str(root / "Short.vasp"), fmt="poscar")
    Structure(Lattice.cubic(4.2), ["Mg", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]]).to(
        filename=str(root / "MgO.cif")
    )
    (root / "broken.cif").write_text("data_x\n_cell_length_a oops\n")
    return root


@pytest.fixture
def client():
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0"
        ) as c,
        Client(c) as cl,
    ):
        yield cl


# --- structures, sites, cards ---------------------------------------------------------------


def test_unique_sites_with_multiplicities():
    sites, symprec = unique_sites(cu2o_cuprite(), "Cu")
    assert symprec == 0.1
    assert [(s.index, s.multiplicity) for s in sites] == [(0, 4)]
    assert sites[0].equivalent == (0, 1, 2, 3)
    spinel = _spinel_all_cu()
    sites, _ = unique_sites(spinel, "Cu")
    assert sorted(s.multiplicity for s in sites) == [8, 16]
    every = sorted(i for s in sites for i in s.equivalent)
    assert every == [i for i, site in enumerate(spinel) if site.specie.symbol == "Cu"]
    assert unique_sites(spinel, "Fe") == ([], 0.1)


def _first_shell(text: str) -> list[float]:
    rows = text.split("ATOMS")[1].splitlines()[4:]  # after the absorber
    dist = [float(r.split()[5]) for r in rows if len(r.split()) >= 6]
    return [d for d in dist if d < dist[0] + 0.05]


def test_cards_follow_the_preset_and_the_absorber():
    spinel = _spinel_all_cu()
    sites, _ = unique_sites(spinel, "Cu")
    tet = next(s.index for s in sites if s.multiplicity == 8)
    octa = next(s.index for s in sites if s.multiplicity == 16)
    fast = feff_input(spinel, tet, PRESETS["fast"])
    standard = feff_input(spinel, octa, PRESETS["standard"])
    assert "\nSCF" not in fast and "LDOS" not in fast and "\nFMS 4 0" in fast
    assert "\nSCF 4 0 30 0.2 1" in standard and "\nFMS 6 0" in standard
    assert "k_grid 0 6 0.04" in standard and "COREHOLE RPA" in standard
    for text in (fast, standard):
        pots = text.split("POTENTIALS")[1].splitlines()[3]
        assert pots.split()[:3] == ["0", "29", "Cu"]
    assert len(_first_shell(fast)) == 4  # tetrahedral 8a site
    assert len(_first_shell(standard)) == 6  # octahedral 16d site
    assert len(standard.split("ATOMS")[1].splitlines()) > len(fast.split("ATOMS")[1].splitlines())


def test_read_structures_from_dir_and_tar(tmp_path):
    root = _write_structures(tmp_path / "in")
    found, failures, without = read_structures(root, element="Cu")
    assert [s.material_id for s in found] == ["Bad", "Cu2O", "Short", "spinel"]
    assert [(f.item, f.reason) for f in failures] == [("broken.cif", "unreadable_structure")]
    assert without == 1  # MgO
    tar = tmp_path / "in.tar.gz"
    with tarfile.open(tar, "w:gz") as fh:
        fh.add(root, arcname="structures")
    from_tar, tar_failures, _ = read_structures(tar, element="Cu")
    assert [(s.material_id, s.poscar) for s in from_tar] == [
        (s.material_id, s.poscar) for s in found
    ]
    assert len(tar_failures) == 1
    with pytest.raises(FileNotFoundError):
        read_structures(tmp_path / "nothing")


# --- the dask job ---------------------------------------------------------------------------


def test_generate_writes_a_tree_that_reads_back_and_resumes(tmp_path, client):
    root = _write_structures(tmp_path / "in")
    out = tmp_path / "tree"
    CALLS.clear()
    report = generate(root, "Cu", out, "fast", runner=fake_runner, progress=False, client=client)
    assert report.n_materials == 4 and report.n_sites == 5
    assert report.computed == 3 and report.skipped_complete == 0
    assert report.failure_counts() == {
        "feff_error": 1,
        "truncated_xmu": 1,
        "unreadable_structure": 1,
    }
    expected = ["Bad site 0", "Cu2O site 0", "Short site 0", "spinel site 0", "spinel site 8"]
    assert sorted(CALLS) == expected
    saved = json.loads((out / "failures.json").read_text())
    assert saved["counts"] == report.failure_counts()
    bad = next(f for f in saved["failures"] if f["reason"] == "feff_error")
    assert bad["item"] == "Bad/000_Cu" and "Norman radius" in bad["detail"]
    record = generation_record(out)
    assert record is not None and record["preset"]["name"] == "fast"
    assert record["preset"]["params"] == PRESETS["fast"].to_dict()
    spinel_sites = record["materials"]["spinel"]["sites"]
    assert {k: v["multiplicity"] for k, v in spinel_sites.items()} == {"000": 8, "008": 16}
    assert all(v["seconds"] >= v["cpu_seconds"] >= 0 for v in spinel_sites.values())

    tree = read_feff_tree(out, element="Cu")
    assert [(s.material_id, s.site_index) for s in tree.sites()] == [
        ("Cu2O", 0),
        ("spinel", 0),
        ("spinel", 8),
    ]
    # Bad and Short: cards and FEFF's words kept, no xmu.dat, so the material has no sites
    assert tree.issue_counts() == {"missing_xmu": 2, "no_sites": 2}
    assert "Norman radius" in (out / "Bad/FEFF-XANES/000_Cu/feff.out").read_text()
    assert (out / "Short/FEFF-XANES/000_Cu/feff.inp").read_text().startswith("* This FEFF")
    assert all(s.energy.size == 300 for s in tree.sites())

    CALLS.clear()  # the re-run joins the same cluster by its address, as on a real cluster
    address = client.scheduler.address
    again = generate(root, "Cu", out, "fast", scheduler=address, runner=fake_runner, progress=False)
    assert again.skipped_complete == 3 and again.computed == 0
    assert sorted(CALLS) == ["Bad site 0", "Short site 0"]  # only the failed ones are retried
    assert again.failure_counts() == report.failure_counts()
    kept = generation_record(out)["materials"]["spinel"]["sites"]
    assert {k: v["seconds"] for k, v in kept.items()} == {
        k: v["seconds"] for k, v in spinel_sites.items()
    }  # the timings of the sites computed before survive the re-run
    with pytest.raises(ValueError, match="preset 'fast'"):
        generate(root, "Cu", out, "standard", runner=fake_runner, progress=False, client=client)


#: set when a fast and when a standard preset's task starts (stamping_runner)
_FAST_STARTED, _STANDARD_STARTED = threading.Event(), threading.Event()


def stamping_runner(feff_inp: str, work_dir: Path) -> str:
    """Writes the FMS card it was given into xmu.dat; a fast run's task waits for a standard's."""
    fms = next(line.split()[1] for line in feff_inp.splitlines() if line.startswith("FMS"))
    if fms == "4":
        _FAST_STARTED.set()
        _STANDARD_STARTED.wait(timeout=60)  # a safety net only: the standard run's task sets it
    else:
        _STANDARD_STARTED.set()
    energy = np.arange(8320.0, 8470.0, 0.5)
    mu = model_mu(energy, 8333.0, 1.0, 3.0, 1.9)
    rows = np.column_stack([energy, energy - 8333.0, energy * 0, mu, mu * 0 + 1, mu - 1])
    text = "\n".join(" ".join(f"{v:.6f}" for v in row) for row in rows)
    (work_dir / "xmu.dat").write_text(f"# FMS {fms}\n" + XMU_HEADER + text + "\n")
    return f"fake FEFF, FMS {fms}\n"


def test_two_runs_on_one_scheduler_get_their_own_results(tmp_path, client):
    """Two trees of one material with other presets, generated at once on one scheduler (as
    a shared ``$XASFLOW_SCHEDULER`` allows): each site's task is its own, not the other's."""
    root = tmp_path / "in"
    root.mkdir()
    cu2o_cuprite().to(filename=str(root / "Cu2O.cif"))
    _FAST_STARTED.clear()
    _STANDARD_STARTED.clear()
    reports = {}

    def run(preset: str) -> None:
        reports[preset] = generate(
            root, "Cu", tmp_path / preset, preset, runner=stamping_runner, progress=False,
            client=client,
        )  # fmt: skip

    first = threading.Thread(target=run, args=("fast",))
    first.start()
    assert _FAST_STARTED.wait(timeout=60)  # the fast run's task is running on the cluster
    run("standard")
    first.join()
    for preset, fms in (("fast", "4"), ("standard", "6")):
        site = tmp_path / preset / "Cu2O/FEFF-XANES/000_Cu"
        assert reports[preset].computed == 1
        assert f"FMS {fms} 0" in (site / "feff.inp").read_text()
        assert (site / "xmu.dat").read_text().startswith(f"# FMS {fms}\n")


def test_a_structure_spglib_would_crash_on_is_skipped_as_a_bad_structure(
    tmp_path, client, monkeypatch
):
    """NaN in a POSCAR (a relaxation that blew up) parses in pymatgen, and spglib under the
    unique sites then kills the process (SIGSEGV): such a structure is a ``bad_structure``
    failure, and the other structures are generated."""
    from pymatgen.io.vasp import Poscar

    from xasflow.training import generate as G

    def finite_only(structure, element):  # stands in for spglib's crash, which kills pytest
        assert np.isfinite(structure.lattice.matrix).all(), "non-finite lattice reached spglib"
        assert np.isfinite(structure.frac_coords).all(), "non-finite coordinates reached spglib"
        return unique_sites(structure, element)

    monkeypatch.setattr(G, "unique_sites", finite_only)
    root = tmp_path / "in"
    root.mkdir()
    cu2o_cuprite().to(filename=str(root / "Cu2O.cif"))
    lines = Poscar(cu2o_cuprite()).get_str().splitlines()
    for name, text in (
        ("nan_cell", [*lines[:4], "0.0 0.0 NaN", *lines[5:]]),
        ("nan_site", [*lines[:-1], "0.5 NaN 0.5 O"]),
    ):
        (root / name).mkdir()
        (root / name / "POSCAR").write_text("\n".join(text) + "\n")
    out = tmp_path / "tree"
    report = generate(root, "Cu", out, "fast", runner=fake_runner, progress=False, client=client)
    assert report.n_materials == 1 and report.computed == 1
    assert report.failure_counts() == {"bad_structure": 2}
    saved = json.loads((out / "failures.json").read_text())["failures"]
    assert {(f["item"], f["reason"]) for f in saved} == {
        ("nan_cell", "bad_structure"),
        ("nan_site", "bad_structure"),
    }
    assert any("lattice is not finite" in f["detail"] for f in saved)
    assert any("coordinates are not finite" in f["detail"] for f in saved)
    assert list(generation_record(out)["materials"]) == ["Cu2O"]
    assert not (out / "nan_cell").exists()  # no POSCAR of a structure that was not planned


def test_resume_under_other_code_versions_is_refused(tmp_path, client, monkeypatch):
    """A tree records the code that computed it (pymatgen writes the cards, feff10-rs runs
    FEFF): resuming it under other versions would mix spectra under one record, so it is
    refused and the tree is left as it was."""
    import importlib.metadata

    root = _cuprite_and_spinel(tmp_path / "in")
    out = tmp_path / "tree"
    kw = {"runner": fake_runner, "progress": False, "client": client}
    first = generate(root, "Cu", out, "fast", limit=1, **kw)
    assert first.computed == 1
    before = (out / "generation.json").read_text()
    code = json.loads(before)["code"]
    assert code["runner"] == "fake_runner" and code["pymatgen"] != "2099.1.1"

    real_version = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata,
        "version",
        lambda name: "2099.1.1" if name == "pymatgen" else real_version(name),
    )
    CALLS.clear()
    with pytest.raises(ValueError, match=r"pymatgen .*2099\.1\.1"):
        generate(root, "Cu", out, "fast", **kw)
    assert CALLS == [] and not (out / "spinel").exists()
    assert (out / "generation.json").read_text() == before
    monkeypatch.undo()
    again = generate(root, "Cu", out, "fast", **kw)  # the versions it was made with resume it
    assert again.computed == 2 and again.skipped_complete == 1


@pytest.mark.parametrize(
    "wording",
    [
        "the shared Cu set's cards (Lightshow defaults): SCF 7 Å, FMS 9 Å, 10 Å",  # the old text
        "an earlier wording of this preset",
    ],
)
def test_a_tree_resumes_across_a_reworded_preset_description(tmp_path, client, wording):
    """A preset's description is words about its physics, not physics: a tree written under
    another wording of it (the ``converged`` preset's until its text was made true) resumes,
    and its record takes the current wording. Before: the description was compared with
    the rest of the parameters, so the tree was refused ("generated ... with preset
    'converged'; use another --out") though every card would be the same. A parameter that
    changes the cards is still refused."""
    root = _cuprite_and_spinel(tmp_path / "in")
    out = tmp_path / "tree"
    kw = {"runner": fake_runner, "progress": False, "client": client}
    assert generate(root, "Cu", out, "converged", limit=1, **kw).computed == 1
    path = out / "generation.json"
    record = json.loads(path.read_text())
    record["preset"]["params"]["description"] = wording
    path.write_text(json.dumps(record))
    again = generate(root, "Cu", out, "converged", **kw)
    assert (again.skipped_complete, again.computed) == (1, 2)
    assert generation_record(out)["preset"]["params"] == PRESETS["converged"].to_dict()
    record = json.loads(path.read_text())
    record["preset"]["params"]["fms_radius"] = 8.0  # other physics under the same name
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="preset 'converged'"):
        generate(root, "Cu", out, "converged", **kw)


def _cards(text: str) -> dict[str, str]:
    """A ``feff.inp``'s one-line cards, numbers as floats (pymatgen writes 7 or 7.0)."""

    def norm(word: str) -> str:
        try:
            return f"{float(word):g}"
        except ValueError:
            return word

    cards = {}
    for line in text.splitlines():
        words = line.split()
        if words and words[0].isupper() and words[0] != "TITLE":
            cards[words[0]] = " ".join(norm(w) for w in words[1:])
    return cards


def test_the_converged_preset_has_the_cu_sets_scf_and_fms_cards_but_not_its_xanes():
    """What the ``converged`` preset's description and the module docstring say of the
    shared Cu set (its ``feff.inp`` files, written by Lightshow): the same SCF, FMS, core
    hole, exchange and S02 cards, but ``XANES 6`` (theirs ``XANES 4``)."""
    from xasflow.paths import cu_feff_archive

    archive = cu_feff_archive()
    if not archive.is_file():
        pytest.skip(f"no shared Cu FEFF set at {archive}")
    with tarfile.open(archive) as tar:
        member = next(m for m in tar if m.name.endswith("/feff.inp"))
        theirs = _cards(tar.extractfile(member).read().decode())
    ours = _cards(feff_input(cu2o_cuprite(), 0, PRESETS["converged"]))
    for card in ("SCF", "FMS", "COREHOLE", "EXCHANGE", "S02", "EGRID", "RPATH", "CONTROL"):
        assert ours[card] == theirs[card], card
    assert (ours["XANES"], theirs["XANES"]) == ("6 0.04 0.1", "4 0.04 0.1")


def test_generated_tree_builds_a_dataset_with_the_same_multiplicities(tmp_path, monkeypatch):
    from xasflow.training.dataset import build_feff_dataset

    monkeypatch.setenv("XASFLOW_CACHE", str(tmp_path / "cache"))
    root = _cuprite_and_spinel(tmp_path / "in")
    out = tmp_path / "tree"
    generate(root, "Cu", out, "fast", runner=fake_runner, progress=False, workers=1)
    ds = build_feff_dataset(out, "Cu", n_jobs=1, progress=False)
    rows = {
        (m, int(s)): int(k)
        for m, s, k in zip(ds.material_id, ds.site_index, ds.multiplicity, strict=True)
    }
    assert rows == {("Cu2O", 0): 4, ("spinel", 0): 8, ("spinel", 8): 16}
    assert ds.complete.all()


def test_run_site_reports_bad_input_without_raising():
    task = SiteTask("x", 0, "Cu", "K", "not a poscar")
    outcome = run_site(task, PRESETS["fast"], fake_runner)
    assert outcome.reason == "bad_structure" and not outcome.files


def test_cli_rejects_an_unknown_preset(tmp_path, capsys):
    from xasflow.cli import main

    code = main(
        [
            *("dataset", "generate", "--element", "Cu", "--structures", str(tmp_path)),
            *("--out", str(tmp_path / "t"), "--preset", "nope"),
        ]
    )
    assert code == 2
    assert "unknown FEFF preset 'nope'" in capsys.readouterr().err


# --- labels on dask equal the old multiprocessing pool's -------------------------------------


def test_dask_labels_equal_the_pool_labels(tmp_path):
    from xasflow.training.label_jobs import _material_job, compute_labels

    tree = read_feff_tree(write_tree(tmp_path, per_type=2, broken=True), element="Cu")
    jobs = [(m.material_id, m.poscar, tuple(s.site_index for s in m.sites)) for m in tree.materials]
    jobs.append(("unreadable", "garbage\n", (0,)))
    labels, mult = compute_labels(jobs, n_jobs=2, progress=False)

    # the previous implementation: a fork pool mapping the same per-material function
    ref_labels, ref_mult = {}, {}
    with multiprocessing.get_context("fork").Pool(2) as pool:
        for mid, sites, res, m in pool.imap_unordered(_material_job, jobs, chunksize=2):
            for site, item in zip(sites, res, strict=True):
                ref_labels[(mid, site)] = item
                ref_mult[(mid, site)] = m.get(site, 1)
    assert mult == ref_mult
    ours, theirs = label_cache.labels_to_arrays(labels), label_cache.labels_to_arrays(ref_labels)
    assert ours.keys() == theirs.keys()
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key])
    assert isinstance(labels[("unreadable", 0)], L.LabelFailure)
    assert sum(isinstance(v, L.SiteLabels) for v in labels.values()) == 6


# --- one real FEFF10 run --------------------------------------------------------------------


@pytest.mark.slow
def test_real_feff10_run_of_a_tiny_cluster():
    pytest.importorskip("feff10")
    from pymatgen.io.vasp import Poscar

    tiny = FeffPreset("tiny", "test only", cluster_radius=3.0, fms_radius=2.5, scf_radius=None)
    task = SiteTask("Cu2O", 0, "Cu", "K", Poscar(cu2o_cuprite()).get_str())
    outcome = run_site(task, tiny)
    assert outcome.reason == "", outcome.detail
    from xasflow.adapters.feff_xmu import parse_xmu

    energy, mu, edge = parse_xmu(outcome.files["xmu.dat"].encode())
    assert edge == "K" and 8970 < energy[0] < 8990 and energy[-1] - energy[0] > 120
    assert 0.5 < np.median(mu[-20:]) < 1.5  # FEFF normalises to an edge step of about one
    assert "FEFF 10" in outcome.files["feff.out"]
    assert outcome.cpu_seconds > 0  # FEFF's stage processes, counted once they exit


def _bench_generate():
    """bench/generate.py as a module (the bench is no package; its folder on sys.path for
    its sibling bench/report.py, as ``python bench/generate.py`` has it)."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "bench" / "generate.py"
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))
    spec = importlib.util.spec_from_file_location("bench_generate", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_bench_keys_a_tree_by_code_when_its_own_would_be_refused(tmp_path):
    """bench/generate.py keeps its trees under ``--work`` and resumes them; after an upgrade
    ``generate`` refuses a tree made with other code versions. Before: the bench raised that
    ValueError (``presets`` never got past it). Now it resumes its tree when it can, and
    otherwise generates into a tree beside it keyed by the code versions and preset (the
    refused one kept), and says which it did and why."""
    from xasflow.training.generate import code_versions

    bench = _bench_generate()
    work = tmp_path / "work"
    base = work / "presets" / "fast"
    assert bench.preset_tree(work, "fast") == (base, {"tree": str(base), "how": "new"})

    def record(tree: Path, **code: str) -> None:
        tree.mkdir(parents=True, exist_ok=True)
        made = {
            "element": "Ni",
            "edge": "K",
            "preset": {"name": "fast", "params": PRESETS["fast"].to_dict()},
            "code": {**code_versions(None), **code},
            "materials": {},
        }
        (tree / "generation.json").write_text(json.dumps(made))

    record(base)
    assert bench.preset_tree(work, "fast") == (base, {"tree": str(base), "how": "resumed"})
    record(base, pymatgen="2000.1.1")  # made before an upgrade
    before = (base / "generation.json").read_text()
    keyed, said = bench.preset_tree(work, "fast")
    assert keyed.parent == base.parent and keyed.name.startswith("fast-") and keyed != base
    assert (said["tree"], said["how"]) == (str(keyed), "keyed")
    assert "other code: pymatgen 2000.1.1" in said["why"] and str(base) in said["why"]
    assert (base / "generation.json").read_text() == before  # the refused tree is kept
    record(keyed)  # the keyed tree, made by the run before: resumed by the next
    assert bench.preset_tree(work, "fast") == (keyed, {**said, "how": "keyed, resumed"})
    record(keyed, pymatgen="2000.1.1")  # cannot happen unless edited: started afresh
    again, said = bench.preset_tree(work, "fast")
    assert again == keyed and said["how"] == "fresh" and not keyed.exists()

"""FEFF run trees (Lightshow layout) from directories and streamed tar.gz archives."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from xasflow.adapters.feff import FeffTree, ReadIssue, read_feff_tree
from xasflow.adapters.feff_energy import FeffEnergies, parse_feff_out, parse_xmu_energies
from xasflow.adapters.feff_xmu import parse_xmu

XMU_HEADER = """\
# # comment:                                                     FEFF 9.9.1
# # Abs   Z=29 Rmt= 1.247 Rnm= 1.305 K  shell
# # Pot 1 Z= 8 Rmt= 1.049 Rnm= 1.096
#  -----------------------------------------------------------------------
#  omega    e    k    mu    mu0     chi     @#
"""

CU2O_POSCAR = """\
Cu4 O2
1.0
4.27 0.0 0.0
0.0 4.27 0.0
0.0 0.0 4.27
Cu O
4 2
direct
0.25 0.25 0.25 Cu
0.75 0.75 0.25 Cu
0.75 0.25 0.75 Cu
0.25 0.75 0.75 Cu
0.0 0.0 0.0 O
0.5 0.5 0.5 O
"""

FECU_POSCAR = """\
Fe1 Cu1
1.0
3.0 0.0 0.0
0.0 3.0 0.0
0.0 0.0 3.0
Fe Cu
1 1
direct
0.0 0.0 0.0 Fe
0.5 0.5 0.5 Cu
"""


def xmu_table(n: int, shift: float) -> np.ndarray:
    """n rows of omega e k mu mu0 chi with exactly representable values."""
    omega = 8980.0 + shift + 0.5 * np.arange(n)
    mu = 0.25 * np.arange(n) + shift
    return np.column_stack([omega, omega - 8980.0, np.zeros(n), mu, mu, np.zeros(n)])


def xmu_text(n: int = 12, shift: float = 0.0) -> str:
    rows = "\n".join(" ".join(repr(float(v)) for v in row) for row in xmu_table(n, shift))
    return XMU_HEADER + rows + "\n"


def with_extra_value(text: str, row: int) -> str:
    """The xmu text with a seventh value appended to data row ``row`` (1-based)."""
    lines = text.splitlines()
    lines[XMU_HEADER.count("\n") + row - 1] += " 7.0"
    return "\n".join(lines) + "\n"


def tree_files() -> dict[str, str]:
    """A small tree with good sites and every kind of broken item, by relative path."""
    good = xmu_text()
    return {
        # mp-1: two good Cu sites, one site index that points at O in the POSCAR
        "Cu/mp-1/POSCAR": CU2O_POSCAR,
        "Cu/mp-1/FEFF-XANES/000_Cu/xmu.dat": good,
        "Cu/mp-1/FEFF-XANES/000_Cu/feff.inp": "TITLE x\n",
        "Cu/mp-1/FEFF-XANES/002_Cu/xmu.dat": xmu_text(15, shift=1.0),
        "Cu/mp-1/FEFF-XANES/004_Cu/xmu.dat": good,
        # mp-2: one good site, then truncated, missing, non-numeric, ragged, cut-short, empty
        "Cu/mp-2/POSCAR": CU2O_POSCAR,
        "Cu/mp-2/FEFF-XANES/000_Cu/xmu.dat": good,
        "Cu/mp-2/FEFF-XANES/001_Cu/xmu.dat": xmu_text(5),
        "Cu/mp-2/FEFF-XANES/002_Cu/feff.inp": "TITLE x\n",
        "Cu/mp-2/FEFF-XANES/002_Cu/.feff.error": "crashed\n",
        "Cu/mp-2/FEFF-XANES/003_Cu/xmu.dat": good.replace("8981.0 ", "8981.0x ", 1),
        "Cu/mp-3/POSCAR": CU2O_POSCAR,
        "Cu/mp-3/FEFF-XANES/000_Cu/xmu.dat": with_extra_value(good, row=3),
        "Cu/mp-3/FEFF-XANES/001_Cu/xmu.dat": good[:-12] + "\n",
        "Cu/mp-3/FEFF-XANES/002_Cu/xmu.dat": XMU_HEADER,
        # mp-4: sites but no POSCAR; mp-5: POSCAR but no FEFF-XANES
        "Cu/mp-4/FEFF-XANES/000_Cu/xmu.dat": good,
        "Cu/mp-5/POSCAR": CU2O_POSCAR,
        # mp-6: an Fe site and a Cu site
        "Cu/mp-6/POSCAR": FECU_POSCAR,
        "Cu/mp-6/FEFF-XANES/000_Fe/xmu.dat": xmu_text(11, shift=2.0),
        "Cu/mp-6/FEFF-XANES/001_Cu/xmu.dat": xmu_text(13, shift=3.0),
        "Cu/mp-6/FEFF-XANES/junk/xmu.dat": good,
        # not materials: ignored
        "Cu/report.json": "{}",
    }


EXPECTED_ISSUES = [
    ("mp-1/004_Cu", "site_mismatch"),
    ("mp-2/001_Cu", "truncated_xmu"),
    ("mp-2/002_Cu", "missing_xmu"),
    ("mp-2/003_Cu", "bad_xmu"),
    ("mp-3", "no_sites"),
    ("mp-3/000_Cu", "bad_xmu"),
    ("mp-3/001_Cu", "truncated_xmu"),
    ("mp-3/002_Cu", "empty_xmu"),
    ("mp-4", "missing_poscar"),
    ("mp-5", "no_sites"),
    ("mp-6/junk", "bad_site_dir"),
]


def write_dir(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        target = root / "FEFF" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return root / "FEFF"


def write_tar(path: Path, files: dict[str, str], poscar_last: bool = True) -> Path:
    """A tar.gz with file members only (no directory entries), POSCARs after the sites."""
    names = sorted(files, key=lambda n: (n.endswith("POSCAR") if poscar_last else 0, n))
    with tarfile.open(path, "w:gz") as tar:
        for name in names:
            data = files[name].encode()
            info = tarfile.TarInfo(f"FEFF/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def check_tree(tree: FeffTree, source_prefix: str) -> None:
    assert [m.material_id for m in tree.materials] == ["mp-1", "mp-2", "mp-6"]
    assert tree.n_sites == 5
    assert [(i.item, i.reason) for i in tree.issues] == EXPECTED_ISSUES
    assert tree.issue_counts() == {
        "bad_site_dir": 1,
        "bad_xmu": 2,
        "empty_xmu": 1,
        "missing_poscar": 1,
        "missing_xmu": 1,
        "no_sites": 2,
        "site_mismatch": 1,
        "truncated_xmu": 2,
    }
    mp1, mp2, mp6 = tree.materials
    assert mp1.poscar == CU2O_POSCAR
    assert [s.site_index for s in mp1.sites] == [0, 2]
    assert [s.site_index for s in mp2.sites] == [0]
    assert [(s.site_index, s.element) for s in mp6.sites] == [(0, "Fe"), (1, "Cu")]
    site = mp1.sites[1]
    expected = xmu_table(15, 1.0)
    np.testing.assert_array_equal(site.energy, expected[:, 0])
    np.testing.assert_array_equal(site.mu, expected[:, 3])
    assert site.energy.dtype == np.float64
    assert site.source.startswith(source_prefix)
    assert site.source.endswith("FEFF/Cu/mp-1/FEFF-XANES/002_Cu/xmu.dat")


def test_directory_tree(tmp_path: Path) -> None:
    root = write_dir(tmp_path, tree_files())
    check_tree(read_feff_tree(root), str(root))


def test_tar_tree_same_as_directory(tmp_path: Path) -> None:
    archive = write_tar(tmp_path / "tree.tar.gz", tree_files())
    check_tree(read_feff_tree(archive), "FEFF/")


def test_the_omnixas_layout_is_recognised_not_a_path_with_feff_in_it(tmp_path: Path) -> None:
    """OmniXAS lays its materials out as ``FEFF/<El>/<mp-id>`` (its citation is owed by what is
    trained on them): packed, extracted, or read from its ``FEFF`` or ``FEFF/Cu`` folder. A
    tree elsewhere is not OmniXAS's, "feff" in its path or not (``xasflow train`` wrote the
    OmniXAS citation into any bundle whose --data path held "feff")."""
    files = tree_files()
    assert read_feff_tree(write_tar(tmp_path / "omnixas.tar.gz", files)).omnixas
    root = write_dir(tmp_path / "x", files)
    assert read_feff_tree(root).omnixas and read_feff_tree(root / "Cu").omnixas
    mine = {f"my-feff-runs/{k.removeprefix('Cu/')}": v for k, v in files.items()}
    assert not read_feff_tree(write_tar(tmp_path / "feff-runs.tar.gz", mine)).omnixas
    assert not read_feff_tree(write_dir(tmp_path / "feff", mine)).omnixas
    other_ids = {k.replace("mp-", "run-"): v for k, v in files.items()}
    assert not read_feff_tree(write_dir(tmp_path / "y", other_ids)).omnixas


def test_issue_details_say_what_is_wrong(tmp_path: Path) -> None:
    tree = read_feff_tree(write_tar(tmp_path / "t.tgz", tree_files()))
    detail = {(i.item, i.reason): i.detail for i in tree.issues}
    assert "only 5 data rows" in detail[("mp-2/001_Cu", "truncated_xmu")]
    assert ".feff.error" in detail[("mp-2/002_Cu", "missing_xmu")]
    assert "non-numeric data row 3" in detail[("mp-2/003_Cu", "bad_xmu")]
    assert "ragged columns: row 3 has 7, row 1 has 6" in detail[("mp-3/000_Cu", "bad_xmu")]
    assert "last row cut short" in detail[("mp-3/001_Cu", "truncated_xmu")]
    assert "POSCAR has O at index 4" in detail[("mp-1/004_Cu", "site_mismatch")]
    assert all(isinstance(i, ReadIssue) for i in tree.issues)


def test_element_filter(tmp_path: Path) -> None:
    root = write_dir(tmp_path, tree_files())
    fe = read_feff_tree(root, element="fe")
    assert [(m.material_id, [s.site_index for s in m.sites]) for m in fe.materials] == [
        ("mp-6", [0])
    ]
    # materials with only Cu sites are filtered quietly (mp-4's missing POSCAR included);
    # a material with no FEFF-XANES at all and a misnamed site dir are still reported
    assert [(i.item, i.reason) for i in fe.issues] == [
        ("mp-5", "no_sites"),
        ("mp-6/junk", "bad_site_dir"),
    ]
    cu = read_feff_tree(root, element="Cu")
    assert [s.element for s in cu.materials[-1].sites] == ["Cu"]
    assert cu.n_sites == 4


def test_to_spectrum_carries_ids(tmp_path: Path) -> None:
    tree = read_feff_tree(write_dir(tmp_path, tree_files()))
    site = tree.materials[0].sites[0]
    spectrum = site.to_spectrum()
    assert (spectrum.element, spectrum.edge) == ("Cu", "K")
    ids = {k: v for k, v in spectrum.meta.items() if not k.startswith("feff_")}
    assert ids == {
        "material_id": "mp-1",
        "site_index": 0,
        "source": site.source,
        "calculated": True,
    }
    # this xmu.dat has no "Mu=" line and there is no feff.out: only omega - e is known
    assert spectrum.meta["feff_edge_offset"] == 8980.0
    assert np.isnan(spectrum.meta["feff_fermi_level"])
    assert np.isnan(spectrum.meta["feff_absorber_charge"])
    assert spectrum.meta["feff_scf_converged"] is None
    np.testing.assert_array_equal(spectrum.mu, site.mu)


def test_limit_reads_first_materials(tmp_path: Path) -> None:
    archive = write_tar(tmp_path / "t.tar.gz", tree_files(), poscar_last=False)
    tree = read_feff_tree(archive, limit=2)
    assert [m.material_id for m in tree.materials] == ["mp-1", "mp-2"]
    root = write_dir(tmp_path / "d", tree_files())
    assert [m.material_id for m in read_feff_tree(root, limit=1).materials] == ["mp-1"]


def test_truncated_archive_keeps_what_was_read(tmp_path: Path) -> None:
    files = {f"Cu/mp-{i}/POSCAR": CU2O_POSCAR for i in range(1, 40)}
    files |= {f"Cu/mp-{i}/FEFF-XANES/000_Cu/xmu.dat": xmu_text(200, i) for i in range(1, 40)}
    archive = write_tar(tmp_path / "t.tar.gz", files, poscar_last=False)
    data = archive.read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(data[: len(data) // 2])
    tree = read_feff_tree(cut)
    assert [i.reason for i in tree.issues if i.item == "cut.tar.gz"] == ["truncated_archive"]
    assert 0 < len(tree.materials) < 39


def test_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_feff_tree(tmp_path / "nope")
    other = tmp_path / "x.zip"
    other.write_bytes(b"PK")
    with pytest.raises(ValueError, match="neither a directory"):
        read_feff_tree(other)


def test_parse_xmu_reads_edge_and_columns() -> None:
    energy, mu, edge = parse_xmu(xmu_text(12).encode())
    np.testing.assert_array_equal(energy, 8980.0 + 0.5 * np.arange(12))
    np.testing.assert_array_equal(mu, 0.25 * np.arange(12))
    assert edge == "K"
    l3 = xmu_text(12).replace(" K  shell", " L3 shell").encode()
    assert parse_xmu(l3)[2] == "L3"
    with pytest.raises(ValueError, match="truncated_xmu"):
        parse_xmu(xmu_text(3).encode())


@pytest.mark.shared_data
def test_real_cu_archive(cu_archive: Path) -> None:
    tree = read_feff_tree(cu_archive, element="Cu")
    assert tree.omnixas
    # 2303 material dirs (plus report.json and writer_metadata.json at the same level):
    # 107 hold only a POSCAR (FEFF failed, listed in report.json) and mp-1101124 has two
    # site dirs whose runs crashed before writing xmu.dat.
    assert len(tree.materials) == 2195
    assert tree.n_sites == 4831
    assert tree.issue_counts() == {"missing_xmu": 2, "no_sites": 108}
    assert len(tree.materials) + tree.issue_counts()["no_sites"] == 2303
    assert {i.item for i in tree.issues if i.reason == "missing_xmu"} == {
        "mp-1101124/001_Cu",
        "mp-1101124/003_Cu",
    }
    sites = list(tree.sites())
    assert all(s.element == "Cu" and s.edge == "K" for s in sites)
    assert all(s.energy.size == 173 for s in sites)
    assert min(s.energy[0] for s in sites) > 8980.0
    ids = [m.material_id for m in tree.materials]
    assert ids == sorted(ids)
    # every run has its Fermi level, core-level offset and absorber charge (FEFF 9.9.1 output)
    fermi = np.array([s.energies.fermi_absolute for s in sites])
    assert np.isfinite(fermi).all()
    # unlike the offsets (8991.9-9006.4 eV), the Fermi level on omega stays within ~6 eV
    assert fermi.min() > 8986.5 and fermi.max() < 8993.0
    assert np.subtract(*np.percentile(fermi, [75, 25])) < 1.5
    offsets = np.array([s.energies.edge_offset for s in sites])
    assert np.ptp(offsets) > 10.0
    assert np.isfinite([s.energies.absorber_charge for s in sites]).all()
    assert all(s.energies.scf_converged for s in sites)


# the energy lines of a real FEFF 9.9.1 run (mp-1036393, site 15)
REAL_HEADER = """\
# # Abs   Z=29 Rmt= 1.247 Rnm= 1.305 K  shell
# # Gam_ch=1.729E+00 H-L exch Vi= 0.000E+00 Vr= 0.000E+00
# # Mu=-9.721E+00eV kf=2.090E+00 Vint=-2.132E+01eV Rs_int= 1.736
#  omega    e    k    mu    mu0     chi     @#
"""
REAL_ROWS = """\
    8985.845    -13.531  -1.000  4.56357E-02  5.51098E-02 -9.47408E-03
    8986.143    -13.233  -0.960  4.82360E-02  5.91886E-02 -1.09525E-02
    8986.430    -12.946  -0.920  5.10395E-02  6.37300E-02 -1.26905E-02
"""
REAL_FEFF_OUT = """\
New Fermi level:    mu=  -9.720 eV  Charge distance=  0.0007 (partial c.d.=  0.0004)
SCF ITERATION NUMBER 13
New Fermi level:    mu=  -9.721 eV  Charge distance=  0.0001 (partial c.d.=  0.0011)
Charge transfer:  type  charge
       0   -0.537
       1   -0.146
       4    0.370
Convergence reached in   14 iterations.
Done with module: potentials.
"""


def test_parse_xmu_energies_real_header() -> None:
    table = np.loadtxt(io.StringIO(REAL_ROWS))
    got = parse_xmu_energies(REAL_HEADER + REAL_ROWS, table[:, 0], table[:, 1])
    assert got.fermi_level == -9.721
    assert (got.kf, got.vint, got.rs_int) == (2.09, -21.32, 1.736)
    assert got.edge_offset == pytest.approx(8999.376, abs=1e-6)
    # the Fermi level on the absolute axis: k = 0, one k-step of 3.81 eV above the first row
    assert got.fermi_absolute == pytest.approx(8989.655, abs=1e-6)
    assert got.fermi_absolute == pytest.approx(table[0, 0] + 3.81, abs=0.001)


def test_parse_xmu_energies_missing_or_inconsistent() -> None:
    omega = np.array([8980.0, 8981.0, 8982.0])
    no_line = parse_xmu_energies("#  omega e k mu\n", omega, omega - 8990.0)
    assert no_line.edge_offset == 8990.0 and np.isnan(no_line.fermi_level)
    assert np.isnan(no_line.fermi_absolute)
    # omega - e not constant: not FEFF's columns, so no offset (the spectrum is still usable)
    ragged = parse_xmu_energies(REAL_HEADER, omega, omega - np.array([8990.0, 8990.0, 8991.0]))
    assert np.isnan(ragged.edge_offset) and ragged.fermi_level == -9.721


def test_parse_feff_out_takes_the_last_scf_values() -> None:
    got = parse_feff_out(REAL_FEFF_OUT.encode())
    assert got == {"absorber_charge": -0.537, "scf_converged": True, "scf_fermi_level": -9.721}
    cut = parse_feff_out(REAL_FEFF_OUT.split("Charge transfer")[0])
    assert np.isnan(cut["absorber_charge"]) and cut["scf_converged"] is False


def test_real_header_through_the_tree_reader(tmp_path: Path) -> None:
    rows = "".join(
        f"{8985.845 + 0.5 * i:.3f} {-13.531 + 0.5 * i:.3f} 0.0 {0.05 * i:.5f} 0.1 0.0\n"
        for i in range(12)
    )
    files = {
        "Cu/mp-9/POSCAR": CU2O_POSCAR,
        "Cu/mp-9/FEFF-XANES/000_Cu/xmu.dat": REAL_HEADER + rows,
        "Cu/mp-9/FEFF-XANES/000_Cu/feff.out": REAL_FEFF_OUT,
        "Cu/mp-9/FEFF-XANES/001_Cu/xmu.dat": REAL_HEADER + rows,
    }
    for tree in (
        read_feff_tree(write_dir(tmp_path, files)),
        read_feff_tree(write_tar(tmp_path / "t.tar.gz", files)),
    ):
        with_out, without_out = tree.materials[0].sites
        assert with_out.energies == FeffEnergies(
            fermi_level=-9.721,
            edge_offset=pytest.approx(8999.376, abs=1e-6),
            kf=2.09,
            vint=-21.32,
            rs_int=1.736,
            absorber_charge=-0.537,
            scf_converged=True,
        )
        assert np.isnan(without_out.energies.absorber_charge)
        assert without_out.energies.fermi_level == -9.721
        meta = with_out.to_spectrum().meta
        assert meta["feff_fermi_absolute"] == pytest.approx(8989.655, abs=1e-6)
        assert meta["feff_absorber_charge"] == -0.537


def test_synthetic_tree_energies(tmp_path: Path) -> None:
    from synthetic_feff import CHARGES, FERMI_ABSOLUTE, write_tree

    tree = read_feff_tree(write_tree(tmp_path, per_type=2, broken=False))
    sites = list(tree.sites())
    assert len(sites) == 6
    for site in sites:
        prototype = site.material_id.split("-")[1]
        assert site.energies.absorber_charge == CHARGES[prototype]
        assert site.energies.scf_converged is True
        # "Mu=" is printed as %.3E: 0.005 eV resolution for |Mu| >= 10
        assert site.energies.fermi_absolute == pytest.approx(FERMI_ABSOLUTE, abs=0.01)
    # the core-level offsets scatter between runs; the Fermi level on omega does not
    assert np.ptp([s.energies.edge_offset for s in sites]) > 0.5


@pytest.mark.parametrize("packed", [False, True])
def test_folders_sharing_a_name_get_their_paths_as_ids(tmp_path: Path, packed: bool) -> None:
    """Runs merged under two sub-folders hold two different ``m1``: keyed by the folder name
    alone they shared one id (and so one set of labels). A name met once keeps its bare id
    (a flat Lightshow tree's ids, its label cache and its bundles' splits are unchanged)."""
    files = {
        "batchA/m1/POSCAR": CU2O_POSCAR,
        "batchA/m1/FEFF-XANES/000_Cu/xmu.dat": xmu_text(),
        "batchB/m1/POSCAR": FECU_POSCAR,
        "batchB/m1/FEFF-XANES/001_Cu/xmu.dat": xmu_text(),
        "batchB/mp-7/POSCAR": CU2O_POSCAR,
        "batchB/mp-7/FEFF-XANES/000_Cu/xmu.dat": xmu_text(),
    }
    root = write_tar(tmp_path / "t.tgz", files) if packed else write_dir(tmp_path, files)
    tree = read_feff_tree(root)
    ids = {m.material_id: m.poscar for m in tree.materials}
    prefix = "FEFF/" if packed else ""
    assert ids == {
        f"{prefix}batchA/m1": CU2O_POSCAR,
        f"{prefix}batchB/m1": FECU_POSCAR,
        "mp-7": CU2O_POSCAR,
    }
    assert tree.issues == []

"""xasflow's own demo spectra: Cu K-edge XANES of five reference Cu sites, computed with FEFF10.

Each compound is built with pymatgen from textbook lattice parameters and Wyckoff positions
(written below, with their sources), a small cluster around one Cu absorber is cut out, the
``feff.inp`` cards are written by :func:`feff_input_text`, and FEFF10 is run through the
``feff10-rs`` Python bindings (``feff10.run(text, work_dir)``, which runs each FEFF stage in
a fresh worker process and leaves ``xmu.dat`` in ``work_dir``). The result is stored as one
small JSON file per compound in ``xasflow/data/demo/``; :func:`load_demo_spectra` reads them
back from the installed package without needing FEFF, pymatgen or a network.

Regenerate (minutes on two cores; needs the ``train`` extra and ``feff10-rs``)::

    .venv/bin/python -m xasflow.sim.feff_demo            # xasflow/data/demo
    .venv/bin/python -m xasflow.sim.feff_demo --herfd    # xasflow/data/demo_herfd

``--herfd`` computes the same sites as Kalpha1-HERFD spectra: FEFF's core-hole broadening
reduced by the width :func:`xasflow.spectra.herfd.herfd_fwhm` adds back (1.02 eV FWHM for
Cu, ``EXCHANGE`` ``vi0`` = -0.51 eV), without instrument broadening. They test that a
declared HERFD spectrum is brought back to the models' resolution.

The compounds cover five Cu sites (motif names are the label vocabulary of
:data:`xasflow.training.labels.MOTIFS`, and a test checks that
:func:`xasflow.training.labels.label_sites` gives each site the expected CN, motif and
oxidation state):

=========  ==========================  ==  ================  =====
name       compound                    CN  motif             Cu ox
=========  ==========================  ==  ================  =====
CuO        tenorite                    4   square co-planar  +2
Cu2O       cuprite                     2   linear            +1
CuCl       nantokite (γ-CuCl)          4   tetrahedral       +1
CuAl2O4    normal spinel, A site       4   tetrahedral       +2
Cu_MgO     Cu²⁺ in MgO (rock salt)     6   octahedral        +2
=========  ==========================  ==  ================  =====

Cu_MgO and CuAl2O4 are idealised: the dilute Cu²⁺ in MgO keeps the host's undistorted
Mg site, and CuAl2O4 is taken as a fully normal spinel, although the real compound is
partly inverse (some Cu on the octahedral site). Both are textbook cases of their motif.
Cu_MgO needs slower SCF mixing (``DemoCompound.feff_overrides``): with the default 0.2
FEFF's first SCF iteration overfills the lone Cu 3d shell and stops ("Cannot determine
Norman radius").
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from xasflow.sim.feff_structures import (
    COMPOUNDS,
    CU_Z,
    DEFAULT_SETTINGS,
    ClusterAtom,
    DemoCompound,
    FeffSettings,
    build_cluster,
    cu2o_cuprite,
    cual2o4_spinel,
    cucl_nantokite,
    cuo_tenorite,
    feff_input_text,
    mgo_periclase,
)
from xasflow.spectra.core import Spectrum
from xasflow.spectra.herfd import herfd_fwhm

if TYPE_CHECKING:  # pymatgen is only needed to regenerate, not to load
    pass

__all__ = [
    "COMPOUNDS",
    "CU_Z",
    "DEFAULT_SETTINGS",
    "DEMO_HERFD_RESOURCE",
    "DEMO_RESOURCE",
    "SCHEMA",
    "ClusterAtom",
    "DemoCompound",
    "DemoSpectrum",
    "FeffSettings",
    "build_cluster",
    "cu2o_cuprite",
    "cual2o4_spinel",
    "cucl_nantokite",
    "cuo_tenorite",
    "demo_document",
    "feff_input_text",
    "feff_versions",
    "generate",
    "load_demo_spectra",
    "mgo_periclase",
    "plot_demo_spectra",
    "run_feff",
    "write_demo_json",
]

#: Where the generated JSON files live inside the ``xasflow`` package.
DEMO_RESOURCE = ("data", "demo")
#: The same compounds computed as Kalpha1-HERFD spectra (``--herfd``: FEFF's core-hole
#: broadening reduced by :func:`xasflow.spectra.herfd.herfd_fwhm`), for testing HERFD handling.
DEMO_HERFD_RESOURCE = ("data", "demo_herfd")
#: Format tag written into every JSON file.
SCHEMA = "xasflow.demo_spectrum/1"


# --------------------------------------------------------------------------------------
# Loading (no FEFF, no pymatgen)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoSpectrum:
    """One packaged demo spectrum and the labels it is expected to carry.

    ``energy`` (eV, FEFF's absolute scale) and ``mu`` (FEFF ``mu``, normalised to an edge
    step of about one) are 1-D float arrays of equal length.
    """

    name: str
    formula: str
    energy: np.ndarray
    mu: np.ndarray
    expected_cn: int
    expected_motif: str
    expected_oxidation_state: int
    element: str = "Cu"
    edge: str = "K"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def labels(self) -> dict[str, Any]:
        """The expected labels as a plain dict (``cn``, ``motif``, ``oxidation_state``)."""
        return {
            "cn": self.expected_cn,
            "motif": self.expected_motif,
            "oxidation_state": self.expected_oxidation_state,
        }

    def to_spectrum(self) -> Spectrum:
        """Return this demo as an xasflow :class:`~xasflow.spectra.core.Spectrum`.

        ``meta`` carries ``name``, ``source`` (``"feff_demo"``), ``formula`` and the
        expected labels, so downstream code can score a prediction against them.
        """
        meta = {
            "name": self.name,
            "source": "feff_demo",
            "formula": self.formula,
            "expected": self.labels,
            **{k: v for k, v in self.meta.items() if k not in {"feff_inp"}},
        }
        return Spectrum(
            energy=self.energy, mu=self.mu, element=self.element, edge=self.edge, meta=meta
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DemoSpectrum:
        """Build from the JSON document written by :func:`write_demo_json`."""
        expected = data["expected"]
        keys: tuple[str, ...] = (
            "structure", "feff", "cluster", "feff_inp", "notes", "simulated_herfd"
        )  # fmt: skip
        meta: dict[str, Any] = {k: data[k] for k in keys if k in data}
        return cls(
            name=str(data["name"]),
            formula=str(data["formula"]),
            energy=np.asarray(data["energy"], dtype=np.float64),
            mu=np.asarray(data["mu"], dtype=np.float64),
            expected_cn=int(expected["cn"]),
            expected_motif=str(expected["motif"]),
            expected_oxidation_state=int(expected["oxidation_state"]),
            element=str(data.get("element", "Cu")),
            edge=str(data.get("edge", "K")),
            meta=meta,
        )


def load_demo_spectra(herfd: bool = False) -> list[DemoSpectrum]:
    """Load the packaged demo spectra (``xasflow/data/demo/*.json``), sorted by name.

    ``herfd``: their simulated HERFD versions instead (``xasflow/data/demo_herfd``; the
    documents' ``simulated_herfd`` says how). These are not declared HERFD: the caller
    declares them (``meta["herfd"]``) or not, as a beamline would.
    """
    root = resources.files("xasflow").joinpath(*(DEMO_HERFD_RESOURCE if herfd else DEMO_RESOURCE))
    if not root.is_dir():
        return []
    out = []
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            out.append(DemoSpectrum.from_dict(json.loads(entry.read_text(encoding="utf-8"))))
    return out


# --------------------------------------------------------------------------------------
# Running FEFF10 and writing the JSON
# --------------------------------------------------------------------------------------


def feff_versions(xmu_header: Sequence[str] = ()) -> dict[str, str]:
    """Versions of the FEFF binding (``feff10-rs``) and, when the header names it, FEFF."""
    from importlib.metadata import version

    out = {"feff10_rs": version("feff10-rs")}
    for line in xmu_header:
        if "FEFF" in line.upper():
            tokens = line.replace("#", " ").split()
            for i, tok in enumerate(tokens):
                if tok.upper() == "FEFF" and i + 1 < len(tokens):
                    out["feff"] = f"FEFF {tokens[i + 1]}"
                    return out
    return out


def _print(message: str) -> None:
    print(message, flush=True)


def run_feff(
    feff_inp: str, work_dir: Path, log: Callable[[str], None] = _print
) -> tuple[np.ndarray, np.ndarray, list[str], float]:
    """Run FEFF10 on ``feff_inp`` in ``work_dir``; return energy, mu, xmu header, seconds.

    ``feff10.run`` accepts the raw ``feff.inp`` text, runs the default FEFF10 stage
    pipeline (RDINP, POT, SCREEN, XSPH, FMS, ..., FF2X) each in a fresh worker process and
    leaves ``xmu.dat`` in ``work_dir``; ``result.read_xmu()`` parses it.
    """
    import feff10

    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "feff.inp").write_text(feff_inp, encoding="utf-8")
    t0 = time.perf_counter()
    result = feff10.run(feff_inp, str(work_dir))  # type: ignore[attr-defined]
    seconds = time.perf_counter() - t0
    slow = sorted(result.stages, key=lambda sr: -sr.duration_secs)[:3]
    log(
        f"  {work_dir.name} slowest stages: "
        + ", ".join(f"{sr.stage.executable_name} {sr.duration_secs:.0f}s" for sr in slow)
    )
    xmu = result.read_xmu()
    # xmu.dat columns: omega (eV), e (eV rel. to edge), k, mu, mu0, chi
    energy = np.asarray(xmu.column(0), dtype=np.float64)
    mu = np.asarray(xmu.column(3), dtype=np.float64)
    return energy, mu, list(xmu.header), seconds


def demo_document(
    compound: DemoCompound,
    energy: np.ndarray,
    mu: np.ndarray,
    feff_inp: str,
    settings: FeffSettings,
    n_atoms: int,
    versions: dict[str, str],
    seconds: float,
) -> dict[str, Any]:
    """Assemble the JSON document for one compound (energy 0.01 eV, mu 5 significant)."""
    return {
        "schema": SCHEMA,
        "name": compound.name,
        "formula": compound.formula,
        "element": "Cu",
        "edge": "K",
        "expected": {
            "cn": compound.expected_cn,
            "motif": compound.expected_motif,
            "oxidation_state": compound.expected_oxidation_state,
        },
        "structure": {"source": compound.source, "builder": compound.build.__name__},
        "cluster": {
            "n_atoms": n_atoms,
            "cluster_radius": settings.cluster_radius,
            "fms_radius": settings.fms_radius,
            "scf_radius": settings.scf_radius,
            "scf_mix": settings.scf_mix,
            "corehole": settings.corehole,
        },
        "feff": {**versions, "runtime_s": round(seconds, 1)},
        **(
            {
                "simulated_herfd": {
                    "vi0_ev": settings.vi0,
                    "removed_fwhm_ev": round(-2 * settings.vi0, 3),
                    "how": "EXCHANGE vi0 < 0 offsets FEFF's core-hole broadening",
                }
            }
            if settings.vi0
            else {}
        ),
        "notes": compound.notes,
        "energy": [round(float(e), 2) for e in energy],
        "mu": [float(f"{m:.5g}") for m in mu],
        "feff_inp": feff_inp,
    }


def write_demo_json(doc: dict[str, Any], out_dir: Path) -> Path:
    """Write one document to ``out_dir/<name>.json`` (compact arrays, readable header)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{doc['name']}.json"
    path.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def generate(
    out_dir: Path,
    names: Sequence[str] | None = None,
    settings: FeffSettings = DEFAULT_SETTINGS,
    keep_work: Path | None = None,
    jobs: int = 2,
    log: Callable[[str], None] | None = None,
) -> list[Path]:
    """Build, run FEFF10 for and write every (or each named) demo compound.

    Each compound runs with ``compound.settings(settings)`` (its ``feff_overrides`` on top of
    ``settings``). ``jobs`` FEFF runs go at once (each FEFF10 stage is serial, one core per run).
    ``keep_work`` keeps the FEFF working directories there (one per compound); otherwise
    they live in a temporary directory that is removed afterwards.
    """
    chosen = [c for c in COMPOUNDS if names is None or c.name in names]
    unknown = set(names or ()) - {c.name for c in COMPOUNDS}
    if unknown:
        raise ValueError(f"unknown demo compound(s): {sorted(unknown)}")
    tmp = Path(tempfile.mkdtemp(prefix="xasflow_feff_")) if keep_work is None else keep_work
    log = log or _print

    def one(compound: DemoCompound) -> Path:
        structure = compound.build()
        own = compound.settings(settings)
        feff_inp = feff_input_text(compound, structure, own)
        n_atoms = len(build_cluster(structure, compound.absorber_element, own.cluster_radius))
        log(f"{compound.name}: {n_atoms} atoms, running FEFF10 ...")
        energy, mu, header, seconds = run_feff(feff_inp, tmp / compound.name, log)
        doc = demo_document(
            compound, energy, mu, feff_inp, own, n_atoms, feff_versions(header), seconds
        )
        path = write_demo_json(doc, out_dir)
        log(f"{compound.name}: {len(energy)} points in {seconds:.0f} s -> {path}")
        return path

    try:
        # feff10.run releases the GIL and runs FEFF in worker processes, so threads suffice.
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            return list(pool.map(one, chosen))
    finally:
        if keep_work is None:
            shutil.rmtree(tmp, ignore_errors=True)


def plot_demo_spectra(path: Path, demos: Sequence[DemoSpectrum] | None = None) -> Path:
    """Plot the demo spectra (full range and a zoom on the edge) to ``path`` (PNG, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    demos = list(demos) if demos is not None else load_demo_spectra()
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for d in demos:
        label = f"{d.name}: CN{d.expected_cn} {d.expected_motif}, Cu{d.expected_oxidation_state}+"
        for ax in axes:
            ax.plot(d.energy, d.mu, label=label)
    axes[0].set_title("FEFF10 Cu K-edge XANES (xasflow demo)")
    axes[1].set_title("edge region")
    axes[1].set_xlim(8978, 9015)
    for ax in axes:
        ax.set_xlabel("energy (eV, FEFF absolute scale)")
        ax.set_ylabel("mu (FEFF, edge step ~ 1)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m xasflow.sim.feff_demo --out xasflow/data/demo``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="default xasflow/data/demo (or demo_herfd)")
    parser.add_argument("--only", nargs="*", help="compound names (default: all)")
    parser.add_argument("--keep-work", type=Path, help="keep FEFF work directories here")
    parser.add_argument("--cluster-radius", type=float, default=DEFAULT_SETTINGS.cluster_radius)
    parser.add_argument("--fms-radius", type=float, default=DEFAULT_SETTINGS.fms_radius)
    parser.add_argument("--scf-radius", type=float, default=DEFAULT_SETTINGS.scf_radius)
    parser.add_argument("--corehole", default=DEFAULT_SETTINGS.corehole)
    parser.add_argument("--jobs", type=int, default=2, help="FEFF runs at once (default 2)")
    parser.add_argument(
        "--herfd",
        action="store_true",
        help="simulate Kalpha1 HERFD: FEFF's broadening reduced by herfd_fwhm('Cu') (vi0 < 0)",
    )
    parser.add_argument("--plot", type=Path, help="only plot the packaged spectra to this PNG")
    args = parser.parse_args(argv)
    if args.plot is not None:
        print(plot_demo_spectra(args.plot))
        return 0
    settings = FeffSettings(
        cluster_radius=args.cluster_radius,
        fms_radius=args.fms_radius,
        scf_radius=args.scf_radius,
        corehole=args.corehole,
        vi0=-(herfd_fwhm("Cu") or 0.0) / 2 if args.herfd else 0.0,  # Cu K: tabulated
    )
    out = args.out or Path("xasflow", *(DEMO_HERFD_RESOURCE if args.herfd else DEMO_RESOURCE))
    generate(out, args.only or None, settings, args.keep_work, args.jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main())

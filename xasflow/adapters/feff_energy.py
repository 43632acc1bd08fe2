"""FEFF's energy bookkeeping per site: what puts a FEFF spectrum on an absolute energy scale.

FEFF 9 writes ``omega`` (absolute photon energy) and ``e`` (photoelectron energy on its
internal scale, on which the SCF Fermi level is ``Mu``) in ``xmu.dat``; ``omega - e`` is the
atomic core-level energy from its Dirac-Fock atom. ``feff.out`` adds the SCF charge of each
potential. These are parsed here, kept apart from the tree reader in :mod:`xasflow.adapters.feff`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

#: largest spread of omega - e (eV) still taken as one constant offset
OFFSET_TOLERANCE = 0.05

_NUM = r"([-+]?\d+(?:\.\d*)?(?:[EeDd][-+]?\d+)?)"
# "# # Mu=-9.721E+00eV kf=2.090E+00 Vint=-2.132E+01eV Rs_int= 1.736"
_INTERSTITIAL = re.compile(
    rf"Mu=\s*{_NUM}\s*(?:eV)?\s+kf=\s*{_NUM}\s+Vint=\s*{_NUM}\s*(?:eV)?\s+Rs_int=\s*{_NUM}"
)
# feff.out: "Charge transfer:  type  charge" then one "ipot charge" row per potential
_CHARGE_BLOCK = re.compile(
    r"Charge transfer:\s+type\s+charge\s*\n((?:[ \t]*\d+[ \t]+\S+[ \t]*\n?)+)"
)
_FERMI_OUT = re.compile(rf"New Fermi level:\s+mu=\s*{_NUM}")


@dataclass(frozen=True)
class FeffEnergies:
    """FEFF's energy bookkeeping for one site (eV), what its absolute energy scale is built from.

    ``omega = e + edge_offset``: ``e`` is the photoelectron energy on FEFF's internal scale, on
    which the Fermi level sits at ``fermi_level`` (the SCF ``mu``); so the Fermi level lies at
    ``omega = fermi_absolute`` (``edge_offset`` is FEFF's atomic core-level energy). NaN marks a
    value the files did not give (an ``xmu.dat`` without the header line, no ``feff.out``).
    """

    fermi_level: float = float("nan")
    edge_offset: float = float("nan")
    kf: float = float("nan")
    vint: float = float("nan")
    rs_int: float = float("nan")
    absorber_charge: float = float("nan")
    scf_converged: bool | None = None

    @property
    def fermi_absolute(self) -> float:
        """The Fermi level on the absolute ``omega`` axis: where FEFF's XANES starts to rise."""
        return self.edge_offset + self.fermi_level

    def as_meta(self) -> dict[str, float | bool | None]:
        """The values as a flat dict (``feff_`` prefixed) for :attr:`Spectrum.meta`."""
        return {
            "feff_fermi_level": self.fermi_level,
            "feff_edge_offset": self.edge_offset,
            "feff_fermi_absolute": self.fermi_absolute,
            "feff_kf": self.kf,
            "feff_vint": self.vint,
            "feff_rs_int": self.rs_int,
            "feff_absorber_charge": self.absorber_charge,
            "feff_scf_converged": self.scf_converged,
        }


def parse_xmu_energies(raw: bytes | str, omega: np.ndarray, e: np.ndarray) -> FeffEnergies:
    """Energies from an ``xmu.dat``: the ``Mu= kf= Vint= Rs_int=`` header line and omega - e.

    ``omega`` and ``e`` are the file's first two columns; their difference is constant in a
    FEFF run. Where it is not (not FEFF's columns) or a value is missing, that field is NaN:
    the spectrum itself stays usable, only its absolute-energy bookkeeping is unknown.
    """
    text = raw.decode("latin-1") if isinstance(raw, bytes) else raw
    offset = np.asarray(omega, dtype=float) - np.asarray(e, dtype=float)
    centre = float("nan")
    # xmu.dat prints 3 decimals, so a real run's omega - e varies by <= 0.002 eV
    if offset.size and np.all(np.isfinite(offset)) and np.ptp(offset) <= OFFSET_TOLERANCE:
        centre = float(np.median(offset))
    header = text[: text.find("omega")] if "omega" in text else text
    match = _INTERSTITIAL.search(header)
    if match is None:
        return FeffEnergies(edge_offset=centre)
    mu, kf, vint, rs = (float(v.replace("D", "E").replace("d", "e")) for v in match.groups())
    return FeffEnergies(fermi_level=mu, edge_offset=centre, kf=kf, vint=vint, rs_int=rs)


def parse_feff_out(raw: bytes | str) -> dict[str, float | bool]:
    """From ``feff.out``: the absorber's (potential 0) last SCF charge transfer and convergence.

    Keys: ``absorber_charge`` (FEFF's sign: electrons gained, so a cation is negative, e.g.
    Cu -0.480 and O +0.315 in mp-1203515; NaN when absent), ``scf_converged``,
    ``scf_fermi_level`` (the last ``New Fermi level``, NaN when absent).
    """
    text = raw.decode("latin-1") if isinstance(raw, bytes) else raw
    charge = float("nan")
    blocks = _CHARGE_BLOCK.findall(text)
    if blocks:
        for line in blocks[-1].splitlines():
            tokens = line.split()
            if len(tokens) == 2 and tokens[0] == "0":
                charge = float(tokens[1])
    fermi = _FERMI_OUT.findall(text)
    return {
        "absorber_charge": charge,
        "scf_converged": "Convergence reached" in text,
        "scf_fermi_level": float(fermi[-1]) if fermi else float("nan"),
    }

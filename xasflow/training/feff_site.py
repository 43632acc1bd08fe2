"""One FEFF run of one absorber site, as a dask worker does it for :mod:`~xasflow.training.generate`.

A :class:`SiteTask` names the site (the material's POSCAR text and the absorber's index);
:func:`run_site` writes its cards, runs FEFF10 (or another runner) in a temporary directory
and sends back the files' text as a :class:`SiteOutcome`, never raising for a bad site, so
the client writes the tree and a remote cluster needs no shared file system.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from xasflow.adapters.feff import XANES_DIR
from xasflow.adapters.feff_xmu import parse_xmu
from xasflow.training.feff_inputs import FeffPreset

#: ``runner(feff_inp_text, work_dir)`` leaves ``xmu.dat`` in ``work_dir`` and returns a log.
Runner = Callable[[str, Path], str]


@dataclass(frozen=True)
class SiteTask:
    """One FEFF run: the absorber ``site_index`` of a material (POSCAR text)."""

    material_id: str
    site_index: int
    element: str
    edge: str
    poscar: str

    @property
    def site_dir(self) -> str:
        """The site's directory relative to the tree root."""
        return f"{self.material_id}/{XANES_DIR}/{self.site_index:03d}_{self.element}"


@dataclass(frozen=True)
class SiteOutcome:
    """What a worker sends back: the files to write, or a failure reason."""

    task: SiteTask
    seconds: float
    files: dict[str, str] = field(default_factory=dict)
    reason: str = ""
    detail: str = ""
    cpu_seconds: float = 0.0


def feff10_runner(feff_inp: str, work_dir: Path) -> str:
    """Run FEFF10 through feff10-rs (:func:`xasflow.sim.feff_demo.run_feff`); returns a log."""
    from xasflow.sim.feff_demo import feff_versions, run_feff

    lines: list[str] = []
    work_dir.mkdir(parents=True, exist_ok=True)
    stdout = work_dir / "feff.stdout"
    # FEFF's stages print to file descriptor 1: send it to the site's feff.out, not the
    # terminal (one task per worker process, as dask_client sets up, keeps this private)
    saved = os.dup(1)
    try:
        with stdout.open("wb") as fh:
            os.dup2(fh.fileno(), 1)
            try:
                _, _, header, seconds = run_feff(feff_inp, work_dir, log=lines.append)
            finally:
                os.dup2(saved, 1)
    finally:
        os.close(saved)
    lines.insert(0, f"xasflow: {feff_versions(header)}, {seconds:.1f} s")
    lines.append(stdout.read_text(encoding="utf-8", errors="replace"))
    return "\n".join(lines) + "\n"


def run_site(task: SiteTask, preset: FeffPreset, runner: Runner | None = None) -> SiteOutcome:
    """Write the cards of one site, run FEFF (``runner``, default FEFF10) and read xmu.dat.

    Never raises for a bad site: every problem comes back as a reason tag (``bad_structure``,
    ``cards``, ``feff_error``, ``missing_xmu`` or the xmu.dat reader's tag) with its detail.
    """
    from pymatgen.core import Structure

    from xasflow.training.feff_inputs import feff_input

    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    files: dict[str, str] = {}

    def failed(reason: str, exc: BaseException | str) -> SiteOutcome:
        detail = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        if files:  # keep the cards (and FEFF's words) next to the missing xmu.dat
            files["feff.out"] = files.get("feff.out", "") + f"xasflow: {reason}: {detail}\n"
        return SiteOutcome(
            task, time.perf_counter() - t0, files, reason, detail[:500], _cpu_seconds() - cpu0
        )

    try:
        structure = Structure.from_str(task.poscar, fmt="poscar")
    except Exception as exc:
        return failed("bad_structure", exc)
    try:
        title = f"{task.material_id} site {task.site_index}"
        files["feff.inp"] = feff_input(structure, task.site_index, preset, task.edge, title)
    except Exception as exc:
        return failed("cards", exc)
    with tempfile.TemporaryDirectory(prefix="xasflow-feff-") as tmp:
        work = Path(tmp)
        try:
            files["feff.out"] = (runner or feff10_runner)(files["feff.inp"], work)
        except Exception as exc:  # FEFF stage errors, crashes of its worker processes
            said = work / "feff.stdout"  # what FEFF printed before it stopped
            if said.exists():
                files["feff.out"] = said.read_text(encoding="utf-8", errors="replace")[-20000:]
            return failed("feff_error", exc)
        xmu = work / "xmu.dat"
        if not xmu.exists():
            return failed("missing_xmu", "FEFF finished without writing xmu.dat")
        raw = xmu.read_bytes()
    try:
        parse_xmu(raw)
    except ValueError as exc:
        reason, _, detail = str(exc).partition(": ")
        return failed(reason, detail)
    files["xmu.dat"] = raw.decode("latin-1")
    return SiteOutcome(task, time.perf_counter() - t0, files, cpu_seconds=_cpu_seconds() - cpu0)


def _cpu_seconds() -> float:
    """CPU time of this thread plus of finished child processes (FEFF's stage workers).

    Exact with one task per worker process (what dask_client sets up); on a shared machine
    this, not wall time, is the cost of a site.
    """
    import resource

    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.thread_time() + kids.ru_utime + kids.ru_stime

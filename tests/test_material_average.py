"""The material average ("what an experiment sees") takes only whole materials: a material
that lost a site to labelling, reading or the bundle's preparation is not averaged."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("pymatgen.core")

from synthetic_feff import write_tree

from xasflow.spectra import PrepParams
from xasflow.training import dataset as D
from xasflow.training import labels as L

#: syn-Cu2O-0 loses its second site to labelling, syn-Cu2O-1 its second to preparation
UNLABELLED, UNPREPARED = "syn-Cu2O-0", "syn-Cu2O-1"


def _second_site(tree: Path, material: str, truncate: bool) -> None:
    """Give ``material`` a second computed Cu site (index 1, symmetry-equivalent to site 0, so
    each stands for two of its four Cu); ``truncate``: its run stops 30 eV above the edge."""
    src = tree / material / "FEFF-XANES" / "000_Cu"
    dst = shutil.copytree(src, src.parent / "001_Cu")
    if truncate:
        run = dst / "xmu.dat"
        lines = run.read_text().splitlines()
        head = [line for line in lines if line.startswith("#")]
        data = [line for line in lines if not line.startswith("#")]
        first = float(data[0].split()[0])
        kept = [r for r in data if float(r.split()[0]) < first + 48]
        run.write_text("\n".join(head + kept) + "\n")


def test_a_material_missing_a_site_is_not_averaged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mp-29225 lost a Cu site to ``no_neighbours`` and its other row still said complete, so
    the average was one site's; a site the bundle's preparation refuses did the same."""
    monkeypatch.setenv("XASFLOW_CACHE", str(tmp_path / "cache"))
    tree = write_tree(tmp_path / "feff", per_type=2, broken=False)
    _second_site(tree, UNLABELLED, truncate=False)
    _second_site(tree, UNPREPARED, truncate=True)
    real = D.compute_labels

    def lose_one(*args: Any, **kwargs: Any) -> Any:
        labels, mult = real(*args, **kwargs)
        labels[(UNLABELLED, 1)] = L.LabelFailure(UNLABELLED, 1, "no_neighbours", "test")
        return labels, mult

    monkeypatch.setattr(D, "compute_labels", lose_one)
    ds = D.build_feff_dataset(tree, "Cu", n_jobs=1, progress=False)
    assert ds.issue_counts() == {"no_neighbours": 1}
    assert ds.multiplicity[ds.material_id == UNPREPARED].tolist() == [2, 2]
    complete = {str(m): bool(c) for m, c in zip(ds.material_id, ds.complete, strict=True)}
    assert complete.pop(UNLABELLED) is False
    assert all(complete.values()), complete  # the preparation comes later
    g = D.grid_dataset(ds, PrepParams())
    assert [(i.item, i.reason) for i in g.issues] == [(f"{UNPREPARED}/001", "no_post_edge")]
    y, avg = D.material_average(ds, g)
    whole = sorted(set(map(str, ds.material_id)) - {UNLABELLED, UNPREPARED})
    assert sorted(map(str, avg.material_id)) == whole and len(whole) == 4
    assert avg.complete.all() and len(y) == len(whole)
    for mid in whole:  # one site each: the average is that site's prepared spectrum
        row = np.flatnonzero(ds.material_id[g.rows] == mid)
        assert np.allclose(y[list(avg.material_id).index(mid)], g.y[row[0]])

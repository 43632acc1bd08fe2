"""Benchmark: does a common absolute energy scale for the FEFF spectra lift valence accuracy?

Valence from E0-relative Cu K-edge spectra stays near 0.8 on the material-grouped test split.
FEFF's absolute ``omega`` axis scatters between runs, but each run's Fermi level on it (``Mu``
plus the ``omega - e`` offset, :class:`xasflow.adapters.feff_energy.FeffEnergies`) is a common
reference, the counterpart of a foil-calibrated measurement's tabulated edge. On the split
``xasflow train`` uses (same prep, salt and fractions; the valence ExtraTrees of
:func:`xasflow.training.fit.make_estimator`, fitted on train+val as ``train`` does, scored on
test, three seeds) this measures today's features alone and with each candidate appended:

* ``e0_raw`` / ``fermi_raw``: E0 (steepest rise) / the Fermi level on omega, minus 8978.9 eV;
* ``e0_above_fermi``: E0 minus the Fermi level;
* ``shift_L``: :func:`xasflow.spectra.energy.chemical_shift`, where normalised mu first reaches
  L minus the Fermi level (a foil-calibrated measurement: minus the tabulated edge);
* ``fermi_grid``: the whole spectrum gridded relative to the Fermi level instead of E0;
* ``probes``: FEFF's core-level offset and absorber SCF charge, which no measurement gives.

It adds 5-fold material-grouped cross-validation for the main contenders, what limits the
answer (per-class recall, mixed-valence materials, confidence), each scalar's ROC AUC for Cu2+
vs Cu+, and the measured references of the XAS Data Library (calibrated to their foils): their
shifts beside the FEFF distributions, and what the models predict for them.

    XASFLOW_CACHE=.cache .venv/bin/python bench/valence.py --json bench/results/valence.json
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
from report import write_report
from sklearn.metrics import accuracy_score, recall_score, roc_auc_score
from sklearn.model_selection import GroupKFold

from xasflow import paths
from xasflow.adapters.columns import read_spectrum_file
from xasflow.spectra import (
    Spectrum,
    SpectrumError,
    align,
    alignment_shift,
    edge_energy,
    featurize,
    find_e0,
    linear_matrix,
    prepare,
)
from xasflow.spectra.energy import chemical_shift, fermi_reference
from xasflow.training.dataset import build_feff_dataset, grid_dataset
from xasflow.training.fit import TrainConfig, make_estimator
from xasflow.training.split import split_dataset, split_keys

LEVELS = (0.2, 0.3, 0.5, 0.7)
SEEDS = (0, 1, 2)
#: measured references: file stem -> formal Cu oxidation state (covellite is mixed, ~+1.3)
REFERENCES = {
    "cu_metal_rt": 0,
    "cu_metal_10K": 0,
    "Cu_Foil_rt_2016Foils": 0,
    "Cu2S_13K_01": 1,
    "CuS_covellite_13K_01": 1,
    "CuO_tenorite_13K_01": 2,
    "Cu_azurite_13K_01": 2,
}
PROBES = ("core_offset", "absorber_charge")


def feff_scalars(spectra: list[Spectrum], e0: np.ndarray, cfg: TrainConfig) -> dict[str, Any]:
    """Candidate scalars per prepared spectrum (NaN where one cannot be computed)."""
    edge = edge_energy("Cu", "K")
    fermi = np.array([fermi_reference(s) for s in spectra])
    out: dict[str, Any] = {
        "e0_raw": e0 - edge,
        "fermi_raw": fermi - edge,
        "e0_above_fermi": e0 - fermi,
        "core_offset": np.array([s.meta["feff_edge_offset"] for s in spectra]),
        "absorber_charge": np.array([s.meta["feff_absorber_charge"] for s in spectra]),
    }
    for level in LEVELS:
        vals = np.full(len(spectra), np.nan)
        for i, (s, e) in enumerate(zip(spectra, e0, strict=True)):
            with contextlib.suppress(SpectrumError):
                vals[i] = chemical_shift(s, cfg.prep, float(e), level)
        out[f"shift_{level:g}"] = vals
    return out


def fermi_grid(spectra: list[Spectrum], cfg: TrainConfig) -> np.ndarray:
    """Each spectrum normalised and gridded with the Fermi level in place of E0."""
    return np.vstack([prepare(s, cfg.prep, e0=fermi_reference(s)).y for s in spectra])


def with_scalars(X: np.ndarray, scalars: dict[str, Any], names: tuple[str, ...]) -> np.ndarray:
    """Features with the named scalars appended (NaN -> the median of the finite values)."""
    cols = []
    for name in names:
        v = np.asarray(scalars[name], dtype=float)
        cols.append(np.where(np.isfinite(v), v, np.nanmedian(v)))
    return np.hstack([X, np.column_stack(cols)]) if cols else X


def fitted(X: np.ndarray, y: np.ndarray, rows: np.ndarray, cfg: TrainConfig, seed: int) -> Any:
    """The valence classifier ``train`` builds (first grid parameters), fitted on ``rows``."""
    params = cfg.grid["classifier"][0]
    est = make_estimator("classifier", params, cfg.model_copy(update={"seed": seed}), "valence")
    return est.fit(X[rows], y[rows])


def grouped_cv(
    X: np.ndarray, y: np.ndarray, rows: np.ndarray, groups: np.ndarray, cfg: TrainConfig
) -> dict[str, float]:
    """Mean and spread of accuracy over 5 material-grouped folds of ``rows``."""
    scores = []
    for tr, te in GroupKFold(5).split(rows, groups=groups[rows]):
        est = fitted(X, y, rows[tr], cfg, 0)
        scores.append(accuracy_score(y[rows[te]], est.predict(X[rows[te]])))
    return {"mean": round(float(np.mean(scores)), 4), "sd": round(float(np.std(scores)), 4)}


def distribution(v: np.ndarray) -> dict[str, float]:
    """5/25/50/75/95 % points, rounded."""
    q = np.nanpercentile(v, [5, 25, 50, 75, 95])
    return {
        k: round(float(x), 3) for k, x in zip(("p5", "p25", "p50", "p75", "p95"), q, strict=True)
    }


def measured(cfg: TrainConfig) -> list[tuple[str, int, Spectrum, float]]:
    """The references, each calibrated to its foil (its reference channel, or itself)."""
    out = []
    for stem, valence in REFERENCES.items():
        path = paths.xas_data_library() / "Cu" / f"{stem}.xdi"
        if not path.exists():
            continue
        s = read_spectrum_file(path, element="Cu")
        ref = s.meta.get("reference_mu")
        foil = s if ref is None else Spectrum(energy=s.energy, mu=ref, element="Cu")
        shift = alignment_shift(foil, "Cu", "K")
        out.append((path.name, valence, align(s, shift), shift))
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole experiment; returns the JSON document."""
    t0 = time.perf_counter()
    cfg = TrainConfig()
    ds = build_feff_dataset(paths.cu_feff_archive(), "Cu", progress=False)
    g = grid_dataset(ds, cfg.prep)
    sub = ds.subset(g.rows)
    parts = split_dataset(sub, cfg.split_salt, cfg.test_fraction, cfg.val_fraction, cfg.split_by)
    matrix = linear_matrix(cfg.features, cfg.prep)
    X = featurize(g.y, cfg.features, cfg.prep, matrix)
    scalars = feff_scalars(sub.spectra, g.e0, cfg)
    XF = featurize(fermi_grid(sub.spectra, cfg), cfg.features, cfg.prep, matrix)
    valid = np.isfinite(sub.valence)
    y = np.nan_to_num(sub.valence, nan=-99).astype(int)
    fit_rows = np.concatenate([parts["train"], parts["val"]])
    fit_rows, test = fit_rows[valid[fit_rows]], parts["test"][valid[parts["test"]]]
    train_classes, train_counts = np.unique(y[fit_rows], return_counts=True)
    majority = train_classes[np.argmax(train_counts)]
    doc: dict[str, Any] = {
        "n_rows": len(sub),
        "n_fit": int(fit_rows.size),
        "n_test": int(test.size),
        "test_classes": {str(c): int(np.sum(y[test] == c)) for c in train_classes},
        "baseline_accuracy": round(float(np.mean(y[test] == majority)), 4),
    }
    sets: dict[str, np.ndarray] = {"today": X, "fermi_grid": XF}
    for name in ("e0_raw", "fermi_raw", "e0_above_fermi", "shift_0.3", "shift_0.5"):
        sets[f"today+{name}"] = with_scalars(X, scalars, (name,))
    sets["today+shifts_all"] = with_scalars(X, scalars, tuple(f"shift_{lv:g}" for lv in LEVELS))
    sets["today+probes"] = with_scalars(X, scalars, PROBES)
    if args.quick:
        sets = {k: sets[k] for k in ("today", "fermi_grid", "today+shift_0.5")}
    doc["test_accuracy"], preds = {}, {}
    for name, Xm in sets.items():
        accs = []
        for seed in SEEDS:
            pred = fitted(Xm, y, fit_rows, cfg, seed).predict(Xm[test])
            accs.append(accuracy_score(y[test], pred))
            preds.setdefault(name, pred)
        doc["test_accuracy"][name] = {
            "seeds": [round(a, 4) for a in accs],
            "mean": round(float(np.mean(accs)), 4),
        }
        print(f"{name:24s} test accuracy {np.round(accs, 4)} mean {np.mean(accs):.4f}", flush=True)
    cv_rows = np.flatnonzero(valid)
    doc["grouped_cv_accuracy"] = {
        name: grouped_cv(sets[name], y, cv_rows, split_keys(sub, cfg.split_by), cfg)
        for name in ("today", "fermi_grid", "today+shift_0.5")
        if name in sets
    }
    doc["limits"] = limits(sub, y, test, preds, fitted(XF, y, fit_rows, cfg, 0), XF)
    one_two = valid & np.isin(y, (1, 2))
    doc["auc_cu2_vs_cu1"], doc["feff_by_valence"] = {}, {}
    for name, v in scalars.items():
        ok = one_two & np.isfinite(v)
        doc["auc_cu2_vs_cu1"][name] = round(float(roc_auc_score(y[ok] == 2, v[ok])), 4)
        doc["feff_by_valence"][name] = {
            str(c): distribution(v[valid & (y == c)]) for c in train_classes
        }
    doc["measured"] = measured_report(cfg, X, XF, scalars, y, fit_rows, matrix)
    doc["seconds"] = round(time.perf_counter() - t0, 1)
    doc["machine"] = {"python": platform.python_version(), "cpu": platform.processor()}
    return doc


def limits(
    sub: Any, y: np.ndarray, test: np.ndarray, preds: dict, est: Any, XF: np.ndarray
) -> dict[str, Any]:
    """What holds the accuracy down: per-class recall, mixed-valence materials, confidence."""
    pred = preds["fermi_grid"]
    ok = pred == y[test]
    mixed_ids = {
        m
        for m in np.unique(sub.material_id)
        if np.unique(sub.valence[(sub.material_id == m) & np.isfinite(sub.valence)]).size > 1
    }
    mixed = np.isin(sub.material_id[test], list(mixed_ids))
    conf = est.predict_proba(XF[test]).max(axis=1)
    classes = np.unique(y[test])
    return {
        "model": "fermi_grid, seed 0",
        "recall": dict(
            zip(
                map(str, classes),
                np.round(recall_score(y[test], pred, average=None), 3).tolist(),
                strict=True,
            )
        ),
        "mixed_valence_fraction": round(float(mixed.mean()), 3),
        "accuracy_mixed_valence_materials": round(float(ok[mixed].mean()), 3),
        "accuracy_single_valence_materials": round(float(ok[~mixed].mean()), 3),
        "by_confidence": {
            f">={t}": {
                "fraction": round(float((conf >= t).mean()), 3),
                "accuracy": round(float(ok[conf >= t].mean()), 3),
            }
            for t in (0.5, 0.7, 0.9)
        },
    }


def measured_report(
    cfg: TrainConfig,
    X: np.ndarray,
    XF: np.ndarray,
    scalars: dict[str, Any],
    y: np.ndarray,
    fit_rows: np.ndarray,
    matrix: np.ndarray,
) -> list[dict[str, Any]]:
    """Each calibrated reference: its shifts and the predicted valence of three models."""
    models = {
        "today": fitted(X, y, fit_rows, cfg, 0),
        "fermi_grid": fitted(XF, y, fit_rows, cfg, 0),
        "today+shift_0.5": fitted(with_scalars(X, scalars, ("shift_0.5",)), y, fit_rows, cfg, 0),
    }
    rows = []
    for name, valence, s, calibration in measured(cfg):
        e0 = find_e0(s, cfg.prep.e0_search)
        row: dict[str, Any] = {
            "file": name,
            "valence": valence,
            "calibration_ev": round(calibration, 3),
            "e0_minus_edge": round(e0 - edge_energy("Cu", "K"), 3),
        }
        for level in LEVELS:
            row[f"shift_{level:g}"] = round(chemical_shift(s, cfg.prep, e0, level), 3)
        x = featurize(prepare(s, cfg.prep, e0=e0).y[None], cfg.features, cfg.prep, matrix)
        xf = featurize(
            prepare(s, cfg.prep, e0=fermi_reference(s)).y[None], cfg.features, cfg.prep, matrix
        )
        inputs = {
            "today": x,
            "fermi_grid": xf,
            "today+shift_0.5": np.hstack([x, [[row["shift_0.5"]]]]),
        }
        row["predicted"] = {}
        for model, est in models.items():
            proba = est.predict_proba(inputs[model])[0]
            row["predicted"][model] = {
                str(c): round(float(p), 2) for c, p in zip(est.classes_, proba, strict=True)
            }
        rows.append(row)
    return rows


def main() -> None:
    """Command line: run and print or write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--quick", action="store_true", help="three feature sets only")
    args = parser.parse_args()
    write_report(args.json, run(args))


if __name__ == "__main__":
    main()

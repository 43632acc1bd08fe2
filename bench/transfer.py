"""Benchmark: how bundles answer on spectra unlike their FEFF training data.

Per bundle (``--bundle``, repeatable, so old and new are compared on the same spectra):

* every labelled measured Cu reference of the shared XAS Data Library
  (``bench/references-cu.csv``): CN with its 90 % set and probability of the labelled CN,
  the CN-motif label, valence, the out-of-domain score and flag, against the label and the
  ``out_of_domain`` column (metals and sulfides should be flagged, oxides not);
* simulated beamline scans (``xasflow.sim.model``: Poisson counts, I0 drift, a background
  slope; step and fly grids) of the packaged FEFF10 demo compounds, ``--seeds`` each: the
  fraction whose CN and valence are right, and the fraction flagged.

The test-split figures (accuracy, the flagged fraction) are ``xasflow evaluate --json``'s.

    .venv/bin/python bench/transfer.py --bundle models/cu-k --bundle /tmp/cu-k-new \\
        --json bench/results/transfer.json
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any

import numpy as np
from report import write_json

from xasflow import paths
from xasflow.adapters.columns import read_spectrum_file
from xasflow.models.predictor import Prediction, Predictor
from xasflow.sim.model import BeamlineModel, fly_energies, step_energies
from xasflow.sim.references import demo_spectra
from xasflow.spectra import Spectrum

HERE = Path(__file__).resolve().parent
#: formal Cu oxidation state of each demo compound (xasflow.sim.feff_demo's table)
DEMO_VALENCE = {"Cu2O": 1, "CuAl2O4": 2, "CuCl": 1, "CuO": 2, "Cu_MgO": 2}


def _answer(pred: Prediction) -> dict[str, Any]:
    cn = pred["cn"]
    return {
        "cn": cn.value,
        "cn_set": cn.prediction_set,
        "cn_probabilities": cn.probabilities,
        "environment": pred["environment"].value,
        "valence": pred["valence"].value,
        "ood_score": pred.ood_score,
        "out_of_domain": pred.out_of_domain,
    }


def references(predictor: Predictor) -> dict[str, Any]:
    """Each labelled library reference's answer beside its label."""
    out: dict[str, Any] = {}
    root = paths.shared_data_dir()
    with open(HERE / "references-cu.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        path = root / row["file"]
        if not path.exists():
            continue
        pred = predictor.predict(read_spectrum_file(path, element="Cu"))
        ans = _answer(pred)
        label_cn, flag = int(row["cn"]), row["out_of_domain"] == "true"
        probs = ans["cn_probabilities"] or {}
        ans.update(
            label_cn=label_cn,
            label_valence=int(row["valence"]),
            should_flag=flag,
            p_label_cn=float(probs.get(str(label_cn), probs.get(label_cn, 0.0))),
            cn_right=ans["cn"] == label_cn,
            flag_right=ans["out_of_domain"] is flag,
            answer_right=(ans["out_of_domain"] if flag else ans["cn"] == label_cn),
        )
        out[path.stem] = ans
    return out


def demo_scans(predictor: Predictor, seeds: int) -> dict[str, Any]:
    """Per demo compound: the share of simulated scans right on CN and valence, and flagged."""
    out: dict[str, Any] = {}
    for spec in demo_spectra():
        name = spec.meta["name"]
        cn_label = int(spec.meta["expected"]["cn"])
        preds = []
        for seed in range(seeds):
            model = BeamlineModel(sample=spec, seed=seed)
            grid = step_energies(within=model) if seed % 2 == 0 else fly_energies(within=model)
            counts = model.channels(grid)
            mu = np.log(counts["I0"] / counts["It"])
            preds.append(predictor.predict(Spectrum(grid, mu, "Cu", "K")))
        out[name] = {
            "scans": seeds,
            "cn_right": float(np.mean([p["cn"].value == cn_label for p in preds])),
            "valence_right": float(
                np.mean([p["valence"].value == DEMO_VALENCE.get(name) for p in preds])
            ),
            "flagged": float(np.mean([p.out_of_domain for p in preds])),
            "cn_answers": sorted({int(p["cn"].value) for p in preds}),
        }
    return out


def main() -> int:
    """Run the benchmark and write the JSON report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", action="append", required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--seeds", type=int, default=12, help="simulated scans per demo compound")
    args = ap.parse_args()
    report: dict[str, Any] = {"benchmark": "transfer", "bundles": {}}
    for bundle in args.bundle:
        predictor = Predictor(bundle)
        refs = references(predictor)
        report["bundles"][bundle] = {
            "bundle_id": predictor.bundle_id,
            "served": {n: t.estimator for n, t in predictor.manifest.tasks.items()},
            "ood_method": predictor.manifest.ood.method if predictor.manifest.ood else None,
            "references": refs,
            "references_answer_right": sum(r["answer_right"] for r in refs.values()),
            "references_flag_right": sum(r["flag_right"] for r in refs.values()),
            "n_references": len(refs),
            "demo_scans": demo_scans(predictor, args.seeds),
        }
    write_json(args.json, report, default=str)
    for bundle, r in report["bundles"].items():
        print(bundle, r["bundle_id"], r["served"])
        for name, a in r["references"].items():
            print(
                f"  {name:28s} cn {a['cn']} (label {a['label_cn']}, p {a['p_label_cn']:.2f}) "
                f"set {a['cn_set']} val {a['valence']} ood {a['ood_score']:.3g} "
                f"{'FLAG' if a['out_of_domain'] else '-'} (should {a['should_flag']})"
            )
        for name, d in r["demo_scans"].items():
            print(
                f"  demo {name:10s} cn {d['cn_right']:.2f} val {d['valence_right']:.2f} "
                f"flagged {d['flagged']:.2f} answers {d['cn_answers']}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

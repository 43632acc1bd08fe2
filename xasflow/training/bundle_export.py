"""Write a trained result as a model bundle: the served graphs, their calibration, the manifest.

Forest tasks become one gzip'd tree graph each (featurisation inside, see
:mod:`xasflow.training.export`); each deep ensemble becomes one graph with every task's
head; the out-of-domain scorer one more. Only graphs some task serves are written.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import xasflow
from xasflow.models.bundle import Manifest, MemberSpec, OodSpec, SpreadSpec, TaskSpec
from xasflow.models.bundle_write import check_replaceable, write_bundle
from xasflow.spectra import linear_matrix
from xasflow.training import labels as L
from xasflow.training.export import to_onnx
from xasflow.training.fit import TrainResult
from xasflow.training.scoring import MOTIF_NAMES
from xasflow.training.select import FOREST
from xasflow.training.served_metrics import with_served_metrics

#: What the manifest keeps of each network member (its per-epoch history stays out).
MEMBER_KEYS = (
    "seed",
    "epochs",
    "best_epoch",
    "best_val_loss",
    "best_val_error",
    "snapshots",
    "seconds",
    "device",  # what the seconds were measured on
)

TASK_TARGETS = {
    "cn": ("dominant coordination number (CrystalNN)", None),
    "environment": ("top CN-motif label (Zheng et al. 2020)", None),
    "motifs": ("CN-weighted motif order parameters; ranked above 0.05 (Zheng et al. 2020)", None),
    "valence": ("oxidation state (pymatgen BVAnalyzer)", None),
    "distance": ("mean first-shell neighbour distance", "angstrom"),
    # pymatgen's calculate_bv_sum (b = 0.31 A, distances scaled by 1.015): CuO's label is 0.78
    # where Brown-Altermatt parameters give 1.93, so an ordering of sites, not valence units
    "charge": ("bond-valence score (pymatgen calculate_bv_sum; relative, not valence units)", None),
}


def _code_version() -> str:
    """Package version plus the git commit when run from a checkout."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"xasflow {xasflow.__version__}" + (f" ({sha})" if sha else "")


def _members(
    name: str, kind: str, chosen: tuple[str, ...], result: TrainResult
) -> list[MemberSpec]:
    """The graph outputs a task averages, in the order they were chosen."""
    out: list[MemberSpec] = []
    for member in chosen:
        if member == FOREST:
            output = "probabilities" if kind == "classifier" else "variable"
            out.append(MemberSpec(kind=FOREST, file=f"{name}.onnx.gz", output=output))
            continue
        ens = result.networks[member]
        out.append(
            MemberSpec(
                kind=member,
                file=f"{member}.onnx",
                output=name,
                std_output=f"{name}_std" if kind == "regressor" else None,
                seeds=[int(m["seed"]) for m in ens.members_info],
            )
        )
    return out


def export_bundle(
    result: TrainResult,
    out: str | Path,
    citation: str = "",
    log: Callable[[str], None] = print,
) -> Path:
    """Write the served tasks as a verified bundle (graphs, calibration, manifest), its metrics
    measured as served (:mod:`xasflow.training.served_metrics`). ``out`` must be new, empty
    or a bundle (:func:`~xasflow.models.bundle.check_replaceable`, checked before any work)."""
    check_replaceable(out)
    cfg, ds = result.config, result.dataset
    matrix = linear_matrix(cfg.features, cfg.prep)
    files: dict[str, bytes] = {}
    specs: dict[str, TaskSpec] = {}
    for name, fit in result.tasks.items():
        choice = result.choices.get(name)
        chosen = choice.members if choice is not None else (FOREST,)
        members = _members(name, fit.kind, chosen, result)
        for member in members:
            if member.file in files:
                continue
            if member.kind == FOREST:
                # gzip (mtime 0: same model, same bytes): tree ensembles compress 5-10x
                graph = to_onnx(fit.estimator, matrix, name=name)
                files[member.file] = gzip.compress(graph, compresslevel=6, mtime=0)
            else:
                files[member.file] = result.networks[member.kind].to_onnx()
        target, unit = TASK_TARGETS[name]
        metrics = {k: float(v) for k, v in fit.metrics.items() if isinstance(v, int | float)}
        specs[name] = TaskSpec(
            kind=fit.kind,
            estimator=choice.estimator if choice is not None else FOREST,
            members=members,
            target=target,
            classes=fit.classes,
            outputs=[MOTIF_NAMES[c] for c in fit.columns] if fit.columns is not None else None,
            unit=unit,
            threshold=L.MOTIF_THRESHOLD if name == "motifs" else None,
            metrics=metrics,
            region_importance=fit.region_importance,
            temperature=choice.temperature if choice is not None else None,
            conformal=choice.conformal if choice is not None else None,
            selection=choice.selection if choice is not None else {},
            selection_margin=choice.margin if choice is not None else None,
        )
    ood = None
    if result.ood is not None:
        files["ood.onnx"] = result.ood.to_onnx(cfg.prep.n_points + cfg.features.n_scalars())
        spec = result.ood.spec()
        ood = OodSpec(
            file="ood.onnx",
            method=str(spec.pop("method")),
            threshold=float(spec.pop("threshold")),
            details=spec,
        )
        ligand = result.ood_ligand
        if ligand is not None:  # one graph: shape, white line and post-edge (ood_ligand)
            files["ood.onnx"] = ligand.to_onnx(cfg.prep.n_points + cfg.features.n_scalars())
            ood = OodSpec(
                file="ood.onnx",
                method=ligand.method,
                threshold=ligand.threshold,
                details=ligand.spec(),
            )
        both = result.ood_spread
        if ligand is None and both is not None and {f for f, _ in both.outputs} <= set(files):
            ood = OodSpec(
                file="ood.onnx",
                method=f"{ood.method}+spread",
                threshold=both.threshold,
                details={**spec, "recon_threshold": ood.threshold, **both.stats},
                recon_scale=both.recon_scale,
                spread=SpreadSpec(outputs=both.outputs, scale=both.spread_scale),
            )
    created = dt.datetime.now(dt.UTC).replace(microsecond=0)
    manifest = Manifest(
        bundle_id=f"{ds.element.lower()}-{ds.edge.lower()}-{created:%Y%m%dT%H%M%SZ}-{ds.fingerprint[:8]}",
        element=ds.element,
        edge=ds.edge,
        created=created.isoformat(),
        code_version=_code_version(),
        prep=cfg.prep,
        features=cfg.features,
        input_width=cfg.prep.n_points + cfg.features.n_scalars(),
        tasks=specs,
        regions=cfg.regions,
        ood=ood,
        training=_training_record(result, citation),
    )
    return write_bundle(out, with_served_metrics(manifest, files, ds, log), files)


def _training_record(result: TrainResult, citation: str) -> dict[str, Any]:
    """Where the bundle came from and how every candidate scored (the manifest's ``training``)."""
    cfg, ds = result.config, result.dataset
    return {
        "source": ds.source,
        "fingerprint": ds.fingerprint,
        "n_spectra": len(ds),
        "n_materials": ds.n_materials,
        "split_salt": cfg.split_salt,
        "split_by": cfg.split_by,
        "test_fraction": cfg.test_fraction,
        "val_fraction": cfg.val_fraction,
        "config": json.loads(cfg.model_dump_json()),
        "hyperparameters": {n: f.params for n, f in result.tasks.items()},
        "skipped_tasks": dict(result.skipped),  # task -> why training left it out
        "networks": {
            arch: {
                "config": json.loads(ens.config.model_dump_json()),
                "members": [
                    {k: v for k, v in m.items() if k in MEMBER_KEYS} for m in ens.members_info
                ],
                "seconds": round(result.timings.get(f"networks_{arch}", 0.0), 1),
            }
            for arch, ens in result.networks.items()
        },
        "candidates_test": result.candidate_metrics,
        "seconds": round(result.seconds, 1),
        "citation": citation,
    }

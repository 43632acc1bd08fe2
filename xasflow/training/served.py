"""After the forests: train the deep ensembles, choose what each task serves, calibrate it.

``serve_tasks`` runs at the end of :func:`xasflow.training.fit.train`. Networks are trained
on the same prepared input ``x`` the bundle graphs receive (the one preprocessing path) and
the same material-grouped split; each task then serves the forest, a network ensemble or
their average, whichever scores best on validation, with its doubt calibrated there.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from xasflow.models.uncertainty import spread_score
from xasflow.spectra import featurize, linear_matrix, model_input
from xasflow.training.ood import DEFAULT_COMPONENTS, fit_ood, fit_spread_ood
from xasflow.training.ood_ligand import fit_ligand_ood
from xasflow.training.ood_threshold import bound_or_keep
from xasflow.training.scoring import evaluate_task, primary_metric, region_importance
from xasflow.training.select import (
    FOREST,
    BaseOutputs,
    average,
    candidates,
    choose_task,
    forest_outputs,
    network_outputs,
    point_of,
)
from xasflow.training.split import split_keys

Targets = dict[str, tuple[str, np.ndarray, np.ndarray]]


def network_targets(result: Any, targets: Targets) -> dict[str, Any]:
    """The networks' targets: the forests' classes and motif columns, rows masked alike."""
    from xasflow.training.nn import TaskTarget

    cfg, sub = result.config, result.dataset
    out: dict[str, Any] = {}
    for name, fit in result.tasks.items():
        kind, y, valid = targets[name]
        weight = None
        if kind == "multi_regressor":
            y = np.nan_to_num(y[:, fit.columns])
        elif kind == "classifier":
            valid = valid & np.isin(y.astype(str), [str(c) for c in fit.classes])
            if name == "cn" and cfg.weight_by_label_confidence:
                weight = np.nan_to_num(np.nanmax(sub.cn_vector, axis=1), nan=0.0)
        out[name] = TaskTarget(kind=kind, y=y, valid=valid, classes=fit.classes, weight=weight)
    return out


def fit_networks(result: Any, targets: Targets, x: np.ndarray, log: Any) -> dict[str, Any]:
    """One deep ensemble per configured architecture ({} without torch or networks)."""
    cfg = result.config
    if not cfg.networks:
        return {}
    try:
        from xasflow.training.nn import NetConfig, fit_network_ensemble
    except ImportError as exc:
        log(f"networks skipped: {exc} (install the nn extra for torch)")
        return {}
    net_targets = network_targets(result, targets)
    nets: dict[str, Any] = {}
    for arch in cfg.networks:
        t0 = time.perf_counter()
        overrides = {
            "seed": cfg.seed,
            "threads": cfg.network_threads,
            "augment": cfg.network_augment,
            **cfg.network_overrides.get(arch, {}),
        }
        net_cfg = NetConfig(arch=arch, **overrides)
        nets[arch] = fit_network_ensemble(
            x,
            net_targets,
            result.split["train"],
            result.split["val"],
            net_cfg,
            log=log,
            grid=cfg.prep.grid,
            device=cfg.network_device,
        )
        result.timings[f"networks_{arch}"] = time.perf_counter() - t0
        log(f"{arch}: {net_cfg.members} members in {result.timings[f'networks_{arch}']:.0f} s")
    return nets


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}


def serve_tasks(result: Any, targets: Targets, mean_curve: np.ndarray, log: Any = print) -> None:
    """Fill ``result.networks``, ``result.choices`` and ``result.candidate_metrics``; the
    served choice's test metrics and region importances replace the forest's in ``tasks``."""
    cfg, g = result.config, result.gridded
    matrix = linear_matrix(cfg.features, cfg.prep)
    x = model_input(g.y, cfg.features, cfg.prep)
    X = featurize(g.y, cfg.features, cfg.prep, matrix)
    result.networks = fit_networks(result, targets, x, log)
    parts = result.split
    # at least 20 training spectra per principal component, or the PCA fits its own noise
    # and flags every new spectrum (10 components for the Cu set; 2 for a tiny test set)
    k = int(min(DEFAULT_COMPONENTS, max(2, len(parts["train"]) // 20)))
    result.ood = fit_ood(
        x[parts["train"]],
        x[parts["val"]],
        n_components=k,
        grid=cfg.prep.grid,
        flag_fraction=cfg.ood_flag_fraction,
    )
    log(
        f"out of domain: {result.ood.method}, threshold {result.ood.threshold:.4g} "
        f"(flags {result.ood.stats['val_flagged_fraction']:.3f} of validation)"
    )
    # every network's per-member answers for every row and task, computed once
    members = {arch: ens.predict_members(x) for arch, ens in result.networks.items()}
    for name, fit in result.tasks.items():
        _serve_one(name, fit, result, targets[name], members, X, mean_curve, log)
    if result.config.ood_ligand:
        result.ood_ligand = _ligand_ood(result, x, log)
    if result.ood_ligand is None and result.config.ood_spread:
        result.ood_spread = _spread_ood(result, members, x, log)


def _ligand_ood(result: Any, x: np.ndarray, log: Any) -> Any:
    """The reconstruction score with the white-line and post-edge components joined."""
    parts, cfg = result.split, result.config
    try:
        fitted = fit_ligand_ood(
            x[parts["train"]], x[parts["val"]], cfg.prep.grid, result.ood, cfg.ood_flag_fraction
        )
    except ValueError as exc:  # a toy dataset: the reconstruction score alone is served
        log(f"out of domain: no ligand-aware score ({exc}); serving {result.ood.method} alone")
        return None
    keys = split_keys(result.dataset, cfg.split_by)
    fitted = bound_or_keep(fitted, x, keys, parts, cfg.ood_bound_confidence, log)
    fitted.stats["test_flagged_fraction"] = float(np.mean(fitted.flags(x[parts["test"]])))
    log(f"out of domain, {fitted.method}: threshold {fitted.threshold:.4g}, {fitted.stats}")
    return fitted


#: the task whose network spread joins the out-of-domain score (measured on the measured Cu
#: references: the CN members disagree on Cu2S, which no shape score flags; bench/ood.py)
SPREAD_TASK = "cn"


def _spread_ood(
    result: Any, members: dict[str, dict[str, np.ndarray]], x: np.ndarray, log: Any
) -> Any:
    """The reconstruction score combined with the spread of the networks the CN task serves
    (None when it serves no network)."""
    choice = result.choices.get(SPREAD_TASK)
    nets = [m for m in (choice.members if choice is not None else ()) if m in members]
    if not nets or result.ood is None:
        return None
    va, te = result.split["val"], result.split["test"]

    def spread(rows: np.ndarray) -> np.ndarray:
        return spread_score([members[a][SPREAD_TASK][:, rows].std(axis=0) for a in nets])

    fitted = fit_spread_ood(
        [(f"{a}.onnx", f"{SPREAD_TASK}_std") for a in nets],
        result.ood.score(x[va]),
        spread(va),
        result.config.ood_flag_fraction,
    )
    test_flags = fitted.score(result.ood.score(x[te]), spread(te)) > fitted.threshold
    fitted.stats["test_flagged_fraction"] = float(np.mean(test_flags))
    log(f"out of domain with {SPREAD_TASK} spread of {nets}: {fitted.stats}")
    return fitted


def _serve_one(
    name: str,
    fit: Any,
    result: Any,
    target: tuple[str, np.ndarray, np.ndarray],
    members: dict[str, dict[str, np.ndarray]],
    X: np.ndarray,
    mean_curve: np.ndarray,
    log: Any,
) -> None:
    """Choose, calibrate and score one task's served estimator."""
    cfg, g, parts = result.config, result.gridded, result.split
    kind, y, valid = target
    tr, va, te = (parts[k][valid[parts[k]]] for k in ("train", "val", "test"))

    def expand(pred: np.ndarray) -> np.ndarray:
        if fit.columns is None:
            return pred
        full = np.zeros((len(pred), y.shape[1]))
        full[:, fit.columns] = pred
        return full

    def bases(rows: np.ndarray) -> dict[str, BaseOutputs]:
        out = {FOREST: forest_outputs(fit, X[rows])}
        for arch, per_task in members.items():
            out[arch] = network_outputs(per_task[name][:, rows], kind)
        return out

    def score(pred: np.ndarray, rows: np.ndarray | None) -> float:
        return primary_metric(name, kind, expand(pred), y[va] if rows is None else y[va][rows])

    choice = choose_task(
        name,
        kind,
        fit.classes,
        bases(va),
        y[va],
        score,
        cfg.conformal_alpha,
        cfg.set_method,
        cfg.serve_tolerance,
        cfg.serve_costs,
        cfg.serve_se,
    )
    result.choices[name] = choice
    per: dict[str, dict[str, Any]] = {}
    for cand, (_, out) in candidates(bases(te)).items():
        pred = expand(point_of(kind, out, fit.classes))
        per[cand] = evaluate_task(name, kind, pred, y[te], y[tr])
    result.candidate_metrics[name] = {c: _numbers(m) for c, m in per.items()}
    fit.metrics = per[choice.candidate]
    log(f"{name}: serves {choice.candidate} (validation {choice.selection})")
    if choice.estimator != FOREST:
        fit.region_importance = region_importance(
            name,
            kind,
            _served_predictor(fit, choice.members, result, expand),
            g.y[va],  # as training's: validation, not the test rows that only score
            y[va],
            y[tr],
            mean_curve,
            cfg,
        )


def _served_predictor(
    fit: Any, members: tuple[str, ...], result: Any, expand: Callable[[np.ndarray], np.ndarray]
) -> Callable[[np.ndarray], np.ndarray]:
    """Gridded spectra -> the served choice's point predictions (for region importance)."""
    cfg = result.config
    matrix = linear_matrix(cfg.features, cfg.prep)

    def predict(y_grid: np.ndarray) -> np.ndarray:
        outs = []
        for member in members:
            if member == FOREST:
                outs.append(forest_outputs(fit, featurize(y_grid, cfg.features, cfg.prep, matrix)))
            else:
                xin = model_input(y_grid, cfg.features, cfg.prep)
                outs.append(
                    network_outputs(
                        result.networks[member].predict_members(xin)[fit.name], fit.kind
                    )
                )
        return expand(point_of(fit.kind, average(outs), fit.classes))

    return predict

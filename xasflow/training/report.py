"""Evaluation report: a Markdown summary with confusion matrices, parity and region plots (PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from xasflow.models.bundle import Manifest
from xasflow.training.evaluate import Evaluation

_LABELS = {
    "cn": "coordination number",
    "environment": "CN-motif label",
    "valence": "oxidation state",
    "distance": "mean NN distance (Å)",
    "charge": "bond-valence score (relative)",
}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _confusion_png(path: Path, title: str, classes: list[Any], matrix: list[list[int]]) -> None:
    plt = _plt()
    cm = np.asarray(matrix, dtype=float)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(classes), 0.8 + 0.5 * len(classes)))
    ax.imshow(cm / np.maximum(cm.sum(axis=1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            if cm[i, j]:
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(classes)), [str(c) for c in classes])
    ax.set_yticks(range(len(classes)), [str(c) for c in classes])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _parity_png(path: Path, title: str, truth: np.ndarray, pred: np.ndarray, metrics: dict) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    ax.scatter(truth, pred, s=6, alpha=0.4)
    lo, hi = (
        float(np.nanmin([truth.min(), pred.min()])),
        float(np.nanmax([truth.max(), pred.max()])),
    )
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xlabel(f"true {title}")
    ax.set_ylabel(f"predicted {title}")
    ax.set_title(
        f"MAE {metrics['mae']:.3f} (mean baseline {metrics['baseline_mae']:.3f}), R² {metrics['r2']:.2f}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _regions_png(path: Path, manifest: Manifest) -> None:
    plt = _plt()
    tasks = list(manifest.tasks)
    combos = list(next(iter(manifest.tasks.values())).region_importance)
    fig, ax = plt.subplots(figsize=(7.5, 0.6 + 0.32 * len(combos)))
    height = 0.8 / max(len(tasks), 1)
    for k, name in enumerate(tasks):
        imp = manifest.tasks[name].region_importance
        scale = max(abs(v) for v in imp.values()) or 1.0
        vals = [imp.get(c, 0.0) / scale for c in combos]
        ax.barh(np.arange(len(combos)) + k * height, vals, height=height, label=name)
    ax.set_yticks(np.arange(len(combos)) + 0.4 - height / 2, combos, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("score lost when the region is removed (relative to the largest, per task)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def write_report(out: str | Path, ev: Evaluation, manifest: Manifest) -> Path:
    """Write ``report.md`` and its PNGs into ``out``; returns the Markdown path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# {manifest.element} {manifest.edge}-edge bundle `{manifest.bundle_id}`",
        "",
        f"Scored through the ONNX graphs on the {ev.scope}: {ev.n_spectra} spectra from "
        f"{ev.n_materials} materials (no test material was seen in training).",
        "",
        "| task | metric | value | baseline |",
        "|---|---|---|---|",
    ]
    for name, m in ev.tasks.items():
        for key in ("accuracy", "jaccard", "f1_macro", "mae", "r2"):
            if key in m:
                base = m.get(f"baseline_{key}", "")
                lines.append(f"| {name} | {key} | {_fmt(m[key])} | {_fmt(base)} |")
    cn = ev.tasks.get("cn", {})
    if "ambiguous_label_fraction" in cn:
        parts = [
            f"{_fmt(cn[f'accuracy_{k}_labels'])} on the {cn[f'n_{k}_labels']} {k} ones"
            for k in ("clear", "ambiguous")
            if f"accuracy_{k}_labels" in cn
        ]
        lines += [
            "",
            f"CN labels: {cn['ambiguous_label_fraction']:.0%} of the sites are ambiguous (the "
            "dominant CN holds under 60 % of CrystalNN's weight). CN accuracy "
            + ", ".join(parts)
            + f"; {_fmt(cn['accuracy_in_label_set'])} with the answer among the CNs of "
            "Zheng's ranked label (weight >= 0.2).",
        ]
    if ev.material_average:
        lines += [
            "",
            "Site-averaged spectra of whole test materials (what an experiment sees):",
            "",
        ]
        lines += ["| task | metric | value | baseline |", "|---|---|---|---|"]
        for name, m in ev.material_average.items():
            for key in ("accuracy", "jaccard", "mae"):
                if key in m:
                    lines.append(
                        f"| {name} | {key} | {_fmt(m[key])} | {_fmt(m.get(f'baseline_{key}', ''))} |"
                    )
    for name, m in ev.tasks.items():
        if "confusion" in m:
            png = f"confusion_{name}.png"
            _confusion_png(
                out / png,
                _LABELS.get(name, name),
                m["confusion"]["classes"],
                m["confusion"]["matrix"],
            )
            lines += ["", f"## {_LABELS.get(name, name)}", "", f"![{name}]({png})"]
            if "f1_per_class" in m:
                per = ", ".join(f"{k}: {v:.2f}" for k, v in m["f1_per_class"].items())
                lines += ["", f"F1 per class: {per}"]
        elif "mae" in m and name in ev.predictions:
            png = f"parity_{name}.png"
            _parity_png(
                out / png, _LABELS.get(name, name), ev.truths[name], ev.predictions[name], m
            )
            lines += ["", f"## {_LABELS.get(name, name)}", "", f"![{name}]({png})"]
    if any(t.region_importance for t in manifest.tasks.values()):
        _regions_png(out / "regions.png", manifest)
        lines += [
            "",
            "## Energy regions",
            "",
            "Drop-region importance: the score the bundle, as served, loses on the validation "
            "split when a region (eV above E0) is replaced by the training-mean spectrum.",
            "",
            "![regions](regions.png)",
            "",
            "regions: "
            + ", ".join(f"{k} {lo:g}…{hi:g} eV" for k, (lo, hi) in manifest.regions.items()),
        ]
    if ev.issues:
        lines += [
            "",
            "Items not scored, by reason: "
            + ", ".join(f"{k} {v}" for k, v in sorted(ev.issues.items())),
        ]
    citation = str(manifest.training.get("citation") or "")  # its training data's, if owed
    lines += ["", citation, ""] if citation else [""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path

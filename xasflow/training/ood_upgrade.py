"""Give an existing bundle the ligand-aware out-of-domain score and re-seal it.

Rebuilds the bundle's training data and split from its manifest (the dataset fingerprint
must match), refits its reconstruction score with the recorded parameters (its threshold
must come out as recorded, or the data differ and nothing is written), fits
:func:`xasflow.training.ood_ligand.fit_ligand_ood`, replaces ``ood.onnx`` with the combined
graph and writes the bundle back atomically with a fresh ``files`` table and
``manifest.sha256`` (and ``manifest.sig`` when given a key). The trained models are untouched.

    python -m xasflow.training.ood_upgrade models/cu-k
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xasflow.models.bundle import Manifest, OodSpec
from xasflow.models.bundle_write import write_bundle
from xasflow.training.ood import fit_ood
from xasflow.training.ood_ligand import METHOD, POSTEDGE_SMOOTH_EV, LigandOod, fit_ligand_ood
from xasflow.training.ood_threshold import CONFIDENCE, bound_or_keep
from xasflow.training.rebuild import bundle_parser, open_for_rewrite, rebuild
from xasflow.training.split import split_keys


def _recon_spec(manifest: Manifest) -> dict[str, Any]:
    """The recorded parameters of the bundle's reconstruction score (also once upgraded)."""
    ood = manifest.ood
    if ood is None:
        raise ValueError(f"{manifest.bundle_id} has no out-of-domain score to extend")
    if ood.spread is not None:
        raise ValueError(f"{manifest.bundle_id}: a score combined with the network spread")
    if ood.method == METHOD:
        return dict(ood.details["components"]["recon"])
    return {**ood.details, "method": ood.method, "threshold": ood.threshold}


def fit_for_bundle(
    manifest: Manifest,
    data: str | Path | None = None,
    log: Callable[[str], None] = print,
    flag_fraction: float | None = None,
    confidence: float | None = CONFIDENCE,
    postedge_smooth_ev: float = POSTEDGE_SMOOTH_EV,
) -> tuple[LigandOod, dict[str, np.ndarray]]:
    """The ligand-aware score for ``manifest``'s training data, and that data's model inputs
    by split (``train``, ``val``, ``test``). ``flag_fraction`` of the combined score defaults
    to the reconstruction score's (a ValueError when the validation rows are too few); the
    threshold is bounded at ``confidence`` for a fresh split (:mod:`ood_threshold`) where the
    split has groups enough, and is validation's split-conformal rank otherwise or for None.
    ``postedge_smooth_ev``: the post-edge component's smoothing (Gaussian sigma, eV)."""
    if confidence is not None and not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    recon = _recon_spec(manifest)
    rebuilt = rebuild(manifest, data)
    xs = {k: rebuilt.inputs(k) for k in ("train", "val", "test")}
    norm = recon.get("norm_columns")
    base = fit_ood(
        xs["train"],
        xs["val"],
        str(recon["method"]),
        int(recon["n_components"]),
        tuple(recon["window_columns"]),
        bool(recon["normalise"]),
        float(recon["flag_fraction"]),
        tuple(norm) if norm else None,
        smooth=float(recon.get("smooth_columns", 0.0)),
    )
    if not math.isclose(base.threshold, float(recon["threshold"]), rel_tol=1e-5):
        raise ValueError(
            f"refitted reconstruction threshold {base.threshold:.6g} is not the bundle's "
            f"{float(recon['threshold']):.6g}: not the data or code the bundle was made with"
        )
    fraction = base.flag_fraction if flag_fraction is None else flag_fraction
    fitted = fit_ligand_ood(
        xs["train"], xs["val"], manifest.prep.grid, base, fraction, postedge_smooth_ev
    )
    keys = split_keys(rebuilt.dataset, manifest.training.get("split_by", "material"))
    fitted = bound_or_keep(fitted, rebuilt.x, keys, rebuilt.parts, confidence, log)
    fitted.stats["test_flagged_fraction"] = float(np.mean(fitted.flags(xs["test"])))
    log(f"{METHOD}: threshold {fitted.threshold:.4g}, scales {fitted.scales}, {fitted.stats}")
    return fitted, xs


def upgrade_bundle(
    bundle: str | Path,
    out: str | Path | None = None,
    data: str | Path | None = None,
    signing_key: str | bytes | Path | None = None,
    log: Callable[[str], None] = print,
    flag_fraction: float | None = None,
    confidence: float | None = CONFIDENCE,
    postedge_smooth_ev: float = POSTEDGE_SMOOTH_EV,
) -> Path:
    """Write ``bundle`` (to ``out``, default: in place) with the ligand-aware OOD graph."""
    bundle, manifest = open_for_rewrite(bundle, signing_key, "the upgrade")
    assert manifest.ood is not None  # checked by _recon_spec in fit_for_bundle
    fitted, _ = fit_for_bundle(manifest, data, log, flag_fraction, confidence, postedge_smooth_ev)
    files = {name: (bundle / name).read_bytes() for name in manifest.files}
    files[manifest.ood.file] = fitted.to_onnx(manifest.input_width, manifest.input_name)
    details = {
        **fitted.spec(),
        "upgraded": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
    }
    ood = OodSpec(
        file=manifest.ood.file,
        output="ood_score",
        method=fitted.method,
        threshold=fitted.threshold,
        details=details,
    )
    return write_bundle(
        bundle if out is None else out,
        manifest.model_copy(update={"ood": ood}),
        files,
        signing_key=signing_key,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: upgrade one bundle directory."""
    ap = bundle_parser(__doc__.splitlines()[0])
    ap.add_argument(
        "--flag-fraction", type=float, help="validation fraction flagged (default: as recorded)"
    )
    ap.add_argument(
        "--confidence",
        type=float,
        default=CONFIDENCE,
        help="confidence that a fresh split is flagged at most the flag fraction (default 0.9)",
    )
    ap.add_argument(
        "--validation-only",
        action="store_true",
        help="the threshold from the validation split alone (split-conformal rank)",
    )
    ap.add_argument(
        "--postedge-smooth",
        type=float,
        default=POSTEDGE_SMOOTH_EV,
        help="Gaussian sigma (eV) smoothing the post-edge window before its reconstruction, "
        f"so point noise counts little; 0: none (default {POSTEDGE_SMOOTH_EV})",
    )
    args = ap.parse_args(argv)
    path = upgrade_bundle(
        args.bundle,
        args.out,
        args.data,
        args.signing_key,
        flag_fraction=args.flag_fraction,
        confidence=None if args.validation_only else args.confidence,
        postedge_smooth_ev=args.postedge_smooth,
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``xasflow predict``'s text: each answer of a prediction with its doubt, in an operator's
words (the CN-motif answer and the motif ranking say when the CN answer chose them), and
why a file could not be predicted; its ``--json`` entries and its ``--herfd`` width."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from xasflow.errors import os_problem

__all__ = ["UNIT_SYMBOLS", "as_json", "describe_prediction", "fwhm", "refusal"]

#: How ``predict`` writes a manifest's units (others as they are).
UNIT_SYMBOLS = {"angstrom": "Å"}


def refusal(exc: Exception, path: object = None) -> tuple[str, str, str]:
    """Why a file was not predicted: the JSON's ``error`` and ``detail``, and the words that
    follow "cannot predict". A path's problem is said plainly ("no such file"), not as
    Python's exception name and errno, and so is a file the readers could not read ("not a
    readable XDI file"); the preparation's refusals keep their tag (``no_post_edge``). The
    JSON keeps the exception's name where there is no tag, for scripts that match on it.
    ``path``: the file, which the words follow (a reader's message that begins with it, as
    given or as ``Path`` writes it, drops it there, so the file is named once)."""
    from xasflow.adapters.columns import ColumnFileError
    from xasflow.adapters.xdi import XdiError

    reason = getattr(exc, "reason", type(exc).__name__)
    if isinstance(exc, OSError):
        detail = os_problem(exc)
        if isinstance(exc, IsADirectoryError):
            files = os.path.join(str(exc.filename or "DIR"), "*.xdi")
            detail += f": give the spectrum files in it (e.g. {files}), not the directory"
        return reason, detail, f": {detail}"
    detail = getattr(exc, "message", str(exc))  # SpectrumError's text without its tag
    said = detail
    if path is not None:  # as given ("./x.xdi") or as the reader's Path wrote it ("x.xdi")
        for written in (f"{path}: ", f"{Path(str(path))}: "):
            said = said.removeprefix(written)
    if isinstance(exc, XdiError | ColumnFileError):
        kind = "XDI" if isinstance(exc, XdiError) else "spectrum"
        return reason, detail, f": not a readable {kind} file: {said}"
    return reason, detail, f" ({reason}): {said}"


def _probabilities(name: str, res: Any, cn_said: Any) -> str:
    """A classifier's three most probable labels; where the CN answer chose a less probable
    environment label (make_consistent), the answer's own probability and why first."""
    top = sorted(res.probabilities.items(), key=lambda kv: -kv[1])[:3]
    probs = ", ".join(f"{k}: {v:.2f}" for k, v in top if v >= 0.01)
    if name != "environment" or res.value is None or top[0][0] == str(res.value):
        return probs
    own = res.probabilities.get(str(res.value), 0.0)
    return (
        f"the most probable label of CN {cn_said}, the CN answer: p {own:.2f}; "
        f"probabilities, highest first: {probs}"
    )


def _ranking(res: Any, cn_said: Any, threshold: float | None) -> str:
    """The motif scores (CN-weighted order parameters, not probabilities) highest first; where
    the ranking leads with the environment answer's motif though it scores lower (the CN
    answer chose it: make_consistent), that score and why first."""
    if not res.ranking:
        above = f" above {threshold:g}" if threshold is not None else ""
        return f"no motif order parameter{above}"
    best = sorted(res.ranking, key=lambda kv: -kv[1])[:3]
    scores = "motif order parameters, highest first: " + ", ".join(f"{k} {v:.2f}" for k, v in best)
    score = res.ranking[0][1]
    if score >= best[0][1]:
        return scores
    return (
        f"the environment answer, chosen for CN {cn_said}, the CN answer: order parameter "
        f"{score:.2f}; {scores}"
    )


def describe_prediction(pred: Any, manifest: Any) -> list[str]:
    """Human-readable lines of a prediction: each answer with its doubt (the conformal
    coverage is the bundle's, and holds only in domain: out of domain the sets are marked)."""

    lines = []
    if pred.out_of_domain:
        lines.append(
            f"  OUT OF DOMAIN (score {pred.ood_score:.3g}, threshold "
            f"{manifest.ood.threshold:.3g}): unlike anything this bundle was trained on; the "
            "answers below are guesses, and their sets and intervals cover nothing"
        )

    def doubt(name: str, what: str) -> str:
        coverage = manifest.set_coverage(name)
        level = f"{coverage:.0%}" if coverage is not None else "conformal"
        return f"{level} {what}" + (" (void: out of domain)" if pred.out_of_domain else "")

    cn = pred.results.get("cn")
    cn_said = cn.value if cn is not None else "?"
    for name, res in pred.results.items():
        value = res.value
        if value is None:  # a CN-motif task where the bundle knows no motif of the CN answered
            value = f"- (no motif of CN {cn_said} in this bundle)"
        spec = manifest.tasks.get(name)
        if res.probabilities is not None:
            chosen = (
                f"  {doubt(name, 'set')} {{{', '.join(map(str, res.prediction_set))}}}"
                if res.prediction_set is not None
                else ""
            )
            lines.append(f"  {name:12s} {value}  ({_probabilities(name, res, cn_said)}){chosen}")
        elif res.ranking is not None:
            threshold = spec.threshold if spec is not None else None
            lines.append(f"  {name:12s} {value}  ({_ranking(res, cn_said, threshold)})")
        else:
            unit = f" {UNIT_SYMBOLS.get(spec.unit, spec.unit)}" if spec and spec.unit else ""
            span = ""
            if res.interval is not None:
                bounds = f"[{res.interval[0]:.3f}, {res.interval[1]:.3f}]"
                if res.unbounded:
                    bounds = "unbounded (the bundle's calibration gives no finite bound)"
                span = f"  {doubt(name, 'interval')} {bounds}"
            lines.append(f"  {name:12s} {res.value:.3f}{unit}{span}")
    return lines


def as_json(pred: Any) -> dict[str, Any]:
    """``predict --json``'s entry for a prediction: :meth:`Prediction.to_dict` (an unbounded
    interval as ``null`` with ``interval_unbounded: true``, as
    :func:`~xasflow.cli_text.describe_prediction` says "unbounded"), and ``out_of_domain``
    on it and on each task, as the analysis event says it: out of domain a task's set and
    interval are kept but cover nothing (the text marks them void)."""
    out = pred.to_dict()
    ood = bool(pred.out_of_domain)
    for entry in out["tasks"].values():
        entry["out_of_domain"] = ood
    return {**out, "out_of_domain": ood}


def fwhm(text: str) -> float:
    """``--herfd``'s optional value: a width in eV (0.2..50, ``spectra.herfd.check_fwhm``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a FWHM in eV, not {text!r} (put the files before --herfd, "
            "or write --herfd=FWHM)"
        ) from None
    from xasflow.spectra.herfd import check_fwhm

    try:
        return check_fwhm(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None  # argparse names --herfd

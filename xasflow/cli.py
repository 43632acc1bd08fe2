"""The ``xasflow`` command: train, evaluate and use models, serve the daemon, run the demo.

Heavy imports happen inside each verb, so ``xasflow predict`` needs only numpy and
onnxruntime, and ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xasflow import __version__, paths
from xasflow.cli_json import QuietStdout, json_target, write_json
from xasflow.cli_text import fwhm
from xasflow.errors import CliError, path_problem

__all__ = ["CliError", "build_parser", "main"]


#: The bundle ``predict`` and ``evaluate`` use when none is named: the shipped Cu K-edge one.
SHIPPED = "the repository's models/cu-k"


#: How ``evaluate`` says what it scored, by ``Evaluation.scope`` (others as they are):
#: "external" is data scored whole, measured references that no bundle trains on.
_SCOPES = {"external": "external data (all of it, none trained on)"}


def _bundle(given: str | None) -> Path:
    """The bundle directory named, or the shipped one (a clear error when it is not there, or
    when the directory named holds bundles, as the daemon's ``models.directory`` does)."""
    if given is not None:
        path = Path(given)
        held = sorted(p.parent for p in path.glob("*/manifest.json"))
        if held and not (path / "manifest.json").exists():  # the daemon's models.directory
            names = ", ".join(p.name for p in held)
            raise CliError(
                f"{path}: a models directory, not a bundle: give one of its bundles, {names} "
                f"(--bundle {held[0]})"
            )
        return path
    shipped = paths.REPO_ROOT / "models" / "cu-k"
    if not (shipped / "manifest.json").is_file():
        raise CliError(f"no --bundle given and no shipped bundle at {shipped}")
    return shipped


def _load_dataset(data: str, element: str, jobs: int) -> Any:
    from xasflow.training.dataset import DatasetError, load_dataset

    try:
        ds = load_dataset(data, element, n_jobs=jobs, progress=sys.stderr.isatty())
    except DatasetError as exc:
        raise CliError(str(exc)) from None
    counts = ds.issue_counts()
    print(
        f"{ds.element}: {len(ds)} labelled spectra from {ds.n_materials} materials"
        + (
            f"; skipped {sum(counts.values())} ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))})"
            if counts
            else ""
        )
    )
    return ds


def cmd_train(args: argparse.Namespace) -> int:
    """Fit every task on a dataset and export a verified bundle."""
    from xasflow.models.bundle import BundleError, verify_bundle
    from xasflow.models.bundle_write import check_replaceable
    from xasflow.training.bundle_export import export_bundle
    from xasflow.training.fit import TrainConfig, TrainError, train

    t0 = time.perf_counter()
    json_target(args.json)
    try:  # before the training, not after it: --out is replaced whole
        check_replaceable(args.out)
    except BundleError as exc:
        raise CliError(f"--out: {exc}") from None
    if args.device != "cpu":  # before the labelling, which takes minutes
        try:
            from xasflow.training.nn import resolve_device

            resolve_device(args.device)
        except (ImportError, ValueError) as exc:
            raise CliError(f"--device: {exc}") from None
    ds = _load_dataset(args.data, args.element, args.jobs)
    cfg = TrainConfig(n_jobs=args.jobs, split_by=args.split_by, network_device=args.device)
    if args.estimators:
        cfg = cfg.model_copy(update={"n_estimators": args.estimators})
    if args.window or args.points or args.align:
        lo, hi = args.window or (cfg.prep.window_start, cfg.prep.window_stop)
        prep = cfg.prep.model_copy(
            update={
                "window_start": lo,
                "window_stop": hi,
                "n_points": args.points or cfg.prep.n_points,
                "align": args.align or cfg.prep.align,
            }
        )
        cfg = cfg.model_copy(update={"prep": type(cfg.prep).model_validate(prep.model_dump())})
    if args.augment:
        augment = type(cfg.augment).model_validate(
            {**cfg.augment.model_dump(), "copies": args.augment}
        )
        cfg = cfg.model_copy(update={"augment": augment})
    t_fit = time.perf_counter()
    try:
        result = train(ds, cfg, log=print)
        out = export_bundle(result, args.out, citation=ds.citation)  # the OmniXAS tree's
    except TrainError as exc:
        raise CliError(str(exc)) from None
    size = sum(p.stat().st_size for p in out.iterdir())
    total = time.perf_counter() - t0
    print(
        f"bundle {out} ({size / 1e6:.1f} MB); fit {time.perf_counter() - t_fit:.0f} s, "
        f"total {total:.0f} s"
    )
    write_json(
        args.json,
        {
            "bundle": str(out),
            "train_seconds": round(total, 1),
            "fit_seconds": round(result.seconds, 1),
            "timings": {k: round(v, 1) for k, v in result.timings.items()},
            "bundle_bytes": size,
            "tasks": {n: t.metrics for n, t in verify_bundle(out).tasks.items()},  # as served
        },
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Score a bundle (through ONNX) on data; JSON and an optional Markdown/PNG report.

    Data of another element than the bundle's, or of which nothing can be scored, are the
    user's to fix: exit 2 with a message, as for data that cannot be read. A reference
    table's skipped rows, unread or refused by the bundle's preparation, are listed with
    their reasons (they are few, and each one matters).
    """
    from xasflow.models.bundle import BundleError
    from xasflow.models.predictor import Predictor
    from xasflow.training.evaluate import NoTestRows, evaluate_bundle
    from xasflow.training.report import write_report

    json_target(args.json)
    report = Path(args.report) if args.report else None
    if report is not None and report.exists() and not report.is_dir():  # before the scoring
        raise CliError(f"--report {report}: not a directory (it gets report.md and the plots)")
    try:
        predictor = Predictor(_bundle(args.bundle))
    except BundleError as exc:
        raise CliError(str(exc)) from None
    element = predictor.manifest.element
    ds = _load_dataset(args.data, element, args.jobs)
    if ds.measured:
        for issue in ds.issues:
            print(f"  skipped {issue.item}: {issue.reason}: {issue.detail}")
    if ds.element != element:
        found = ds.element or "of no element"
        raise CliError(f"{args.data}: the data are {found}, the bundle is for {element}")
    try:
        ev = evaluate_bundle(predictor, ds)
    except NoTestRows as exc:
        raise CliError(f"{args.data}: {exc}") from None
    if ds.measured:
        for issue in ev.unprepared:
            print(f"  skipped {issue.item}: {issue.reason}: {issue.detail}")
    scope = _SCOPES.get(ev.scope, ev.scope)
    print(f"scored the {scope}: {ev.n_spectra} spectra of {ev.n_materials} materials")
    payload = ev.to_json(predictor.manifest)
    for name, m in ev.tasks.items():
        shown = ", ".join(f"{k} {v:.3f}" for k, v in m.items() if isinstance(v, float))
        print(f"{name:12s} {shown}")
    write_json(args.json, payload)
    if report is not None:
        try:
            print(f"wrote {write_report(report, ev, predictor.manifest)}")
        except OSError as exc:
            raise CliError(f"cannot write --report {report}: {path_problem(exc, report)}") from None
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Predict measured spectra (XDI or two columns) with a bundle."""
    from xasflow.adapters.columns import ColumnFileError, read_spectrum_file
    from xasflow.adapters.xdi import XdiError
    from xasflow.cli_text import as_json, describe_prediction, refusal
    from xasflow.models.bundle import BundleError
    from xasflow.models.predictor import HERFD_SUSPECTED, Predictor
    from xasflow.spectra import SpectrumError

    json_target(args.json)
    try:
        predictor = Predictor(_bundle(args.bundle))
    except BundleError as exc:
        raise CliError(str(exc)) from None
    results: dict[str, Any] = {}
    failed = 0
    for name in args.files:
        try:
            spectrum = read_spectrum_file(name, element=predictor.manifest.element)
            # what the user declares wins over the file: herfd (prepare() broadens it; False:
            # never, header or not) and calculated (--measured: held to a measured scan's
            # pre-edge, as an XDI file is; else a file of mu is left to the guess)
            declared = {"herfd": args.herfd, "calculated": args.calculated}
            if any(v is not None for v in declared.values()):
                meta = {k: v for k, v in declared.items() if v is not None}
                spectrum = spectrum.with_(meta={**spectrum.meta, **meta})
            pred = predictor.with_herfd_hint(spectrum, predictor.predict(spectrum))
        except (OSError, ColumnFileError, XdiError, SpectrumError) as exc:
            reason, detail, why = refusal(exc, name)
            print(f"{name}: cannot predict{why}", file=sys.stderr)
            results[name] = {"error": reason, "detail": detail}
            failed += 1
            continue
        score = "" if pred.ood_score is None else f", ood score {pred.ood_score:.3g}"
        print(
            f"{name}: E0 {pred.e0:.1f} eV{score}"
            + (f" [{', '.join(pred.flags)}]" if pred.flags else "")
        )
        herfd = spectrum.meta.get("herfd", False)
        if herfd:
            width = "tabulated width" if herfd is True else f"{herfd:g} eV"
            print(f"  HERFD: broadened to the model's resolution ({width})")
        elif HERFD_SUSPECTED in pred.flags:
            print("  HERFD? In domain once broadened as HERFD would be: if it was measured so,")
            print("  rerun with --herfd")
        print("\n".join(describe_prediction(pred, predictor.manifest)))
        results[name] = {**as_json(pred), "herfd": herfd}
    write_json(args.json, results)
    if failed:  # a script over many files must see that some were not predicted
        print(f"{failed} of {len(args.files)} files could not be predicted", file=sys.stderr)
    return 1 if failed else 0


def cmd_dataset(args: argparse.Namespace) -> int:
    """Dataset verbs: download MP XAS documents, or build (and cache) a dataset's labels."""
    if args.dataset_cmd == "fetch-mp":
        from xasflow.adapters.mp import fetch_mp_xas

        try:
            n = fetch_mp_xas(args.element, Path(args.out), api_key=args.api_key, edge=args.edge)
        except RuntimeError as exc:
            raise CliError(str(exc)) from None
        print(f"wrote {n} {args.element} {args.edge}-edge XAS documents to {args.out}")
        return 0
    ds = _load_dataset(args.data, args.element, args.jobs)
    for issue in ds.issues[: args.show_issues]:
        print(f"  {issue.item}: {issue.reason} {issue.detail}")
    return 0


def cmd_dataset_generate(args: argparse.Namespace) -> int:
    """FEFF10 spectra of every symmetry-unique site of structures, as dask tasks (resumable)."""
    from xasflow.training.generate import generate

    try:
        report = generate(
            args.structures, args.element, args.out, preset=args.preset, edge=args.edge,
            scheduler=args.scheduler, workers=args.workers, progress=sys.stderr.isatty(),
            limit=args.limit,
        )  # fmt: skip
    except OSError as exc:  # the path's problem in words, not Python's errno text
        raise CliError(path_problem(exc)) from None
    except (ValueError, RuntimeError) as exc:
        raise CliError(str(exc)) from None
    print(report.summary())
    for failure in report.failures[: args.show_issues]:
        print(f"  {failure.item}: {failure.reason} {failure.detail}")
    return 1 if report.failures and not (report.computed or report.skipped_complete) else 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every verb."""
    about = __doc__.splitlines()[0].replace("``", "")  # reST quoting is for the docs
    p = argparse.ArgumentParser(prog="xasflow", description=about)
    p.add_argument("--version", action="version", version=f"xasflow {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    default_data = str(paths.cu_feff_archive())

    t = sub.add_parser("train", help="train a per-element bundle")
    t.add_argument(
        "--data",
        default=default_data,
        help="FEFF tree (dir or .tar.gz), MP .json or reference .csv",
    )
    t.add_argument("--element", default="Cu", help="absorbing element (default Cu)")
    t.add_argument("--out", required=True, help="bundle directory to write")
    t.add_argument("--jobs", type=int, default=2, help="worker processes (labels, trees)")
    t.add_argument("--estimators", type=int, default=0, help="trees per ensemble (default: config)")
    t.add_argument(
        "--augment",
        type=int,
        default=0,
        metavar="N",
        help="N augmented copies per spectrum (Zheng: +-5 eV stretch, E0 shift, noise); default 0",
    )
    t.add_argument(
        "--window",
        type=float,
        nargs=2,
        metavar=("START", "STOP"),
        help="model window relative to its origin (E0 unless --align), eV (default -3.5 116.5; "
        "MP XANES need e.g. -3.5 41.5)",
    )
    t.add_argument("--points", type=int, default=0, help="grid points in the window (default 240)")
    t.add_argument(
        "--align",
        choices=("e0", "centroid"),
        help="the grid's origin: e0 (default) or the centroid of the edge's rise, steady where "
        "E0 jumps between two rises of nearly equal slope (xasflow.spectra.anchor)",
    )
    t.add_argument(
        "--split-by",
        choices=("formula", "material"),
        default="formula",
        help="what no two split parts share (default formula: duplicate entries and "
        "polymorphs of one composition are never scored as unseen)",
    )
    t.add_argument(
        "--device",
        default="cpu",
        help="where the networks train: cpu (default), cuda[:N], or auto (a GPU if present)",
    )
    t.add_argument("--json", help="write training figures here")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="score a bundle on data")
    e.add_argument("--bundle", default=None, help=f"bundle directory (default: {SHIPPED})")
    e.add_argument(
        "--data",
        default=default_data,
        help="labelled data (default: the shared Cu FEFF tree; a bundle trained on it is "
        "scored on its recorded test split)",
    )
    e.add_argument("--json", help="write metrics here")
    e.add_argument("--report", help="write report.md and plots into this directory")
    e.add_argument("--jobs", type=int, default=2, help="processes for labelling (default 2)")
    e.set_defaults(func=cmd_evaluate)

    r = sub.add_parser(
        "predict",
        help="predict measured spectra",
        description="Predict measured spectra. Exit status 0 when every file was predicted, "
        "1 when any could not be (each says why on stderr).",
    )
    r.add_argument("--bundle", default=None, help=f"bundle directory (default: {SHIPPED})")
    r.add_argument("files", nargs="+", help="XDI or two-column (energy eV, mu) files")
    r.add_argument("--json", help="write predictions here")
    r.add_argument(
        "--herfd",
        nargs="?",
        const=True,
        type=fwhm,
        metavar="FWHM",
        help="the spectra are HERFD: broaden by FWHM eV (default: the element's tabulated "
        "width) before predicting; put it after the files or write --herfd=FWHM",
    )
    r.add_argument(
        "--no-herfd",
        dest="herfd",
        action="store_const",
        const=False,
        help="the spectra are not HERFD, whatever a file's header says",
    )
    kind = r.add_mutually_exclusive_group()
    kind.add_argument(
        "--measured",
        dest="calculated",
        action="store_const",
        const=False,
        help="the files are measurements: a scan must start on its pre-edge, as an XDI file's "
        "must (default: XDI files and detector channels are; a file of mu is guessed)",
    )
    kind.add_argument(
        "--calculated",
        dest="calculated",
        action="store_const",
        const=True,
        help="the files are calculations (FEFF): no pre-edge background is fitted",
    )
    r.set_defaults(func=cmd_predict)

    d = sub.add_parser(
        "dataset", help="generate (FEFF10), fetch (MP) or build (label) training data"
    )
    dsub = d.add_subparsers(dest="dataset_cmd", required=True)
    f = dsub.add_parser(
        "fetch-mp", help="download Materials Project XAS documents (needs MP_API_KEY)"
    )
    f.add_argument("--element", required=True, help="absorbing element, e.g. Ni")
    f.add_argument("--edge", default="K", help="absorption edge (default K)")
    f.add_argument("--out", required=True, help="JSON file to write")
    f.add_argument("--api-key", help="default: $MP_API_KEY")
    b = dsub.add_parser("build", help="read and label a dataset (fills the label cache)")
    b.add_argument(
        "--data",
        default=default_data,
        help="FEFF tree (dir or .tar.gz), MP .json or reference .csv (default: the shared Cu tree)",
    )
    b.add_argument("--element", default="Cu", help="absorbing element (default Cu)")
    b.add_argument("--jobs", type=int, default=2, help="processes for labelling (default 2)")
    b.add_argument(
        "--show-issues", type=int, default=10, help="list this many skipped items (default 10)"
    )
    g = dsub.add_parser("generate", help="FEFF10 spectra of structures (dask; resumable)")
    g.add_argument("--element", required=True, help="absorbing element, e.g. Ni")
    g.add_argument("--edge", default="K", help="absorption edge (default K)")
    g.add_argument("--structures", required=True, help="directory or tar of CIF/POSCAR files")
    g.add_argument("--out", required=True, help="FEFF tree to write (Lightshow layout)")
    g.add_argument("--preset", default="standard", help="fast, standard or converged")
    g.add_argument("--scheduler", help="dask scheduler address (default: a LocalCluster)")
    g.add_argument("--workers", type=int, default=2, help="LocalCluster workers (default 2)")
    g.add_argument("--limit", type=int, help="only the first N structures with the element")
    g.add_argument(
        "--show-issues", type=int, default=10, help="list this many failed sites (default 10)"
    )
    g.set_defaults(func=cmd_dataset_generate)
    d.set_defaults(func=cmd_dataset)

    from xasflow.daemon.commands import add_commands
    from xasflow.models.commands import add_bundle_command
    from xasflow.sim.commands import add_demo_command

    add_bundle_command(sub)  # bundle seal | sign | verify | keygen
    add_commands(sub)  # serve
    add_demo_command(sub)  # demo
    _name_verbs(p)
    return p


def _name_verbs(parser: argparse.ArgumentParser) -> None:
    """Name each verb list by its verbs, as its usage shows it: a missing verb was said as
    "the following arguments are required: cmd" (or ``dataset_cmd``, ``bundle_cmd``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            action.metavar = action.metavar or "{" + ",".join(action.choices) + "}"
            for sub in action.choices.values():
                _name_verbs(sub)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    out = sys.stdout = QuietStdout(sys.stdout)
    try:
        args = build_parser().parse_args(argv)
        status = int(args.func(args))
        out.flush()
        return status
    except CliError as exc:
        print(f"xasflow: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        sys.stdout = out.inner


if __name__ == "__main__":
    sys.exit(main())

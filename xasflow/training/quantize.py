"""Serve a bundle's network graphs in int8, with their doubt recalibrated on what is served.

onnxruntime's dynamic quantisation stores each weight matrix as int8 (one scale per output
channel) and quantises activations per call. The Cu bundle's five-member MLP graph shrinks
from 5.5 to 1.5 MB, so one spectrum reads a quarter of the bytes and a batch runs on integer
dot products (measured in ``bench/predict.py``). The temperatures and conformal quantiles a
bundle carries were fitted on the float graph's validation outputs; they are fitted again on
the int8 graph's, so the calibration and coverage it reports are those of the graph it runs.
An out-of-domain score that reads the networks' spread (``ood.spread``) has its scales and
threshold fitted again on the int8 graphs' outputs likewise. Tree graphs and the out-of-domain
graph are left as they are. The manifest records, per graph, the sizes and how closely int8
follows float32 on the validation rows.

    python -m xasflow.training.quantize models/cu-k
"""

from __future__ import annotations

import datetime as dt
import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xasflow.models.batch import member_mean, member_spread
from xasflow.models.bundle import Manifest, OodSpec, TaskSpec
from xasflow.models.bundle_write import write_bundle
from xasflow.models.predictor import Predictor
from xasflow.models.uncertainty import spread_score
from xasflow.training.fit import task_targets
from xasflow.training.ood import fit_spread_ood
from xasflow.training.rebuild import open_for_rewrite, rebuild, rewrite_main
from xasflow.training.select import BaseOutputs, calibrate_outputs
from xasflow.training.served_metrics import with_served_metrics

INT8 = "int8"
#: What the manifest says was done (``training.quantization.method``).
METHOD = (
    "onnxruntime quantize_dynamic: int8 weights per output channel in 7 bits (reduce_range),"
    " activations per call"
)


class _Quiet(logging.Filter):
    """Drops the quantiser's advice to run its pre-processing (shapes are static here)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


def quantize_graph(graph: bytes) -> bytes:
    """``graph`` (serialised ONNX, float32 weights) with its matrix products in int8.

    Weights in 7 bits (``reduce_range``): onnxruntime's u8 x s8 products on x86 CPUs with
    AVX2 but no VNNI sum pairs in saturating 16-bit lanes, so full-range weights gave answers
    that depend on the CPU (on the test fixture, probabilities 0.045 off the float graph on
    such a CPU, 0.0016 with 7-bit weights; the shipped Cu bundle's valence ECE 0.050 on a VNNI
    machine, 0.051 on an AVX2 one). onnxruntime's quantisation guide gives this remedy.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quiet = _Quiet()
    logging.getLogger().addFilter(quiet)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "f32.onnx", Path(tmp) / "int8.onnx"
            src.write_bytes(graph)
            quantize_dynamic(
                src, dst, per_channel=True, reduce_range=True, weight_type=QuantType.QInt8
            )
            return dst.read_bytes()
    finally:
        logging.getLogger().removeFilter(quiet)


def agreement(
    before: dict[str, np.ndarray], after: dict[str, np.ndarray], task_outputs: Sequence[str]
) -> dict[str, dict[str, float]]:
    """Per task output: the largest absolute difference between the two graphs' answers, and
    for outputs of several columns the fraction of rows whose largest column is the same."""
    out: dict[str, dict[str, float]] = {}
    for name in task_outputs:
        a, b = np.asarray(before[name], float), np.asarray(after[name], float)
        entry = {"max_abs_diff": float(np.max(np.abs(a - b)))}
        if a.ndim == 2 and a.shape[1] > 1:
            entry["argmax_agreement"] = float(np.mean(a.argmax(1) == b.argmax(1)))
        out[name] = entry
    return out


def _outputs(spec: TaskSpec, raw: dict[str, dict[str, np.ndarray]], n: int) -> BaseOutputs:
    """A task's served average on a batch (the daemon's own member averaging), as training's
    selection saw its candidates."""
    mean = member_mean(raw, spec, n)
    return BaseOutputs(
        mean[:, 0] if spec.kind == "regressor" else mean, member_spread(raw, spec, n)
    )


def recalibrate(
    manifest: Manifest,
    raw: dict[str, dict[str, np.ndarray]],
    targets: dict[str, tuple[str, np.ndarray, np.ndarray]],
) -> dict[str, TaskSpec]:
    """Every calibrated task's temperature and conformal spec refitted on ``raw`` (the served
    graphs' outputs on the validation rows, whose labels ``targets`` holds)."""
    n = len(next(iter(targets.values()))[1])
    specs = dict(manifest.tasks)
    for name, spec in manifest.tasks.items():
        if spec.conformal is None and spec.temperature is None:
            continue
        _, y, valid = targets[name]
        out = _outputs(spec, raw, n)
        keep = BaseOutputs(out.mean[valid], None if out.std is None else out.std[valid])
        alpha = spec.conformal.alpha if spec.conformal is not None else 0.1
        method = spec.conformal.method if spec.conformal is not None else "aps"
        temperature, conformal = calibrate_outputs(
            spec.kind, spec.classes, keep, y[valid], alpha, method
        )
        update: dict[str, Any] = {  # what the bundle had, refitted; nothing added
            "temperature": temperature if spec.temperature is not None else None,
            "conformal": conformal if spec.conformal is not None else None,
        }
        specs[name] = spec.model_copy(update=update)
    return specs


def _spread_inputs(
    ood: OodSpec, raw: dict[str, dict[str, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray]:
    """The two signals of a spread-combined score on a batch: graph score and summed spread."""
    assert ood.spread is not None
    recon = np.asarray(raw[ood.file][ood.output], dtype=np.float64).reshape(-1)
    return recon, spread_score([raw[f][o] for f, o in ood.spread.outputs])


def refit_spread(
    ood: OodSpec,
    raw_val: dict[str, dict[str, np.ndarray]],
    raw_test: dict[str, dict[str, np.ndarray]] | None = None,
) -> OodSpec:
    """``ood``'s spread-combined score with scales and threshold fitted again on ``raw_val``
    as training fits them (:func:`fit_spread_ood`), its test flag rate from ``raw_test``."""
    assert ood.spread is not None
    fraction = float(ood.details["flag_fraction"])
    fitted = fit_spread_ood(ood.spread.outputs, *_spread_inputs(ood, raw_val), fraction)
    stats = dict(fitted.stats)
    if raw_test is not None:
        flags = fitted.score(*_spread_inputs(ood, raw_test)) > fitted.threshold
        stats["test_flagged_fraction"] = float(np.mean(flags))
    return ood.model_copy(
        update={
            "threshold": fitted.threshold,
            "recon_scale": fitted.recon_scale,
            "spread": ood.spread.model_copy(update={"scale": fitted.spread_scale}),
            "details": {**ood.details, **stats},
        }
    )


def _agree(name: str, pairs: list[tuple[float | None, float | None]]) -> None:
    """Each recorded value (first) is given back by the refit (second) to 1e-3, or refused."""
    for was, now in pairs:
        if (was is None) != (now is None) or (
            was is not None and now is not None and abs(now - was) > 1e-3 * abs(was)
        ):
            raise ValueError(
                f"{name}: refitting the float graphs gives {now}, the bundle records {was}: "
                "not the data or code the bundle was made with"
            )


def check_reproduced(
    manifest: Manifest, refitted: dict[str, TaskSpec], ood: OodSpec | None = None
) -> None:
    """The float graphs' refit must give the recorded calibration (to 1e-3), or the data or
    code differ from the bundle's and a refit on the int8 graphs would mean nothing."""
    for name, spec in refitted.items():
        old = manifest.tasks[name]
        pairs = [(old.temperature, spec.temperature)]
        if old.conformal is not None and spec.conformal is not None:
            pairs.append((old.conformal.qhat, spec.conformal.qhat))
        _agree(name, pairs)
    was = manifest.ood
    if ood is not None and was is not None and was.spread is not None and ood.spread is not None:
        scales = [(was.recon_scale, ood.recon_scale), (was.spread.scale, ood.spread.scale)]
        _agree("ood", [(was.threshold, ood.threshold), *scales])


def quantize_bundle(
    bundle: str | Path,
    out: str | Path | None = None,
    data: str | Path | None = None,
    signing_key: str | bytes | Path | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Write ``bundle`` (to ``out``, default: in place) with int8 network graphs, recalibrated."""
    bundle, manifest = open_for_rewrite(bundle, signing_key, "quantising")
    nets = {
        m.file: m
        for spec in manifest.tasks.values()
        for m in spec.graph_members()
        if m.kind in ("mlp", "cnn")
    }
    if not nets:
        raise ValueError(f"{manifest.bundle_id} serves no network graph to quantise")
    if any(m.precision == INT8 for m in nets.values()):
        raise ValueError(f"{manifest.bundle_id} is already quantised")
    rebuilt = rebuild(manifest, data)
    x_val = rebuilt.inputs("val").astype(np.float32)
    files = {name: (bundle / name).read_bytes() for name in manifest.files}
    before = Predictor(bundle).run(x_val)
    record: dict[str, Any] = {}
    for name in nets:
        float_bytes = len(files[name])
        files[name] = quantize_graph(files[name])
        record[name] = {"bytes_float32": float_bytes, "bytes_int8": len(files[name])}
    ood = manifest.ood
    spread = ood if ood is not None and ood.spread is not None else None
    with tempfile.TemporaryDirectory() as tmp:  # the new graphs, verified like any bundle
        draft = write_bundle(Path(tmp) / "draft", manifest, files)
        after = Predictor(draft).run(x_val)
        if spread is not None:  # the spread score reads the int8 graphs: refitted on them
            test = Predictor(draft).run(rebuilt.inputs("test").astype(np.float32))
            ood = refit_spread(spread, after, test)
    outputs = sorted({m.output for s in manifest.tasks.values() for m in s.graph_members()})
    for name in nets:
        mine = [o for o in outputs if o in before[name]]
        record[name]["validation_agreement"] = agreement(before[name], after[name], mine)
    targets = task_targets(rebuilt.dataset, rebuilt.parts["val"])
    check_reproduced(
        manifest,
        recalibrate(manifest, before, targets),
        refit_spread(spread, before) if spread is not None else None,
    )
    tasks = recalibrate(manifest, after, targets)
    for name, spec in tasks.items():
        members = [
            m.model_copy(update={"precision": INT8}) if m.file in nets else m
            for m in spec.graph_members()
        ]
        tasks[name] = spec.model_copy(update={"members": members})
        old, new = manifest.tasks[name], tasks[name]
        if new.conformal is not None and old.conformal is not None:
            log(f"{name}: qhat {old.conformal.qhat:.4g} -> {new.conformal.qhat:.4g}")
    quantization = {
        "method": METHOD,
        "graphs": record,
        "calibration": "refitted on the int8 graphs' validation outputs",
        "date": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
    }
    if spread is not None and ood is not None:
        quantization["ood"] = "spread scale and threshold refitted on the int8 graphs' outputs"
        log(f"ood: threshold {spread.threshold:.4g} -> {ood.threshold:.4g}")
    training = {**manifest.training, "quantization": quantization}
    for name, rec in record.items():
        log(f"{name}: {rec['bytes_float32']} -> {rec['bytes_int8']} bytes")
    quantised = manifest.model_copy(update={"tasks": tasks, "ood": ood, "training": training})
    return write_bundle(
        bundle if out is None else out,
        with_served_metrics(quantised, files, rebuilt.dataset, log),  # the int8 graphs' figures
        files,
        signing_key=signing_key,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: quantise one bundle directory."""
    return rewrite_main(quantize_bundle, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())

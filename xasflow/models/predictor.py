"""The ``Predictor``: a verified bundle's ONNX graphs applied to a ``Spectrum``.

Only onnxruntime and numpy run here (no scikit-learn, no torch, no pickle), so the daemon
can load bundles safely. Preprocessing is ``xasflow.spectra.prepare`` with the manifest's
parameters, the same call training made.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from xasflow.models.bundle import Manifest, TaskSpec, verify_bundle
from xasflow.spectra import Prepared, Spectrum, SpectrumError, model_input, prepare

#: The flag a prediction carries when its spectrum lies outside what the bundle was trained on.
OUT_OF_DOMAIN = "out_of_domain"


@dataclass(frozen=True)
class TaskResult:
    """One task's answer and its doubt.

    ``probabilities`` (classifiers, calibrated) or ``ranking`` (multi-output); classifiers may
    carry a conformal ``prediction_set`` (the labels that together hold the true one with the
    bundle's coverage, e.g. 90 %), regressors a conformal ``interval`` (low, high).
    """

    value: Any
    probabilities: dict[str, float] | None = None
    ranking: list[tuple[str, float]] | None = None
    prediction_set: list[Any] | None = None
    interval: tuple[float, float] | None = None

    @property
    def confidence(self) -> float | None:
        """Probability of the predicted class, or None for regressors."""
        if self.probabilities is None:
            return None
        return max(self.probabilities.values())


@dataclass(frozen=True)
class Prediction:
    """Everything a bundle says about one spectrum."""

    bundle_id: str
    element: str
    edge: str
    e0: float
    edge_step: float
    results: dict[str, TaskResult]
    flags: list[str] = field(default_factory=list)
    ood_score: float | None = None  # higher is further from the training data; see manifest

    @property
    def out_of_domain(self) -> bool:
        """Whether the spectrum lies outside what the bundle was trained on."""
        return OUT_OF_DOMAIN in self.flags

    def __getitem__(self, task: str) -> TaskResult:
        return self.results[task]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view (used by the CLI, the daemon's documents and the dashboard)."""
        tasks: dict[str, Any] = {}
        for name, res in self.results.items():
            entry: dict[str, Any] = {"value": res.value}
            if res.probabilities is not None:
                entry["probabilities"] = res.probabilities
            if res.ranking is not None:
                entry["ranking"] = [[label, score] for label, score in res.ranking]
            if res.prediction_set is not None:
                entry["prediction_set"] = list(res.prediction_set)
            if res.interval is not None:
                entry["interval"] = [res.interval[0], res.interval[1]]
            tasks[name] = entry
        return {
            "bundle_id": self.bundle_id,
            "element": self.element,
            "edge": self.edge,
            "e0": self.e0,
            "edge_step": self.edge_step,
            "flags": list(self.flags),
            "ood_score": self.ood_score,
            "tasks": tasks,
        }


def _plain(value: Any) -> Any:
    """numpy scalars to Python scalars (for JSON and equality)."""
    return value.item() if isinstance(value, np.generic) else value


class Predictor:
    """Loads and verifies a bundle once; predicts spectra of its element and edge."""

    def __init__(self, bundle_dir: str | Path, threads: int = 1) -> None:
        self.path = Path(bundle_dir)
        self.manifest: Manifest = verify_bundle(self.path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self._sessions: dict[str, ort.InferenceSession] = {}
        for name, task in self.manifest.tasks.items():
            data = (self.path / task.file).read_bytes()
            if task.file.endswith(".gz"):  # tree graphs compress 5-10x; shipped bundles use it
                data = gzip.decompress(data)
            self._sessions[name] = ort.InferenceSession(
                data, sess_options=opts, providers=["CPUExecutionProvider"]
            )
        self._outputs = {
            name: [o.name for o in sess.get_outputs()] for name, sess in self._sessions.items()
        }

    @property
    def bundle_id(self) -> str:
        """The manifest's bundle id."""
        return self.manifest.bundle_id

    def accepts(self, spectrum: Spectrum) -> bool:
        """Whether this bundle is for the spectrum's element and edge."""
        return spectrum.element == self.manifest.element and spectrum.edge == self.manifest.edge

    def prepare(self, spectrum: Spectrum) -> Prepared:
        """The manifest's preprocessing of one spectrum (raises SpectrumError with a reason)."""
        if spectrum.element is None:
            spectrum = spectrum.with_(element=self.manifest.element)
        if not self.accepts(spectrum):
            raise SpectrumError(
                "no_model",
                f"bundle {self.bundle_id} is for {self.manifest.element} {self.manifest.edge}, "
                f"not {spectrum.element} {spectrum.edge}",
            )
        return prepare(spectrum, self.manifest.prep)

    def run(self, x: np.ndarray) -> dict[str, list[Any]]:
        """Raw ONNX outputs per task for a batch of model inputs ``x`` (float32, (n, width))."""
        m = self.manifest
        return {name: sess.run(None, {m.input_name: x}) for name, sess in self._sessions.items()}

    def predict(self, spectrum: Spectrum) -> Prediction:
        """Prepare and predict one spectrum."""
        return self.predict_prepared([self.prepare(spectrum)])[0]

    def predict_prepared(self, prepared: list[Prepared]) -> list[Prediction]:
        """Predict already-prepared spectra in one batch per task."""
        m = self.manifest
        y = np.vstack([p.y for p in prepared])
        raw = self.run(model_input(y, m.features, m.prep))
        out: list[Prediction] = []
        for i, prep in enumerate(prepared):
            results = {name: self._decode(m.tasks[name], raw[name], i) for name in m.tasks}
            flags = []
            if prep.extrapolated > 0:
                flags.append(f"extrapolated_{prep.extrapolated:.1f}eV")
            out.append(
                Prediction(
                    bundle_id=m.bundle_id,
                    element=m.element,
                    edge=m.edge,
                    e0=prep.e0,
                    edge_step=prep.edge_step,
                    results=results,
                    flags=flags,
                )
            )
        return out

    @staticmethod
    def _decode(task: TaskSpec, outputs: list[Any], i: int) -> TaskResult:
        """Turn row ``i`` of a task's ONNX outputs into a TaskResult."""
        if task.kind == "classifier":
            probs = np.asarray(outputs[1])[i]
            classes = task.classes or []
            prob_map = {str(c): float(p) for c, p in zip(classes, probs, strict=True)}
            return TaskResult(value=_plain(classes[int(np.argmax(probs))]), probabilities=prob_map)
        values = np.asarray(outputs[0])[i].ravel()
        if task.kind == "regressor":
            return TaskResult(value=float(values[0]))
        names = task.outputs or [str(k) for k in range(values.size)]
        order = np.argsort(-values, kind="stable")
        thr = task.threshold if task.threshold is not None else -np.inf
        ranking = [(names[k], float(values[k])) for k in order if values[k] >= thr]
        top = names[int(order[0])]
        return TaskResult(value=top, ranking=ranking)

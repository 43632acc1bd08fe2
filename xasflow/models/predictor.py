"""The ``Predictor``: a verified bundle's ONNX graphs applied to a ``Spectrum``.

Only onnxruntime and numpy run here (no scikit-learn, no torch, no pickle), so the daemon
can load bundles safely. Preprocessing is ``xasflow.spectra.prepare`` with the manifest's
parameters, the same call training made. Every graph file runs once per batch; a task
averages its members' outputs, calibrates them (temperature) and attaches its conformal set
or interval; the out-of-domain graph scores the batch; CN and the CN-motif label are decoded
jointly so they never contradict each other.
"""

from __future__ import annotations

import dataclasses
import hashlib
from functools import cached_property
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from xasflow.models.batch import TaskArrays, batch_size, decode_batch
from xasflow.models.bundle import GRAPH_LIMIT, BundleError, Manifest, verify_bundle
from xasflow.models.graphs import join, prune
from xasflow.models.integrity import MAX_GRAPH_BYTES, gunzip_limited, read_limited
from xasflow.models.plan import plan_for
from xasflow.models.results import OUT_OF_DOMAIN, Prediction, TaskResult
from xasflow.models.single import decode_one
from xasflow.models.views import join_views, view_counts, view_rows
from xasflow.spectra import Prepared, Spectrum, SpectrumError, model_input, prepare
from xasflow.spectra.quality import edge_snr

__all__ = ["HERFD_SUSPECTED", "OUT_OF_DOMAIN", "Prediction", "Predictor", "TaskResult"]

#: Added to an out-of-domain prediction whose spectrum, broadened as a HERFD one would be,
#: is in domain, also with its measured point noise put back: "was this measured as HERFD?
#: Declare it." (a hint, never an answer).
HERFD_SUSPECTED = "herfd_suspected"
#: Noisy copies of the broadened spectrum the hint compares with (fixed seed, majority vote):
#: the hint is withheld when the measured point noise alone puts them out of domain.
HINT_NOISE_DRAWS = 3


class Predictor:
    """Loads and verifies a bundle once; predicts spectra of its element and edge."""

    def __init__(
        self,
        bundle_dir: str | Path,
        threads: int = 1,
        *,
        require_digest: bool = True,
        min_edge_snr: float | None = None,
        all_outputs: bool = False,
        max_graph_bytes: int = MAX_GRAPH_BYTES,
    ) -> None:
        """``require_digest``: refuse a manifest without its ``manifest.sha256`` (off only
        where the caller compares the manifest with one verified that way, see
        :attr:`manifest_digest`); every graph file is checked against the manifest anyway.
        ``min_edge_snr``: the operator's edge-against-noise limit instead of the bundle's.
        The graphs serve the outputs the manifest reads, joined into one session where the
        files allow (:mod:`xasflow.models.graphs`); ``all_outputs`` runs every output of every
        file, each on its own session, for the steps that compare or refit graphs.
        ``max_graph_bytes``: no graph file is read past this size, nor a ``.gz`` one
        decompressed past it (``too_large``; the daemon's ``models.max_graph_mb``)."""
        self.path = Path(bundle_dir)
        #: the size limit its graph files were read under (the preparation process reuses it)
        self.max_graph_bytes = max_graph_bytes
        self.manifest: Manifest = verify_bundle(
            self.path, require_digest=require_digest, max_graph_bytes=max_graph_bytes
        )
        #: the preparation this predictor applies: the manifest's, with the operator's limit
        self.prep = (
            self.manifest.prep
            if min_edge_snr is None
            else self.manifest.prep.model_copy(update={"min_edge_snr": float(min_edge_snr)})
        )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        models: dict[str, onnx.ModelProto] = {}
        for name in sorted(self.manifest.graph_files()):
            data = read_limited(self.path / name, max_graph_bytes, GRAPH_LIMIT)
            # the bytes loaded are the bytes checked: a file swapped between the bundle's
            # verification and this read is refused, not served
            if hashlib.sha256(data).hexdigest() != self.manifest.files.get(name):
                raise BundleError(
                    f"{self.path}: {name} changed after the bundle was verified; refusing it",
                    "file_mismatch",
                )
            if name.endswith(".gz"):  # tree graphs compress 5-10x; shipped bundles use it
                data = gunzip_limited(data, max_graph_bytes, str(self.path / name), GRAPH_LIMIT)
            models[name] = onnx.load_from_string(data)
        if not all_outputs:
            served = self.manifest.served_outputs()
            models = {name: prune(m, served[name]) for name, m in models.items() if name in served}
        joined = None if all_outputs or len(models) < 2 else join(models, self.manifest.input_name)
        #: per session, its outputs as (graph file, output name)
        self._sessions: list[tuple[ort.InferenceSession, list[tuple[str, str]]]] = []
        parts = (
            [joined]
            if joined is not None
            else [
                (m, {o.name: (name, o.name) for o in m.graph.output}) for name, m in models.items()
            ]
        )
        for model, names in parts:
            sess = ort.InferenceSession(
                model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"]
            )
            self._sessions.append((sess, [names[o.name] for o in sess.get_outputs()]))
        self._files = list(models)

    @cached_property
    def manifest_digest(self) -> str:
        """sha256 of the parsed manifest (its JSON): equal digests, equal graph files, since
        each file was checked against the manifest's own digest of it."""
        return hashlib.sha256(self.manifest.model_dump_json().encode()).hexdigest()

    @property
    def bundle_id(self) -> str:
        """The manifest's bundle id."""
        return self.manifest.bundle_id

    def accepts(self, spectrum: Spectrum) -> bool:
        """Whether this bundle is for the spectrum's element and edge (as the registry files
        it: symbols capitalised, edges upper-case, whatever the manifest's spelling)."""
        m = self.manifest
        return (str(spectrum.element).strip().capitalize(), str(spectrum.edge).strip().upper()) == (
            m.element.strip().capitalize(),
            m.edge.strip().upper(),
        )

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
        return prepare(spectrum, self.prep)

    def run(self, x: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
        """Raw outputs of the graph files for a batch of model inputs ``x`` (float32, (n, width)):
        file -> output -> array; the outputs the decoder reads, or all with ``all_outputs``."""
        feed = {self.manifest.input_name: x}
        raw: dict[str, dict[str, np.ndarray]] = {name: {} for name in self._files}
        for sess, names in self._sessions:
            for (file, output), value in zip(names, sess.run(None, feed), strict=True):
                raw[file][output] = value
        return raw

    def infer(
        self, x: np.ndarray, counts: np.ndarray | None = None
    ) -> tuple[dict[str, TaskArrays], np.ndarray | None]:
        """Per task the decoded batch (calibrated, with sets/intervals) and the OOD scores;
        ``counts``: rows of ``x`` per spectrum, when spectra have alternate grids (their
        outputs joined, :func:`~xasflow.models.views.join_views`)."""
        raw = self.run(x)
        return decode_batch(
            self.manifest, raw if counts is None else join_views(self.manifest, raw, counts)
        )

    def predict(self, spectrum: Spectrum) -> Prediction:
        """Prepare and predict one spectrum."""
        return self.predict_prepared([self.prepare(spectrum)])[0]

    def with_herfd_hint(self, spectrum: Spectrum, prediction: Prediction) -> Prediction:
        """``prediction`` with :data:`HERFD_SUSPECTED` added when it is out of domain, the
        spectrum was not declared HERFD, the same spectrum broadened as HERFD (the element's
        tabulated width) is in domain, and so is that broadened spectrum with the spectrum's
        measured point noise put back (:meth:`_noise_explains`): broadening smooths noise
        too, and a conventional scan made out of domain by its noise alone (5 % of the step:
        measured CuO, azurite) is no HERFD one. Costs up to 1 + :data:`HINT_NOISE_DRAWS`
        predictions, out of domain only. On the shipped Cu bundle: the simulated-HERFD demo
        Cu2O, CuAl2O4 and Cu in MgO get it (also with noise of 0.5 and 2 % of the step);
        measured Cu metal, CuS and Cu2S, the chloride, and noisy conventional oxides do not.
        """
        if not prediction.out_of_domain or spectrum.meta.get("herfd"):
            return prediction
        try:
            prepared = self.prepare(spectrum.with_(meta={**spectrum.meta, "herfd": True}))
        except SpectrumError:  # no tabulated width, or the broadened one cannot be prepared
            return prediction
        if self.predict_prepared([prepared])[0].out_of_domain:
            return prediction
        if self._noise_explains(spectrum, prediction, prepared.spectrum):
            return prediction
        return dataclasses.replace(prediction, flags=[*prediction.flags, HERFD_SUSPECTED])

    def _noise_explains(
        self, spectrum: Spectrum, prediction: Prediction, broadened: Spectrum
    ) -> bool:
        """Whether ``spectrum``'s point noise alone puts it out of domain: ``broadened`` (its
        HERFD-broadened version, in domain) with fresh noise of the measured size (the edge
        SNR's estimate, :func:`~xasflow.spectra.quality.edge_snr`) is out of domain in most of
        :data:`HINT_NOISE_DRAWS` fixed-seed draws (one that cannot be prepared counts as out).
        The broadened spectrum keeps part of its own noise, so the control carries a little
        more than was measured: in doubt, no hint. No measurable noise: False."""
        rel = spectrum.energy - prediction.e0
        snr = edge_snr(rel, np.asarray(spectrum.mu, dtype=np.float64), prediction.edge_step)
        if not np.isfinite(snr) or snr <= 0:
            return False
        sigma = abs(prediction.edge_step) / snr
        draws = np.random.default_rng(0).standard_normal((HINT_NOISE_DRAWS, broadened.mu.size))
        prepared, out = [], 0
        for z in draws:
            try:
                prepared.append(self.prepare(broadened.with_(mu=broadened.mu + sigma * z)))
            except SpectrumError:  # noise that breaks the preparation: out of domain too
                out += 1
        if prepared:
            out += sum(p.out_of_domain for p in self.predict_prepared(prepared))
        return 2 * out > HINT_NOISE_DRAWS

    def predict_prepared(self, prepared: list[Prepared]) -> list[Prediction]:
        """Predict already-prepared spectra in one batch (one call per graph file)."""
        return self.predictions(prepared, self.run(self.model_input(prepared)))

    def model_input(self, prepared: list[Prepared]) -> np.ndarray:
        """The graphs' input for prepared spectra: one row each, and one per alternate grid
        (``prep.e0_rivals``; :func:`~xasflow.models.views.view_rows`)."""
        m = self.manifest
        return model_input(np.vstack(view_rows(prepared)), m.features, m.prep)

    def predictions(
        self, prepared: list[Prepared], raw: dict[str, dict[str, np.ndarray]]
    ) -> list[Prediction]:
        """``prepared``'s predictions from the graphs' outputs ``raw`` on their
        :meth:`model_input` (run here, or in the daemon's preparation process)."""
        m = self.manifest
        threshold = m.ood.threshold if m.ood is not None else None
        if batch_size(raw) != len(prepared):  # a spectrum's views joined into its row
            raw = join_views(m, raw, view_counts([p.alternates for p in prepared]))
        one = decode_one(plan_for(m), raw) if batch_size(raw) == 1 else None
        if one is not None:  # Python floats after the block: numpy's overhead per call is
            rows = {name: [result] for name, result in one[0].items()}  # most of one row's time
            scores = None if m.ood is None else [one[1]]
        else:
            tasks, ood = decode_batch(m, raw)
            rows = {name: arrays.results() for name, arrays in tasks.items()}
            scores = ood.tolist() if ood is not None else None
        out: list[Prediction] = []
        for i, prep in enumerate(prepared):
            results = {name: task_rows[i] for name, task_rows in rows.items()}
            flags = []
            if prep.extrapolated > 0:
                flags.append(f"extrapolated_{prep.extrapolated:.1f}eV")
            score = None if scores is None else scores[i]
            if score is not None and threshold is not None and not score <= threshold:
                flags.append(OUT_OF_DOMAIN)  # NaN scores are out of domain too
            out.append(
                Prediction.make(
                    m.bundle_id, m.element, m.edge, prep.e0, prep.edge_step, results, flags, score
                )
            )
        return out

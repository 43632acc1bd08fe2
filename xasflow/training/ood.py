"""Out-of-domain scorer: how far a gridded spectrum lies from the bundle's training spectra.

A principal-component model of the training spectra (on an energy window, each spectrum first
divided by its mean there, so an edge-step error alone does not move it) gives a score per
spectrum; the threshold is the validation quantile that flags at most ``flag_fraction`` of
in-domain spectra. Methods: ``recon`` (squared PCA reconstruction error), ``mahalanobis``
(in the k-component space) and ``ppca`` (their sum under probabilistic PCA). The scorer is
exported as a small ONNX graph on the bundle input ``x`` and also runs as the numpy formula
:func:`xasflow.models.uncertainty.ood_score`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from xasflow.models import uncertainty as U
from xasflow.training.export import TARGET_OPSET

METHODS = ("recon", "mahalanobis", "ppca")
#: The chosen scorer, measured against the alternatives in ``bench/ood.py`` on the shared Cu
#: data: PCA reconstruction error of the mean-normalised spectrum from E0-3.5 to E0+60 eV.
DEFAULT_METHOD = "recon"
DEFAULT_COMPONENTS = 10
DEFAULT_WINDOW_EV = (-3.5, 60.0)


@dataclass(frozen=True)
class OodScorer:
    """A fitted OOD scorer; ``score(x) > threshold`` means out of domain."""

    method: str
    start: int  # window: columns start:stop of the model input
    stop: int
    normalise: bool
    mean: np.ndarray  # (d,) mean of the (normalised) training window
    components: np.ndarray  # (k, d) principal axes
    inv_scale: np.ndarray  # (k,) per-component weight of the Mahalanobis term (0 for recon)
    residual_weight: float  # weight of the squared reconstruction error (0 for mahalanobis)
    threshold: float
    flag_fraction: float
    stats: dict[str, Any] = field(default_factory=dict)
    norm_window: tuple[int, int] | None = None  # columns whose mean divides; None: ``start:stop``
    smooth: float = 0.0  # Gaussian sigma (columns) the window is smoothed with first; 0: none

    @property
    def smoother(self) -> np.ndarray | None:
        """The window's smoothing matrix (:func:`~xasflow.models.uncertainty.smoothing_matrix`)."""
        return U.smoothing_matrix(self.stop - self.start, self.smooth) if self.smooth > 0 else None

    @property
    def _norm(self) -> tuple[int, int]:
        return self.norm_window if self.norm_window is not None else (self.start, self.stop)

    @property
    def width(self) -> int:
        """Columns of the model input the scorer reads."""
        return max(self.stop, self._norm[1])

    @property
    def n_components(self) -> int:
        """Number of principal components kept."""
        return int(self.components.shape[0])

    def score(self, x: np.ndarray) -> np.ndarray:
        """One score per row of the model input ``x`` ((n, width) or (width,))."""
        xs = np.atleast_2d(np.asarray(x, dtype=np.float64))
        if xs.shape[1] < self.width:
            raise ValueError(f"x has {xs.shape[1]} columns; the scorer needs {self.width}")
        return U.ood_score(xs, **self.runtime())

    def runtime(self) -> dict[str, Any]:
        """Keyword arguments of :func:`xasflow.models.uncertainty.ood_score` (numpy path)."""
        return {
            "mean": self.mean,
            "components": self.components,
            "inv_scale": self.inv_scale,
            "residual_weight": self.residual_weight,
            "window": (self.start, self.stop),
            "norm_window": self._norm if self.normalise else None,
            "smoother": self.smoother,
        }

    def flags(self, x: np.ndarray) -> np.ndarray:
        """True where a row is out of domain."""
        return self.score(x) > self.threshold

    def spec(self) -> dict[str, Any]:
        """JSON-able description for the bundle manifest (the arrays live in the ONNX graph)."""
        return {
            "method": self.method,
            "n_components": self.n_components,
            "window_columns": [self.start, self.stop],
            "normalise": self.normalise,
            "norm_columns": list(self._norm) if self.normalise else None,
            "threshold": self.threshold,
            "flag_fraction": self.flag_fraction,
            **({"smooth_columns": self.smooth} if self.smooth > 0 else {}),
            **self.stats,
        }

    def to_onnx(self, input_width: int, input_name: str = "x") -> bytes:
        """Serialized ONNX graph: ``x`` float32 [batch, input_width] -> ``ood_score`` [batch].

        A row that cannot be normalised (zero mean) comes out NaN or infinite: treat any
        non-finite score as out of domain, as the numpy path does.
        """
        if input_width < self.width:
            raise ValueError(f"input width {input_width} is narrower than the window {self.width}")
        f32 = np.float32
        inits = [
            numpy_helper.from_array(np.array([self.start], np.int64), "win_start"),
            numpy_helper.from_array(np.array([self.stop], np.int64), "win_stop"),
            numpy_helper.from_array(np.array([1], np.int64), "axis1"),
            numpy_helper.from_array(np.array([self._norm[0]], np.int64), "norm_start"),
            numpy_helper.from_array(np.array([self._norm[1]], np.int64), "norm_stop"),
            numpy_helper.from_array(self.mean.astype(f32), "pca_mean"),
            numpy_helper.from_array(self.components.T.astype(f32), "pca_axes_t"),
            numpy_helper.from_array(self.components.astype(f32), "pca_axes"),
            numpy_helper.from_array(self.inv_scale.astype(f32), "inv_scale"),
            numpy_helper.from_array(np.array(self.residual_weight, f32), "residual_weight"),
        ]
        nodes = [helper.make_node("Slice", [input_name, "win_start", "win_stop", "axis1"], ["w"])]
        if self.normalise:
            nodes += [
                helper.make_node(
                    "Slice", [input_name, "norm_start", "norm_stop", "axis1"], ["n_cols"]
                ),
                helper.make_node("ReduceMean", ["n_cols"], ["w_mean"], axes=[1], keepdims=1),
                helper.make_node("Div", ["w", "w_mean"], ["w_norm"]),
            ]
        w = "w_norm" if self.normalise else "w"
        smoother = self.smoother
        if smoother is not None:
            inits.append(numpy_helper.from_array(smoother.T.astype(f32), "smooth_t"))
            nodes.append(helper.make_node("MatMul", [w, "smooth_t"], ["w_smooth"]))
            w = "w_smooth"
        nodes += [
            helper.make_node("Sub", [w, "pca_mean"], ["c"]),
            helper.make_node("MatMul", ["c", "pca_axes_t"], ["z"]),
            helper.make_node("Mul", ["z", "inv_scale"], ["zs"]),
            helper.make_node("Mul", ["zs", "zs"], ["zs2"]),
            helper.make_node("ReduceSum", ["zs2", "axis1"], ["t2"], keepdims=0),
            helper.make_node("MatMul", ["z", "pca_axes"], ["c_hat"]),
            helper.make_node("Sub", ["c", "c_hat"], ["r"]),
            helper.make_node("Mul", ["r", "r"], ["r2"]),
            helper.make_node("ReduceSum", ["r2", "axis1"], ["q"], keepdims=0),
            helper.make_node("Mul", ["q", "residual_weight"], ["qw"]),
            helper.make_node("Add", ["t2", "qw"], ["ood_score"]),
        ]
        graph = helper.make_graph(
            nodes,
            "ood",
            [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", input_width])],
            [helper.make_tensor_value_info("ood_score", TensorProto.FLOAT, ["batch"])],
            initializer=inits,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", TARGET_OPSET[""])],
            producer_name="xasflow.training.ood",
        )
        model.ir_version = 8  # readable by every onnxruntime the project supports
        onnx.checker.check_model(model)
        return model.SerializeToString()


@dataclass(frozen=True)
class SpreadOod:
    """The reconstruction score combined with the networks' disagreement (``ood.spread``).

    ``score = max(recon / recon_scale, spread / spread_scale)``, each scale its signal's own
    validation quantile, and ``threshold`` the combined score's, so at most ``flag_fraction``
    of validation is flagged in all (:func:`xasflow.models.uncertainty.combined_ood`).
    """

    outputs: list[
        tuple[str, str]
    ]  # (graph file, output) of the spread, e.g. ("mlp.onnx", "cn_std")
    recon_scale: float
    spread_scale: float
    threshold: float
    stats: dict[str, Any] = field(default_factory=dict)

    def score(self, recon: np.ndarray, spread: np.ndarray) -> np.ndarray:
        """The combined score from the reconstruction scores and the summed spreads."""
        return U.combined_ood(recon, self.recon_scale, spread, self.spread_scale)


def _quantile_threshold(scores: np.ndarray, flag_fraction: float) -> float:
    """The (ceil((1-f) n))-th smallest score: at most a fraction f of ``scores`` lies above it."""
    rank = max(1, math.ceil((1 - flag_fraction) * len(scores)))
    return float(np.sort(np.asarray(scores, dtype=np.float64))[rank - 1])


def fit_spread_ood(
    outputs: list[tuple[str, str]],
    recon_val: np.ndarray,
    spread_val: np.ndarray,
    flag_fraction: float = 0.05,
) -> SpreadOod:
    """Scales and threshold of the combined score from in-domain validation rows."""
    recon_val = np.asarray(recon_val, dtype=np.float64)
    spread_val = np.asarray(spread_val, dtype=np.float64)
    if len(recon_val) == 0 or recon_val.shape != spread_val.shape:
        raise ValueError("recon_val and spread_val must be equally long and not empty")
    if not 0 < flag_fraction < 1:
        raise ValueError("flag_fraction must be in (0, 1)")
    r_scale = max(_quantile_threshold(recon_val, flag_fraction), 1e-12)
    s_scale = max(_quantile_threshold(spread_val, flag_fraction), 1e-12)
    combined = U.combined_ood(recon_val, r_scale, spread_val, s_scale)
    threshold = _quantile_threshold(combined, flag_fraction)
    stats = {
        "val_flagged_fraction": float(np.mean(combined > threshold)),
        "val_flagged_by_spread": float(np.mean(spread_val / s_scale > threshold)),
        "val_flagged_by_recon": float(np.mean(recon_val / r_scale > threshold)),
    }
    return SpreadOod(list(outputs), r_scale, s_scale, threshold, stats)


def energy_window(grid: np.ndarray, lo_ev: float, hi_ev: float) -> tuple[int, int]:
    """Columns ``(start, stop)`` of the model grid lying within ``lo_ev..hi_ev`` (relative to E0)."""
    idx = np.flatnonzero((grid >= lo_ev - 1e-9) & (grid <= hi_ev + 1e-9))
    if idx.size < 2:
        raise ValueError(f"fewer than 2 grid points between {lo_ev} and {hi_ev} eV")
    return int(idx[0]), int(idx[-1]) + 1


def _window(
    x: np.ndarray, start: int, stop: int, normalise: bool, norm: tuple[int, int], smooth: float
) -> np.ndarray:
    """Columns ``start:stop``, divided by each row's mean over the ``norm`` columns if asked,
    smoothed with a Gaussian of ``smooth`` columns if positive."""
    w = np.asarray(x, dtype=np.float64)[:, start:stop]
    if normalise:
        w = w / np.asarray(x, dtype=np.float64)[:, norm[0] : norm[1]].mean(axis=1, keepdims=True)
    if smooth > 0:
        w = w @ U.smoothing_matrix(stop - start, smooth).T
    return w


def fit_default_ood(x_train: np.ndarray, x_val: np.ndarray, grid: np.ndarray) -> OodScorer:
    """The chosen scorer on model inputs whose first columns are spectra on ``grid``."""
    return fit_ood(x_train, x_val, grid=grid)


def fit_ood(
    x_train: np.ndarray,
    x_val: np.ndarray,
    method: str = DEFAULT_METHOD,
    n_components: int = DEFAULT_COMPONENTS,
    window: tuple[int, int] | None = None,
    normalise: bool = True,
    flag_fraction: float = 0.05,
    norm_window: tuple[int, int] | None = None,
    grid: np.ndarray | None = None,
    smooth: float = 0.0,
) -> OodScorer:
    """Fit the PCA on ``x_train`` and set the threshold on ``x_val`` (held-out, in domain).

    ``window`` (columns scored) defaults, given the model ``grid``, to ``DEFAULT_WINDOW_EV``
    with spectra divided by their mean over the whole grid (the chosen scorer); otherwise
    ``normalise`` divides by the mean over ``norm_window`` (default: ``window``). The
    threshold is the smallest validation score such that at most ``flag_fraction`` of the
    validation rows score above it. ``smooth`` (Gaussian sigma in columns, 0: none) smooths
    the window, training and scored rows alike, so point noise adds little to the score.
    """
    if window is None:
        if grid is None:
            raise ValueError("pass the model grid (for the default window) or a column window")
        window = energy_window(grid, *DEFAULT_WINDOW_EV)
        if norm_window is None:
            norm_window = (0, int(np.size(grid)))
    if method not in METHODS:
        raise ValueError(f"unknown OOD method {method!r}; use one of {METHODS}")
    start, stop = window
    if not 0 <= start < stop <= np.shape(x_train)[1]:
        raise ValueError(f"window {window} does not fit inputs of width {np.shape(x_train)[1]}")
    if not 0 < flag_fraction < 1:
        raise ValueError("flag_fraction must be in (0, 1)")
    norm = norm_window if norm_window is not None else (start, stop)
    if not 0 <= norm[0] < norm[1] <= np.shape(x_train)[1]:
        raise ValueError(f"norm_window {norm} does not fit inputs of width {np.shape(x_train)[1]}")
    if not (math.isfinite(smooth) and smooth >= 0):
        raise ValueError(f"smooth must be a finite sigma >= 0, got {smooth}")
    tr = _window(np.atleast_2d(x_train), start, stop, normalise, norm, smooth)
    va = np.atleast_2d(x_val)
    if not np.all(np.isfinite(tr)):
        raise ValueError("training spectra contain NaN/inf (or a zero mean with normalise)")
    if len(va) == 0:
        raise ValueError("no validation rows to set the threshold on")
    k = int(n_components)
    if not 1 <= k < min(tr.shape):
        raise ValueError(f"n_components must be in [1, {min(tr.shape) - 1}], got {k}")
    mean = tr.mean(axis=0)
    _, sing, vt = np.linalg.svd(tr - mean, full_matrices=False)
    var = sing**2 / (len(tr) - 1)
    residual_var = float(var[k:].mean())
    inv = 1.0 / np.sqrt(np.maximum(var[:k], 1e-300))
    if method == "recon":
        inv_scale, weight = np.zeros(k), 1.0
    elif method == "mahalanobis":
        inv_scale, weight = inv, 0.0
    else:  # probabilistic PCA: both terms in units of their variances
        inv_scale, weight = inv, 1.0 / max(residual_var, 1e-300)
    scorer = OodScorer(
        method,
        start,
        stop,
        normalise,
        mean,
        vt[:k].copy(),
        inv_scale,
        weight,
        math.inf,
        0.0,
        norm_window=norm_window,
        smooth=float(smooth),
    )
    val_scores = scorer.score(va)
    # the (ceil((1-f) n))-th smallest score: at most a fraction f of validation lies above it
    rank = max(1, math.ceil((1 - flag_fraction) * len(val_scores)))
    threshold = float(np.sort(val_scores)[rank - 1])
    flagged_val = float(np.mean(val_scores > threshold))
    stats = {
        "explained_variance": float(var[:k].sum() / var.sum()),
        "val_flagged_fraction": flagged_val,
        "n_train": len(tr),
        "n_val": len(va),
    }
    return replace(scorer, threshold=threshold, flag_fraction=flag_fraction, stats=stats)

"""Featurisation of a gridded spectrum: raw values, derivative and TRIXS multiscale cubic fits.

All but the scalar white-line features are *linear* in the gridded spectrum, so they are
one matrix ``M``: ``features = [y, scalars] @ M``. The bundle exporter puts that matrix into
the ONNX graph, and training computes exactly the same product here.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from xasflow.spectra.process import PrepParams


class FeatureSpec(BaseModel):
    """Which features a model sees; stored in the bundle manifest."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    spectrum: bool = True
    derivative: bool = True
    poly_partitions: tuple[int, ...] = (4, 5, 10, 20)
    poly_degree: int = Field(3, ge=0, le=5)
    whiteline: bool = True

    def n_scalars(self) -> int:
        """Number of non-linear scalar inputs that ride along with the spectrum."""
        return 2 if self.whiteline else 0


def _poly_block(x: np.ndarray, partitions: int, degree: int) -> np.ndarray:
    """(n, partitions*(degree+1)) projection: least-squares polynomial coefficients per partition."""
    n = x.size
    edges = np.linspace(0, n, partitions + 1).round().astype(int)
    block = np.zeros((n, partitions * (degree + 1)))
    for p in range(partitions):
        lo, hi = edges[p], edges[p + 1]
        xs = x[lo:hi]
        t = (xs - xs.mean()) / max(np.ptp(xs) / 2.0, 1e-12)  # [-1, 1] for conditioning
        vander = np.vander(t, degree + 1, increasing=True)
        block[lo:hi, p * (degree + 1) : (p + 1) * (degree + 1)] = np.linalg.pinv(vander).T
    return block


def linear_matrix(spec: FeatureSpec, prep: PrepParams) -> np.ndarray:
    """The matrix ``M`` with ``features = concat(y, scalars) @ M`` (shape (n+s, n_features))."""
    n, s = prep.n_points, spec.n_scalars()
    grid = prep.grid
    blocks: list[np.ndarray] = []
    if spec.spectrum:
        blocks.append(np.eye(n))
    if spec.derivative:
        step = grid[1] - grid[0]
        d = np.zeros((n, n))
        idx = np.arange(1, n - 1)
        d[idx - 1, idx] = -0.5 / step  # column j gets (y[j+1]-y[j-1]) / 2h
        d[idx + 1, idx] = 0.5 / step
        d[0, 0], d[1, 0] = -1 / step, 1 / step
        d[n - 2, n - 1], d[n - 1, n - 1] = -1 / step, 1 / step
        blocks.append(d)
    for parts in spec.poly_partitions:
        blocks.append(_poly_block(grid, parts, spec.poly_degree))
    top = np.hstack(blocks) if blocks else np.zeros((n, 0))
    m = np.zeros((n + s, top.shape[1] + s))
    m[:n, : top.shape[1]] = top
    m[n:, top.shape[1] :] = np.eye(s)
    return m


def feature_names(spec: FeatureSpec, prep: PrepParams) -> list[str]:
    """Human-readable names of the columns of ``linear_matrix`` (for importances and reports)."""
    grid = prep.grid
    names: list[str] = []
    if spec.spectrum:
        names += [f"mu@{e:+.2f}" for e in grid]
    if spec.derivative:
        names += [f"dmu@{e:+.2f}" for e in grid]
    for parts in spec.poly_partitions:
        edges = np.linspace(0, prep.n_points, parts + 1).round().astype(int)
        for p in range(parts):
            lo, hi = grid[edges[p]], grid[edges[p + 1] - 1]
            names += [f"poly{parts}[{lo:+.1f},{hi:+.1f}]c{k}" for k in range(spec.poly_degree + 1)]
    if spec.whiteline:
        names += ["whiteline_energy", "whiteline_height"]
    return names


def feature_energies(spec: FeatureSpec, prep: PrepParams) -> np.ndarray:
    """Energy (relative to E0) that each feature describes: its point or its partition's centre.

    Scalars get NaN. Used to turn feature importances into energy-region importances.
    """
    grid = prep.grid
    out: list[np.ndarray] = []
    if spec.spectrum:
        out.append(grid)
    if spec.derivative:
        out.append(grid)
    for parts in spec.poly_partitions:
        edges = np.linspace(0, prep.n_points, parts + 1).round().astype(int)
        centres = [(grid[edges[p]] + grid[edges[p + 1] - 1]) / 2 for p in range(parts)]
        out.append(np.repeat(centres, spec.poly_degree + 1))
    out.append(np.full(spec.n_scalars(), np.nan))
    return np.concatenate(out)


def scalar_inputs(y: np.ndarray, spec: FeatureSpec, prep: PrepParams) -> np.ndarray:
    """Non-linear scalars per spectrum (rows of ``y``): white-line energy and height."""
    y2 = np.atleast_2d(y)
    if not spec.whiteline:
        return np.zeros((y2.shape[0], 0))
    idx = np.argmax(y2, axis=1)
    return np.column_stack([prep.grid[idx], y2[np.arange(y2.shape[0]), idx]])


def model_input(y: np.ndarray, spec: FeatureSpec, prep: PrepParams) -> np.ndarray:
    """The float32 array fed to a bundle's ONNX graphs: gridded spectra with their scalars.

    Filled in place (one allocation; per spectrum in the daemon, so the copies showed)."""
    y2 = np.atleast_2d(y)
    n, w = y2.shape
    x = np.empty((n, w + spec.n_scalars()), np.float32)
    x[:, :w] = y2
    x[:, w:] = scalar_inputs(y2, spec, prep)
    return x


def featurize(
    y: np.ndarray, spec: FeatureSpec, prep: PrepParams, matrix: np.ndarray | None = None
) -> np.ndarray:
    """Features of gridded spectra, computed as the ONNX graph computes them (float32 in)."""
    m = linear_matrix(spec, prep) if matrix is None else matrix
    return model_input(y, spec, prep).astype(np.float64) @ m

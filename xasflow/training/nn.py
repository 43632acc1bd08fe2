"""Small multi-task neural networks (MLP or 1-D CNN) trained as a deep ensemble.

Training runs on the CPU by default; ``device="cuda"`` (or ``"auto"``) trains on a GPU where
one is at hand, with the same random streams, and the fitted modules always come back to the CPU
(export and serving never need a GPU).

Every network takes exactly the bundle input ``x`` (the gridded normalised spectrum plus its
scalar columns, see :func:`xasflow.spectra.model_input`), so clipping, the derivative and the
standardisation live inside the module and therefore inside the exported ONNX graph. A shared
trunk feeds one head per task; losses are masked per task, regression targets are standardised
inside and un-standardised by the module. Early stopping watches every task's validation error:
a member keeps the weights of at most ``max_snapshots`` epochs and serves each task from the one
nearest that task's best (see :func:`~xasflow.training.nn_member.choose_snapshots`; one
snapshot by default, so the graph holds one trunk per member). How one member is trained is
:mod:`~xasflow.training.nn_member`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from xasflow.training.nn_augment import BatchAugmenter, NetAugment
from xasflow.training.nn_device import resolve_device
from xasflow.training.nn_export import ensemble_to_onnx
from xasflow.training.nn_graph import EnsembleModule, NetTask
from xasflow.training.nn_member import encode, plain, train_member

__all__ = [
    "NetConfig",
    "NetTask",
    "NetworkEnsemble",
    "TaskTarget",
    "fit_network_ensemble",
    "resolve_device",
    "targets_from_tuples",
]

KINDS = ("classifier", "regressor", "multi_regressor")


class NetConfig(BaseModel):
    """Architecture and training settings of a network ensemble; stored in the bundle manifest."""

    model_config = ConfigDict(extra="forbid")

    arch: Literal["mlp", "cnn"] = "mlp"
    members: int = Field(5, ge=1)  # a deep ensemble wants >= 5; tests use fewer
    seed: int = 0  # member k is seeded with seed + k
    hidden: tuple[int, ...] = (256, 256, 256)  # mlp: dense layers; the last is the embedding
    # cnn: conv blocks (each halves the length), then dense layers. (16, 32, 32) with kernel 7
    # and 256 dense units trained 4x slower than the MLP on Cu and scored lower (CN 0.82 vs
    # 0.84 for two members, distance 0.039 vs 0.034 A), hence this smaller default (5 members
    # on Cu: CN 0.830, distance 0.042 A; the MLP's 0.848, 0.032 A; bench/nn.py)
    cnn_channels: tuple[int, ...] = (8, 16, 16)
    cnn_kernel: int = 5
    cnn_hidden: tuple[int, ...] = (128,)
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    lr: float = 1e-3
    schedule: Literal["constant", "cosine"] = "cosine"  # cosine: lr decays to 0 at max_epochs
    # regression loss on standardised targets: Huber with this transition (0: squared error)
    huber: float = Field(0.1, ge=0.0)
    weight_decay: float = 1e-4
    batch_size: int = 64
    max_epochs: int = 100  # also the length of the cosine schedule
    patience: int = 20  # stop when no task's validation figure improved for this many epochs
    # what per-task early stopping watches on the validation rows: "error" (error rate for
    # classifiers, MAE for regressors) or "loss" (the training loss)
    stop_on: Literal["error", "loss"] = "error"
    # per-task early stopping: each task is served by the kept epoch closest to its own best
    # validation figure, with at most this many distinct weight snapshots per member (graph
    # size and latency grow with it). 1: the epoch with the least summed relative excess over
    # every task's best; measured on Cu (2 MLPs, cosine, Huber) 1, 2, 3 and 6 snapshots gave
    # the same test figures within noise (CN 0.838-0.844, distance 0.033 A), so 1 it is
    max_snapshots: int = Field(1, ge=1)
    threads: int = 2
    n_scalars: int = 2  # trailing non-spectrum columns of x (white-line energy and height)
    # Normalised absorption outside [-1, 5] is an undetermined edge step (FEFF spectra with
    # values up to ~700 exist); clipping inside the graph keeps such rows from wrecking training
    clip: tuple[float, float] = (-1.0, 5.0)
    z_clip: float = 8.0  # every standardised feature (scalars included) is clamped to +-z_clip
    # per-batch augmentation of the training rows (shift, broadening, scale, noise), drawn
    # afresh every epoch; needs the model grid (``fit_network_ensemble(grid=...)``)
    augment: NetAugment = NetAugment()


@dataclass
class TaskTarget:
    """One task's training target over all rows of ``x``."""

    kind: str  # "classifier" | "regressor" | "multi_regressor"
    y: np.ndarray  # (n,) labels, (n,) floats or (n, k) floats
    valid: np.ndarray  # (n,) bool: rows that have a target
    classes: list | None = None  # classifier label order (probability columns)
    weight: np.ndarray | None = None  # optional (n,) per-row loss weight


@dataclass
class NetworkEnsemble:
    """A trained deep ensemble: predictions in numpy, one ONNX graph for the bundle."""

    config: NetConfig
    tasks: dict[str, NetTask]
    module: EnsembleModule
    width: int
    members_info: list[dict[str, Any]] = field(default_factory=list)

    def _check(self, x: np.ndarray) -> torch.Tensor:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.width:
            raise ValueError(f"x must be (n, {self.width}) model input, got shape {x.shape}")
        return torch.from_numpy(np.ascontiguousarray(x))

    def _squeeze(self, t: str, a: torch.Tensor) -> np.ndarray:
        out = a.numpy()
        return out[..., 0] if self.tasks[t].kind == "regressor" else out

    @torch.no_grad()
    def predict(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Member-mean predictions: (n, K) probabilities, (n,) values or (n, k) values."""
        outs = self.module.eval()(self._check(x))
        return {t: self._squeeze(t, outs[2 * i]) for i, t in enumerate(self.module.task_names)}

    @torch.no_grad()
    def predict_members(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Per-member predictions, shape (members, n, ...) with the same trailing axes as predict."""
        per_task, _ = self.module.eval().stacked(self._check(x))
        return {t: self._squeeze(t, a) for t, a in per_task.items()}

    @torch.no_grad()
    def embedding(self, x: np.ndarray) -> np.ndarray:
        """Member-mean trunk embedding (n, d), for out-of-domain scoring."""
        return self.module.eval()(self._check(x))[-1].numpy()

    def to_onnx(self) -> bytes:
        """One ONNX graph: input ``x`` [batch, width]; outputs ``t``, ``t_std``, ``embedding``."""
        return ensemble_to_onnx(self.module, self.width)


def _task_specs(targets: dict[str, TaskTarget], rows: np.ndarray) -> dict[str, NetTask]:
    specs: dict[str, NetTask] = {}
    outputs = [n for t in targets for n in (t, f"{t}_std")] + ["x", "embedding"]
    if len(set(outputs)) != len(outputs):
        raise ValueError(f"task names {list(targets)} clash with each other or with x/embedding")
    for name, tt in targets.items():
        if tt.kind not in KINDS:
            raise ValueError(f"task {name!r}: kind must be one of {KINDS}, got {tt.kind!r}")
        if tt.kind == "classifier":
            classes = tt.classes
            if classes is None:
                labels = {plain(v) for v in np.asarray(tt.y)[rows][tt.valid[rows]]}
                classes = sorted(labels, key=lambda c: (str(type(c)), c))
            if len(classes) < 2:
                raise ValueError(f"task {name!r}: a classifier needs >= 2 classes, got {classes}")
            specs[name] = NetTask(tt.kind, len(classes), [plain(c) for c in classes])
        else:
            y = np.asarray(tt.y, dtype=float)
            specs[name] = NetTask(tt.kind, 1 if y.ndim == 1 else y.shape[1])
    return specs


def fit_network_ensemble(
    x: np.ndarray,
    targets: dict[str, TaskTarget],
    train_rows: np.ndarray,
    val_rows: np.ndarray,
    config: NetConfig,
    log: Callable[[str], Any] = print,
    grid: np.ndarray | None = None,
    device: str = "cpu",
) -> NetworkEnsemble:
    """Train ``config.members`` multi-task networks on ``train_rows``, early-stopped on ``val_rows``.

    ``x`` is the bundle model input (n, width) for all rows; ``targets`` give per task the
    target and validity of every row. Rows without a valid target are masked out of the loss.
    ``grid`` (energies of the spectrum columns of ``x``) is needed when ``config.augment`` is on.
    ``device`` is where the arithmetic runs (:func:`resolve_device`); the returned ensemble
    lives on the CPU whatever it was.
    """
    dev = resolve_device(device)
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] <= config.n_scalars + 2:
        raise ValueError(f"x must be (n, width) model input, got shape {x.shape}")
    train_rows, val_rows = np.asarray(train_rows, int), np.asarray(val_rows, int)
    if len(train_rows) == 0 or len(val_rows) == 0:
        raise ValueError("fit_network_ensemble needs training and validation rows")
    if not np.all(np.isfinite(x[np.concatenate([train_rows, val_rows])])):
        raise ValueError("x has non-finite values in the training or validation rows")
    if not targets:
        raise ValueError("no tasks given")
    augmenter = None
    if config.augment.active:
        if grid is None or np.size(grid) != x.shape[1] - config.n_scalars:
            raise ValueError("augmentation needs the grid of the spectrum columns of x")
        augmenter = BatchAugmenter(config.augment, grid, config.n_scalars).to(dev)
    fit_rows = np.concatenate([train_rows, val_rows])
    specs = _task_specs(targets, fit_rows)
    enc = {t: encode(t, targets[t], specs[t], train_rows) for t in specs}
    for t in specs:
        if not enc[t].valid[torch.from_numpy(train_rows)].any():
            raise ValueError(f"task {t!r} has no valid training rows")
    xt = torch.from_numpy(np.nan_to_num(x).astype(np.float32))
    xd = xt.to(dev)
    enc_d = {t: e.to(dev) for t, e in enc.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    members, info = [], []
    try:
        for k in range(config.members):
            member, mi = train_member(
                k, xt, enc_d, specs, train_rows, val_rows, config, augmenter, xd
            )
            members.append(member)
            info.append(mi)
            log(
                f"  {config.arch} member {k + 1}/{config.members}: {mi['epochs']} epochs, "
                f"{mi['snapshots']} snapshot(s), {mi['seconds']:.0f} s"
            )
    finally:
        torch.set_num_threads(threads)
    module = EnsembleModule(members, specs).eval()
    return NetworkEnsemble(config, specs, module, x.shape[1], info)


def targets_from_tuples(
    tuples: dict[str, tuple[str, np.ndarray, np.ndarray]],
    weights: dict[str, np.ndarray] | None = None,
) -> dict[str, TaskTarget]:
    """``fit.task_targets`` output ``{task: (kind, y, valid)}`` as :class:`TaskTarget` objects."""
    weights = weights or {}
    return {
        t: TaskTarget(kind, np.asarray(y), np.asarray(valid, bool), weight=weights.get(t))
        for t, (kind, y, valid) in tuples.items()
    }

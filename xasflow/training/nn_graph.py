"""The torch modules of a network ensemble (exported as one graph by ``nn_export``).

:class:`InputBlock` clips, differentiates and standardises the bundle input ``x`` inside the
module (so inside the graph); :class:`MultiTaskNet` is one trunk with a head per task;
:class:`Member` serves each task from the snapshot that was best for it, and
:class:`EnsembleModule` returns, per task, the member mean and std plus the mean embedding.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from xasflow.training.nn import NetConfig


@dataclass
class NetTask:
    """What a fitted network predicts for one task."""

    kind: str
    n_outputs: int
    classes: list | None = None


class InputBlock(nn.Module):
    """Clip the spectrum, append its finite difference and scalars, standardise and clamp."""

    mean: torch.Tensor  # buffers, registered in __init__
    scale: torch.Tensor

    def __init__(self, width: int, n_scalars: int, clip: tuple[float, float], z_clip: float):
        super().__init__()
        self.n_points = width - n_scalars
        self.clip = (float(clip[0]), float(clip[1]))
        self.z_clip = float(z_clip)
        n_feat = 2 * self.n_points + n_scalars
        self.register_buffer("mean", torch.zeros(n_feat))
        self.register_buffer("scale", torch.ones(n_feat))

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """Unstandardised features: clipped spectrum, its difference (same length), scalars."""
        y = torch.clamp(x[:, : self.n_points], self.clip[0], self.clip[1])
        d = y[:, 1:] - y[:, :-1]
        d = torch.cat([d, d[:, -1:]], dim=1)
        return torch.cat([y, d, x[:, self.n_points :]], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (self.raw(x) - self.mean) / self.scale
        return torch.clamp(z, -self.z_clip, self.z_clip)


def _dense(sizes: list[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


class MLPTrunk(nn.Module):
    """Dense layers over all standardised features."""

    def __init__(self, cfg: NetConfig, n_points: int, n_scalars: int):
        super().__init__()
        self.net = _dense([2 * n_points + n_scalars, *cfg.hidden], cfg.dropout)
        self.dim = cfg.hidden[-1]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class CNNTrunk(nn.Module):
    """1-D convolutions over (spectrum, derivative) channels, then dense layers with the scalars."""

    def __init__(self, cfg: NetConfig, n_points: int, n_scalars: int):
        super().__init__()
        self.n_points = n_points
        blocks: list[nn.Module] = []
        length, c_in = n_points, 2
        for c in cfg.cnn_channels:
            blocks += [
                nn.Conv1d(c_in, c, cfg.cnn_kernel, padding=cfg.cnn_kernel // 2),
                nn.ReLU(),
                nn.MaxPool1d(2),
            ]
            length, c_in = length // 2, c
        self.conv = nn.Sequential(*blocks)
        self.dense = _dense([c_in * length + n_scalars, *cfg.cnn_hidden], cfg.dropout)
        self.dim = cfg.cnn_hidden[-1]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        n = self.n_points
        seq = torch.stack([z[:, :n], z[:, n : 2 * n]], dim=1)
        h = torch.flatten(self.conv(seq), 1)
        return self.dense(torch.cat([h, z[:, 2 * n :]], dim=1))


class Head(nn.Module):
    """One task's output layer; regression outputs are un-standardised here."""

    y_mean: torch.Tensor  # buffers, registered in __init__
    y_scale: torch.Tensor

    def __init__(self, dim: int, task: NetTask):
        super().__init__()
        self.kind = task.kind
        self.linear = nn.Linear(dim, task.n_outputs)
        self.register_buffer("y_mean", torch.zeros(task.n_outputs))
        self.register_buffer("y_scale", torch.ones(task.n_outputs))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Training output: logits, or standardised regression values."""
        return self.linear(h)

    def predict(self, h: torch.Tensor) -> torch.Tensor:
        """Served output: probabilities, or values in target units (motifs non-negative)."""
        out = self.linear(h)
        if self.kind == "classifier":
            return torch.softmax(out, dim=1)
        out = out * self.y_scale + self.y_mean
        return torch.relu(out) if self.kind == "multi_regressor" else out


class MultiTaskNet(nn.Module):
    """Input block, shared trunk and one head per task."""

    def __init__(self, cfg: NetConfig, width: int, tasks: dict[str, NetTask]):
        super().__init__()
        self.inputs = InputBlock(width, cfg.n_scalars, cfg.clip, cfg.z_clip)
        trunk = MLPTrunk if cfg.arch == "mlp" else CNNTrunk
        self.trunk = trunk(cfg, self.inputs.n_points, cfg.n_scalars)
        self.heads = nn.ModuleDict({t: Head(self.trunk.dim, spec) for t, spec in tasks.items()})

    def head(self, task: str) -> Head:
        """The head of ``task`` (typed access to the module dict)."""
        return cast(Head, self.heads[task])

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Trunk embedding (the input of every head)."""
        return self.trunk(self.inputs(x))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.embed(x)
        return {t: head(h) for t, head in self.heads.items()}


class Member(nn.Module):
    """One trained ensemble member: per task, the snapshot that was best for that task."""

    def __init__(self, snapshots: list[MultiTaskNet], use: dict[str, int]):
        super().__init__()
        self.snapshots = nn.ModuleList(snapshots)
        self.use = dict(use)  # task -> snapshot index; the embedding is snapshot 0's

    def snapshot(self, i: int) -> MultiTaskNet:
        """Snapshot ``i`` (typed access to the module list)."""
        return cast(MultiTaskNet, self.snapshots[i])

    def forward(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Served outputs per task and the embedding."""
        hs = [self.snapshot(i).embed(x) for i in range(len(self.snapshots))]
        out = {t: self.snapshot(i).head(t).predict(hs[i]) for t, i in self.use.items()}
        return out, hs[0]


class EnsembleModule(nn.Module):
    """All members in one module: per task the member mean and std, plus the mean embedding.

    Its forward returns a flat tuple in :meth:`output_names` order (what ONNX export needs).
    """

    def __init__(self, members: list[Member], tasks: dict[str, NetTask]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.task_names = list(tasks)
        self.tasks = tasks

    def output_names(self) -> list[str]:
        """``t`` and ``t_std`` per task, then ``embedding``."""
        return [n for t in self.task_names for n in (t, f"{t}_std")] + ["embedding"]

    def stacked(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Per task (members, n, k) outputs and the (members, n, d) embeddings."""
        outs = [m(x) for m in self.members]
        per_task = {t: torch.stack([o[0][t] for o in outs], 0) for t in self.task_names}
        return per_task, torch.stack([o[1] for o in outs], 0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        per_task, emb = self.stacked(x)
        result: list[torch.Tensor] = []
        for t in self.task_names:
            mean = per_task[t].mean(dim=0)
            std = torch.sqrt(((per_task[t] - mean) ** 2).mean(dim=0))
            result += [mean, std]
        result.append(emb.mean(dim=0))
        return tuple(result)

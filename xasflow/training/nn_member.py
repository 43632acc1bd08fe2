"""One member of a network ensemble trained, as :func:`~xasflow.training.nn.fit_network_ensemble`
trains each in turn.

The targets as tensors (regression standardised on the training rows), the masked per-task
losses and validation errors, the input block's robust centre and scale, the epochs with
per-task early stopping, and the snapshots a member keeps (:func:`choose_snapshots`). A
member's shuffles and augmentation draws come from one CPU generator seeded per member, so
it sees the same batches on every device.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.nn import functional as F

from xasflow.training.nn_augment import BatchAugmenter
from xasflow.training.nn_device import device_name
from xasflow.training.nn_graph import Member, MultiTaskNet, NetTask

if TYPE_CHECKING:
    from xasflow.training.nn import NetConfig, TaskTarget


def plain(v: Any) -> Any:
    """numpy scalars as Python values (JSON-friendly class labels)."""
    return v.item() if hasattr(v, "item") else v


@dataclass
class Encoded:
    """One task's training arrays: targets as tensors, validity mask and row weights."""

    y: torch.Tensor
    valid: torch.Tensor
    weight: torch.Tensor
    mean: np.ndarray | None = None
    scale: np.ndarray | None = None

    def to(self, device: torch.device) -> Encoded:
        """The same targets with their tensors on ``device``."""
        return Encoded(
            self.y.to(device), self.valid.to(device), self.weight.to(device), self.mean, self.scale
        )


def encode(name: str, tt: TaskTarget, spec: NetTask, fit_rows: np.ndarray) -> Encoded:
    """Targets as tensors; regression targets standardised on the rows trained on."""
    n = len(tt.valid)
    valid = np.asarray(tt.valid, dtype=bool).copy()
    if len(tt.y) != n:
        raise ValueError(f"task {name!r}: target has {len(tt.y)} rows but valid has {n}")
    weight = np.ones(n) if tt.weight is None else np.nan_to_num(np.asarray(tt.weight, float))
    if spec.kind == "classifier":
        index = {c: i for i, c in enumerate(spec.classes or [])}
        codes = np.array([index.get(plain(v), -1) for v in np.asarray(tt.y, dtype=object)])
        valid &= codes >= 0  # labels outside ``classes`` cannot be learned
        return Encoded(
            torch.from_numpy(np.where(valid, codes, 0)).long(),
            torch.from_numpy(valid),
            torch.from_numpy(weight).float(),
        )
    y = np.asarray(tt.y, dtype=float).reshape(n, -1)
    valid &= np.all(np.isfinite(y), axis=1)
    ref = y[fit_rows[valid[fit_rows] & (weight[fit_rows] > 0)]]  # rows that are trained on
    if len(ref) == 0:
        raise ValueError(f"task {name!r} has no valid training rows")
    mean = ref.mean(axis=0)
    scale = ref.std(axis=0)
    scale = np.where(scale > 1e-8, scale, 1.0)
    z = np.where(valid[:, None], (np.nan_to_num(y) - mean) / scale, 0.0)
    return Encoded(
        torch.from_numpy(z).float(),
        torch.from_numpy(valid),
        torch.from_numpy(weight).float(),
        mean,
        scale,
    )


def task_loss(
    kind: str, out: torch.Tensor, enc: Encoded, rows: torch.Tensor, huber: float = 0.0
) -> torch.Tensor:
    """Weighted mean loss over the valid rows among ``rows`` (zero when there are none):
    cross-entropy, or squared error (Huber with ``huber`` > 0) on standardised targets."""
    valid = enc.valid[rows]
    w = enc.weight[rows] * valid
    if kind == "classifier":
        per_row = F.cross_entropy(out, enc.y[rows], reduction="none")
    elif huber > 0:
        per_row = F.smooth_l1_loss(out, enc.y[rows], reduction="none", beta=huber).mean(dim=1)
    else:
        per_row = F.mse_loss(out, enc.y[rows], reduction="none").mean(dim=1)
    return (per_row * w).sum() / w.sum().clamp_min(1e-12)


def val_error(kind: str, out: torch.Tensor, enc: Encoded, rows: torch.Tensor) -> float:
    """Validation error the stopping rule watches: error rate, or MAE in standardised units."""
    valid = enc.valid[rows]
    if not valid.any():
        return 0.0
    if kind == "classifier":
        return float((out.argmax(dim=1) != enc.y[rows])[valid].float().mean())
    return float((out - enc.y[rows]).abs()[valid].mean())


def input_stats(net: MultiTaskNet, x: torch.Tensor) -> None:
    """Set the input block's centre and scale per feature from the training rows: median and
    IQR/1.349 (robust to the few spectra with an undetermined edge step)."""
    with torch.no_grad():
        raw = net.inputs.raw(x)
        # numpy: torch.quantile refuses inputs above 16M elements
        q = torch.from_numpy(np.quantile(raw.numpy(), [0.25, 0.5, 0.75], axis=0)).float()
        centre, scale = q[1], (q[2] - q[0]) / 1.349
        std = raw.std(dim=0)
        scale = torch.where(scale > 1e-6, scale, std)  # e.g. a scalar that is mostly constant
        net.inputs.mean.copy_(centre)
        net.inputs.scale.copy_(torch.where(scale > 1e-6, scale, torch.ones_like(scale)))


def choose_snapshots(
    history: np.ndarray, has_val: list[bool], max_snapshots: int
) -> tuple[list[int], list[int]]:
    """Epochs to keep (at most ``max_snapshots``) and, per task, which of them serves it.

    ``history`` is (tasks, epochs) of the validation figure (error or loss, lower is better).
    The set minimises the summed relative excess of each task's figure over its own best (every
    task at its best epoch when allowed); exhaustive up to two snapshots, greedy beyond. Tasks
    without validation rows do not vote. Every epoch's weights are held until this choice.
    """
    h = np.asarray(history, dtype=float)[np.asarray(has_val, bool)]
    if len(h) == 0:
        return [h.shape[1] - 1 if h.ndim == 2 else 0], [0] * len(has_val)
    low = h.min(axis=1, keepdims=True)
    regret = (h - low) / np.maximum(np.abs(low), 1e-12)  # (tasks, epochs), 0 at each best
    per_task = sorted({int(e) for e in np.argmin(regret, axis=1)})
    if len(per_task) <= max_snapshots:
        chosen = per_task
    else:
        n = regret.shape[1]
        single = regret.sum(axis=0)
        chosen = [int(np.argmin(single))]
        if max_snapshots >= 2:
            pair = np.minimum(regret[:, :, None], regret[:, None, :]).sum(axis=0)
            i, j = np.unravel_index(int(np.argmin(pair)), (n, n))
            chosen = sorted({int(i), int(j)})
        while len(chosen) < max_snapshots:
            cost = [np.minimum(regret[:, chosen].min(axis=1), regret[:, e]).sum() for e in range(n)]
            chosen = sorted({*chosen, int(np.argmin(cost))})
    serve = np.argmin(regret[:, chosen], axis=1)
    use, k = [], 0
    for ok in has_val:  # tasks without validation rows take the most used snapshot
        if ok:
            use.append(int(serve[k]))
            k += 1
        else:
            use.append(int(np.bincount(serve, minlength=len(chosen)).argmax()))
    # snapshot 0 (the embedding's) is the one serving the most tasks
    order = sorted(range(len(chosen)), key=lambda i: (-use.count(i), chosen[i]))
    return [chosen[i] for i in order], [order.index(u) for u in use]


def train_member(
    k: int,
    x: torch.Tensor,
    enc: dict[str, Encoded],
    specs: dict[str, NetTask],
    train_rows: np.ndarray,
    val_rows: np.ndarray,
    cfg: NetConfig,
    augmenter: BatchAugmenter | None = None,
    xd: torch.Tensor | None = None,
) -> tuple[Member, dict[str, Any]]:
    """One member trained on ``xd`` (``x`` on the training device; ``x`` itself when None).

    Shuffles and augmentation draws come from one CPU generator seeded with ``seed + k``, so a
    member sees the same batches on every device; only the arithmetic differs.
    """
    seed = cfg.seed + k
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    xd = x if xd is None else xd
    dev = xd.device
    net = MultiTaskNet(cfg, x.shape[1], specs)
    input_stats(net, x[torch.from_numpy(train_rows)])
    for t in net.heads:
        head = net.head(t)
        if enc[t].mean is not None:
            head.y_mean.copy_(torch.from_numpy(enc[t].mean).float())
            head.y_scale.copy_(torch.from_numpy(enc[t].scale).float())
    net.to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.max_epochs)
        if cfg.schedule == "cosine"
        else None
    )
    tr = torch.from_numpy(train_rows)
    va = torch.from_numpy(val_rows).to(dev)
    best: dict[str, tuple[float, int]] = {t: (float("inf"), -1) for t in specs}
    states: list[dict[str, torch.Tensor]] = []
    history: dict[str, list[float]] = {t: [] for t in specs}
    losses: dict[str, list[float]] = {t: [] for t in specs}
    epoch = 0
    for epoch in range(cfg.max_epochs):
        net.train()
        for rows in tr[torch.randperm(len(tr), generator=gen)].split(cfg.batch_size):
            if len(rows) < 2:
                continue
            chunk = rows.to(dev, non_blocking=True)
            xb = xd[chunk] if augmenter is None else augmenter(xd[chunk], gen)
            out = net(xb)
            batch_loss = sum(
                task_loss(specs[t].kind, out[t], enc[t], chunk, cfg.huber) for t in specs
            )
            assert isinstance(batch_loss, torch.Tensor)  # specs is never empty
            opt.zero_grad()
            batch_loss.backward()
            opt.step()
        if sched is not None:
            sched.step()
        net.eval()
        with torch.no_grad():
            out = net(xd[va])
            loss = {
                t: float(task_loss(specs[t].kind, out[t], enc[t], va, cfg.huber)) for t in specs
            }
            err = {t: val_error(specs[t].kind, out[t], enc[t], va) for t in specs}
        val = err if cfg.stop_on == "error" else loss
        states.append(copy.deepcopy(net.state_dict()))
        for t in specs:
            history[t].append(round(val[t], 6))
            losses[t].append(round(loss[t], 6))
            if val[t] < best[t][0]:
                best[t] = (val[t], epoch)
        if epoch - max(e for _, e in best.values()) >= cfg.patience:
            break
    has_val = [bool(enc[t].valid[va].any()) for t in specs]
    epochs, use = choose_snapshots(np.array(list(history.values())), has_val, cfg.max_snapshots)
    snapshots = []
    for e in epochs:
        snap = MultiTaskNet(cfg, x.shape[1], specs)
        snap.load_state_dict(states[e])
        snapshots.append(snap.eval())
    member = Member(snapshots, dict(zip(specs, use, strict=True)))
    chosen = {t: epochs[i] for t, i in zip(specs, use, strict=True)}
    info = {
        "seed": seed,
        "epochs": epoch + 1,
        "best_epoch": chosen,
        "best_val_loss": {t: losses[t][e] for t, e in chosen.items()},
        "bestval_error": {t: history[t][e] for t, e in chosen.items()},
        "snapshots": len(snapshots),
        "device": device_name(dev),
        "val_loss": losses,  # per task, per epoch: masked validation loss, as trained
        "val_history": history,  # per task, per epoch: what the stopping rule watched
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return member, info

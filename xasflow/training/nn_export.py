"""A network ensemble exported as one ONNX graph; MLP ensembles rearranged for serving first.

:class:`~xasflow.training.nn_graph.EnsembleModule` exports as many small graphs side by side as
it has members: every member standardises the same input again, runs its own first layer and
six task heads of its own, and each task is post-processed per member. The Cu bundle's
five-member graph had 45 matrix products and ~350 nodes after quantisation, and onnxruntime's
fixed cost per node, not the arithmetic, set a single spectrum's time.

:class:`FusedMLPEnsemble` computes the same function with the members' weights rearranged:
the input block once (the members share its statistics, all fitted on the same rows), the
first layers of all towers (a tower: one member snapshot in use) concatenated into one matrix,
each tower's deeper layers as before, all its served heads as one matrix, and the per-task
post-processing once on the members stacked. Matrix rows and columns are only regrouped, so
per-channel int8 quantisation sees the very channels it saw before (measured on the shipped Cu
bundle: int8 outputs identical to the last bit, 16 matrix products instead of 45).
:func:`fuse` returns None when an ensemble does not fit this shape (CNN trunks, members with
different input statistics); it is then exported as it is.

torch 2.13 defaults to the ``torch.export``-based ONNX exporter, which needs ``onnxscript``
(not a dependency); these are plain feed-forward modules, so the TorchScript-tracing exporter
(``dynamo=False``, opset 17) exports them exactly. Its deprecation warning is silenced here.
"""

from __future__ import annotations

import io
import warnings
from typing import cast

import onnx
import torch
from torch import nn

from xasflow.training.nn_graph import EnsembleModule, InputBlock, Member, MLPTrunk, MultiTaskNet


def _linears(trunk: MLPTrunk) -> list[nn.Linear]:
    return [m for m in trunk.net if isinstance(m, nn.Linear)]


def _same_inputs(blocks: list[InputBlock]) -> bool:
    first = blocks[0]
    return all(
        b.n_points == first.n_points
        and b.clip == first.clip
        and b.z_clip == first.z_clip
        and torch.equal(b.mean, first.mean)
        and torch.equal(b.scale, first.scale)
        for b in blocks[1:]
    )


OPSET = 17


class FusedMLPEnsemble(nn.Module):
    """The function of an MLP :class:`EnsembleModule`, arranged for few, wide matrix products.

    ``forward`` returns the same flat tuple (per task member mean and std, then the mean
    embedding) as the module it was built from.
    """

    def __init__(self, module: EnsembleModule) -> None:
        super().__init__()
        members = [cast(Member, m) for m in module.members]
        self.task_names = list(module.task_names)
        self.kinds = {t: module.tasks[t].kind for t in self.task_names}
        # towers: every (member, snapshot) that serves a task or gives the embedding (0)
        towers: list[tuple[int, int]] = []
        for m, member in enumerate(members):
            for s in sorted({0, *member.use.values()}):
                towers.append((m, s))
        nets: list[MultiTaskNet] = [members[m].snapshot(s) for m, s in towers]
        self.inputs = nets[0].inputs
        firsts = [_linears(cast(MLPTrunk, n.trunk))[0] for n in nets]
        self.width = firsts[0].out_features
        self.first = nn.Linear(firsts[0].in_features, self.width * len(nets))
        with torch.no_grad():
            self.first.weight.copy_(torch.cat([f.weight for f in firsts], 0))
            self.first.bias.copy_(torch.cat([f.bias for f in firsts], 0))
        self.deeper = nn.ModuleList(
            nn.ModuleList(_linears(cast(MLPTrunk, n.trunk))[1:]) for n in nets
        )
        # per tower, the tasks it serves and their columns in its one head matrix
        self.served: list[dict[str, tuple[int, int]]] = []
        heads: list[nn.Module] = []
        for (m, s), net in zip(towers, nets, strict=True):
            tasks = [t for t in self.task_names if members[m].use[t] == s]
            cols: dict[str, tuple[int, int]] = {}
            start = 0
            for t in tasks:
                n_out = net.head(t).linear.out_features
                cols[t] = (start, start + n_out)
                start += n_out
            self.served.append(cols)
            if not tasks:  # the embedding's snapshot only
                heads.append(nn.Identity())
                continue
            lin = nn.Linear(net.trunk.dim, start)
            with torch.no_grad():
                lin.weight.copy_(torch.cat([net.head(t).linear.weight for t in tasks], 0))
                lin.bias.copy_(torch.cat([net.head(t).linear.bias for t in tasks], 0))
            heads.append(lin)
        self.heads = nn.ModuleList(heads)
        # per task and member: the tower serving it; per member: its embedding tower
        self.route = {
            t: [towers.index((m, members[m].use[t])) for m in range(len(members))]
            for t in self.task_names
        }
        self.embed_from = [towers.index((m, 0)) for m in range(len(members))]
        for t in self.task_names:
            if self.kinds[t] != "classifier":
                rows = [nets[i].head(t) for i in self.route[t]]
                self.register_buffer(f"scale_{t}", torch.stack([h.y_scale for h in rows])[:, None])
                self.register_buffer(f"mean_{t}", torch.stack([h.y_mean for h in rows])[:, None])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        z = self.inputs(x)
        wide = torch.relu(self.first(z))
        hidden: list[torch.Tensor] = []
        outs: list[torch.Tensor] = []
        for k, (layers, head) in enumerate(zip(self.deeper, self.heads, strict=True)):
            h = wide[:, k * self.width : (k + 1) * self.width]
            for layer in cast(nn.ModuleList, layers):
                h = torch.relu(layer(h))
            hidden.append(h)
            outs.append(head(h) if self.served[k] else h)
        result: list[torch.Tensor] = []
        for t in self.task_names:
            parts = []
            for tower in self.route[t]:
                lo, hi = self.served[tower][t]
                parts.append(outs[tower][:, lo:hi])
            p = torch.stack(parts, 0)  # (members, n, k)
            if self.kinds[t] == "classifier":
                p = torch.softmax(p, dim=2)
            else:
                p = p * getattr(self, f"scale_{t}") + getattr(self, f"mean_{t}")
                if self.kinds[t] == "multi_regressor":
                    p = torch.relu(p)
            mean = p.mean(dim=0)
            result += [mean, torch.sqrt(((p - mean) ** 2).mean(dim=0))]
        result.append(torch.stack([hidden[i] for i in self.embed_from], 0).mean(dim=0))
        return tuple(result)


def fuse(module: EnsembleModule) -> FusedMLPEnsemble | None:
    """``module`` as a :class:`FusedMLPEnsemble`, or None when it has a CNN trunk, members whose
    input statistics differ, or trunks of different shapes (exported unchanged then)."""
    nets = [
        cast(Member, m).snapshot(s)
        for m in module.members
        for s in range(len(cast(Member, m).snapshots))
    ]
    if not nets or not all(isinstance(n.trunk, MLPTrunk) for n in nets):
        return None
    if not _same_inputs([n.inputs for n in nets]):
        return None
    shapes = {
        tuple((lin.in_features, lin.out_features) for lin in _linears(cast(MLPTrunk, n.trunk)))
        for n in nets
    }
    if len(shapes) != 1:
        return None
    return FusedMLPEnsemble(module).eval()


def ensemble_to_onnx(module: EnsembleModule, width: int, fused: bool = True) -> bytes:
    """Serialised ONNX model of ``module`` for float32 input ``x`` of shape (batch, ``width``);
    ``fused``: as :func:`fuse` rearranges it, where it can (the same outputs)."""
    names = module.output_names()
    graph: nn.Module = (fuse(module) if fused else None) or module.eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            (torch.zeros(2, width),),
            buf,  # type: ignore[arg-type]  # a file object works; the stub names paths only
            dynamo=False,
            input_names=["x"],
            output_names=names,
            dynamic_axes={n: {0: "batch"} for n in ["x", *names]},
            opset_version=OPSET,
            do_constant_folding=True,
        )
    model = onnx.load_from_string(buf.getvalue())
    model.producer_name = "xasflow"
    model.doc_string = "xasflow network ensemble: per task member mean and std, plus embedding"
    onnx.checker.check_model(model)
    return model.SerializeToString()

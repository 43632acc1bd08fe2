"""A bundle's graph files as served: outputs nobody reads pruned, the files joined into one.

A network graph also carries outputs the decoder never reads (the embedding, the classifiers'
member spreads), and every ``session.run`` costs its fixed overhead once per file. On the Cu
bundle, pruning and joining ``mlp.onnx`` with ``ood.onnx`` cut a 64-spectrum call by about
15 % (1.90 -> 1.57 ms) and a single one by about 40 us. The nodes kept are the same nodes;
onnxruntime may fuse them differently once an intermediate is no longer an output, so equal
answers are observed (bit for bit on every bundle tried, tests/test_graphs.py), not promised.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import onnx
from onnx import compose


def prune(model: onnx.ModelProto, outputs: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` computing only ``outputs`` (the nodes and weights they need)."""
    graph = model.graph
    wanted = set(outputs)
    missing = wanted - {o.name for o in graph.output}
    if missing:
        raise ValueError(f"graph {graph.name!r} has no output {sorted(missing)}")
    needed = set(wanted)
    kept = []
    for node in reversed(graph.node):  # nodes are stored in topological order
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(reversed(kept))
    del out.graph.output[:]
    out.graph.output.extend(o for o in graph.output if o.name in wanted)
    del out.graph.initializer[:]
    out.graph.initializer.extend(t for t in graph.initializer if t.name in needed)
    return out


def _opsets(model: onnx.ModelProto) -> tuple[int, tuple[tuple[str, int], ...]]:
    return model.ir_version, tuple(sorted((o.domain, o.version) for o in model.opset_import))


def join(
    models: Mapping[str, onnx.ModelProto], input_name: str
) -> tuple[onnx.ModelProto, dict[str, tuple[str, str]]] | None:
    """One graph running every model of ``models`` (file name -> model) on the shared input,
    and its outputs as (file, output); None where the files differ in IR or opset versions,
    or take other inputs, and so cannot share a graph."""
    items = list(models.items())
    if len({_opsets(m) for _, m in items}) != 1:
        return None
    if any([i.name for i in m.graph.input] != [input_name] for _, m in items):
        return None
    if any(m.functions or m.graph.sparse_initializer for _, m in items):
        return None  # kept simple: such graphs run as they are
    joined: onnx.ModelProto | None = None
    names: dict[str, tuple[str, str]] = {}
    for k, (file, model) in enumerate(items):
        prefixed = compose.add_prefix(model, f"g{k}/", rename_inputs=False)
        for out, orig in zip(prefixed.graph.output, model.graph.output, strict=True):
            names[out.name] = (file, orig.name)
        if joined is None:
            joined = prefixed
            continue
        g = prefixed.graph
        joined.graph.node.extend(g.node)
        joined.graph.initializer.extend(g.initializer)
        joined.graph.output.extend(g.output)
    assert joined is not None
    onnx.checker.check_model(joined)
    return joined, names

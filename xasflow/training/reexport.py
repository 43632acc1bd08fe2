"""Re-export a bundle's float MLP graphs with the current exporter, weights unchanged.

A bundle keeps only its ONNX graphs, not torch state. This step reads a float MLP ensemble
graph back into :class:`~xasflow.training.nn_graph.EnsembleModule` (weights from the graph's
initializers, architecture from ``training.networks.mlp.config`` and the weight shapes),
exports it again with :func:`~xasflow.training.nn_export.ensemble_to_onnx` (fused for
serving) and checks that the new graph gives the old one's outputs on random and, with the
training data at hand, on the validation rows. Calibration, metrics and everything else in
the manifest stay as they are; quantise afterwards (``xasflow.training.quantize``)::

    python -m xasflow.training.reexport FLOAT_BUNDLE --out DIR
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

from xasflow.models.bundle import Manifest
from xasflow.models.bundle_write import write_bundle
from xasflow.training.nn import NetConfig
from xasflow.training.nn_export import ensemble_to_onnx
from xasflow.training.nn_graph import EnsembleModule, Member, MultiTaskNet, NetTask
from xasflow.training.rebuild import bundle_parser, open_for_rewrite, rebuild

#: Largest difference allowed between the old graph's outputs and the re-exported one's.
TOLERANCE = 1e-4


def graph_weights(graph: bytes) -> dict[str, np.ndarray]:
    """Initializers by name, with the names torch's exporter made aliases (Identity) of them."""
    model = onnx.load_from_string(graph)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in weights:
            weights[node.output[0]] = weights[node.input[0]]
    return weights


def _layout_error(where: str) -> ValueError:
    return ValueError(
        f"{where}: the graph's weights are not the per-member layout this step reads "
        "(a graph exported fused already needs no re-export)"
    )


def load_ensemble(
    graph: bytes, config: NetConfig, tasks: dict[str, NetTask], width: int
) -> EnsembleModule:
    """The MLP ensemble a float graph in the per-member layout was exported from: weights
    from its initializers, each member's served snapshot per task from which heads it has."""
    weights = graph_weights(graph)
    members = sorted({int(k.split(".")[1]) for k in weights if k.startswith("members.")})
    if not members:
        raise _layout_error("the graph has no members.* weights")
    built: list[Member] = []
    for m in members:
        prefix = f"members.{m}.snapshots."
        snaps = sorted(
            {int(k[len(prefix) :].split(".")[0]) for k in weights if k.startswith(prefix)}
        )
        nets, use = [], {}
        for s in snaps:
            net = MultiTaskNet(config, width, tasks)
            own = {
                k[len(f"{prefix}{s}.") :]: v
                for k, v in weights.items()
                if k.startswith(f"{prefix}{s}.")
            }
            state = {k: torch.from_numpy(np.array(v)) for k, v in own.items()}
            missing, unexpected = net.load_state_dict(state, strict=False)
            if unexpected or any(not k.startswith("heads.") for k in missing):
                raise _layout_error(f"member {m} snapshot {s}")
            nets.append(net.eval())
            use.update({t: len(nets) - 1 for t in tasks if f"heads.{t}.linear.weight" in own})
        if set(use) != set(tasks):
            raise ValueError(f"member {m} serves {sorted(use)}, the graph has {sorted(tasks)}")
        built.append(Member(nets, use))
    return EnsembleModule(built, tasks).eval()


def _tasks(graph: bytes, manifest: Manifest) -> dict[str, NetTask]:
    """The graph's tasks (its outputs, in order) with the manifest's kinds and classes."""
    names = [o.name for o in onnx.load_from_string(graph).graph.output][:-1:2]
    tasks: dict[str, NetTask] = {}
    for t in names:
        spec = manifest.tasks.get(t)
        if spec is None:
            raise ValueError(f"the graph has a task {t!r} the manifest does not describe")
        n = len(spec.classes or spec.outputs or [None])
        tasks[t] = NetTask(spec.kind, n, list(spec.classes) if spec.classes else None)
    return tasks


def _outputs(graph: bytes, x: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


def reexport_bundle(
    bundle: str | Path,
    out: str | Path,
    data: str | Path | None = None,
    signing_key: str | bytes | Path | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Write ``bundle`` to ``out`` with its float MLP graphs re-exported (see the module doc)."""
    bundle, manifest = open_for_rewrite(bundle, signing_key, "re-exporting")
    mlp = {m.file for s in manifest.tasks.values() for m in s.graph_members() if m.kind == "mlp"}
    if not mlp:
        raise ValueError(f"{manifest.bundle_id} serves no MLP graph")
    members = [m for s in manifest.tasks.values() for m in s.graph_members() if m.file in mlp]
    if any(m.precision != "float32" for m in members):
        raise ValueError(f"{manifest.bundle_id}: re-export the float bundle, then quantise")
    x = np.random.default_rng(0).normal(0, 1, (64, manifest.input_width)).astype(np.float32)
    if data is not None:
        x = np.vstack([x, rebuild(manifest, data).inputs("val").astype(np.float32)])
    files = {name: (bundle / name).read_bytes() for name in manifest.files}
    for name in sorted(mlp):
        old = files[name]
        config = NetConfig(**manifest.training["networks"]["mlp"]["config"])
        module = load_ensemble(old, config, _tasks(old, manifest), manifest.input_width)
        files[name] = ensemble_to_onnx(module, manifest.input_width)
        diff = max(
            float(np.max(np.abs(a - b)))
            for a, b in zip(_outputs(old, x), _outputs(files[name], x), strict=True)
        )
        if diff > TOLERANCE:
            raise ValueError(f"{name}: the re-exported graph differs by {diff:.3g}")
        log(
            f"{name}: {len(old)} -> {len(files[name])} bytes, outputs within {diff:.2g} on {len(x)} rows"
        )
    return write_bundle(out, manifest, files, signing_key=signing_key)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: re-export one float bundle."""
    args = bundle_parser(__doc__.splitlines()[0]).parse_args(argv)
    if args.out is None:
        raise SystemExit("--out is required (the float bundle is kept as it is)")
    print(f"wrote {reexport_bundle(args.bundle, args.out, args.data, args.signing_key)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

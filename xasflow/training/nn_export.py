"""ONNX export of a network ensemble: one graph, input ``x`` with a dynamic batch axis.

torch 2.13 defaults to the ``torch.export``-based exporter, which needs ``onnxscript`` (not a
dependency); these networks are plain feed-forward modules, so the TorchScript-tracing exporter
(``dynamo=False``, opset 17) exports them exactly. Its deprecation warning is silenced here.
"""

from __future__ import annotations

import io
import warnings

import onnx
import torch

OPSET = 17


def ensemble_to_onnx(module: torch.nn.Module, width: int) -> bytes:
    """Serialised ONNX model of ``module`` (an ``EnsembleModule``) for (batch, ``width``) input."""
    names = module.output_names()
    module = module.eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.zeros(2, width),),
            buf,
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

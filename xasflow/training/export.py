"""Export fitted scikit-learn models to ONNX with the linear featurisation inside the graph.

Each task graph takes the bundle input ``x`` (gridded spectrum plus white-line scalars,
float32) and starts with one ``MatMul`` by the feature matrix of ``xasflow.spectra``; the
tree ensemble converted by skl2onnx follows. The daemon therefore never needs to know how
features are built, only how to grid a spectrum.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType

TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}


def to_onnx(estimator: Any, matrix: np.ndarray, input_name: str = "x", name: str = "task") -> bytes:
    """Serialized ONNX model computing ``estimator.predict[_proba](x @ matrix)``.

    Classifiers yield outputs ``label`` and ``probabilities`` (no ZipMap); regressors yield
    ``variable`` with shape (n, n_outputs).
    """
    n_in, n_feat = matrix.shape
    options = {id(estimator): {"zipmap": False}} if hasattr(estimator, "classes_") else None
    model = convert_sklearn(
        estimator,
        name=name,
        initial_types=[("features", FloatTensorType([None, n_feat]))],
        options=options,
        target_opset=TARGET_OPSET,
    )
    graph = model.graph
    old_input = graph.input[0].name
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [None, n_in]))
    graph.initializer.append(
        numpy_helper.from_array(matrix.astype(np.float32), name="feature_matrix")
    )
    graph.node.insert(
        0, helper.make_node("MatMul", [input_name, "feature_matrix"], [old_input], name="featurise")
    )
    onnx.checker.check_model(model)
    return model.SerializeToString()

"""Multi-task network ensembles: shapes, masking, per-task early stopping, ONNX parity, seeds."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the nn extra (torch) is not installed")
ort = pytest.importorskip("onnxruntime")

from xasflow.training.nn import (  # noqa: E402
    NetConfig,
    TaskTarget,
    fit_network_ensemble,
    resolve_device,
)
from xasflow.training.nn_augment import BatchAugmenter, NetAugment  # noqa: E402
from xasflow.training.nn_member import choose_snapshots  # noqa: E402

N, WIDTH = 240, 242
TRAIN, VAL, TEST = np.arange(0, 160), np.arange(160, 200), np.arange(200, 240)


def _data(seed: int = 0) -> tuple[np.ndarray, dict[str, TaskTarget]]:
    """Spectrum-like curves (an edge and a peak of varying height ``a`` and position ``b``)
    whose targets depend on ``a`` and ``b``."""
    rng = np.random.default_rng(seed)
    a, b = rng.uniform(0.5, 1.5, N), rng.uniform(0.2, 0.8, N)
    t = np.linspace(0.0, 1.0, 240)
    peak = a[:, None] * np.exp(-(((t - b[:, None]) / 0.05) ** 2))
    y = 1 - np.exp(-5 * t) + peak + rng.normal(0, 0.02, (N, 240))
    idx = np.argmax(y, axis=1)
    x = np.column_stack([y, -3.5 + 120 * t[idx], y[np.arange(N), idx]]).astype(np.float32)
    cn = np.where(b < 0.5, 4, 6)
    cn[a > 1.3] = 2
    valid_d = rng.random(N) > 0.2
    distance = np.where(valid_d, 1.9 + 0.2 * b, np.nan)
    motifs = np.column_stack([a - 0.5, b, np.zeros(N)])
    return x, {
        "cn": TaskTarget("classifier", cn, np.ones(N, bool)),
        "valence": TaskTarget("classifier", np.where(a > 1.0, "Cu+", "Cu2+"), np.ones(N, bool)),
        "distance": TaskTarget("regressor", distance, valid_d),
        "motifs": TaskTarget("multi_regressor", motifs, np.ones(N, bool)),
    }


def _cfg(**kw) -> NetConfig:
    base = dict(
        members=2,
        hidden=(24, 16),
        cnn_channels=(4, 6),
        cnn_hidden=(16,),
        max_epochs=8,
        patience=3,
        batch_size=32,
        threads=1,
        lr=3e-3,
        max_snapshots=4,  # one per task: every task served by its own best epoch
    )
    return NetConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def mlp():
    x, targets = _data()
    return x, targets, fit_network_ensemble(x, targets, TRAIN, VAL, _cfg(), log=lambda _: None)


def test_shapes_and_probabilities(mlp) -> None:
    x, _, ens = mlp
    pred = ens.predict(x[TEST])
    assert ens.tasks["cn"].classes == [2, 4, 6]
    assert ens.tasks["valence"].classes == ["Cu+", "Cu2+"]
    assert pred["cn"].shape == (40, 3)
    assert pred["valence"].shape == (40, 2)
    assert pred["distance"].shape == (40,)
    assert pred["motifs"].shape == (40, 3)
    np.testing.assert_allclose(pred["cn"].sum(axis=1), 1.0, atol=1e-6)
    assert (pred["motifs"] >= 0).all()
    members = ens.predict_members(x[TEST])
    assert members["cn"].shape == (2, 40, 3)
    assert members["distance"].shape == (2, 40)
    np.testing.assert_allclose(members["cn"].mean(axis=0), pred["cn"], atol=1e-6)
    assert not np.allclose(members["distance"][0], members["distance"][1])
    assert [m["seed"] for m in ens.members_info] == [0, 1]
    with pytest.raises(ValueError, match=r"\(n, 242\)"):
        ens.predict(x[:3, :240])


def test_learns_the_tasks(mlp) -> None:
    x, targets, ens = mlp
    pred = ens.predict(x[TEST])
    d = targets["distance"]
    ok = TEST[d.valid[TEST]]
    mae = np.mean(np.abs(ens.predict(x[ok])["distance"] - d.y[ok]))
    assert mae < 0.5 * np.mean(np.abs(d.y[ok] - np.nanmean(d.y[TRAIN])))
    cn = np.array(ens.tasks["cn"].classes)[pred["cn"].argmax(axis=1)]
    modal = np.mean(targets["cn"].y[TEST] == np.bincount(targets["cn"].y[TRAIN]).argmax())
    assert np.mean(cn == targets["cn"].y[TEST]) > modal + 0.1


def test_early_stopping_keeps_each_tasks_best_epoch(mlp) -> None:
    x, targets, ens = mlp
    members = ens.predict_members(x[VAL])
    for k, info in enumerate(ens.members_info):
        for task, history in info["val_history"].items():  # validation error rate / MAE
            assert info["best_epoch"][task] == int(np.argmin(history))
        # the kept weights reproduce the best epoch's validation loss
        best = info["best_epoch"]
        p = members["cn"][k]
        codes = np.searchsorted([2, 4, 6], targets["cn"].y[VAL])
        ce = -np.mean(np.log(p[np.arange(len(VAL)), codes]))
        assert ce == pytest.approx(info["val_loss"]["cn"][best["cn"]], abs=1e-4)
        assert np.mean(p.argmax(axis=1) != codes) == pytest.approx(min(info["val_history"]["cn"]))
        d = targets["distance"]
        ok = d.valid[VAL]
        scale = np.nanstd(d.y[TRAIN][d.valid[TRAIN]])
        err = np.abs(members["distance"][k][ok] - d.y[VAL][ok]) / scale
        beta = ens.config.huber
        huber = np.mean(np.where(err < beta, 0.5 * err**2 / beta, err - 0.5 * beta))
        assert huber == pytest.approx(info["val_loss"]["distance"][best["distance"]], rel=1e-3)
        mae = np.mean(err)
        assert mae == pytest.approx(min(info["val_history"]["distance"]), rel=1e-3)


def test_choose_snapshots_bounds_the_snapshots() -> None:
    # three tasks, best at epochs 1, 3 and 4; epoch 3 is nearly as good for the third task
    history = np.array(
        [
            [1.0, 0.5, 0.6, 0.8, 0.9],
            [1.0, 0.9, 0.8, 0.4, 0.5],
            [1.0, 0.9, 0.8, 0.41, 0.4],
        ]
    )
    assert choose_snapshots(history, [True] * 3, 3) == ([1, 3, 4], [0, 1, 2])
    epochs, use = choose_snapshots(history, [True] * 3, 2)
    assert epochs == [3, 1]  # epoch 3 serves two tasks, so it comes first (the embedding's)
    assert use == [1, 0, 0]
    epochs, use = choose_snapshots(history, [True] * 3, 1)
    assert epochs == [3] and use == [0, 0, 0]
    # a task without validation rows does not vote; it takes the most used snapshot (on a
    # tie, the earlier epoch)
    assert choose_snapshots(history, [True, True, False], 2) == ([1, 3], [0, 1, 0])
    assert choose_snapshots(history, [False, True, True], 2) == ([3, 4], [0, 0, 1])


def test_invalid_rows_and_zero_weights_do_not_train() -> None:
    x, targets = _data()
    cfg = _cfg(members=1, max_epochs=3)
    a = fit_network_ensemble(x, targets, TRAIN, VAL, cfg, log=lambda _: None)
    garbage = dict(targets)
    d = targets["distance"]
    garbage["distance"] = TaskTarget("regressor", np.where(d.valid, d.y, 1e6), d.valid)
    b = fit_network_ensemble(x, garbage, TRAIN, VAL, cfg, log=lambda _: None)
    np.testing.assert_array_equal(a.predict(x)["distance"], b.predict(x)["distance"])
    # a zero weight is the same as an invalid row
    y_any = np.nan_to_num(d.y, nan=5.0)
    weighted = dict(targets)
    weighted["distance"] = TaskTarget("regressor", y_any, np.ones(N, bool), weight=d.valid * 1.0)
    masked_val = dict(weighted)  # validation loss also weighted: same masking on both sides
    c = fit_network_ensemble(x, masked_val, TRAIN, VAL, cfg, log=lambda _: None)
    np.testing.assert_allclose(a.predict(x)["cn"], c.predict(x)["cn"], atol=1e-5)


def test_deterministic_for_a_seed() -> None:
    x, targets = _data()
    cfg = _cfg(members=1, max_epochs=3)
    a = fit_network_ensemble(x, targets, TRAIN, VAL, cfg, log=lambda _: None)
    b = fit_network_ensemble(x, targets, TRAIN, VAL, cfg, log=lambda _: None)
    c = fit_network_ensemble(
        x, targets, TRAIN, VAL, cfg.model_copy(update={"seed": 7}), log=lambda _: None
    )
    np.testing.assert_array_equal(a.predict(x)["cn"], b.predict(x)["cn"])
    assert not np.allclose(a.predict(x)["cn"], c.predict(x)["cn"])


def test_outlier_spectra_are_clipped(mlp) -> None:
    x, _, ens = mlp
    big, capped = x[TEST[:4]].copy(), x[TEST[:4]].copy()
    big[:, 100:110] = 700.0
    capped[:, 100:110] = 5.0
    pa, pb = ens.predict(big), ens.predict(capped)
    for task in pa:
        np.testing.assert_array_equal(pa[task], pb[task])
        assert np.isfinite(pa[task]).all()


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_onnx_matches_torch(arch: str, mlp) -> None:
    if arch == "mlp":
        x, _, ens = mlp
    else:
        x, targets = _data()
        ens = fit_network_ensemble(x, targets, TRAIN, VAL, _cfg(arch="cnn"), log=lambda _: None)
    sess = ort.InferenceSession(ens.to_onnx(), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["x"]
    names = [o.name for o in sess.get_outputs()]
    assert names == [
        "cn",
        "cn_std",
        "valence",
        "valence_std",
        "distance",
        "distance_std",
        "motifs",
        "motifs_std",
        "embedding",
    ]
    for rows in (TEST[:1], np.resize(TEST, 64)):
        got = dict(zip(names, sess.run(None, {"x": x[rows]}), strict=True))
        want = ens.predict(x[rows])
        members = ens.predict_members(x[rows])
        for task, value in want.items():
            onnx_value = got[task][:, 0] if task == "distance" else got[task]
            assert onnx_value.shape == value.shape
            assert np.max(np.abs(onnx_value - value)) <= 1e-4
            std = members[task].std(axis=0)
            onnx_std = got[f"{task}_std"][:, 0] if task == "distance" else got[f"{task}_std"]
            assert np.max(np.abs(onnx_std - std)) <= 1e-4
        np.testing.assert_allclose(got["embedding"], ens.embedding(x[rows]), atol=1e-4)
        assert got["embedding"].shape == (len(rows), 16)
        np.testing.assert_allclose(got["cn"].sum(axis=1), 1.0, atol=1e-5)


def _graph_outputs(graph: bytes, x: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def _matmuls(graph: bytes) -> int:
    import onnx

    ops = [n.op_type for n in onnx.load_from_string(graph).graph.node]
    return sum(op in ("Gemm", "MatMul", "MatMulInteger") for op in ops)


def test_fused_graph_serves_the_members_function(mlp) -> None:
    """The served (fused) graph computes what the per-member layout computes, in float and in
    int8, with one first layer for all towers and one head matrix per tower."""
    from xasflow.training.nn_export import ensemble_to_onnx, fuse
    from xasflow.training.quantize import quantize_graph

    x, _, ens = mlp
    plain = ensemble_to_onnx(ens.module, ens.width, fused=False)
    fused = ensemble_to_onnx(ens.module, ens.width)
    towers = len(fuse(ens.module).heads)
    snapshots = [len(m.snapshots) for m in ens.module.members]
    assert towers == sum(snapshots)  # max_snapshots=4: members serve tasks from several epochs
    layers = len(_cfg().hidden)
    members = len(snapshots)
    serving = len({(m, s) for m, mem in enumerate(ens.module.members) for s in mem.use.values()})
    assert _matmuls(plain) == sum(snapshots) * layers + members * len(ens.tasks)
    # one first layer, each tower's deeper layers, one head matrix per tower serving a task
    assert _matmuls(fused) == 1 + towers * (layers - 1) + serving
    for rows in (TEST[:1], TEST):
        for a, b in zip(
            _graph_outputs(plain, x[rows]), _graph_outputs(fused, x[rows]), strict=True
        ):
            assert a.shape == b.shape
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
        qa = _graph_outputs(quantize_graph(plain), x[rows])
        qb = _graph_outputs(quantize_graph(fused), x[rows])
        for a, b in zip(qa, qb, strict=True):
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)


def test_reexport_reads_the_member_layout_back(mlp) -> None:
    """A float graph in the per-member layout (what bundles held before the fused export) gives
    back the very module it came from; its fused re-export serves the same answers."""
    from xasflow.training.nn_export import ensemble_to_onnx
    from xasflow.training.reexport import load_ensemble

    x, _, ens = mlp
    plain = ensemble_to_onnx(ens.module, ens.width, fused=False)
    module = load_ensemble(plain, ens.config, ens.tasks, ens.width)
    rows = torch.from_numpy(x[TEST])
    with torch.no_grad():
        for a, b in zip(module(rows), ens.module(rows), strict=True):
            assert torch.equal(a, b)
    again = ensemble_to_onnx(module, ens.width)
    for a, b in zip(_graph_outputs(plain, x[TEST]), _graph_outputs(again, x[TEST]), strict=True):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="per-member layout"):
        load_ensemble(again, ens.config, ens.tasks, ens.width)


def test_cnn_ensembles_are_exported_unfused() -> None:
    from xasflow.training.nn_export import fuse

    x, targets = _data()
    ens = fit_network_ensemble(
        x, targets, TRAIN, VAL, _cfg(arch="cnn", members=1, max_epochs=2), log=lambda _: None
    )
    assert fuse(ens.module) is None


def test_bad_input_is_rejected() -> None:
    x, targets = _data()
    bad = x.copy()
    bad[3, 7] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        fit_network_ensemble(bad, targets, TRAIN, VAL, _cfg(), log=lambda _: None)
    with pytest.raises(ValueError, match="kind"):
        fit_network_ensemble(
            x,
            {"cn": TaskTarget("ranker", targets["cn"].y, targets["cn"].valid)},
            TRAIN,
            VAL,
            _cfg(),
        )
    with pytest.raises(ValueError, match="clash"):
        fit_network_ensemble(x, {"embedding": targets["cn"]}, TRAIN, VAL, _cfg())
    with pytest.raises(ValueError, match="validation rows"):
        fit_network_ensemble(x, targets, TRAIN, np.array([], int), _cfg())


# Where networks train: the device is resolved strictly and recorded per member; a GPU run
# sees the same batches and augmentation draws as a CPU run (the GPU tests run only where torch
# sees a CUDA device; nothing else depends on one).
GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not GPU, reason="torch sees no CUDA GPU on this machine")
GRID = np.linspace(-3.5, 116.5, 240)


def test_devices_are_resolved_strictly() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if GPU else "cpu")
    for bad in ("tpu", "gpu0", ""):
        with pytest.raises(ValueError, match="device"):
            resolve_device(bad)
    if not GPU:  # never a silent fall-back to the CPU when a GPU was asked for
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_each_member_records_where_it_trained() -> None:
    x, targets = _data()
    ens = fit_network_ensemble(
        x, targets, TRAIN, VAL, _cfg(max_epochs=2), log=lambda _: None, device="cpu"
    )
    assert [m["device"] for m in ens.members_info] == ["cpu", "cpu"]


@needs_gpu
def test_gpu_augmentation_draws_what_the_cpu_draws() -> None:
    recipe = NetAugment(
        p=0.7,
        shift_ev=1.0,
        gauss_fwhm_ev=2.0,
        lorentz_fwhm_ev=1.0,
        scale_sigma=0.06,
        noise_sigma=0.005,
    )
    x = torch.from_numpy(_data()[0][:64])
    cpu = BatchAugmenter(recipe, GRID)(x, torch.Generator().manual_seed(3))
    gpu = BatchAugmenter(recipe, GRID).to(torch.device("cuda"))(
        x.cuda(), torch.Generator().manual_seed(3)
    )
    assert gpu.device.type == "cuda"
    np.testing.assert_allclose(gpu.cpu().numpy(), cpu.numpy(), atol=1e-5)


@needs_gpu
def test_a_gpu_member_trains_as_the_cpu_member_and_comes_back_to_the_cpu() -> None:
    """Without dropout (whose masks come from each device's own generator) a GPU member sees
    the same batches and draws as the CPU one: the same predictions within float noise."""
    x, targets = _data()
    cfg = _cfg(
        members=1,
        max_epochs=4,
        dropout=0.0,
        augment=NetAugment(p=0.5, shift_ev=1.0, noise_sigma=0.005),
    )
    cpu = fit_network_ensemble(x, targets, TRAIN, VAL, cfg, log=lambda _: None, grid=GRID)
    gpu = fit_network_ensemble(
        x, targets, TRAIN, VAL, cfg, log=lambda _: None, grid=GRID, device="cuda"
    )
    assert gpu.members_info[0]["device"].startswith("cuda:")
    assert {p.device.type for p in gpu.module.parameters()} == {"cpu"}
    assert {b.device.type for b in gpu.module.buffers()} == {"cpu"}
    a, b = cpu.predict(x), gpu.predict(x)
    for task in a:
        np.testing.assert_allclose(b[task], a[task], atol=2e-3, err_msg=task)
    assert len(gpu.to_onnx()) > 0


_TORCH_SEES = """
import importlib.abc, os, sys
seen = []
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("OMP_WAIT_POLICY"))
        return None
sys.meta_path.insert(0, Watch())
import xasflow.training.fit
print(seen)
"""


def test_torch_loads_with_passive_openmp_waits_whichever_module_imports_it() -> None:
    """``OMP_WAIT_POLICY`` is read when torch loads: the training command reaches torch
    through ``fit`` -> ``nn_augment``, before ``nn``, so the policy must already be set then."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run(
        [sys.executable, "-c", _TORCH_SEES], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "['PASSIVE']"

"""Shared pytest fixtures: locations of the shared data (skipping clearly when absent), one
tiny Cu K bundle trained from the synthetic FEFF tree once per session, the browser tests'
daemon and chromium; the pipeline tests' registry and pipeline over a copy of the tiny
bundle; the 0MQ input tests' teardown (``closing``); the dashboard tests' daemon (``dash``);
the training tests' synthetic tree, its dataset, the model trained on it and its bundle, each
made once per session."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from dashboard_helpers import RATE_HZ
from epics_support import CaPorts, loopback_ca, running_ioc
from helpers import Harness, LoopbackProxy, daemon_config, free_port
from kafka_broker import Broker, BrokerUnavailable

from xasflow import paths

if TYPE_CHECKING:
    from xasflow.daemon.counters import Counters
    from xasflow.daemon.pipeline import Pipeline
    from xasflow.daemon.registry import ModelRegistry


@pytest.fixture(scope="session")
def cu_archive() -> Path:
    """The shared Cu FEFF archive, or a skip that says where it was looked for."""
    path = paths.cu_feff_archive()
    if not path.exists():
        pytest.skip(f"shared Cu FEFF data not found at {path} (set {paths.SHARED_DATA_ENV})")
    return path


@pytest.fixture(scope="session")
def xdi_library() -> Path:
    """The shared XAS Data Library, or a skip that says where it was looked for."""
    path = paths.xas_data_library()
    if not path.exists():
        pytest.skip(f"shared XAS Data Library not found at {path} (set {paths.SHARED_DATA_ENV})")
    return path


@pytest.fixture(scope="session")
def cuo_xdi(xdi_library: Path) -> Path:
    """Measured CuO tenorite (13 K) of the shared library, as an XDI file."""
    return xdi_library / "Cu" / "CuO_tenorite_13K_01.xdi"


@pytest.fixture(scope="session")
def cuo_columns(cuo_xdi: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CuO tenorite as a plain two-column file (energy eV, ln(i0/itrans))."""
    from xasflow.adapters.xdi import read_xdi, xdi_to_spectrum

    s = xdi_to_spectrum(read_xdi(cuo_xdi))
    path = tmp_path_factory.mktemp("cols") / "cuo.txt"
    path.write_text("".join(f"{e:.4f} {m:.6f}\n" for e, m in zip(s.energy, s.mu, strict=True)))
    return path


@pytest.fixture(scope="session")
def tiny_cu_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Cu K bundle (synthetic FEFF tree, 12 trees), alone in its models directory
    (``tiny_cu_bundle.parent``). Tests copy it before changing anything."""
    pytest.importorskip("sklearn")
    pytest.importorskip("pymatgen.core")
    return _tiny_bundle(tmp_path_factory, "Cu")


@pytest.fixture(scope="session")
def tiny_ni_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Ni K bundle, made like ``tiny_cu_bundle`` from the same prototypes with Ni."""
    pytest.importorskip("sklearn")
    pytest.importorskip("pymatgen.core")
    return _tiny_bundle(tmp_path_factory, "Ni")


@pytest.fixture(scope="session")
def tiny_mlp_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Cu K bundle trained with the latency-aware default choice, so its MLP serves
    the classifiers (its label cache: ``tiny_mlp_bundle.parent.parent / "cache"``)."""
    pytest.importorskip("sklearn")
    pytest.importorskip("torch")
    pytest.importorskip("pymatgen.core")
    return _tiny_bundle(tmp_path_factory, "Cu", serve_networks=True)


@pytest.fixture(scope="session")
def tiny_rivals_bundle(tiny_mlp_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_mlp_bundle`` served on its edges' rival rises (``xasflow.training.rivals``)."""
    from xasflow.training.rivals import rivals_bundle

    out = tmp_path_factory.mktemp("tiny-cu-rivals") / "models" / "cu-k"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XASFLOW_CACHE", str(tiny_mlp_bundle.parent.parent / "cache"))
        return rivals_bundle(tiny_mlp_bundle, out, log=lambda _: None)


def _tiny_bundle(
    tmp_path_factory: pytest.TempPathFactory, element: str, serve_networks: bool = False
) -> Path:
    """Train and export a tiny K-edge bundle of ``element`` from a synthetic FEFF tree."""
    from synthetic_feff import write_tree

    from xasflow.training.bundle_export import export_bundle
    from xasflow.training.dataset import build_feff_dataset
    from xasflow.training.fit import TrainConfig, train

    kind = "mlp" if serve_networks else "bundle"
    base = tmp_path_factory.mktemp(f"tiny-{element.lower()}-{kind}")
    tree = write_tree(base / "feff", per_type=8, element=element)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XASFLOW_CACHE", str(base / "cache"))
        ds = build_feff_dataset(tree, element, n_jobs=1, progress=False)
    # a small MLP ensemble beside the forest, so the served-choice path runs in the tests
    small_mlp = {"members": 2, "hidden": [32, 32], "max_epochs": 30, "patience": 10}
    cfg = TrainConfig(
        n_estimators=12,
        n_jobs=1,
        test_fraction=0.3,
        val_fraction=0.15,
        split_by="material",  # the synthetic tree has three formulas
        networks=("mlp",),
        network_overrides={"mlp": small_mlp},
    )
    if not serve_networks:
        # the daemon tests tamper with the tree graphs: the forest costs nothing, so it is
        # served wherever it is within the margin (the latency-aware default would serve the MLP)
        cfg = cfg.model_copy(update={"serve_tolerance": 0.0, "serve_costs": {"extra_trees": 0.0}})
    cfg = cfg.model_copy(update={"augment": cfg.augment.model_copy(update={"copies": 1})})
    out = base / "models" / f"{element.lower()}-k"
    return export_bundle(train(ds, cfg, log=lambda *_: None), out)


@pytest.fixture
def matrix_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """``prepare_batch`` runs its matrix path however few the rows (a stack below
    ``BATCH_MIN_ROWS`` goes to ``prepare`` row by row): for the tests that hold that path
    to ``prepare`` with small pages."""
    from xasflow.spectra import batch

    monkeypatch.setattr(batch, "BATCH_MIN_ROWS", 1)


@pytest.fixture
def short_busy_timeout(monkeypatch: pytest.MonkeyPatch) -> float:
    """The store journal's SQLite busy timeout at 0.5 s, not 5 s, for the tests that hold its
    write lock to make a journal write fail: that failure comes sooner, the rest is the same."""
    from xasflow.adapters import store_journal

    monkeypatch.setattr(store_journal, "BUSY_TIMEOUT_S", 0.5)
    return store_journal.BUSY_TIMEOUT_S


@pytest.fixture(scope="module")
def models_dir(tiny_cu_bundle: Path) -> Path:
    """A models/ directory holding the session's tiny Cu K bundle (read-only here)."""
    return tiny_cu_bundle.parent


@pytest.fixture(scope="module")
def shared_proxy() -> Iterator[LoopbackProxy]:
    """The proxy of the module-wide daemon (``harness``)."""
    p = LoopbackProxy()
    yield p
    p.close()


@pytest.fixture
def proxy() -> Iterator[LoopbackProxy]:
    """A proxy of its own, so no other daemon sees this test's documents."""
    p = LoopbackProxy()
    yield p
    p.close()


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    """One Kafka-protocol broker for the session, or a skip that says why none could start."""
    try:
        b = Broker().start()
    except BrokerUnavailable as exc:
        pytest.skip(f"no Kafka-protocol broker: {exc}")
    yield b
    b.stop(grace=0)  # the session is over: nothing waits for its clients


@pytest.fixture(scope="module")
def beamline(
    models_dir: Path, shared_proxy: LoopbackProxy, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Harness]:
    """The browser tests' daemon with its dashboard, a publisher and a results subscriber,
    warmed up (one per test module)."""
    cfg = daemon_config(models_dir, shared_proxy, tmp_path_factory.mktemp("store"))
    h = Harness(cfg, shared_proxy)
    yield h
    h.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless chromium (the system one, :mod:`browser_page`), closed after the module."""
    from browser_page import chromium

    with chromium() as b:
        yield b


# --------------------------------------------------------------------------- the pipeline
# tests (test_pipeline_*.py): a registry over a copy of the tiny Cu K bundle, and a pipeline
# that validates its documents, on a clock that stands 4 ms after the spectra's event time


@pytest.fixture
def model_dir(tiny_cu_bundle: Path, tmp_path: Path) -> Path:
    shutil.copytree(tiny_cu_bundle, tmp_path / "models" / "cu-k")
    return tmp_path / "models"


@pytest.fixture
def counters() -> Counters:
    from xasflow.daemon.counters import Counters

    return Counters()


@pytest.fixture
def registry(model_dir: Path, counters: Counters) -> ModelRegistry:
    from xasflow.daemon.registry import ModelRegistry

    return ModelRegistry(model_dir, counters)


@pytest.fixture
def pipeline(registry: ModelRegistry, counters: Counters) -> Pipeline:
    from pipeline_helpers import T0, Clock

    from xasflow.daemon.pipeline import Pipeline

    return Pipeline(registry, counters, validate=True, clock=Clock(T0 + 0.004))


# --------------------------------------------------------------------------- the 0MQ input
# tests (test_zmq_bus_*.py)


@pytest.fixture
def closing() -> Iterator[Callable[[Any], Any]]:
    """Register sources/publishers for teardown; asserts sources' threads really ended."""
    from xasflow.adapters.zmq_bus import ZmqDocumentSource

    objs: list[Any] = []
    yield lambda obj: objs.append(obj) or obj
    for obj in reversed(objs):
        if isinstance(obj, ZmqDocumentSource):
            assert obj.close(timeout=5.0)
        else:
            obj.close()
    alive = [t.name for t in threading.enumerate() if t.name == "xasflow-zmq-in"]
    assert alive == []


# --------------------------------------------------------------------------- the dashboard
# tests (test_dashboard_*.py)


@pytest.fixture(scope="module")
def dash(
    models_dir: Path,
    shared_proxy: LoopbackProxy,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Harness]:
    """A started daemon (dashboard on, default loopback host, no token), warmed up."""
    cfg = daemon_config(models_dir, shared_proxy, tmp_path_factory.mktemp("store"))
    cfg = cfg.with_updates({"http": {"dashboard_rate_hz": RATE_HZ}})
    h = Harness(cfg, shared_proxy)
    yield h
    h.close()


# --------------------------------------------------------------------------- the training
# tests (test_training_*.py): made once per session (the dataset takes some 20 s)


@pytest.fixture(scope="session")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from synthetic_feff import write_tree

    return write_tree(tmp_path_factory.mktemp("feff"), per_type=8)


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def dataset(tree: Path, cache: Path):  # type: ignore[no-untyped-def]
    from xasflow.training.dataset import build_feff_dataset

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XASFLOW_CACHE", str(cache))
        return build_feff_dataset(tree, "Cu", n_jobs=1, progress=False)


@pytest.fixture(scope="session")
def trained(dataset):  # type: ignore[no-untyped-def]
    from synthetic_feff import small_config

    from xasflow.training.fit import train

    return train(dataset, small_config(), log=lambda *_: None)


@pytest.fixture(scope="session")
def bundle(trained, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from xasflow.training.bundle_export import export_bundle

    return export_bundle(trained, tmp_path_factory.mktemp("b") / "cu-k")


# --------------------------------------------------------------------------- the EPICS tests
# (test_epics_*.py, and the daemon's own IOC in test_service_lifecycle.py): epics_support


@pytest.fixture
def ca_loopback(monkeypatch: pytest.MonkeyPatch) -> CaPorts:
    """Channel Access on two free loopback ports, for this test's servers and clients only."""
    pytest.importorskip("caproto")
    return loopback_ca(monkeypatch, CaPorts(free_port(), free_port()))


@pytest.fixture
def ioc_env(ca_loopback: CaPorts) -> Iterator[dict[str, Any]]:
    """A running IOC and a loopback-only client context; both torn down, threads checked."""
    with running_ioc(ca_loopback) as env:
        yield env

"""A simulated quick-XAS beamline: ophyd sim devices and a real bluesky RunEngine.

The detector channels I0, It and Ir are generated from real spectra (a sample
:class:`~xasflow.spectra.Spectrum` and a reference-foil spectrum, both on an absolute eV
axis) by :class:`BeamlineModel`, with counting noise, slow I0 drift, a smooth sample
background and a monochromator miscalibration shared by sample and reference (so aligning
to the reference foil undoes it). :class:`SimBeamline` runs plans on a RunEngine and
publishes every document through bluesky's 0MQ ``Publisher``; :func:`start_proxy` runs
bluesky's 0MQ ``Proxy`` in a subprocess.

Data keys are the same for both kinds of scan, so consumers need one code path:

* step scans (:func:`step_scan_plan`): one event per point; ``energy`` (the motor
  readback, nominal eV), ``I0``, ``It``, ``Ir`` are scalars.
* fly scans (:func:`fly_scan_plan`): one event per spectrum; ``energy``, ``I0``, ``It``,
  ``Ir`` are arrays of shape ``[N]`` (descriptor ``dtype: "array"``, ``shape: [N]``).

Start-document metadata (:func:`default_md`), i.e. what the daemon can rely on:

``element``, ``edge``
    absorber and edge of the sample (``"Cu"``, ``"K"``).
``edge_energy``
    the tabulated edge energy in eV (not measured).
``sample_name``
    a human-readable sample name.
``xas_mode``
    ``"transmission"``: mu = ln(I0/It); the reference foil is mu_ref = ln(It/Ir).
``xas_channels``
    role -> data key: ``{"energy": "energy", "i0": "I0", "it": "It", "ir": "Ir"}``.
``xas_scan``
    ``"step"`` or ``"fly"`` (added by the plans).
``reference_element``, ``reference_edge``
    the foil behind the sample, for :func:`xasflow.spectra.alignment_shift`.
``beamline_id``
    ``"xasflow-sim"``.
``demo_expected``
    only for a packaged demo sample: its expected labels (``cn``, ``motif``,
    ``oxidation_state``), ground truth like ``simulation``.
``simulation``
    ground truth (offset, flux, drift, thickness, seed, sources) for tests and
    benchmarks; a consumer must not use it for analysis.

Sample spectra: :func:`demo_spectra` gives the project's own FEFF10 spectra of Cu reference
compounds (``xasflow/data/demo``, see :mod:`xasflow.sim.feff_demo`), always available and
the default samples; :func:`sample_spectra` adds the measured spectra of the shared XAS Data
Library (:func:`library_spectra`) when it is present.

0MQ's slow joiner: a PUB socket drops messages until the subscription has propagated, so
:meth:`SimBeamline.warm_up` publishes tiny probe runs (a start document carrying
``xasflow_probe`` and its stop, no events, never through the RunEngine) until the consumer
reports one; :func:`is_probe` recognises them so consumers can skip them.
"""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Sequence
from typing import Any

import numpy as np

from xasflow.adapters.probes import PROBE_KEY
from xasflow.sim.devices import (
    EnergyAxis,
    QuickXasDetector,
    XasStepDetector,
    make_devices,
    make_quick_xas,
)
from xasflow.sim.model import (
    CHANNELS,
    BeamlineModel,
    BeamlineRangeError,
    fly_energies,
    step_energies,
)
from xasflow.sim.references import (
    default_reference,
    demo_spectra,
    library_spectra,
    sample_spectra,
    synthetic_foil,
)

__all__ = [
    "CHANNELS",
    "PROBE_KEY",
    "BeamlineModel",
    "BeamlineRangeError",
    "EnergyAxis",
    "ProxyProcess",
    "QuickXasDetector",
    "SimBeamline",
    "XasStepDetector",
    "default_md",
    "default_reference",
    "demo_spectra",
    "fly_energies",
    "fly_scan_plan",
    "is_probe",
    "library_spectra",
    "make_devices",
    "make_quick_xas",
    "sample_spectra",
    "start_proxy",
    "step_energies",
    "step_scan_plan",
    "synthetic_foil",
]


_PROBE_UID_PREFIX = "xasflow-probe-"
BEAMLINE_ID = "xasflow-sim"


# --------------------------------------------------------------------------- plans


def default_md(model: BeamlineModel) -> dict[str, Any]:
    """Start-document metadata for a run of ``model`` (keys documented in the module docstring)."""
    assert model.reference is not None
    sample = model.sample
    name = sample.meta.get("sample") or sample.meta.get("name") or sample.label
    expected = sample.meta.get("expected") if sample.meta.get("source") == "feff_demo" else None
    return {
        "element": model.element,
        "edge": model.edge,
        "edge_energy": float(model.edge_energy),
        "sample_name": str(name),
        "xas_mode": "transmission",
        "xas_channels": {"energy": "energy", "i0": "I0", "it": "It", "ir": "Ir"},
        "reference_element": model.reference.element or model.element,
        "reference_edge": model.reference.edge,
        "beamline_id": BEAMLINE_ID,
        **({"demo_expected": dict(expected)} if isinstance(expected, dict) else {}),
        "simulation": {
            "energy_offset": float(model.energy_offset),
            "i0_flux": float(model.i0_flux),
            "i0_drift": float(model.i0_drift),
            "sample_thickness": float(model.sample_thickness),
            "background": float(model.background),
            "seed": model.seed,
            "sample_source": str(sample.meta.get("source", "")),
            "reference_source": model.reference_source,
        },
    }


def _merge_md(model: BeamlineModel, scan: str, md: dict[str, Any] | None) -> dict[str, Any]:
    merged = default_md(model)
    merged["xas_scan"] = scan
    merged.update(md or {})
    return merged


def step_scan_plan(
    model: BeamlineModel,
    energies: Sequence[float] | np.ndarray,
    md: dict[str, Any] | None = None,
    *,
    dwell: float = 1.0,
    rng: np.random.Generator | None = None,
) -> Generator[Any, Any, str]:
    """A bluesky ``list_scan`` of the energy motor over ``energies``: one event per point.

    Energies outside ``model.energy_range`` raise BeamlineRangeError here, not mid-run.
    """
    import bluesky.plans as bp

    grid = np.asarray(energies, dtype=np.float64)
    model.true_energy(grid)
    motor, det = make_devices(model, rng)
    det.dwell.put(float(dwell))
    merged = _merge_md(model, "step", md)

    def plan() -> Generator[Any, Any, str]:
        det.start_scan(grid.size)
        energies: Any = [float(e) for e in grid]  # list_scan's stubs want (motor, list) pairs
        return (yield from bp.list_scan([det], motor, energies, md=merged))

    return plan()


def fly_scan_plan(
    model: BeamlineModel,
    energies: Sequence[float] | np.ndarray,
    n_spectra: int,
    md: dict[str, Any] | None = None,
    period: float = 0.0,
    *,
    dwell: float = 1.0,
    bidirectional: bool = False,
    rng: np.random.Generator | None = None,
) -> Generator[Any, Any, str]:
    """One quick-XAS run: a bluesky ``count`` of ``n_spectra`` events, each a whole spectrum.

    Events carry arrays of shape ``[len(energies)]``; ``period`` seconds pass between spectra.
    """
    import bluesky.plans as bp

    if n_spectra < 1:
        raise ValueError("n_spectra must be >= 1")
    det = make_quick_xas(model, energies, n_spectra, bidirectional=bidirectional, rng=rng)
    det.dwell.put(float(dwell))
    merged = _merge_md(model, "fly", md)
    merged.setdefault("num_points_per_spectrum", int(np.size(energies)))

    def plan() -> Generator[Any, Any, str]:
        det.start_scan(n_spectra)
        return (yield from bp.count([det], num=n_spectra, delay=period, md=merged))

    return plan()


# --------------------------------------------------------------------------- running it


def is_probe(name: str, doc: dict[str, Any]) -> bool:
    """True for the documents of a :meth:`SimBeamline.warm_up` probe run."""
    if name == "start":
        return PROBE_KEY in doc or str(doc.get("uid", "")).startswith(_PROBE_UID_PREFIX)
    if name == "stop":
        return str(doc.get("run_start", "")).startswith(_PROBE_UID_PREFIX)
    return False


class SimBeamline:
    """A RunEngine that publishes every document to a 0MQ proxy with bluesky's ``Publisher``.

    ``publish_to`` is the proxy's *in* address (None: no publishing); ``extra_callbacks``
    are subscribed too. The RunEngine has no signal handlers (``context_managers=[]``), so it
    can be driven from any thread. Call :meth:`close` (or use ``with``) to stop its loop.
    """

    def __init__(
        self,
        publish_to: str | None = "tcp://127.0.0.1:5577",
        prefix: bytes = b"",
        extra_callbacks: Iterable[Callable[[str, dict[str, Any]], Any]] = (),
    ) -> None:
        from bluesky import RunEngine

        self.RE = RunEngine({}, context_managers=[])
        self.publisher: Any = None
        self._closed = False
        try:
            if publish_to is not None:
                import zmq
                from bluesky.callbacks.zmq import Publisher

                self.publisher = Publisher(publish_to, prefix=prefix)
                # bluesky leaves LINGER infinite: close() would hang if the proxy is gone.
                sock = getattr(self.publisher, "_socket", None)
                if sock is not None:
                    sock.setsockopt(zmq.LINGER, 2000)
                self.RE.subscribe(self.publisher)
            for callback in extra_callbacks:
                self.RE.subscribe(callback)
        except BaseException:
            self.close()
            raise

    def run(self, plan: Iterable[Any]) -> list[str]:
        """Run a plan to completion; returns the uids of the runs it opened."""
        if self._closed:
            raise RuntimeError("SimBeamline is closed")
        result = self.RE(plan)
        uids: Any = getattr(result, "run_start_uids", result)
        return [str(u) for u in uids]

    def warm_up(
        self, seen: Callable[[str], bool], timeout: float = 15.0, interval: float = 0.02
    ) -> int:
        """Publish probe runs until ``seen(token)`` is true; returns how many were sent.

        Works around 0MQ's slow joiner. Each probe is a start (``xasflow_probe: token``) and
        its stop, sent straight to the publisher. TimeoutError after ``timeout`` seconds.
        """
        import event_model

        if self.publisher is None:
            raise RuntimeError("warm_up needs a publisher (publish_to was None)")
        token = uuid.uuid4().hex
        deadline = time.monotonic() + timeout
        sent = 0
        while True:
            bundle = event_model.compose_run(
                uid=f"{_PROBE_UID_PREFIX}{token}-{sent}",
                metadata={PROBE_KEY: token, "plan_name": "xasflow_probe"},
            )
            self.publisher("start", bundle.start_doc)
            self.publisher("stop", bundle.compose_stop(exit_status="success"))
            sent += 1
            if seen(token):
                return sent
            if time.monotonic() > deadline:
                raise TimeoutError(f"no probe seen after {sent} sent in {timeout:g}s")
            time.sleep(interval)

    def close(self) -> None:
        """Close the publisher and stop the RunEngine's event-loop thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self.publisher is not None:
            self.publisher.close()
        loop = self.RE.loop
        if not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)
        thread = getattr(self.RE, "_th", None)
        if thread is not None:
            thread.join(5.0)
        if (thread is None or not thread.is_alive()) and not loop.is_closed():
            loop.close()

    def __enter__(self) -> SimBeamline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- the 0MQ proxy

_PROXY_SCRIPT = """
import sys
from bluesky.callbacks.zmq import Proxy
proxy = Proxy(sys.argv[1], sys.argv[2])
print(proxy.in_port, proxy.out_port, flush=True)
proxy.start()
"""


class ProxyProcess(subprocess.Popen[str]):
    """A running ``bluesky.callbacks.zmq.Proxy``; ``in_address`` for publishers, ``out_address``
    for subscribers. Stop it with :meth:`stop` (or terminate/wait, or ``with``)."""

    in_address: str
    out_address: str

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate (then kill if needed) and reap the proxy process."""
        if self.poll() is None:
            self.terminate()
            try:
                self.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                self.wait(timeout)


def start_proxy(
    in_port: int = 5577, out_port: int = 5578, host: str = "127.0.0.1", timeout: float = 30.0
) -> ProxyProcess:
    """Start bluesky's 0MQ Proxy in a subprocess and return once it is bound and listening.

    Port 0 picks a free port; the actual addresses are ``proc.in_address`` and
    ``proc.out_address``. The caller stops it (``proc.stop()``).
    """

    def address(port: int) -> str:
        return f"tcp://{host}:{port}" if port else f"tcp://{host}"

    with tempfile.TemporaryFile() as errors:
        proc = ProxyProcess(
            [sys.executable, "-c", _PROXY_SCRIPT, address(in_port), address(out_port)],
            stdout=subprocess.PIPE,
            stderr=errors,
            stdin=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert proc.stdout is not None
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(proc.stdout, selectors.EVENT_READ)
                ready = sel.select(timeout)
            line = proc.stdout.readline() if ready else ""
            parts = line.split()
            if len(parts) != 2:
                proc.stop()
                errors.seek(0)
                tail = errors.read().decode(errors="replace")[-2000:]
                why = "timed out" if not ready else f"exited with {proc.returncode}"
                raise RuntimeError(f"0MQ proxy on {host}:{in_port}/{out_port} {why}: {tail}")
        except BaseException:
            proc.stop()
            raise
        finally:
            proc.stdout.close()  # the proxy prints nothing else
    proc.in_address, proc.out_address = str(parts[0]), str(parts[1])
    return proc

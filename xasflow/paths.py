"""Where xasflow finds the shared data sets and keeps its caches."""

from __future__ import annotations

import os
from pathlib import Path

#: Environment variable that overrides the location of the shared data tree.
SHARED_DATA_ENV = "XASFLOW_SHARED_DATA"
#: Environment variable that overrides the cache directory.
CACHE_ENV = "XASFLOW_CACHE"

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    """Return the shared data directory (``$XASFLOW_SHARED_DATA`` or ``../shared/data``).

    The default is resolved next to the repository checkout, so it works from any cwd.
    """
    env = os.environ.get(SHARED_DATA_ENV)
    if env:
        return Path(env).expanduser()
    return REPO_ROOT.parent / "shared" / "data"


def cu_feff_archive() -> Path:
    """Path of the OmniXAS Cu FEFF archive inside the shared data tree."""
    return shared_data_dir() / "omnixas-cu-feff" / "cu_feff_xanes.tar.gz"


def xas_data_library() -> Path:
    """Path of the measured XAS Data Library (XDI files) inside the shared data tree."""
    return shared_data_dir() / "xas-data-library" / "data"


def cache_dir() -> Path:
    """Directory for derived, recomputable data (label caches); created on demand."""
    env = os.environ.get(CACHE_ENV)
    path = Path(env).expanduser() if env else REPO_ROOT / ".cache"
    path.mkdir(parents=True, exist_ok=True)
    return path

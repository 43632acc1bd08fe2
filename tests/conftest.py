"""Shared pytest fixtures: locations of the shared data, skipping clearly when absent."""

from __future__ import annotations

from pathlib import Path

import pytest

from xasflow import paths


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

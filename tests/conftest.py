"""Pytest fixtures shared by the test modules (helpers live in ``helpers.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # helpers.py and plain_reference.py, for every test module
from helpers import randomize_  # noqa: E402


@pytest.fixture(scope="session")
def full_model():
    """The released configuration with random weights (fast attention), shared by the slow tests."""
    from custom.networks import build_sam_med3d

    return randomize_(build_sam_med3d("sam_med3d"), seed=1).eval()

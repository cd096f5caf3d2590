"""Shared fixtures: real data is skipped when absent, unless MOE_LAB_REQUIRE_DATA=1 (CI)."""

import os

import pytest
import torch


def _require_data() -> bool:
    return os.environ.get("MOE_LAB_REQUIRE_DATA", "").lower() in {"1", "true", "yes"}


@pytest.fixture
def data_dir():
    """The folder holding the course's real data, from MOE_LAB_DATA."""
    folder = os.environ.get("MOE_LAB_DATA")
    if folder and os.path.isfile(os.path.join(folder, "cifar10-subset.npz")):
        return folder
    message = "real data not found: set MOE_LAB_DATA to the course data folder"
    if _require_data():
        pytest.fail(message + " (MOE_LAB_REQUIRE_DATA=1 forbids skipping)")
    pytest.skip(message)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    """Register the stand-in ``fake`` device before any test runs a backward pass: PyTorch's
    autograd engine sizes its per-device queues on its first backward, so a backend registered
    after that cannot run backward (an internal assert), whatever order tests run in."""
    from fake_device import fake_device  # tests/ is on sys.path (rootdir-relative conftest)

    try:
        fake_device()
    except RuntimeError:  # this PyTorch cannot host it: the tests that need it skip themselves
        pass

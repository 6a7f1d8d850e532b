"""Test-wide settings."""

import os

import torch

# The suite is dominated by many tiny tensor ops, where intra-op threads only add
# synchronisation overhead (and thrash badly when another process shares the cores).
torch.set_num_threads(1)

try:
    from hypothesis import settings

    # fast: CI (every property test runs 500 examples); slow: HYPOTHESIS_PROFILE=slow.
    settings.register_profile("fast", max_examples=500, derandomize=True, print_blob=True)
    settings.register_profile("slow", max_examples=5000, print_blob=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))
except ImportError:  # hypothesis is a test extra; tests/test_properties.py skips without it
    pass


import sys  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Each test starts without accelerate's process-wide state: it refuses a second Accelerator with other
    settings (mixed precision, cpu) in one process, which in-process trainer tests create in turn."""
    yield
    state = sys.modules.get("accelerate.state")
    if state is not None:
        state.AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def module_reference_cache(tmp_path_factory):
    """One reference cache for a whole test module (searches on one batch share their reference), kept out of
    ~/.cache. Use it with ``pytestmark = pytest.mark.usefixtures("module_reference_cache")``."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEWSTEP_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def gmm():
    """The GMM testbed (exact reference, nothing to load), one per test module."""
    from fewstep.eval.testbeds import GMMTestbed

    return GMMTestbed()

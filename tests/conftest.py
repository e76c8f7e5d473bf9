"""Test-wide settings: a headless plotting backend and one torch thread.

Small models run faster on one thread than on several competing ones, and one thread
also keeps floating-point reductions in the same order from run to run.
"""

import matplotlib
import pytest
import torch

matplotlib.use("Agg")


@pytest.fixture(autouse=True, scope="session")
def single_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

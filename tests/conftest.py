import os
import sys

import pytest
import torch

# Tests import the library and the top-level scripts from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module's tests. Tiny convolutions run fastest on one thread, and on a
    busy two-core machine two OpenMP threads mostly wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

"""Shared by the reference models' tests."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models' ops are far too small for intra-op threads: one thread runs them faster
    (much faster when other processes share the cores), and the results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

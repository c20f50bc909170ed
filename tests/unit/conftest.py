import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models decode faster on one thread, and a shared 2-core machine stays responsive."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)

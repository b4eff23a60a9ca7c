import pytest
import torch
from torch._dynamo.utils import counters

# Every tensor in this suite is tiny: one intra-op thread avoids thread-pool wake-ups that cost
# 100x the arithmetic on a loaded 2-core machine (a 16x8 MLP backward: 20 ms with 2 threads, 0.2 ms with 1).
torch.set_num_threads(1)


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches and counters cleared before and after the test (compile counts start at 0)."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()

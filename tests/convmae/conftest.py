import pytest
import torch

import convmae


@pytest.fixture(autouse=True)
def single_cpu_thread():
    """Tiny models run faster on one thread, and the shared 2-core CI box stays responsive."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_model():
    """convmae_tiny at 64x64 (a 4x4 token grid), deterministic weights, eval mode."""

    def make(**overrides):
        torch.manual_seed(0)
        return convmae.build_model("convmae_tiny", **overrides).eval()

    return make


@pytest.fixture
def images():
    def make(batch=2, size=64, seed=0):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(batch, 3, size, size, generator=g)

    return make

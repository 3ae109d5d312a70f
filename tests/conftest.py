import pytest
import torch


@pytest.fixture
def double_precision():
    """Comparisons of the math, not of float32 rounding."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)

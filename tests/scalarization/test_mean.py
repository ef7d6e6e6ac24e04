import pytest
import torch
from torch.testing import assert_close

from torchjd.scalarization import Mean


def test_worked_values() -> None:
    assert_close(Mean()(torch.tensor([1.0, 2.0, 3.0])), torch.tensor(2.0))
    assert_close(Mean()(torch.tensor([[1.0, 2.0], [3.0, 0.5]])), torch.tensor(1.625))
    assert_close(Mean()(torch.tensor(3.0)), torch.tensor(3.0))


def test_gradient_is_one_over_k() -> None:
    values = torch.tensor([[1.0, -2.0], [3.0, 0.5]], requires_grad=True)
    Mean()(values).backward()
    assert_close(values.grad, torch.full((2, 2), 0.25))


def test_empty_is_rejected() -> None:
    with pytest.raises(ValueError, match="at least one element"):
        Mean()(torch.zeros(0))


def test_repr_str() -> None:
    assert repr(Mean()) == "Mean()"
    assert str(Mean()) == "Mean"

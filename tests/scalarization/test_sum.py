import torch
from torch.testing import assert_close

from torchjd.scalarization import Sum


def test_worked_values() -> None:
    assert_close(Sum()(torch.tensor([1.0, 2.0, 3.0])), torch.tensor(6.0))
    assert_close(Sum()(torch.tensor([[1.0, 2.0], [3.0, 0.5]])), torch.tensor(6.5))
    assert_close(Sum()(torch.zeros(0)), torch.tensor(0.0))


def test_gradient_is_one() -> None:
    values = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    Sum()(values).backward()
    assert_close(values.grad, torch.ones(3))


def test_repr_str() -> None:
    assert repr(Sum()) == "Sum()"
    assert str(Sum()) == "Sum"

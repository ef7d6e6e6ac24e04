import math

import pytest
import torch
from torch.testing import assert_close

from torchjd.scalarization import IMTLL, UW

L = torch.tensor([1.0, 2.0, 4.0])


def _imtll_with(log_scale: list[float]) -> IMTLL:
    imtll = IMTLL(len(log_scale))
    with torch.no_grad():
        imtll.log_scale.copy_(torch.tensor(log_scale))
    return imtll


def test_worked_values() -> None:
    assert_close(IMTLL((3,))(L), torch.tensor(7.0))
    # e^0.5 + 2 e^-1 + 4 - (0.5 - 1 + 0)
    expected = math.exp(0.5) + 2 * math.exp(-1) + 4 + 0.5
    assert_close(_imtll_with([0.5, -1.0, 0.0])(L), torch.tensor(expected))
    assert_close(_imtll_with([0.5, -1.0, 0.0])(L), torch.tensor(6.8845), rtol=0.0, atol=1e-4)


def test_equals_twice_uw_with_opposite_parameter() -> None:
    s = torch.tensor([0.3, -0.7, 1.2])
    values = torch.tensor([0.5, 2.0, 4.0])
    imtll, uw = IMTLL(3), UW(3)
    with torch.no_grad():
        imtll.log_scale.copy_(s)
        uw.log_var.copy_(-s)
    assert_close(imtll(values), 2 * uw(values))


def test_gradients() -> None:
    s = torch.tensor([0.5, -1.0, 0.0])
    imtll = _imtll_with(s.tolist())
    values = L.clone().requires_grad_()
    imtll(values).backward()
    assert_close(values.grad, torch.exp(s))
    assert_close(imtll.log_scale.grad, torch.exp(s) * L - 1)


def test_learns_to_bring_the_losses_to_one() -> None:
    # For fixed L > 0, e^s L - s is minimal at s = -log L, where e^s L = 1.
    losses = torch.tensor([0.5, 2.0, 8.0])
    imtll = IMTLL(3)
    optimizer = torch.optim.Adam(imtll.parameters(), lr=0.05)
    for _ in range(600):
        optimizer.zero_grad()
        imtll(losses).backward()
        optimizer.step()
    assert_close(imtll.log_scale.detach(), -torch.log(losses), rtol=0.0, atol=1e-2)


def test_parameter() -> None:
    imtll = IMTLL(3)
    assert isinstance(imtll.log_scale, torch.nn.Parameter)
    assert imtll.log_scale.shape == (3,)
    assert list(imtll.state_dict()) == ["log_scale"]
    assert IMTLL((2, 3)).log_scale.shape == (2, 3)


@pytest.mark.parametrize(
    ("shape", "values_shape"), [((5,), (4,)), ((5,), (5, 1)), ((3, 4), (4, 3))]
)
def test_shape_mismatch(shape: tuple[int, ...], values_shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="shape"):
        IMTLL(shape)(torch.ones(values_shape))


def test_scalar_shape_and_negative_values() -> None:
    assert_close(IMTLL(())(torch.tensor(4.0)), torch.tensor(4.0))
    assert_close(IMTLL(2)(torch.tensor([-1.0, -3.0])), torch.tensor(-4.0))


def test_one_sgd_step_changes_log_scale_and_reset_zeros_it_in_place() -> None:
    imtll = IMTLL(2)
    optimizer = torch.optim.SGD(imtll.parameters(), lr=0.1)
    imtll(torch.tensor([2.0, 5.0])).backward()
    optimizer.step()
    # grad = L - 1 = [1, 4]
    assert_close(imtll.log_scale.detach(), torch.tensor([-0.1, -0.4]))
    parameter = imtll.log_scale
    imtll.reset()
    assert imtll.log_scale is parameter
    assert torch.equal(imtll.log_scale.detach(), torch.zeros(2))


def test_repr_str() -> None:
    assert repr(IMTLL(3)) == "IMTLL(shape=(3,))"
    assert repr(IMTLL((2, 3))) == "IMTLL(shape=(2, 3))"
    assert str(IMTLL(3)) == "IMTLL"

import math

import pytest
import torch
from torch.testing import assert_close

from torchjd.scalarization import DWA


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values)


def _expected(older: list[float], newer: list[float], values: list[float], t: float) -> float:
    """K * softmax(newer / older / T) . values, written out by hand."""
    rates = [n / o for n, o in zip(newer, older)]
    exps = [math.exp(r / t) for r in rates]
    k = len(values)
    return sum(k * e / sum(exps) * v for e, v in zip(exps, values))


def test_first_two_epochs_give_the_plain_sum() -> None:
    dwa = DWA()
    assert_close(dwa(_t(1.0, 3.0)), torch.tensor(4.0))
    dwa.step()
    assert_close(dwa(_t(2.0, 5.0)), torch.tensor(7.0))
    dwa.step()


def test_third_epoch_uses_the_rates() -> None:
    dwa = DWA()
    dwa(_t(1.0, 1.0))
    dwa.step()
    dwa(_t(1.0, 4.0))
    dwa.step()
    out = dwa(_t(3.0, 5.0))
    assert_close(out, torch.tensor(9.2703), rtol=0.0, atol=1e-4)
    assert math.isclose(float(out), _expected([1, 1], [1, 4], [3, 5], 2.0), rel_tol=1e-6)


def test_gradient_is_the_weights() -> None:
    dwa = DWA(temperature=1.0)
    dwa(_t(2.0, 1.0, 4.0))
    dwa.step()
    dwa(_t(1.0, 1.0, 1.0))
    dwa.step()
    values = _t(1.0, 1.0, 1.0).requires_grad_()
    dwa(values).backward()
    rates = torch.tensor([0.5, 1.0, 0.25])
    assert_close(values.grad, 3 * torch.softmax(rates, dim=0))
    assert_close(values.grad.sum(), torch.tensor(3.0))


def test_epoch_averages_over_batches() -> None:
    # Batches [2, 2], [0, 0] then [2, 6], [0, 2] average to [1, 1] and [1, 4].
    batched = DWA()
    batched(_t(2.0, 2.0))
    batched(_t(0.0, 0.0))
    batched.step()
    batched(_t(2.0, 6.0))
    batched(_t(0.0, 2.0))
    batched.step()
    single = DWA()
    single(_t(1.0, 1.0))
    single.step()
    single(_t(1.0, 4.0))
    single.step()
    assert_close(batched(_t(3.0, 5.0)), single(_t(3.0, 5.0)))


def test_only_the_last_two_epochs_count() -> None:
    dwa = DWA()
    for epoch in ([1.0, 2.0], [1.0, 1.0], [1.0, 4.0]):
        dwa(torch.tensor(epoch))
        dwa.step()
    assert len(dwa._previous_averages) == 2
    assert math.isclose(
        float(dwa(_t(3.0, 5.0))), _expected([1, 1], [1, 4], [3, 5], 2.0), rel_tol=1e-6
    )


def test_unequal_then_equal_rates() -> None:
    dwa = DWA()
    dwa(_t(1.0, 2.0))
    dwa.step()
    dwa(_t(2.0, 1.0))
    dwa.step()
    # Rates [2, 0.5]: not equal, so check the hand value, then equal rates.
    assert math.isclose(
        float(dwa(torch.ones(2))), _expected([1, 2], [2, 1], [1, 1], 2.0), rel_tol=1e-6
    )
    other = DWA()
    other(_t(1.0, 2.0))
    other.step()
    other(_t(2.0, 4.0))
    other.step()
    assert_close(other(torch.ones(2)), torch.tensor(2.0))


def test_temperature() -> None:
    dwa = DWA(temperature=0.5)
    dwa(_t(1.0, 1.0))
    dwa.step()
    dwa(_t(1.0, 4.0))
    dwa.step()
    expected = _expected([1, 1], [1, 4], [3, 5], 0.5)
    assert math.isclose(float(dwa(_t(3.0, 5.0))), expected, rel_tol=1e-6)


def test_consistently_negative_losses() -> None:
    dwa = DWA(temperature=1.0)
    dwa(_t(-2.0, -2.0))
    dwa.step()
    dwa(_t(-2.0, -8.0))
    dwa.step()
    values = torch.ones(2, requires_grad=True)
    dwa(values).backward()
    assert_close(values.grad, 2 * torch.softmax(torch.tensor([1.0, 4.0]), dim=0))


def test_step_without_forward_is_a_no_op() -> None:
    dwa = DWA()
    dwa.step()
    dwa.step()
    assert dwa._previous_averages == []
    assert dwa._loss_sum is None
    assert dwa._n_batches == 0


def test_shape_change_within_an_epoch() -> None:
    dwa = DWA()
    dwa(_t(1.0, 2.0))
    with pytest.raises(ValueError, match="shape"):
        dwa(_t(1.0, 2.0, 3.0))
    assert dwa._n_batches == 1
    assert torch.equal(dwa._loss_sum, _t(1.0, 2.0))


def test_shape_change_after_two_epochs() -> None:
    dwa = DWA()
    for _ in range(2):
        dwa(_t(1.0, 2.0))
        dwa.step()
    with pytest.raises(ValueError, match="shape"):
        dwa(_t(1.0, 2.0, 3.0))


def test_shape_change_between_epochs_before_weights_are_used() -> None:
    dwa = DWA()
    dwa(_t(1.0, 2.0))
    dwa.step()
    assert_close(dwa(_t(1.0, 2.0, 3.0)), torch.tensor(6.0))


def test_matrix_values() -> None:
    dwa = DWA()
    dwa(torch.ones(2, 2))
    dwa.step()
    dwa(torch.tensor([[1.0, 2.0], [0.5, 1.0]]))
    dwa.step()
    values = torch.ones(2, 2, requires_grad=True)
    dwa(values).backward()
    rates = torch.tensor([[1.0, 2.0], [0.5, 1.0]])
    assert_close(values.grad, 4 * torch.softmax(rates.flatten() / 2.0, dim=0).reshape(2, 2))


def test_reset() -> None:
    dwa = DWA()
    for _ in range(3):
        dwa(_t(1.0, 2.0))
        dwa.step()
    dwa(_t(1.0, 2.0))
    dwa.reset()
    assert dwa._previous_averages == []
    assert dwa._loss_sum is None
    assert dwa._n_batches == 0


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan")])
def test_invalid_temperature(temperature: float) -> None:
    with pytest.raises(ValueError, match="`temperature`"):
        DWA(temperature)


def test_repr_str() -> None:
    assert repr(DWA()) == "DWA(temperature=2.0)"
    assert repr(DWA(1.5)) == "DWA(temperature=1.5)"
    assert repr(DWA(3)) == "DWA(temperature=3)"
    assert str(DWA()) == "DWA"

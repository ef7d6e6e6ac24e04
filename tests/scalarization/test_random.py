import torch
from torch.testing import assert_close

from torchjd.scalarization import Random

L = torch.tensor([1.0, 2.0, 4.0])


def test_seed_zero_worked_values() -> None:
    torch.manual_seed(0)
    values = L.clone().requires_grad_()
    out = Random()(values)
    assert_close(out, torch.tensor(1.1963), rtol=0.0, atol=1e-4)
    out.backward()
    # The gradient is the drawn weights.
    assert_close(values.grad, torch.tensor([0.8446, 0.1349, 0.0205]), rtol=0.0, atol=1e-4)
    torch.manual_seed(0)
    assert_close(
        Random()(torch.tensor([[1.0, 2.0], [3.0, 0.5]])), torch.tensor(1.0122), atol=1e-4, rtol=0
    )


def test_weights_are_softmax_of_one_standard_normal_draw() -> None:
    torch.manual_seed(3)
    expected = torch.softmax(torch.randn(6), dim=0).reshape(2, 3)
    torch.manual_seed(3)
    values = torch.rand(2, 3).requires_grad_()
    torch.manual_seed(3)
    Random()(values).backward()
    assert_close(values.grad, expected)


def test_weights_are_positive_and_sum_to_one() -> None:
    values = torch.zeros(7, requires_grad=True)
    Random()(values).backward()
    assert (values.grad > 0).all()
    assert_close(values.grad.sum(), torch.tensor(1.0))
    assert_close(Random()(torch.ones(5)), torch.tensor(1.0))


def test_new_weights_at_every_call() -> None:
    random = Random()
    assert not torch.equal(random(L), random(L))


def test_same_seed_same_value() -> None:
    torch.manual_seed(0)
    first = Random()(L)
    torch.manual_seed(0)
    assert torch.equal(Random()(L), first)


def test_repr_str() -> None:
    assert repr(Random()) == "Random()"
    assert str(Random()) == "Random"

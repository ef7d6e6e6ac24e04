import pytest
import torch
from torch.testing import assert_close

from torchjd.scalarization import Constant


def test_worked_values() -> None:
    weights = torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert_close(Constant(weights)(torch.tensor([1.0, 2.0, 3.0, 4.0])), torch.tensor(3.0))
    r = torch.tensor([0.2, 0.3, 0.5])
    assert_close(Constant(r)(torch.tensor([1.0, 2.0, 4.0])), torch.tensor(2.8))


@pytest.mark.parametrize("shape", [(), (5,), (3, 4), (2, 3, 4)], ids=str)
def test_any_shape_with_matching_weights(shape: tuple[int, ...]) -> None:
    weights = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
    values = torch.full(shape, 2.0)
    assert_close(Constant(weights)(values), 2.0 * weights.sum())


def test_gradient_is_the_weights() -> None:
    weights = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    values = torch.ones(2, 2, requires_grad=True)
    Constant(weights)(values).backward()
    assert_close(values.grad, weights)


@pytest.mark.parametrize(
    ("weights_shape", "values_shape"), [((5,), (4,)), ((5,), (5, 1)), ((3, 4), (4, 3))]
)
def test_shape_mismatch(weights_shape: tuple[int, ...], values_shape: tuple[int, ...]) -> None:
    message = f"`weights` has shape {weights_shape}.*`values` has shape {values_shape}"
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Constant(torch.ones(weights_shape))(torch.ones(values_shape))


def test_scalar_weights() -> None:
    assert_close(Constant(torch.ones(()))(torch.ones(())), torch.tensor(1.0))


def test_weights_are_cast_to_the_values() -> None:
    weights = torch.tensor([1.0, 2.0], dtype=torch.float64)
    out = Constant(weights)(torch.tensor([1.0, 1.0]))
    assert out.dtype == torch.float32
    assert_close(out, torch.tensor(3.0))


def test_non_finite_weights_are_rejected() -> None:
    with pytest.raises(ValueError, match="`weights` must be finite"):
        Constant(torch.tensor([1.0, float("nan")]))(torch.ones(2))


def test_non_tensor_weights_are_rejected() -> None:
    with pytest.raises(TypeError, match="`weights` must be a Tensor"):
        Constant([1.0, 2.0])  # type: ignore[arg-type]


def test_weights_can_be_reassigned() -> None:
    constant = Constant(torch.tensor([1.0, 0.0]))
    constant.weights = torch.tensor([0.0, 1.0])
    assert_close(constant(torch.tensor([3.0, 5.0])), torch.tensor(5.0))


def test_weights_are_not_state() -> None:
    constant = Constant(torch.ones(3))
    assert list(constant.state_dict()) == []
    assert list(constant.parameters()) == []


def test_repr_str() -> None:
    assert repr(Constant(torch.tensor([1.0, 2.0]))) == "Constant(weights=tensor([1., 2.]))"
    assert str(Constant(torch.tensor([1.0, 2.0]))) == "Constant([1., 2.])"
    assert str(Constant(torch.tensor([0.2, 0.3, 0.5]))) == "Constant([0.2, 0.3, 0.5])"
    assert str(Constant(torch.ones(3, 4))) == "Constant(weights of shape (3, 4))"
    assert str(Constant(torch.ones(()))) == "Constant(weights of shape ())"

import pytest
import torch
from torch.testing import assert_close

from torchjd._accumulation import (
    IncompatibleJacobianError,
    accumulate_grads,
    accumulate_jacs,
    check_grad_targets,
    check_jac_targets,
)


def test_jac_stored_without_copy_then_added_in_place() -> None:
    p = torch.ones(2, requires_grad=True)
    first = torch.tensor([[1.0, 2.0]])
    accumulate_jacs([p], [first])
    assert p.jac is first
    accumulate_jacs([p], [torch.tensor([[10.0, 20.0]])])
    assert p.jac is first
    assert_close(first, torch.tensor([[11.0, 22.0]]))


def test_grad_stored_without_copy_then_added_in_place() -> None:
    p = torch.ones(2, requires_grad=True)
    first = torch.tensor([1.0, 2.0])
    accumulate_grads([p], [first])
    assert p.grad is first
    accumulate_grads([p], [torch.tensor([10.0, 20.0])])
    assert p.grad is first
    assert_close(first, torch.tensor([11.0, 22.0]))


def test_targets_must_require_grad_and_be_leaves() -> None:
    frozen = torch.ones(2)
    with pytest.raises(RuntimeError, match="does not require grad"):
        check_jac_targets([frozen], 1, "inputs")
    with pytest.raises(ValueError, match="does not require grad"):
        check_grad_targets([frozen], "tensors", requires_grad_error=ValueError)
    p = torch.ones(2, requires_grad=True)
    non_leaf = p * 2
    with pytest.raises(ValueError, match="retain_grad"):
        check_jac_targets([non_leaf], 1, "inputs")
    with pytest.raises(ValueError, match="retain_grad"):
        check_grad_targets([non_leaf], "tensors")
    non_leaf.retain_grad()
    check_jac_targets([non_leaf], 1, "inputs")
    check_grad_targets([non_leaf], "tensors")


@pytest.mark.parametrize(
    ("existing_shape", "m"),
    [((2, 3), 3), ((1, 3), 3), ((3, 3, 1), 3), ((3, 1), 3), ((3,), 3), ((3, 3), 2)],
)
def test_existing_jac_of_another_shape_is_rejected(existing_shape: tuple[int, ...], m: int) -> None:
    p = torch.ones(3, requires_grad=True)
    p.jac = torch.zeros(existing_shape)
    with pytest.raises(IncompatibleJacobianError, match=r"already has a `\.jac`"):
        check_jac_targets([p], m, "inputs")


def test_existing_jac_of_the_same_shape_is_accepted() -> None:
    p = torch.ones(3, requires_grad=True)
    p.jac = torch.zeros(4, 3)
    check_jac_targets([p], 4, "inputs")


def test_incompatible_jacobian_error_is_both_value_and_runtime_error() -> None:
    assert issubclass(IncompatibleJacobianError, ValueError)
    assert issubclass(IncompatibleJacobianError, RuntimeError)

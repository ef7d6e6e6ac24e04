"""The rules for writing into the ``.jac`` and ``.grad`` fields of tensors.

``.jac`` is a plain Python attribute holding a Jacobian of shape ``[m, *t.shape]``; ``.grad`` is
torch's gradient field. Both are writable only on tensors that require grad and are leaves (or
retain their grad), as torch does for ``.grad``. A new value is added in place to an existing one
(so aliases of the old tensor see the sum) or stored as is, without a copy.

The checks are separate from the writes so that the public functions can validate every target
before they compute or mutate anything.
"""

from collections.abc import Sequence

from torch import Tensor

from torchjd._validation import mark_consumed, rows_shape


class IncompatibleJacobianError(ValueError, RuntimeError):
    """A ``.jac`` field whose shape does not fit the tensor or the Jacobian to add to it.

    It is a :class:`ValueError` (a wrong value in the input) and also a :class:`RuntimeError`,
    the type that torch's in-place addition raises on a shape mismatch.
    """


def _check_writable(
    t: Tensor, name: str, index: int, field: str, requires_grad_error: type
) -> None:
    if not t.requires_grad:
        raise requires_grad_error(
            f"Element {index} of `{name}` (shape {tuple(t.shape)}) does not require grad, so its "
            f"`{field}` cannot be written. Call `requires_grad_()` on it or leave it out."
        )
    if not (t.is_leaf or t.retains_grad):
        raise ValueError(
            f"Element {index} of `{name}` (shape {tuple(t.shape)}) is not a leaf tensor and does "
            f"not retain its grad, so its `{field}` cannot be written. Call `retain_grad()` on "
            "it before the computation, or leave it out."
        )


def check_jac_targets(
    tensors: Sequence[Tensor], m: int, name: str, requires_grad_error: type = RuntimeError
) -> None:
    """Check that a Jacobian of ``m`` rows can be accumulated into the ``.jac`` of each tensor."""
    for i, t in enumerate(tensors):
        _check_writable(t, name, i, ".jac", requires_grad_error)
        if hasattr(t, "jac"):
            existing = t.jac
            expected = (m, *t.shape)
            if not isinstance(existing, Tensor) or tuple(existing.shape) != expected:
                got = tuple(existing.shape) if isinstance(existing, Tensor) else type(existing)
                raise IncompatibleJacobianError(
                    f"Element {i} of `{name}` (shape {tuple(t.shape)}) already has a `.jac` of "
                    f"shape {got}, which cannot accumulate a new Jacobian of shape "
                    f"{rows_shape(t.shape)} with m = {m}. Consume it with `jac_to_grad` or "
                    "delete it (`del t.jac`) before differentiating other objectives."
                )


def accumulate_jacs(tensors: Sequence[Tensor], jacobians: Sequence[Tensor]) -> None:
    """``t.jac += J`` in place if ``t`` has a ``.jac``, else ``t.jac = J`` (no copy)."""
    for t, jacobian in zip(tensors, jacobians):
        if hasattr(t, "jac"):
            t.jac.add_(jacobian)
        else:
            t.jac = jacobian


def check_grad_targets(
    tensors: Sequence[Tensor], name: str, requires_grad_error: type = RuntimeError
) -> None:
    """Check that a gradient can be accumulated into the ``.grad`` of each tensor."""
    for i, t in enumerate(tensors):
        _check_writable(t, name, i, ".grad", requires_grad_error)


def accumulate_grads(tensors: Sequence[Tensor], gradients: Sequence[Tensor]) -> None:
    """``t.grad += g`` in place if ``t.grad`` exists, else ``t.grad = g`` (no copy)."""
    for t, gradient in zip(tensors, gradients):
        if t.grad is None:
            t.grad = gradient
        else:
            t.grad.add_(gradient)


def consume_jacs(tensors: Sequence[Tensor]) -> None:
    """Delete the ``.jac`` fields (the aggregation keeps the values), remembering it."""
    for t in tensors:
        del t.jac
        mark_consumed(t)

"""Checks of the arguments of :mod:`torchjd.distributed`, done before anything is communicated."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import Tensor

from torchjd._validation import check_unique, materialise

ROWS = ("mean", "stack")


def check_choice(value: object, name: str, allowed: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in allowed:
        options = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"`{name}` must be one of {options}, got {value!r}.")


def check_bool(value: object, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool, got {value!r}.")


def validated_grad_params(
    grad_params: Iterable[Tensor] | None, tensors: Sequence[Tensor]
) -> list[Tensor]:
    """The ``.grad`` fields of the tensors of ``grad_params``, checked."""
    if grad_params is None:
        return []
    params = materialise(grad_params, "grad_params")
    check_unique(params, "grad_params")
    tensor_ids = {id(t) for t in tensors}
    grads = []
    for i, p in enumerate(params):
        if id(p) in tensor_ids:
            raise ValueError(
                f"Element {i} of `grad_params` (shape {tuple(p.shape)}) is also in `tensors`: a "
                "tensor's `.jac` is aggregated into its `.grad`, so it cannot also be listed for "
                "the reduction of its `.grad`. Leave it out of one of them."
            )
        if p.grad is None:
            raise ValueError(
                f"Element {i} of `grad_params` (shape {tuple(p.shape)}) has no `.grad` to reduce. "
                "List only tensors whose `.grad` was filled on every process (e.g. the task "
                "heads after `mtl_backward`)."
            )
        grads.append(p.grad)
    return grads


def check_one_device(jacobians: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
    device = jacobians[0].device
    for t in [*jacobians, *grads]:
        if t.device != device:
            raise ValueError(
                "The `.jac` fields of `tensors` and the `.grad` fields of `grad_params` must all "
                f"be on one device, to be sent in one buffer; got {device} and {t.device}."
            )

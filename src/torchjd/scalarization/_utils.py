"""Input checks and small helpers shared by the scalarizers."""

import operator
from collections.abc import Sequence

import torch
from torch import Tensor


def as_shape(shape: int | Sequence[int]) -> tuple[int, ...]:
    """Turn the ``shape`` argument of a scalarizer (``n`` or a sequence of sizes) into a tuple."""
    items = [shape] if not isinstance(shape, Sequence) else list(shape)
    try:
        if isinstance(shape, str) or any(isinstance(s, bool) for s in items):
            raise TypeError
        sizes = tuple(operator.index(s) for s in items)
    except TypeError:
        raise TypeError(f"`shape` must be an int or a sequence of ints, got {shape!r}.") from None
    if any(s < 0 for s in sizes):
        raise ValueError(f"`shape` must contain non-negative sizes only, got {shape!r}.")
    return sizes


def check_tensor(name: str, tensor: object, *, optional: bool = False) -> None:
    """Type check of a tensor hyper-parameter (no device synchronisation)."""
    if optional and tensor is None:
        return
    if not isinstance(tensor, Tensor):
        allowed = "a Tensor or None" if optional else "a Tensor"
        raise TypeError(f"`{name}` must be {allowed}, got {type(tensor).__name__}.")


def check_values_tensor(values: object) -> None:
    """Check that ``values`` is a real floating-point tensor (metadata only, no synchronisation)."""
    if not isinstance(values, Tensor):
        raise TypeError(f"`values` must be a Tensor, got {type(values).__name__}.")
    if not values.is_floating_point():
        raise TypeError(
            f"`values` must be a tensor of real floating-point dtype, got dtype {values.dtype}."
        )


def check_same_shape(name: str, tensor: Tensor, values: Tensor) -> None:
    """Raise if ``tensor`` (the hyper-parameter called ``name``) does not have the values' shape."""
    if tensor.shape != values.shape:
        raise ValueError(
            f"`{name}` must have the same shape as `values`: `{name}` has shape "
            f"{tuple(tensor.shape)} but `values` has shape {tuple(values.shape)}."
        )


def check_built_shape(owner: str, shape: torch.Size, values: Tensor) -> None:
    """Raise if ``values`` does not have the shape a scalarizer was built for."""
    if values.shape != shape:
        raise ValueError(
            f"{owner} was built for `values` of shape {tuple(shape)}, got `values` of shape "
            f"{tuple(values.shape)}."
        )


def check_values(
    values: Tensor,
    *,
    non_empty: bool = False,
    lower_bound: Tensor | float | None = None,
    lower_bound_text: str = "",
    finite: Sequence[tuple[str, Tensor]] = (),
    nonzero: Sequence[tuple[str, Tensor]] = (),
) -> None:
    """Check the values (and the tensor hyper-parameters used with them) before a scalarization.

    All the conditions are reduced to one boolean on the values' device and read with a single
    device-to-host synchronisation; only when it is false are the conditions examined one by one
    to build the error message.

    :param values: the values to scalarize; must be finite.
    :param non_empty: whether ``values`` must have at least one element.
    :param lower_bound: if given, every value must be ``>= lower_bound`` (a number or a tensor of
        the values' shape, on their device).
    :param lower_bound_text: how the bound is described in the error message.
    :param finite: ``(name, tensor)`` pairs of hyper-parameters that must be finite as well.
    :param nonzero: ``(name, tensor)`` pairs of hyper-parameters that must not be all zero.
    """
    if non_empty and values.numel() == 0:
        raise ValueError("`values` must have at least one element, got an empty tensor.")
    ok = torch.isfinite(values).all()
    if lower_bound is not None:
        ok = ok & (values >= lower_bound).all()
    for _, tensor in finite:
        ok = ok & torch.isfinite(tensor).all()
    for _, tensor in nonzero:
        ok = ok & (tensor != 0).any()
    if bool(ok):  # the one host synchronisation of the call
        return
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"`values` must be finite (no NaN nor infinity), got {values.detach()}.")
    if lower_bound is not None and not bool((values >= lower_bound).all()):
        raise ValueError(f"`values` must be {lower_bound_text}, got {values.detach()}.")
    for name, tensor in finite:
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"`{name}` must be finite (no NaN nor infinity), got {tensor}.")
    for name, tensor in nonzero:
        if not bool((tensor != 0).any()):
            raise ValueError(f"`{name}` must have at least one non-zero entry, got {tensor}.")
    raise AssertionError("unreachable: one of the checks above must have failed")

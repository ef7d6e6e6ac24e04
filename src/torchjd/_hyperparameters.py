"""Checks and display of the hyper-parameters of aggregators and scalarizers."""

from torch import Tensor


def format_vector(vector: Tensor) -> str:
    """Format a vector for ``str``: two decimals per entry, trailing zeros removed.

    ``tensor([0.1234, 1.005, 10., -0.5])`` gives ``"[0.12, 1., 10., -0.5]"``.
    """
    entries = [f"{float(x):.2f}".rstrip("0") for x in vector]
    return "[" + ", ".join(entries) + "]"


def check_vector(value: object, name: str, *, optional: bool = False) -> None:
    """A vector hyper-parameter must be a 1-D tensor (or ``None`` where ``optional``)."""
    if value is None and optional:
        return
    allowed = "a vector (a tensor of dimension 1)" + (" or None" if optional else "")
    if not isinstance(value, Tensor):
        hint = f", e.g. `torch.tensor({value!r})`" if isinstance(value, (list, tuple)) else ""
        raise TypeError(f"`{name}` must be {allowed}, got {type(value).__name__}{hint}.")
    if value.ndim != 1:
        raise ValueError(f"`{name}` must be {allowed}, got a tensor of shape {tuple(value.shape)}.")

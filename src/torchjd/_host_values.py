"""Python numbers back into a CPU tensor, for the computations done with Python floats (small
problems on the CPU, where reading a tensor synchronises with nothing)."""

from array import array
from collections.abc import Iterable

import torch
from torch import Tensor

# The array type of each dtype built through a buffer.
_TYPECODES = {torch.float32: "f", torch.float64: "d"}


def float32_values(values: Iterable[float]) -> list[float]:
    """The float32 values nearest to ``values`` (inf beyond its range), as Python floats: what a
    float32 tensor operation rounds its results to."""
    return array("f", values).tolist()


def host_tensor(values: list[float], dtype: torch.dtype) -> Tensor:
    """``torch.tensor(values, dtype=dtype)`` (1-D, on the CPU), with the same bits: a float32 or
    float64 array rounds Python floats as ``torch.tensor`` does, and the tensor takes over its
    buffer, in about a third of the time of converting the list value by value (a good part of a
    small call's cost). Other dtypes go through ``torch.tensor``."""
    code = _TYPECODES.get(dtype)
    if code is None or not values:
        return torch.tensor(values, dtype=dtype)
    return torch.frombuffer(array(code, values), dtype=dtype)

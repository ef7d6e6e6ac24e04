"""The dtype in which the small problems of an aggregation are solved.

In float16 and bfloat16, epsilons such as 1e-8 underflow, the trace of a finite Gramian can
overflow and ``linalg`` routines are not implemented. The small ``m × m`` problems (and their
normalisations) are therefore solved in float32 for half-precision inputs and the results are cast
back to the input's dtype. float32 and float64 inputs keep their own dtype, so their steps are
exactly those of the reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

_HALF = (torch.float16, torch.bfloat16)


def is_half(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` is float16 or bfloat16."""
    return dtype in _HALF


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for a half-precision dtype, the dtype itself otherwise."""
    return torch.float32 if dtype in _HALF else dtype


def promoted(tensor: Tensor) -> Tensor:
    """``tensor`` in its working dtype (no copy unless it is in half precision)."""
    return tensor.to(working_dtype(tensor.dtype))

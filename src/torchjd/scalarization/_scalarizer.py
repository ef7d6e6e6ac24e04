"""Base class of the scalarization package."""

from abc import ABC, abstractmethod

from torch import Tensor, nn

from torchjd._precision import is_half, promoted


class Scalarizer(nn.Module, ABC):
    """Abstract base of every scalarizer: turns a tensor of per-objective values into one scalar.

    A scalarizer receives the values of several objectives (typically the losses of several tasks,
    as a tensor of any shape) and returns a 0-dimensional tensor that can be back-propagated with a
    plain ``.backward()``. It is the loss-space counterpart of the aggregators of
    :mod:`torchjd.aggregation`, which combine gradients instead of values.

    Calling a scalarizer runs :meth:`forward` through :meth:`torch.nn.Module.__call__`, so forward
    hooks and pre-hooks registered on it run. The base class does not validate the input; each
    built-in scalarizer checks the values it receives (type, shape, finiteness and, where a
    logarithm is taken, the sign) with one device-to-host synchronisation per call.

    float16 and bfloat16 values are scalarized in float32 and the result is returned in their
    dtype (the gradient flows back through both casts): in half precision, constants such as
    ``1e-8`` underflow, squares of values whose result fits overflow, and sums of logarithms lose
    several percent. :meth:`forward` therefore receives values in their working dtype (see
    :mod:`torchjd._precision`). A subclass whose random draws must follow the values' own dtype
    sets ``_promotes_half = False``.
    """

    _promotes_half: bool = True

    def __init__(self) -> None:
        super().__init__()

    @abstractmethod
    def forward(self, values: Tensor, /) -> Tensor:
        """Combine ``values`` into a 0-dimensional tensor."""

    def __call__(self, values: Tensor, /) -> Tensor:
        if self._promotes_half and isinstance(values, Tensor) and is_half(values.dtype):
            return super().__call__(promoted(values)).to(values.dtype)
        return super().__call__(values)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __str__(self) -> str:
        return type(self).__name__

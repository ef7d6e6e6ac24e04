"""Base class of the scalarization package."""

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from torch import Tensor, nn

from torchjd._precision import is_half, promoted
from torchjd._tasks import restricted, validated_present, warn_no_task_present


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

    ``scalarizer(values, present=mask)`` combines only the values of the present tasks (a vector
    of values and one boolean per value): the result is the scalarizer's own result on the
    sub-vector, with its per-task hyper-parameters (``weights``, ``reference``...), parameters
    and state restricted to these tasks; an absent task's value is never read and its state is
    left as it was. A subclass declares what depends on the task index as the aggregators do:
    :attr:`_task_vectors`, :attr:`_task_counts` and :attr:`_task_state`.
    """

    _promotes_half: bool = True

    _task_vectors: ClassVar[tuple[str, ...]] = ()
    _task_counts: ClassVar[tuple[str, ...]] = ()
    _task_state: ClassVar[tuple[tuple[str, int, float | str], ...]] = ()

    def __init__(self) -> None:
        super().__init__()

    @abstractmethod
    def forward(self, values: Tensor, /) -> Tensor:
        """Combine ``values`` into a 0-dimensional tensor."""

    def __call__(
        self, values: Tensor, /, *, present: Tensor | Sequence[bool] | None = None
    ) -> Tensor:
        if present is None:
            return self._call_promoted(values)
        if not isinstance(values, Tensor) or values.ndim != 1:
            what = f"shape {tuple(values.shape)}" if isinstance(values, Tensor) else "no tensor"
            raise ValueError(
                f"`present` needs a vector of values (one per task), got {what}: flatten the "
                "values and the mask."
            )
        m = values.shape[0]
        indices = validated_present(present, m)
        if indices is None:
            return self._call_promoted(values)
        if len(indices) == 0:
            warn_no_task_present("the result is 0 and does not depend on any value", 2)
            return values[:0].sum()  # back-propagates zeros, never reads an absent value
        with restricted(self, indices, m):
            return self._call_promoted(values.index_select(0, indices.to(values.device)))

    def _call_promoted(self, values: Tensor) -> Tensor:
        if self._promotes_half and isinstance(values, Tensor) and is_half(values.dtype):
            return super().__call__(promoted(values)).to(values.dtype)
        return super().__call__(values)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __str__(self) -> str:
        return type(self).__name__

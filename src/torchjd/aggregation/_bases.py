"""Base classes of the aggregation package.

An :class:`Aggregator` turns a matrix ``J`` of shape ``[m, n]`` (one row per objective) into one
vector of shape ``[n]``. Most aggregators are *weighted*: a :class:`Weighting` computes a weight
vector ``w`` of shape ``[m]`` and the aggregation is ``w @ J``. When the weights depend on ``J``
only through its Gramian ``G = J J^T``, the aggregator is a :class:`GramianWeightedAggregator`;
this is what lets :func:`torchjd.autojac.jac_to_grad` aggregate without ever concatenating the
Jacobians of the individual parameters.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Generic, TypeVar, overload

import torch
from torch import Tensor, nn

from torchjd._precision import is_half, promoted
from torchjd._protocol import Need
from torchjd.linalg._gramian import compute_gramian
from torchjd.linalg._matrix import Matrix, PSDMatrix

_T = TypeVar("_T", bound=Tensor)
_V = TypeVar("_V")


class TaskIndexed:
    """What of a module depends on the index of the tasks, for steps where only some are present.

    The application pipeline restricts an aggregator (and every weighting inside it) to the
    present tasks for the duration of a step: the hyper-parameters named in
    :attr:`_task_vectors` (one value per task) become their sub-vectors, those in
    :attr:`_task_counts` (the number of tasks) become ``k``, and the state tensors of
    :attr:`_task_state` (``(name, n_axes, fill)``, the first ``n_axes`` dimensions indexed by the
    task) are gathered, then written back, so the absent tasks' state is left as it was. ``fill``
    (a float or ``"mean"``) initialises the never-seen tasks when the state is created in a step
    where some are absent. Declare these on the class that holds the attributes.
    """

    _task_vectors: ClassVar[tuple[str, ...]] = ()
    _task_counts: ClassVar[tuple[str, ...]] = ()
    _task_state: ClassVar[tuple[tuple[str, int, float | str], ...]] = ()


class Aggregator(TaskIndexed, nn.Module, ABC):
    """Abstract base of every aggregator: maps a matrix ``[m, n]`` to a vector ``[n]``.

    Calling an aggregator checks that its input is a matrix, then runs :meth:`forward` through
    :meth:`torch.nn.Module.__call__`, so forward hooks and pre-hooks registered on it run.

    Every aggregator declares what it reads of the matrix (:attr:`need`) and whether it draws
    random numbers (:attr:`randomized`), so that :func:`~torchjd.autojac.jac_to_grad` computes
    only what it needs. A subclass that overrides :meth:`forward` reads the whole matrix.
    """

    #: Whether the aggregation draws from the global random generator.
    randomized: ClassVar[bool] = False
    # Set on every subclass that defines its own ``forward``: it is then called on the matrix.
    _overrides_forward: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "forward" in cls.__dict__:
            cls._overrides_forward = True

    @property
    def need(self) -> Need:
        """What the aggregation reads of the matrix ``J``: the number of rows only, the Gramian
        ``J Jᵀ`` only, or the whole matrix (the default)."""
        return Need.MATRIX

    @staticmethod
    def _check_is_matrix(matrix: Tensor) -> None:
        if matrix.ndim != 2:
            raise ValueError(
                "An aggregator expects a matrix (a tensor of dimension 2, one row per objective), "
                f"got a tensor of shape {tuple(matrix.shape)}."
            )

    @abstractmethod
    def forward(self, matrix: Matrix, /) -> Tensor:
        """Aggregate the rows of ``matrix`` into one vector."""

    def __call__(self, matrix: Tensor, /) -> Tensor:
        self._check_is_matrix(matrix)
        return super().__call__(matrix)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __str__(self) -> str:
        return type(self).__name__


class NoGrad:
    """Mixin for non-differentiable aggregators and weightings: the whole module call, forward
    hooks included, runs under :func:`torch.no_grad`.

    Placed first among the bases. It wraps ``__call__`` rather than ``forward``, so that a
    :class:`GramianWeightedAggregator` keeps its own ``forward`` and
    :func:`~torchjd.autojac.jac_to_grad` can still aggregate it without concatenation.
    """

    def __call__(self, input: Tensor, /) -> Tensor:
        # What torch.no_grad() does, without building a context manager on every call (a
        # noticeable part of a small aggregation's fixed cost): torch.set_grad_enabled, called
        # as a function, still builds one around the setter it calls, this one.
        enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            return super().__call__(input)  # type: ignore[misc]
        finally:
            torch._C._set_grad_enabled(enabled)


class Weighting(TaskIndexed, nn.Module, ABC, Generic[_T]):
    """Abstract base of every weighting: maps a statistic of the objectives to weights ``[m]``.

    ``Weighting[Matrix]`` takes the matrix ``J`` itself; ``Weighting[PSDMatrix]`` takes its Gramian
    ``J J^T``. Weightings do not validate their input. A float16 or bfloat16 input is weighed in
    float32 (see :mod:`torchjd._precision`) and the weights are returned in the input's dtype,
    except for weightings that read only the number of rows.

    Declarations read by :func:`~torchjd.autojac.jac_to_grad` and
    :class:`~torchjd.grouping.GroupedAggregator`: :attr:`row_count_only` (the weights depend only
    on the number of rows of the input), :attr:`randomized`, and the batched entry point
    :meth:`_forward_grouped`, which weighs a stack of inputs, the ``k``-th with the ``k``-th
    instance. A subclass that overrides :meth:`forward` keeps none of its parent's declarations
    unless it states them again: it reads its whole input and is weighed instance by instance.
    """

    #: The weights depend only on the number of rows of the input (and its dtype and device).
    row_count_only: ClassVar[bool] = False
    #: The weights are drawn from the global random generator.
    randomized: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "forward" in cls.__dict__:
            if "row_count_only" not in cls.__dict__:
                cls.row_count_only = False
            if "_forward_grouped" not in cls.__dict__:
                cls._forward_grouped = Weighting.__dict__["_forward_grouped"]  # type: ignore[method-assign]

    @classmethod
    def _forward_grouped(cls, weightings: Sequence[Weighting], stats: Tensor) -> Tensor:
        """Weights ``[b, m]`` of a stack of inputs ``[b, m, ...]``, the ``k``-th weighed by
        ``weightings[k]`` (instances of this class): here one call per instance, in order.
        Subclasses override it with one vectorised computation that draws the same random
        numbers, in the same order, and updates each instance's state as its call would."""
        if len(weightings) != stats.shape[0]:
            raise ValueError(
                f"Got {len(weightings)} weightings for {stats.shape[0]} inputs: give one "
                "weighting per input."
            )
        if not weightings:
            return stats.new_zeros(0, stats.shape[1])
        return torch.stack([weighting(stat) for weighting, stat in zip(weightings, stats)])

    @classmethod
    def batched(cls) -> bool:
        """Whether this class weighs a stack of inputs in one vectorised computation."""
        return cls._forward_grouped.__func__ is not Weighting._forward_grouped.__func__

    @abstractmethod
    def forward(self, stat: _T, /) -> Tensor:
        """Compute one weight per objective (per row of ``stat``)."""

    def __call__(self, stat: _T, /) -> Tensor:
        if is_half(stat.dtype) and not self.row_count_only:
            # Epsilons underflow and linalg routines are missing in half precision: solve in the
            # working dtype (torchjd._precision) and return the weights in the input's dtype.
            return super().__call__(promoted(stat)).to(dtype=stat.dtype)
        return super().__call__(stat)

    def __lshift__(self, fn: Callable[[Tensor], _T]) -> Weighting[Tensor]:
        """Return the weighting ``stat -> self(fn(stat))``."""
        return _Composition(self, fn)


class _Composition(Weighting[Tensor]):
    """The weighting ``stat -> weighting(fn(stat))``, built by ``weighting << fn``."""

    def __init__(self, weighting: Weighting, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.weighting = weighting
        self.fn = fn

    def forward(self, stat: Tensor, /) -> Tensor:
        return self.weighting(self.fn(stat))

    @property
    def randomized(self) -> bool:  # type: ignore[override]
        return self.weighting.randomized


class WeightedAggregator(Aggregator):
    """Aggregator computing ``w @ J`` with ``w = weighting(J)``.

    :param weighting: the weighting applied to the matrix.
    """

    def __init__(self, weighting: Weighting[Matrix]) -> None:
        super().__init__()
        self.weighting = weighting

    def forward(self, matrix: Tensor, /) -> Tensor:
        # Half-precision rows are weighed (and their Gramian formed) in float32, so that neither
        # the Gramian nor the weighted sum overflows; weights read from the shape need no copy.
        work = matrix if self.weighting.row_count_only else promoted(matrix)
        weights = self.weighting(work)
        # A user-given weight vector (Constant, pref_vector) may differ in dtype or device.
        return (weights.to(dtype=work.dtype, device=matrix.device) @ work).to(dtype=matrix.dtype)

    @property
    def need(self) -> Need:
        if type(self)._overrides_forward or not self.weighting.row_count_only:
            return Need.MATRIX
        return Need.ROW_COUNT

    @property
    def randomized(self) -> bool:  # type: ignore[override]
        return self.weighting.randomized


WeightedAggregator._overrides_forward = False


class GramianWeightedAggregator(WeightedAggregator):
    """Aggregator computing ``w @ J`` with ``w = gramian_weighting(J @ J.T)``.

    ``self.weighting`` is ``gramian_weighting << (J -> J @ J.T)``; the Gramian weighting is
    registered once, as ``self.weighting.weighting``, and :attr:`gramian_weighting` is an alias, so
    that :meth:`state_dict` lists each piece of state once.

    :param gramian_weighting: the weighting applied to the Gramian of the matrix.
    """

    def __init__(self, gramian_weighting: Weighting[PSDMatrix]) -> None:
        super().__init__(gramian_weighting << compute_gramian)

    @property
    def gramian_weighting(self) -> Weighting[PSDMatrix]:
        # Read from the submodule tables (read on every `jac_to_grad` call, and
        # `nn.Module.__getattr__` costs about a microsecond a lookup); the attribute path covers
        # a `weighting` that is not a composition.
        composition = self._modules.get("weighting")
        inner = composition._modules.get("weighting") if composition is not None else None
        return inner if inner is not None else self.weighting.weighting  # type: ignore[return-value]

    @property
    def need(self) -> Need:
        return Need.MATRIX if type(self)._overrides_forward else Need.GRAMIAN

    def __repr__(self) -> str:
        """``Name(a=..., b=...)`` over the :class:`Forwarded` hyper-parameters, in the order of
        their declarations."""
        names = [
            name
            for cls in reversed(type(self).__mro__)
            for name, value in vars(cls).items()
            if isinstance(value, Forwarded)
        ]
        arguments = ", ".join(f"{name}={getattr(self, name)!r}" for name in names)
        return f"{type(self).__name__}({arguments})"


class Forwarded(Generic[_V]):
    """A hyper-parameter of a :class:`GramianWeightedAggregator` held by its Gramian weighting:
    reading or setting it on the aggregator reads or sets (and so validates) the weighting's
    attribute of the same name. Declared once, as ``pref_vector = Forwarded[Tensor | None]()``;
    the aggregator's ``repr`` lists these hyper-parameters in their order of declaration."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, instance: None, owner: type) -> Forwarded[_V]: ...

    @overload
    def __get__(self, instance: object, owner: type) -> _V: ...

    def __get__(self, instance: object, owner: type) -> Forwarded[_V] | _V:
        if instance is None:
            return self
        return getattr(instance.gramian_weighting, self.name)  # type: ignore[attr-defined]

    def __set__(self, instance: object, value: _V) -> None:
        setattr(instance.gramian_weighting, self.name, value)  # type: ignore[attr-defined]

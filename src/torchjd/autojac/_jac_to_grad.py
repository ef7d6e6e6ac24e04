from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from functools import reduce
from typing import Literal, overload

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module

from torchjd.aggregation._bases import (
    Aggregator,
    GramianWeightedAggregator,
    WeightedAggregator,
    _Composition,
    _gramian_of,
)
from torchjd.aggregation._constant import ConstantWeighting
from torchjd.aggregation._mean import MeanWeighting
from torchjd.aggregation._random import RandomWeighting
from torchjd.aggregation._sum import SumWeighting
from torchjd.autojac._accumulation import accumulate_grads, check_grad_targets
from torchjd.autojac._synchronization import warn_if_unsynchronized
from torchjd.autojac._validation import check_non_empty, check_unique, materialise, rows_shape

# Weightings that only look at the number of rows (and the dtype and device) of their input.
_ROW_COUNT_WEIGHTINGS = (MeanWeighting, SumWeighting, ConstantWeighting, RandomWeighting)


class _Route(enum.Enum):
    CONCATENATE = "concatenate"  # call the aggregator on the [m, N] matrix
    GRAMIAN = "gramian"  # weights from Σ_t J_t J_tᵀ, then wᵀ J_t tensor by tensor
    ROW_COUNT = "row count"  # weights from an [m, 0] stand-in, then wᵀ J_t tensor by tensor


@overload
def jac_to_grad(
    tensors: Iterable[Tensor],
    /,
    aggregator: GramianWeightedAggregator,
    *,
    retain_jac: bool = False,
    optimize_gramian_computation: bool = False,
) -> Tensor: ...


@overload
def jac_to_grad(
    tensors: Iterable[Tensor],
    /,
    aggregator: WeightedAggregator,
    *,
    retain_jac: bool = False,
    optimize_gramian_computation: Literal[False] = False,
) -> Tensor: ...


@overload
def jac_to_grad(
    tensors: Iterable[Tensor],
    /,
    aggregator: Aggregator,
    *,
    retain_jac: bool = False,
    optimize_gramian_computation: Literal[False] = False,
) -> None: ...


def jac_to_grad(
    tensors: Iterable[Tensor],
    /,
    aggregator: Aggregator,
    *,
    retain_jac: bool = False,
    optimize_gramian_computation: bool = False,
) -> Tensor | None:
    r"""Aggregate the ``.jac`` fields of ``tensors`` into one update, accumulated into ``.grad``.

    Mathematically, the Jacobians ``t.jac`` (shape ``[m, *t.shape]``, e.g. filled by
    :func:`~torchjd.autojac.backward` or :func:`~torchjd.autojac.mtl_backward`) are flattened to
    ``[m, t.numel()]`` and concatenated, in the order of ``tensors``, into a matrix
    :math:`J \in \mathbb R^{m \times N}`; the aggregate :math:`g = \mathcal A(J) \in \mathbb R^N`
    is split back into one piece per tensor, cast to its dtype, and added to its ``.grad`` (or
    stored there if it is ``None``).

    How it is computed depends on the aggregator:

    - When the aggregator's weights come from the Gramian :math:`G = J J^\top` (a
      :class:`~torchjd.aggregation.GramianWeightedAggregator` whose class does not override
      ``forward``), ``J`` is never built: :math:`G = \sum_t J_t J_t^\top` is accumulated tensor
      by tensor (in float32 at least, or in the Jacobians' dtype if it is wider), the weights are
      :math:`w` = ``aggregator.gramian_weighting(G)`` (so hooks registered on the Gramian
      weighting run) and each tensor receives :math:`w^\top J_t`.
    - When they depend only on the number of rows (:class:`~torchjd.aggregation.Mean`,
      :class:`~torchjd.aggregation.Sum`, :class:`~torchjd.aggregation.Constant`,
      :class:`~torchjd.aggregation.Random`), not even the Gramian is computed.
    - Otherwise, or when forward hooks or pre-hooks are registered on the aggregator or on
      ``aggregator.weighting`` (or globally), the aggregator is called on the concatenated
      matrix ``J``, so that every hook sees exactly ``J`` and the aggregate.

    Both ways give the same result up to rounding.

    :param tensors: The tensors whose ``.jac`` to aggregate (any iterable, e.g.
        ``model.parameters()``, iterated once). Non-empty, without the same tensor twice; each must
        have a ``.jac`` of shape ``[m, *t.shape]`` with one common ``m >= 1``, require grad and be
        a leaf (or retain its grad).
    :param aggregator: The aggregator mapping the ``[m, N]`` matrix to a vector of length ``N``.
    :param retain_jac: Keep the ``.jac`` fields. Default ``False``: they are deleted once the
        arguments are validated, before the aggregation.
    :param optimize_gramian_computation: Require the Gramian computation described above: the
        aggregator must then be a :class:`~torchjd.aggregation.GramianWeightedAggregator` with no
        forward hook or pre-hook on itself or on ``aggregator.weighting`` (``ValueError``
        otherwise); its own ``forward`` is not called. Default ``False``: the computation is chosen
        automatically.
    :return: The weights of a :class:`~torchjd.aggregation.WeightedAggregator` (shape ``[m]``, as
        returned by ``aggregator.weighting`` on ``J``, hooks on it included), ``None`` for other
        aggregators.

    Non-finite values are not checked (that would synchronise with the device): NaN in, NaN out.

    >>> import torch
    >>> from torchjd.aggregation import Mean
    >>> from torchjd.autojac import jac_to_grad
    >>> p = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> p.jac = torch.tensor([[2.0, -1.0], [-1.0, 3.0]])
    >>> jac_to_grad([p], Mean())
    tensor([0.5000, 0.5000])
    >>> p.grad
    tensor([0.5000, 1.0000])
    """
    tensors_ = materialise(tensors, "tensors")
    jacobians = _validated_jacobians(tensors_)
    warn_if_unsynchronized(jacobians, stacklevel=2)
    check_grad_targets(tensors_, "tensors", requires_grad_error=ValueError)
    route = _choose_route(aggregator, optimize_gramian_computation)

    if not retain_jac:
        for t in tensors_:
            del t.jac

    if route is _Route.CONCATENATE:
        weights, gradients = _aggregate_concatenated(tensors_, jacobians, aggregator)
    else:
        weights = _weights_without_concatenation(jacobians, aggregator, route)
        gradients = _combine(tensors_, jacobians, weights)
    accumulate_grads(tensors_, gradients)
    return weights


def _validated_jacobians(tensors: list[Tensor]) -> list[Tensor]:
    """Check everything about the ``.jac`` fields before anything is mutated."""
    missing = [i for i, t in enumerate(tensors) if not hasattr(t, "jac")]
    if missing:
        raise ValueError(
            f"Every tensor of `tensors` must have a `.jac` field, but the element(s) at "
            f"position(s) {missing} have none. Fill them with `backward` or `mtl_backward` first "
            "(or leave those tensors out)."
        )
    check_non_empty(tensors, "tensors")
    jacobians = [t.jac for t in tensors]
    for i, j in enumerate(jacobians):
        if not isinstance(j, Tensor) or j.ndim == 0:
            what = f"shape {tuple(j.shape)}" if isinstance(j, Tensor) else type(j).__name__
            raise ValueError(
                f"The `.jac` of element {i} of `tensors` must be a tensor of shape "
                f"{rows_shape(tensors[i].shape)}, got {what}."
            )
    rows = [j.shape[0] for j in jacobians]
    if any(r != rows[0] for r in rows):
        raise ValueError(
            "The `.jac` fields of `tensors` must all have the same number of rows (one per "
            f"objective), got {rows}. Each must come from the same objectives."
        )
    check_unique(tensors, "tensors")
    for i, (t, j) in enumerate(zip(tensors, jacobians)):
        if j.shape[1:] != t.shape:
            raise ValueError(
                f"The `.jac` of element {i} of `tensors` must have shape {rows_shape(t.shape)} "
                f"for a tensor of shape {tuple(t.shape)}, got {tuple(j.shape)}."
            )
    if rows[0] == 0:
        raise ValueError(
            "The `.jac` fields of `tensors` have 0 rows: there is no objective to aggregate."
        )
    return jacobians


def _has_forward_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _has_global_forward_hooks() -> bool:
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks)


def _choose_route(aggregator: Aggregator, optimize_gramian_computation: bool) -> _Route:
    if optimize_gramian_computation:
        if not isinstance(aggregator, GramianWeightedAggregator):
            raise ValueError(
                "`optimize_gramian_computation=True` needs an aggregator whose weights come from "
                f"the Gramian (a GramianWeightedAggregator), got {aggregator!r}. Leave the "
                "option to False: the computation is then chosen automatically."
            )
        if _has_forward_hooks(aggregator) or _has_forward_hooks(aggregator.weighting):
            raise ValueError(
                "`optimize_gramian_computation=True` does not call the aggregator nor "
                "`aggregator.weighting`, so it cannot run the forward hooks or pre-hooks "
                "registered on them. Remove those hooks (hooks on `aggregator.gramian_weighting` "
                "are fine), or leave the option to False."
            )
        return _Route.GRAMIAN

    if not callable(aggregator):
        raise TypeError(
            "`aggregator` must be an Aggregator, got an object of type "
            f"{type(aggregator).__name__}."
        )
    if (
        not isinstance(aggregator, WeightedAggregator)
        or type(aggregator).forward is not WeightedAggregator.forward
        or _has_forward_hooks(aggregator)
        or _has_forward_hooks(aggregator.weighting)
        or _has_global_forward_hooks()
    ):
        return _Route.CONCATENATE
    weighting = aggregator.weighting
    if type(weighting) in _ROW_COUNT_WEIGHTINGS:
        return _Route.ROW_COUNT
    if (
        isinstance(aggregator, GramianWeightedAggregator)
        and type(weighting) is _Composition
        and weighting.fn is _gramian_of
    ):
        return _Route.GRAMIAN
    return _Route.CONCATENATE


def _promoted_dtype(jacobians: Sequence[Tensor]) -> torch.dtype:
    return reduce(torch.promote_types, (j.dtype for j in jacobians))


def _weights_without_concatenation(
    jacobians: list[Tensor], aggregator: WeightedAggregator, route: _Route
) -> Tensor:
    m = jacobians[0].shape[0]
    dtype = _promoted_dtype(jacobians)
    device = jacobians[0].device
    if route is _Route.ROW_COUNT:
        # The weighting only reads the number of rows, the dtype and the device of its input.
        weights = aggregator.weighting(torch.empty((m, 0), dtype=dtype, device=device))
    else:
        gramian = _sum_of_gramians(jacobians, torch.promote_types(dtype, torch.float32))
        weights = aggregator.gramian_weighting(gramian)
        weights = weights.to(dtype=dtype)
    _check_weights(weights, m, aggregator)
    return weights


def _check_weights(weights: object, m: int, aggregator: Aggregator) -> None:
    """The weighting of ``aggregator`` must have returned a vector of ``m`` weights."""
    if not isinstance(weights, Tensor) or weights.shape != (m,):
        got = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(
            f"The weighting of {aggregator!r} must return one weight per row ({m}), got {got}."
        )


def _sum_of_gramians(jacobians: list[Tensor], dtype: torch.dtype) -> Tensor:
    """``Σ_t J_t J_tᵀ`` in ``dtype``, each ``.jac`` flattened to ``J_t`` of shape ``[m, numel]``."""
    m = jacobians[0].shape[0]
    gramian: Tensor | None = None
    for jacobian in jacobians:
        matrix = jacobian.reshape(m, -1).to(dtype=dtype)
        if gramian is None:
            gramian = matrix @ matrix.T
        else:
            gramian.addmm_(matrix, matrix.T)
    assert gramian is not None  # there is at least one tensor (validated)
    return gramian


def _combine(tensors: list[Tensor], jacobians: list[Tensor], weights: Tensor) -> list[Tensor]:
    """``wᵀ J_t`` for each tensor, with ``w`` cast to the ``.jac``'s dtype, cast to ``t.dtype``."""
    m = weights.shape[0]
    cast: dict[tuple[torch.dtype, torch.device], Tensor] = {}
    gradients = []
    for t, jacobian in zip(tensors, jacobians):
        key = (jacobian.dtype, jacobian.device)
        if key not in cast:
            cast[key] = weights.to(dtype=jacobian.dtype, device=jacobian.device)
        gradient = cast[key] @ jacobian.reshape(m, -1)
        gradients.append(gradient.reshape(t.shape).to(dtype=t.dtype))
    return gradients


def _aggregate_concatenated(
    tensors: list[Tensor], jacobians: list[Tensor], aggregator: Aggregator
) -> tuple[Tensor | None, list[Tensor]]:
    m = jacobians[0].shape[0]
    matrices = [j.reshape(m, -1) for j in jacobians]
    matrix = matrices[0] if len(matrices) == 1 else torch.cat(matrices, dim=1)

    captured: list[Tensor] = []
    handle = None
    if isinstance(aggregator, WeightedAggregator):
        # Appended after the user's hooks, so it sees the weights as they modified them.
        handle = aggregator.weighting.register_forward_hook(
            lambda _module, _args, output: captured.append(output)
        )
    try:
        aggregate = aggregator(matrix)
    finally:
        if handle is not None:
            handle.remove()

    n = matrix.shape[1]
    if not isinstance(aggregate, Tensor) or aggregate.shape != (n,):
        got = tuple(aggregate.shape) if isinstance(aggregate, Tensor) else type(aggregate).__name__
        raise ValueError(
            f"The aggregator {aggregator!r} must return a vector of length {n} (the number of "
            f"columns of the concatenated Jacobians), got {got}."
        )
    pieces = aggregate.split([m_.shape[1] for m_ in matrices])
    gradients = [p.reshape(t.shape).to(dtype=t.dtype) for p, t in zip(pieces, tensors)]
    return (captured[-1] if captured else None), gradients

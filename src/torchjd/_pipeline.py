"""The application pipeline: groups of tensors with ``.jac`` fields, an aggregator each → ``.grad``.

validate → route by what the aggregator needs (hooks force the matrix) → statistics (Gramians) →
weigh (one ``_forward_grouped`` call per run of groups of one weighting class) → combine ``wᵀ J_t``
→ accumulate. :class:`Steps` makes the statistics and the combination pluggable (collective in
:mod:`torchjd.distributed`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Hashable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import reduce

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module

from torchjd._accumulation import accumulate_grads, check_grad_targets, consume_jacs
from torchjd._protocol import Need
from torchjd._synchronization import warn_if_unsynchronized
from torchjd._validation import check_aggregator, validated_jacobians
from torchjd.aggregation import Aggregator, WeightedAggregator
from torchjd.linalg._gramian import sum_of_gramians


@dataclass(eq=False)
class Group:
    """One group of tensors on its way through the pipeline."""

    tensors: list[Tensor]
    jacobians: list[Tensor]
    aggregator: Aggregator
    route: Need
    m: int  # the number of rows the aggregator sees
    wants_gramian: bool
    dtype: torch.dtype  # the promoted dtype of the Jacobians: the dtype of the weights
    gramian: Tensor | None = None
    weights: Tensor | None = None
    gradients: list[Tensor] = field(default_factory=list)

    @property
    def gramian_dtype(self) -> torch.dtype:
        """Gramians are summed in float32 at least (a half-precision sum loses the small rows)."""
        return torch.promote_types(self.dtype, torch.float32)

    @property
    def device(self) -> torch.device:
        return self.jacobians[0].device

    @functools.cached_property
    def weighting(self) -> nn.Module:
        """The weighting that reads the statistic of the route (row count or Gramian)."""
        if self.route is Need.GRAMIAN:
            return self.aggregator.gramian_weighting  # type: ignore[attr-defined]
        return self.aggregator.weighting  # type: ignore[attr-defined]


class Steps:
    """Where the statistics come from and where the update goes: the local ``.jac`` fields."""

    # Local `.jac` fields in a process group of several processes are usually a mistake.
    warns_unsynchronized = True

    def prepare(self, groups: list[Group]) -> None:
        """Compute what the weighing reads: here the Gramians of the groups that want one."""
        for group in groups:
            if group.wants_gramian:
                group.gramian = sum_of_gramians(group.jacobians, group.gramian_dtype)

    def scope(self) -> AbstractContextManager[object]:
        """A context around the weighing (e.g. a shared random generator)."""
        return contextlib.nullcontext()

    def combine(self, groups: list[Group]) -> None:
        """Set the gradients ``wᵀ J_t`` of the groups whose weights are known."""
        for group in groups:
            assert group.weights is not None
            group.gradients = combine(group.tensors, group.jacobians, group.weights)


def _has_forward_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def choose_route(aggregator: Aggregator, optimize_gramian_computation: bool = False) -> Need:
    """The route of ``aggregator``: what it declares it needs, unless hooks must see the matrix.

    ``optimize_gramian_computation`` requires the Gramian route (``ValueError`` otherwise)."""
    need = aggregator.need
    weighting = getattr(aggregator, "weighting", None)
    hooked = _has_forward_hooks(aggregator) or (
        isinstance(weighting, nn.Module) and _has_forward_hooks(weighting)
    )
    if optimize_gramian_computation:
        if not hasattr(aggregator, "gramian_weighting"):
            raise ValueError(
                "`optimize_gramian_computation=True` needs a GramianWeightedAggregator, got "
                f"{aggregator!r}. Leave it False: the computation is then chosen automatically."
            )
        if hooked:
            raise ValueError(
                "`optimize_gramian_computation=True` calls neither the aggregator nor "
                "`aggregator.weighting`, so it cannot run their forward hooks or pre-hooks. Remove "
                "them (hooks on `aggregator.gramian_weighting` are fine), or leave it False."
            )
        return Need.GRAMIAN
    global_hooks = _module._global_forward_hooks or _module._global_forward_pre_hooks
    if need is Need.MATRIX or hooked or global_hooks:
        return Need.MATRIX
    return need


def prepare(
    groups: Sequence[Sequence[Tensor]],
    aggregators: Sequence[Aggregator],
    names: Sequence[str],
    *,
    optimize_gramian_computation: bool = False,
    compute_gramians: bool = False,
) -> list[Group]:
    """Validate every group (named ``names[k]`` in messages) and route it; nothing is mutated."""
    prepared = []
    for k, (tensors, aggregator, name) in enumerate(zip(groups, aggregators, names)):
        check_aggregator(aggregator)
        tensors = list(tensors)
        try:
            jacobians = validated_jacobians(tensors, name)
            check_grad_targets(tensors, name, requires_grad_error=ValueError)
        except ValueError as error:
            if len(names) == 1:
                raise
            raise ValueError(f"Group {k}: {error}") from None
        route = choose_route(aggregator, optimize_gramian_computation)
        wants = route is Need.GRAMIAN or compute_gramians
        dtype = reduce(torch.promote_types, {j.dtype for j in jacobians})
        prepared.append(
            Group(tensors, jacobians, aggregator, route, len(jacobians[0]), wants, dtype)
        )
    return prepared


def run(groups: list[Group], steps: Steps, *, retain_jac: bool, stacklevel: int) -> None:
    """Everything after the validation: statistics, weights, update, accumulated into ``.grad``."""
    if steps.warns_unsynchronized:
        jacobians = [j for g in groups for j in g.jacobians]
        warn_if_unsynchronized(jacobians, stacklevel=stacklevel + 1)
    if not retain_jac:  # the groups keep references to the Jacobians
        consume_jacs([t for g in groups for t in g.tensors])
    steps.prepare(groups)
    with steps.scope():
        for batch in _runs(groups) if len(groups) > 1 else [groups]:
            _weigh(batch)
    steps.combine([g for g in groups if g.route is not Need.MATRIX])
    accumulate_grads(
        [t for g in groups for t in g.tensors], [d for g in groups for d in g.gradients]
    )


def _batch_key(group: Group) -> Hashable | None:
    """Groups with equal keys are weighed in one call; ``None``: weigh this group alone."""
    if group.route is Need.MATRIX or any(map(_has_forward_hooks, group.weighting.modules())):
        return None
    stat_dtype = group.gramian_dtype if group.route is Need.GRAMIAN else group.dtype
    return (group.route, type(group.weighting), group.m, stat_dtype, group.device)


def _runs(groups: list[Group]) -> list[list[Group]]:
    """The groups, in order, split into maximal runs of consecutive groups with one batch key."""
    batches: list[list[Group]] = []
    previous: Hashable | None = None
    for group in groups:
        key = _batch_key(group)
        if key is not None and batches and key == previous:
            batches[-1].append(group)
        else:
            batches.append([group])
        previous = key
    return batches


def _weigh(batch: list[Group]) -> None:
    first = batch[0]
    if first.route is Need.MATRIX:
        first.weights, first.gradients = aggregate_matrix(
            first.tensors, first.jacobians, first.aggregator
        )
        return
    if first.route is Need.ROW_COUNT:
        # The weighting reads only the number of rows, the dtype and the device of its input.
        stats = torch.empty((len(batch), first.m, 0), dtype=first.dtype, device=first.device)
    else:
        stats = torch.stack([g.gramian for g in batch])  # type: ignore[misc]
    if len(batch) == 1:
        weights = first.weighting(stats[0]).unsqueeze(0)
    else:
        weights = type(first.weighting)._forward_grouped([g.weighting for g in batch], stats)
    if not isinstance(weights, Tensor) or weights.shape != (len(batch), first.m):
        got = tuple(weights.shape[1:]) if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(
            f"The weighting of {first.aggregator!r} must return one weight per row "
            f"({first.m}), got {got}."
        )
    if first.route is Need.GRAMIAN:
        weights = weights.to(dtype=first.dtype)
    for group, w in zip(batch, weights.unbind(0)):
        group.weights = w


def combine(tensors: list[Tensor], jacobians: list[Tensor], weights: Tensor) -> list[Tensor]:
    """``wᵀ J_t`` for each tensor, with ``w`` cast to the ``.jac``'s dtype, cast to ``t.dtype``."""
    m = weights.shape[0]
    return [
        (weights.to(j.device, j.dtype) @ j.reshape(m, -1)).reshape(t.shape).to(t.dtype)
        for t, j in zip(tensors, jacobians)
    ]


def aggregate_matrix(
    tensors: list[Tensor], jacobians: list[Tensor], aggregator: Aggregator
) -> tuple[Tensor | None, list[Tensor]]:
    """Call ``aggregator`` on the concatenated ``[m, N]`` matrix (so every hook sees it); the
    weights its weighting returned (``None`` if it has none), and the pieces of the aggregate."""
    m = jacobians[0].shape[0]
    matrices = [j.reshape(m, -1) for j in jacobians]
    matrix = matrices[0] if len(matrices) == 1 else torch.cat(matrices, dim=1)
    captured: list[Tensor] = []
    weighting = getattr(aggregator, "weighting", None)
    handle = None
    if isinstance(aggregator, WeightedAggregator):
        # Appended after the user's hooks, so it sees the weights as they modified them.
        handle = weighting.register_forward_hook(lambda _m, _a, output: captured.append(output))
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
    pieces = aggregate.split([mat.shape[1] for mat in matrices])
    gradients = [p.reshape(t.shape).to(dtype=t.dtype) for p, t in zip(pieces, tensors)]
    return (captured[-1] if captured else None), gradients

"""``jac_to_grad`` for several groups of tensors at once, each with its own aggregator.

The result is that of one :func:`~torchjd.autojac.jac_to_grad` call per group, in the order of the
groups, but the weightings of consecutive groups that share a batchable weighting class run once,
on the stack of their Gramians ``[b, m, m]``:

1. every group is validated (nothing is mutated before all are valid), then the ``.jac`` fields
   are deleted unless ``retain_jac``;
2. the Gramians ``Σ_p J_p J_pᵀ`` of the groups that need one are computed, tensor by tensor;
3. the weights are computed group by group in order, except that a run of consecutive groups
   whose weightings have the same class, and that class a batched entry point
   (``_forward_grouped``), is weighted in one call; the random draws of PCGrad and GradVac
   happen inside that call, problem by problem, so they come in the order of the loop;
4. each tensor receives ``wᵀ J_p`` with the weights of its group, accumulated into ``.grad``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from torchjd.aggregation._mean import MeanWeighting
from torchjd.aggregation._sum import SumWeighting
from torchjd.autojac._accumulation import accumulate_grads, check_grad_targets
from torchjd.autojac._jac_to_grad import (
    _aggregate_concatenated,
    _check_weights,
    _choose_route,
    _combine,
    _has_forward_hooks,
    _promoted_dtype,
    _Route,
    _sum_of_gramians,
    _validated_jacobians,
    _weights_without_concatenation,
)
from torchjd.autojac._synchronization import warn_if_unsynchronized

# Row-count weightings that are the same function of (m, dtype, device) for every instance.
_SHARED_ROW_COUNT_WEIGHTINGS = (MeanWeighting, SumWeighting)


@dataclass
class _Group:
    tensors: list[Tensor]
    jacobians: list[Tensor]
    aggregator: nn.Module
    route: _Route
    dtype: torch.dtype  # the promoted dtype of the Jacobians: the dtype of the weights
    gramian_weighting: nn.Module | None = None  # for the Gramian route
    gramian: Tensor | None = None
    weights: Tensor | None = None
    gradients: list[Tensor] = field(default_factory=list)

    @property
    def m(self) -> int:
        return self.jacobians[0].shape[0]


def grouped_jac_to_grad(
    groups: Sequence[Sequence[Tensor]],
    aggregators: Sequence[nn.Module],
    *,
    retain_jac: bool,
    compute_gramians: bool,
) -> tuple[list[Tensor | None], list[Tensor | None]]:
    """Aggregate the ``.jac`` fields of each group with its aggregator, into ``.grad``.

    :param groups: disjoint, non-empty groups of tensors (checked by the caller).
    :param aggregators: one aggregator per group, distinct instances (checked by the caller).
    :param retain_jac: keep the ``.jac`` fields.
    :param compute_gramians: also compute the Gramian of groups whose aggregator does not need it.
    :return: the weights of each group (``None`` for a non-weighted aggregator), and the Gramian of
        each group (``None`` where it was not computed).
    """
    prepared = _prepare(groups, aggregators)
    warn_if_unsynchronized([j for group in prepared for j in group.jacobians], stacklevel=3)
    if not retain_jac:
        for group in prepared:
            for t in group.tensors:
                del t.jac

    for group in prepared:
        if group.route is _Route.GRAMIAN or compute_gramians:
            gramian_dtype = torch.promote_types(group.dtype, torch.float32)
            group.gramian = _sum_of_gramians(group.jacobians, gramian_dtype)

    for run in _runs(prepared):
        _weigh(run)

    all_tensors: list[Tensor] = []
    all_gradients: list[Tensor] = []
    for group in prepared:
        if group.route is not _Route.CONCATENATE:
            assert group.weights is not None
            group.gradients = _combine(group.tensors, group.jacobians, group.weights)
        all_tensors.extend(group.tensors)
        all_gradients.extend(group.gradients)
    accumulate_grads(all_tensors, all_gradients)
    return [g.weights for g in prepared], [g.gramian for g in prepared]


def _prepare(groups: Sequence[Sequence[Tensor]], aggregators: Sequence[nn.Module]) -> list[_Group]:
    """Validate every group as :func:`~torchjd.autojac.jac_to_grad` does, before any mutation.

    All the tensors are first checked at once (the common case: one ``m`` for all); if that
    fails, group by group, so that the error names the group (or, when only ``m`` differs from
    group to group, which is allowed, so that each group is checked on its own)."""
    flat = [t for group in groups for t in group]
    try:
        flat_jacobians = _validated_jacobians(flat)
        check_grad_targets(flat, "groups", requires_grad_error=ValueError)
    except ValueError:
        per_group = [_validated_group(k, group) for k, group in enumerate(groups)]
    else:
        per_group, start = [], 0
        for group in groups:
            per_group.append(flat_jacobians[start : start + len(group)])
            start += len(group)
    prepared = []
    for group, jacobians, aggregator in zip(groups, per_group, aggregators):
        route = _choose_route(aggregator, optimize_gramian_computation=False)
        gramian_weighting = aggregator.gramian_weighting if route is _Route.GRAMIAN else None
        prepared.append(
            _Group(
                list(group),
                jacobians,
                aggregator,
                route,
                _promoted_dtype(jacobians),
                gramian_weighting,
            )
        )
    return prepared


def _validated_group(index: int, tensors: Sequence[Tensor]) -> list[Tensor]:
    tensors = list(tensors)
    name = f"groups[{index}]"
    try:
        jacobians = _validated_jacobians(tensors)
        check_grad_targets(tensors, name, requires_grad_error=ValueError)
    except ValueError as error:
        message = str(error).replace("`tensors`", f"`{name}`")
        raise ValueError(f"Group {index}: {message}") from None
    return jacobians


def _batch_key(group: _Group) -> Hashable | None:
    """Groups with equal keys can be weighted in one call; ``None``: weigh this group alone."""
    if group.route is _Route.CONCATENATE:
        return None
    device = group.jacobians[0].device
    if group.route is _Route.ROW_COUNT:
        weighting = group.aggregator.weighting
        if type(weighting) in _SHARED_ROW_COUNT_WEIGHTINGS:
            return ("row count", type(weighting), group.m, group.dtype, device)
        return None
    assert group.gramian is not None and group.gramian_weighting is not None
    weighting = group.gramian_weighting
    # Only the class that defines the batched entry point (not a subclass that may override
    # forward), and only when no hook is waiting to see this group's Gramian or weights.
    if "_forward_grouped" not in vars(type(weighting)):
        return None
    if _has_hooks_inside(weighting):
        return None
    return ("gramian", type(weighting), group.m, group.gramian.dtype, device)


def _has_hooks_inside(module: nn.Module) -> bool:
    """Whether ``module`` or one of its submodules has forward hooks or pre-hooks."""
    return _has_forward_hooks(module) or any(
        _has_hooks_inside(child) for child in module._modules.values() if child is not None
    )


def _runs(groups: list[_Group]) -> list[list[_Group]]:
    """Split the groups, in order, into maximal runs of consecutive groups with one batch key."""
    runs: list[list[_Group]] = []
    previous: Hashable | None = None
    for group in groups:
        key = _batch_key(group)
        if key is not None and runs and key == previous:
            runs[-1].append(group)
        else:
            runs.append([group])
        previous = key
    return runs


def _weigh(run: list[_Group]) -> None:
    """Set the weights (and, for the concatenated route, the gradients) of a run of groups."""
    first = run[0]
    if len(run) == 1:
        if first.route is _Route.CONCATENATE:
            first.weights, first.gradients = _aggregate_concatenated(
                first.tensors, first.jacobians, first.aggregator
            )
        elif first.route is _Route.ROW_COUNT:
            first.weights = _weights_without_concatenation(
                first.jacobians, first.aggregator, _Route.ROW_COUNT
            )
        else:
            assert first.gramian_weighting is not None and first.gramian is not None
            weights = first.gramian_weighting(first.gramian).to(dtype=first.dtype)
            _check_weights(weights, first.m, first.aggregator)
            first.weights = weights
        return

    if first.route is _Route.ROW_COUNT:
        # Mean and Sum: the same weights for every group of the run, one row each.
        weights = _weights_without_concatenation(first.jacobians, first.aggregator, first.route)
        batch = weights.expand(len(run), -1).clone()
    else:
        weightings = [group.gramian_weighting for group in run]
        gramians = torch.stack([group.gramian for group in run])
        batch = type(weightings[0])._forward_grouped(weightings, gramians).to(dtype=first.dtype)
        expected = (len(run), first.m)
        if batch.shape != expected:
            raise ValueError(
                f"The batched weighting of {first.aggregator!r} must return weights of shape "
                f"{expected}, got {tuple(batch.shape)}."
            )
    for group, weights in zip(run, batch.unbind(0)):
        group.weights = weights

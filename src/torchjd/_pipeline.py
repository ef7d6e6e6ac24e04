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
from torchjd._synchronization import is_marked, mark_synchronized, warn_if_unsynchronized
from torchjd._tasks import restricted, validated_present, warn_no_task_present
from torchjd._validation import check_aggregator, validated_jacobians
from torchjd.aggregation import Aggregator, WeightedAggregator
from torchjd.linalg._gramian import matrix_gramian, sum_of_gramians


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
    device: torch.device
    gramian: Tensor | None = None
    weights: Tensor | None = None
    gradients: list[Tensor] = field(default_factory=list)
    # The indices of the present tasks among `n_tasks` (`None`: all present); `m` counts them.
    present: Tensor | None = None
    n_tasks: int = 0

    @property
    def gramian_dtype(self) -> torch.dtype:
        """Gramians are summed in float32 at least (a half-precision sum loses the small rows)."""
        return torch.promote_types(self.dtype, torch.float32)

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


def _hooked_tree(module: nn.Module) -> bool:
    """Whether ``module`` or one of its submodules has forward hooks or pre-hooks (a walk over
    the submodule tables: ``modules()`` costs microseconds per call in generator machinery)."""
    stack, seen = [module], {id(module)}
    while stack:
        current = stack.pop()
        if current._forward_hooks or current._forward_pre_hooks:
            return True
        for child in current._modules.values():
            if child is not None and id(child) not in seen:  # shared or cyclic submodules
                seen.add(id(child))
                stack.append(child)
    return False


def choose_route(aggregator: Aggregator, optimize_gramian_computation: bool = False) -> Need:
    """The route of ``aggregator``: what it declares it needs, unless hooks must see the matrix.

    ``optimize_gramian_computation`` requires the Gramian route (``ValueError`` otherwise)."""
    need = aggregator.need
    if optimize_gramian_computation:
        if not hasattr(aggregator, "gramian_weighting"):
            raise ValueError(
                "`optimize_gramian_computation=True` needs a GramianWeightedAggregator, got "
                f"{aggregator!r}. Leave it False: the computation is then chosen automatically."
            )
        if _hooked(aggregator):
            raise ValueError(
                "`optimize_gramian_computation=True` calls neither the aggregator nor "
                "`aggregator.weighting`, so it cannot run their forward hooks or pre-hooks. Remove "
                "them (hooks on `aggregator.gramian_weighting` are fine), or leave it False."
            )
        return Need.GRAMIAN
    if need is Need.MATRIX or _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return Need.MATRIX
    return Need.MATRIX if _hooked(aggregator) else need


def _hooked(aggregator: Aggregator) -> bool:
    """Whether the aggregator or its weighting has forward hooks or pre-hooks."""
    if _has_forward_hooks(aggregator):
        return True
    # The submodule table first: `nn.Module.__getattr__` is slow (a property may hold it too).
    weighting = aggregator._modules.get("weighting")
    if weighting is None:
        weighting = getattr(aggregator, "weighting", None)
    return isinstance(weighting, nn.Module) and _has_forward_hooks(weighting)


def prepare(
    groups: Sequence[Sequence[Tensor]],
    aggregators: Sequence[Aggregator],
    names: Sequence[str],
    *,
    optimize_gramian_computation: bool = False,
    compute_gramians: bool = False,
    present: object = None,
) -> list[Group]:
    """Validate every group (named ``names[k]`` in messages) and route it; nothing is mutated.

    ``present`` (``None``: every task) keeps the rows of the present tasks (see
    :func:`select_tasks`)."""
    prepared = []
    for k, (tensors, aggregator, name) in enumerate(zip(groups, aggregators, names)):
        check_aggregator(aggregator)
        tensors = list(tensors)
        try:
            jacobians = _checked_jacobians(tensors, name)
        except ValueError as error:
            if len(names) == 1:
                raise
            raise ValueError(f"Group {k}: {error}") from None
        group = _routed(tensors, jacobians, aggregator, optimize_gramian_computation)
        group.wants_gramian = group.wants_gramian or compute_gramians
        prepared.append(group)
    if present is not None:
        select_tasks(prepared, present)
    return prepared


def _checked_jacobians(tensors: list[Tensor], name: str) -> list[Tensor]:
    """The ``.jac`` fields of ``tensors``, once every field and every ``.grad`` target is
    checked."""
    jacobians = _plain_jacobians(tensors)
    if jacobians is None:  # something is wrong: let the checks say what
        jacobians = validated_jacobians(tensors, name)
        check_grad_targets(tensors, name, requires_grad_error=ValueError)
    return jacobians


def _plain_jacobians(tensors: list[Tensor]) -> list[Tensor] | None:
    """The ``.jac`` fields of ``tensors`` if every check of :func:`_checked_jacobians` passes at
    first sight, else ``None``: one pass over the tensors in place of one pass per check (on a
    small group, the checks are a good part of the cost of a call)."""
    jacobians = []
    rows = -1
    for t in tensors:
        jacobian = getattr(t, "jac", None)
        if (
            not isinstance(jacobian, Tensor)
            or jacobian.ndim == 0
            or jacobian.shape[1:] != t.shape
            or not t.requires_grad
            or not (t.is_leaf or t.retains_grad)
        ):
            return None
        if jacobian.shape[0] != rows:
            if rows != -1:
                return None
            rows = jacobian.shape[0]
        jacobians.append(jacobian)
    if rows <= 0 or (len(tensors) > 1 and len(set(map(id, tensors))) != len(tensors)):
        return None
    return jacobians


def _routed(
    tensors: list[Tensor], jacobians: list[Tensor], aggregator: Aggregator, optimize: bool
) -> Group:
    """The group of validated ``tensors``, routed by what ``aggregator`` needs."""
    route = choose_route(aggregator, optimize)
    m = jacobians[0].shape[0]
    dtype, device = _promoted_dtype(jacobians), jacobians[0].device
    return Group(
        tensors, jacobians, aggregator, route, m, route is Need.GRAMIAN, dtype, device, n_tasks=m
    )


def _promoted_dtype(jacobians: list[Tensor]) -> torch.dtype:
    if len(jacobians) == 1:
        return jacobians[0].dtype
    return reduce(torch.promote_types, {j.dtype for j in jacobians})


def apply_local(
    tensors: list[Tensor],
    aggregator: Aggregator,
    *,
    retain_jac: bool,
    optimize_gramian_computation: bool,
    present: object,
    stacklevel: int,
) -> Tensor | None:
    """One group of local ``.jac`` fields aggregated into ``.grad`` (``jac_to_grad``); the weights
    (``None`` without a weighting).

    The common case (every task present, weights from the Gramian or the row count) skips the
    batching and task-selection machinery of :func:`run`: it validates alike, computes the same
    statistic and calls the same weighting, so the step is the one :func:`run` would take."""
    check_aggregator(aggregator)
    jacobians = _checked_jacobians(tensors, "tensors")
    route = choose_route(aggregator, optimize_gramian_computation)
    if present is not None or route is Need.MATRIX:
        group = _routed(tensors, jacobians, aggregator, optimize_gramian_computation)
        if present is not None:
            select_tasks([group], present)
        run([group], Steps(), retain_jac=retain_jac, stacklevel=stacklevel + 1)
        return group.weights
    warn_if_unsynchronized(jacobians, stacklevel=stacklevel + 1)
    if not retain_jac:
        consume_jacs(tensors)
    first = jacobians[0]
    m, dtype = first.shape[0], _promoted_dtype(jacobians)
    if route is Need.GRAMIAN:
        # Summed in float32 at least: a half-precision sum loses the small rows.
        stat = _gramian(jacobians, torch.promote_types(dtype, torch.float32))
        weighting = aggregator.gramian_weighting  # type: ignore[attr-defined]
    else:  # the weighting reads only the number of rows, the dtype and the device
        stat = torch.empty((m, 0), dtype=dtype, device=first.device)
        weighting = aggregator.weighting  # type: ignore[attr-defined]
    weights = _checked_weights(weighting(stat), aggregator, (m,))
    if route is Need.GRAMIAN and weights.dtype != dtype:  # weighed in the Gramian's dtype
        weights = weights.to(dtype=dtype)
    accumulate_grads(tensors, combine(tensors, jacobians, weights))
    return weights


def select_tasks(groups: list[Group], present: object) -> None:
    """Keep, in every group, only the rows of the tasks that ``present`` marks (one boolean per
    row); the aggregator then sees ``k`` rows and acts on these tasks (:func:`restricted`).
    All present: nothing changes, so the step is exactly the one without ``present``."""
    selections = [validated_present(present, g.m) for g in groups]
    for group, indices in zip(groups, selections):
        if indices is None:
            continue
        group.present = indices
        group.m = len(indices)
        # Only the present rows are read: an absent task's row may hold anything.
        group.jacobians = [_rows(j, indices) for j in group.jacobians]


def _rows(jacobian: Tensor, indices: Tensor) -> Tensor:
    rows = jacobian.index_select(0, indices.to(jacobian.device))
    if is_marked(jacobian):  # the rows of a synchronised Jacobian are synchronised
        mark_synchronized(rows)
    return rows


def run(groups: list[Group], steps: Steps, *, retain_jac: bool, stacklevel: int) -> None:
    """Everything after the validation: statistics, weights, update, accumulated into ``.grad``."""
    if steps.warns_unsynchronized:
        jacobians = [j for g in groups for j in g.jacobians]
        warn_if_unsynchronized(jacobians, stacklevel=stacklevel + 1)
    if not retain_jac:  # the groups keep references to the Jacobians
        consume_jacs([t for g in groups for t in g.tensors])
    if any(g.m == 0 for g in groups):
        warn_no_task_present("`.grad` is left untouched", stacklevel + 1)
        for g in groups:
            g.weights = torch.zeros(g.n_tasks, dtype=g.dtype, device=g.device)
        return
    steps.prepare(groups)
    with steps.scope():
        for batch in _runs(groups) if len(groups) > 1 else [groups]:
            _weigh(batch)
    steps.combine([g for g in groups if g.route is not Need.MATRIX])
    accumulate_grads(
        [t for g in groups for t in g.tensors], [d for g in groups for d in g.gradients]
    )
    for g in groups:
        if g.present is not None:  # back to the m tasks: an absent one weighs 0, has a zero row
            _scatter_to_all_tasks(g, g.present.to(g.device))


def _scatter_to_all_tasks(group: Group, indices: Tensor) -> None:
    if group.weights is not None:
        full = group.weights.new_zeros(group.n_tasks)
        group.weights = full.index_copy_(0, indices.to(full.device), group.weights)
    if group.gramian is not None:
        m, gramian = group.n_tasks, group.gramian
        rows = gramian.new_zeros(m, len(indices)).index_copy_(0, indices, gramian)
        group.gramian = gramian.new_zeros(m, m).index_copy_(1, indices, rows)


def _batch_key(group: Group) -> Hashable | None:
    """Groups with equal keys are weighed in one call; ``None``: weigh this group alone."""
    if group.route is Need.MATRIX or _hooked_tree(group.weighting):
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
    if first.present is None:  # every task present: the step as it always was
        _weigh_restricted(batch)
        return
    with contextlib.ExitStack() as stack:
        for group in batch:
            stack.enter_context(restricted(group.aggregator, group.present, group.n_tasks))
        try:
            _weigh_restricted(batch)
        except ValueError as error:
            # e.g. Krum or TrimmedMean below their minimum number of rows
            raise ValueError(
                f"With k={first.m} present tasks (of {first.n_tasks}), {first.aggregator!r} "
                f"cannot aggregate: {error}"
            ) from error


def _weigh_restricted(batch: list[Group]) -> None:
    first = batch[0]
    if first.route is Need.MATRIX:
        first.weights, first.gradients = aggregate_matrix(
            first.tensors, first.jacobians, first.aggregator
        )
        return
    if first.route is Need.ROW_COUNT:
        # The weighting reads only the number of rows, the dtype and the device of its input.
        stats = torch.empty((len(batch), first.m, 0), dtype=first.dtype, device=first.device)
    elif len(batch) > 1:
        stats = torch.stack([g.gramian for g in batch])  # type: ignore[misc]
    if len(batch) == 1:
        stat = stats[0] if first.route is Need.ROW_COUNT else first.gramian
        weights = first.weighting(stat)
        expected: tuple[int, ...] = (first.m,)
    else:
        weights = type(first.weighting)._forward_grouped([g.weighting for g in batch], stats)
        expected = (len(batch), first.m)
    weights = _checked_weights(weights, first.aggregator, expected)
    if first.route is Need.GRAMIAN:
        weights = weights.to(dtype=first.dtype)
    if len(batch) == 1:
        first.weights = weights
        return
    for group, w in zip(batch, weights.unbind(0)):
        group.weights = w


def _gramian(jacobians: list[Tensor], dtype: torch.dtype) -> Tensor:
    """:func:`sum_of_gramians` in ``dtype``; one ``[m, n]`` Jacobian already in ``dtype`` (a
    bias or a norm's weight in a per-tensor loop) is one product, without the generic steps."""
    if len(jacobians) == 1:
        matrix = jacobians[0]
        if matrix.ndim == 2 and matrix.dtype == dtype:
            return matrix_gramian(matrix)
    return sum_of_gramians(jacobians, dtype)


def _checked_weights(weights: object, aggregator: Aggregator, expected: tuple[int, ...]) -> Tensor:
    """``weights``, once checked to hold one weight per row (``expected``: ``(m,)``, or
    ``(b, m)`` for a batch of ``b`` groups)."""
    if not isinstance(weights, Tensor) or weights.shape != expected:
        got = (
            tuple(weights.shape[len(expected) - 1 :])
            if isinstance(weights, Tensor)
            else type(weights).__name__
        )
        raise ValueError(
            f"The weighting of {aggregator!r} must return one weight per row "
            f"({expected[-1]}), got {got}."
        )
    return weights


def combine(tensors: list[Tensor], jacobians: list[Tensor], weights: Tensor) -> list[Tensor]:
    """``wᵀ J_t`` for each tensor, with ``w`` cast to the ``.jac``'s dtype, cast to ``t.dtype``."""
    m = weights.shape[0]
    # A [1, m] x [m, n] product: `w @ J` on a vector goes through a transposed matrix-vector
    # product, slower on the small tensors of a per-tensor loop. Casts only where needed: even a
    # cast that copies nothing costs.
    row = weights.unsqueeze(0)
    gradients = []
    for t, j in zip(tensors, jacobians):
        w = row if (j.dtype, j.device) == (row.dtype, row.device) else row.to(j.device, j.dtype)
        matrix = j if j.ndim == 2 else j.reshape(m, -1)  # even a no-op reshape costs
        gradient = _shaped_like(torch.mm(w, matrix), t)
        gradients.append(gradient if gradient.dtype == t.dtype else gradient.to(t.dtype))
    return gradients


def _shaped_like(gradient: Tensor, t: Tensor) -> Tensor:
    """``gradient`` (contiguous) viewed with the shape of ``t``. ``view_as`` on a plain tensor or
    parameter: ``view(t.shape)`` parses the ``torch.Size`` on a slow path (microseconds a tensor);
    a tensor subclass is only read for its shape, so that its ``__torch_function__`` is not
    involved."""
    if type(t) is Tensor or type(t) is nn.Parameter:
        return gradient.view_as(t)
    return gradient.view(t.shape)


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

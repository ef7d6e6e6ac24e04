from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from torchjd._pipeline import Group, Steps, prepare, run, select_tasks
from torchjd._protocol import Need
from torchjd._validation import materialise
from torchjd.aggregation import Aggregator
from torchjd.distributed._arguments import (
    ROWS,
    check_bool,
    check_choice,
    check_one_device,
    validated_grad_params,
)
from torchjd.distributed._comm import backend, group_rank_and_size
from torchjd.distributed._exchange import (
    Exchange,
    GramianExchange,
    JacobianExchange,
    UpdateExchange,
)
from torchjd.distributed._tasks import global_weights, local_counts, scaled
from torchjd.grouping import GroupedAggregator

_STRATEGIES = ("auto", "jacobian", "gramian", "update")


def jac_to_grad(
    tensors: Iterable[Tensor] | GroupedAggregator,
    /,
    aggregator: Aggregator | None = None,
    *,
    retain_jac: bool = False,
    optimize_gramian_computation: bool = False,
    grad_params: Iterable[Tensor] | None = None,
    rows: Literal["mean", "stack"] = "mean",
    strategy: Literal["auto", "jacobian", "gramian", "update"] = "auto",
    group: Any = None,
    share_rng_state: bool = True,
    present: Tensor | Sequence[bool] | None = None,
    counts: Tensor | Sequence[float] | None = None,
) -> Tensor | list[Tensor | None] | None:
    r"""Aggregate the Jacobian of the whole process group into ``.grad``, identically everywhere.

    The data-parallel counterpart of :func:`torchjd.autojac.jac_to_grad`, called by every process
    of ``group`` with the same arguments once the local ``.jac`` fields are filled (which
    ``DistributedDataParallel`` does not synchronise). With :math:`R` processes holding local
    Jacobians :math:`J_r` (:math:`m` rows), the global Jacobian is :math:`J = \frac1R \sum_r J_r`
    with ``rows="mean"`` (the same objectives on every shard, e.g. task losses), or the rows of
    :math:`J_0, \dots, J_{R-1}` stacked in rank order with ``rows="stack"`` (e.g. one loss per
    sample). Every process adds the same :math:`\mathcal A(J)` to the ``.grad`` of ``tensors``
    (averaging local aggregations would be wrong: aggregators are not linear), and the ``.grad`` of
    ``grad_params`` (e.g. the heads) is replaced by its mean (``"mean"``) or sum (``"stack"``) in
    the same collectives. Give a :class:`~torchjd.grouping.GroupedAggregator` in place of
    ``tensors`` (and no ``aggregator``) to aggregate each of its groups with its own aggregator,
    all groups sharing the collectives of the step.

    Strategies (their traffic is on the distributed page of the documentation): ``"jacobian"``
    exchanges the Jacobians and works with every aggregator; ``"gramian"`` (weights from the
    Gramian) shards the columns of :math:`J`, all-reduces the partial Gramians and all-gathers the
    update; ``"update"`` (weights from the number of rows only) all-reduces the local updates.
    ``"auto"`` picks the first that the aggregators allow among ``"update"``, ``"gramian"`` and
    ``"jacobian"`` (``"jacobian"`` rather than ``"gramian"`` with ``rows="mean"`` on gloo).

    :param tensors: As for :func:`torchjd.autojac.jac_to_grad`, in the same order and shapes on
        every process; or a :class:`~torchjd.grouping.GroupedAggregator`.
    :param aggregator: The aggregator (``None`` with a GroupedAggregator).
    :param retain_jac: Keep the local ``.jac`` fields. Default ``False``.
    :param optimize_gramian_computation: As in :func:`torchjd.autojac.jac_to_grad`.
    :param grad_params: Tensors (each with a ``.grad``, not aggregated) whose ``.grad`` to reduce
        with the same collectives. Default ``None``: none.
    :param rows: ``"mean"`` (default) or ``"stack"`` (equal local row counts on every process).
    :param strategy: ``"auto"`` (default), ``"jacobian"``, ``"gramian"`` or ``"update"``.
    :param group: The process group (``None``, default: the default group).
    :param share_rng_state: Aggregate with the CPU generator state of the group's first process
        (then restore each process's own), so that randomised and stateful aggregators agree
        everywhere. Default ``True``; on a GPU it costs one synchronisation.
    :param present: The tasks labelled on this process (one boolean per row), i.e. ``counts`` of
        1 and 0. Needs ``rows="mean"``. Default ``None``: all, on every process.
    :param counts: This process's number of labelled samples of each task, ``n_{i,r} >= 0``. The
        global row of task ``i`` is then :math:`\sum_r n_{i,r} J_{i,r} / \sum_r n_{i,r}`, a
        task without any label on any process is absent from the step (as ``present`` in
        :func:`torchjd.autojac.jac_to_grad`), and all processes agree on the present tasks, the
        weights and the state. One extra all-reduce of ``m`` numbers. Default ``None``.
    :return: The weights, as :func:`torchjd.autojac.jac_to_grad` returns them (:math:`Rm` of them
        with ``rows="stack"``); with a GroupedAggregator, the list of each group's weights.
    """
    check_choice(rows, "rows", ROWS)
    check_choice(strategy, "strategy", _STRATEGIES)
    check_bool(share_rng_state, "share_rng_state")
    holder: dict[str, Steps] = {}

    def steps_for(groups: list[Group]) -> Steps:
        local = local_counts(present, counts, groups[0].n_tasks, rows)
        if local is not None:
            _weigh_rows_by_counts(groups, local, group)
        tensors_ = [t for g in groups for t in g.tensors]
        grads = validated_grad_params(grad_params, tensors_)
        chosen = _choose_strategy(groups, strategy)
        check_one_device([j for g in groups for j in g.jacobians], grads)
        rank, world_size = group_rank_and_size(group)
        ex = Exchange(rows, group, rank, world_size, share_rng_state)
        if chosen == "gramian" and strategy == "auto" and ex.mean and backend(group) == "gloo":
            # Gloo's reduce-scatter is slower than its all-reduce of the same buffer (measured
            # on CPU: 44 ms against 20 ms for 35 MB), so the fewer bytes do not pay there.
            chosen = "jacobian"
        steps = _STEPS[chosen](ex, grads)
        holder["steps"] = steps
        return steps

    if isinstance(tensors, GroupedAggregator):
        if aggregator is not None or optimize_gramian_computation:
            raise TypeError(
                "With a GroupedAggregator (which holds one aggregator per group), give no "
                "`aggregator` and no `optimize_gramian_computation`."
            )
        result: Tensor | list[Tensor | None] | None = tensors._aggregate_groups(
            steps_for, retain_jac=retain_jac, stacklevel=2
        )
    else:
        options = {"optimize_gramian_computation": optimize_gramian_computation}
        groups = prepare([materialise(tensors, "tensors")], [aggregator], ["tensors"], **options)
        run(groups, steps_for(groups), retain_jac=retain_jac, stacklevel=2)
        result = groups[0].weights
    with torch.no_grad():
        for grad, value in zip(holder["steps"].grads, holder["steps"].reduced):  # type: ignore[attr-defined]
            grad.copy_(value)
    return result


def _weigh_rows_by_counts(groups: list[Group], local: Tensor, group: Any) -> None:
    """Scale the local rows by the label counts, then keep the globally present tasks."""
    _, world_size = group_rank_and_size(group)
    factors, present = global_weights(local, groups[0].device, world_size, group)
    for g in groups:
        g.jacobians = [scaled(j, factors) for j in g.jacobians]
    select_tasks(groups, present)


def _choose_strategy(groups: list[Group], strategy: str) -> str:
    routes = {g.route for g in groups}
    names = ", ".join(repr(g.aggregator) for g in groups)
    if strategy == "auto":
        if routes == {Need.ROW_COUNT}:
            return "update"
        return "jacobian" if Need.MATRIX in routes else "gramian"
    if strategy == "update" and routes != {Need.ROW_COUNT}:
        raise ValueError(
            "`strategy='update'` needs an aggregator (for every group) whose weights depend only "
            "on the number of rows (Mean, Sum, Constant or Random, without forward hooks), got "
            f"{names}. Use 'auto' to choose the strategy automatically."
        )
    if strategy == "gramian" and routes != {Need.GRAMIAN}:
        raise ValueError(
            "`strategy='gramian'` needs an aggregator (for every group) whose weights come from "
            "the Gramian (a GramianWeightedAggregator) without forward hooks or pre-hooks on "
            f"itself or on its `weighting`, got {names}. Use 'jacobian', which works "
            "with every aggregator."
        )
    return strategy


_STEPS = {"jacobian": JacobianExchange, "gramian": GramianExchange, "update": UpdateExchange}

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from torchjd._pipeline import validated_jacobians
from torchjd._synchronization import mark_synchronized
from torchjd._validation import materialise
from torchjd.distributed._arguments import (
    ROWS,
    check_bool,
    check_choice,
    check_one_device,
    validated_grad_params,
)
from torchjd.distributed._comm import RngScope, group_rank_and_size
from torchjd.distributed._exchange import Exchange, exchange_jacobians
from torchjd.distributed._tasks import global_weights, local_counts, scaled


def sync_jac(
    tensors: Iterable[Tensor],
    /,
    *,
    grad_params: Iterable[Tensor] | None = None,
    rows: Literal["mean", "stack"] = "mean",
    group: Any = None,
    share_rng_state: bool = True,
    present: Tensor | Sequence[bool] | None = None,
    counts: Tensor | Sequence[float] | None = None,
) -> RngScope:
    r"""Replace the local ``.jac`` fields by the Jacobian of the whole process group, in one
    collective, so that any later aggregation gives the same result on every process.

    To be called by every process of ``group`` with the same tensors. After it, each tensor's
    ``.jac`` holds the global Jacobian :math:`J` (a new tensor, in the ``.jac``'s dtype): with
    ``rows="mean"`` (default) the mean of the local Jacobians, with ``rows="stack"`` their rows
    stacked in rank order (see :func:`torchjd.distributed.jac_to_grad`). The ``.grad`` fields of
    ``grad_params`` are replaced in place by their mean (``"mean"``) or sum (``"stack"``). All of
    it travels in one all-reduce (``"mean"``) or all-gather (``"stack"``): one buffer for all the
    tensors, never one collective per tensor.

    Then aggregate as in a single process, with :func:`torchjd.autojac.jac_to_grad` or a
    :class:`torchjd.grouping.GroupedAggregator` (one aggregator per group of parameters: every
    group is synchronised by this one call). This is the way for aggregation code that
    :func:`torchjd.distributed.jac_to_grad` does not cover; for one aggregator, that function
    moves fewer bytes with Gramian-based or row-count aggregators.

    With ``share_rng_state=True`` (default), the state of the global CPU generator of the
    group's first process comes along in the same collective and the other processes take it,
    so that randomised aggregators draw the same numbers everywhere. The returned object is a
    context manager: leaving the ``with`` block gives every process its own generator state
    back (the first process keeps its state throughout, as a single process would). Without a
    ``with`` block, the other processes keep the first process's generator state.

    .. code-block:: python

        mtl_backward(losses, features)
        with sync_jac(model.trunk.parameters(), grad_params=model.heads.parameters()):
            jac_to_grad(model.trunk[0].parameters(), UPGrad())
            jac_to_grad(model.trunk[1].parameters(), GradVac())

    :param tensors: The tensors whose ``.jac`` to synchronise (any iterable); each must have a
        ``.jac``, with one common number of rows.
    :param grad_params: Tensors whose ``.grad`` to reduce in the same collective. Each must have a
        ``.grad`` and not be in ``tensors``. Default ``None``: none.
    :param rows: ``"mean"`` (default) or ``"stack"``.
    :param group: The process group (``None``, default: the default group).
    :param share_rng_state: Give the other processes the first process's CPU generator state.
        Default ``True``.
    :param present: The tasks labelled on this process (one boolean per row): ``counts`` of 1
        and 0. Needs ``rows="mean"``. Default ``None``.
    :param counts: This process's label count of each task: the global row of task ``i`` is
        :math:`\sum_r n_{i,r} J_{i,r} / \sum_r n_{i,r}` (zero when no process has a label). The
        returned object's ``present`` attribute (a boolean tensor, the same on every process)
        then says which tasks are present: pass it to the aggregation, e.g.
        ``jac_to_grad(params, aggregator, present=scope.present)``. Default ``None``.
    :return: A context manager that restores the processes' own generator states at exit.
    """
    check_choice(rows, "rows", ROWS)
    check_bool(share_rng_state, "share_rng_state")
    tensors_ = materialise(tensors, "tensors")
    jacobians = validated_jacobians(tensors_)
    grads = validated_grad_params(grad_params, tensors_)
    check_one_device(jacobians, grads)
    rank, world_size = group_rank_and_size(group)
    local = local_counts(present, counts, jacobians[0].shape[0], rows)
    global_present = None
    if local is not None:
        factors, global_present = global_weights(local, jacobians[0].device, world_size, group)
        jacobians = [scaled(j, factors) for j in jacobians]

    ex = Exchange(rows, group, rank, world_size, share_rng_state)
    global_jacobians, reduced, state = exchange_jacobians(jacobians, grads, ex)
    for t, jacobian in zip(tensors_, global_jacobians):
        mark_synchronized(jacobian)
        t.jac = jacobian
    with torch.no_grad():
        for g, value in zip(grads, reduced):
            g.copy_(value)
    scope = RngScope(state, rank)
    scope.present = global_present
    return scope

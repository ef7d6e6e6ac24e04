from __future__ import annotations

from collections.abc import Iterable
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


def sync_jac(
    tensors: Iterable[Tensor],
    /,
    *,
    grad_params: Iterable[Tensor] | None = None,
    rows: Literal["mean", "stack"] = "mean",
    group: Any = None,
    share_rng_state: bool = True,
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
    :return: A context manager that restores the processes' own generator states at exit.
    """
    check_choice(rows, "rows", ROWS)
    check_bool(share_rng_state, "share_rng_state")
    tensors_ = materialise(tensors, "tensors")
    jacobians = validated_jacobians(tensors_)
    grads = validated_grad_params(grad_params, tensors_)
    check_one_device(jacobians, grads)
    rank, world_size = group_rank_and_size(group)

    ex = Exchange(rows, group, rank, world_size, share_rng_state)
    global_jacobians, reduced, state = exchange_jacobians(jacobians, grads, ex)
    for t, jacobian in zip(tensors_, global_jacobians):
        mark_synchronized(jacobian)
        t.jac = jacobian
    with torch.no_grad():
        for g, value in zip(grads, reduced):
            g.copy_(value)
    return RngScope(state, rank)

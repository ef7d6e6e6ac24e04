"""The three ways of turning the local ``.jac`` fields of every process into one update.

Notation: ``R`` processes; process ``r`` holds local Jacobians ``J_r`` with ``m`` rows and ``N``
columns in all (the ``.jac`` fields of the aggregated tensors, flattened and concatenated) and
``H`` extra gradient entries (the ``.grad`` fields of ``grad_params``, e.g. the task heads after
``mtl_backward``). The global Jacobian ``J`` is

- ``rows="mean"``: ``(1/R) Σ_r J_r`` (``m`` rows); the extra gradients are averaged;
- ``rows="stack"``: the rows of ``J_0, ..., J_{R-1}`` stacked in rank order (``R·m`` rows); the
  extra gradients are summed.

Strategies (per process, in numbers of entries sent to collectives):

- ``jacobian``: one all-reduce (``mean``) or all-gather (``stack``) of ``m·N + H`` entries, then
  every process aggregates ``J`` itself. Works with any aggregator.
- ``gramian``: the columns of ``J`` are split into ``R`` shards. One reduce-scatter (``mean``) or
  all-to-all (``stack``) gives each process its shard ``S_r`` of ``J`` (``m·N + H`` entries in);
  the Gramian ``G = J Jᵀ = Σ_r S_r S_rᵀ`` is one all-reduce of the small partial Gramians;
  every process computes the weights ``w`` from ``G`` and its piece ``wᵀ S_r`` of the update,
  and one all-gather assembles the update (``N + H`` entries out). Only for aggregators whose
  weights come from the Gramian. About half the traffic of ``jacobian`` for ``mean`` (reduce-
  scatter + all-gather of a vector instead of reduce-scatter + all-gather of the matrix), ``R``
  times less for ``stack``, and each process computes ``1/R`` of the Gramian.
- ``update``: the weights do not depend on ``J`` (Mean, Sum, Constant, Random), so every process
  computes ``w_rᵀ J_r`` locally and one all-reduce of ``N + H`` entries sums them: exactly the
  traffic of ``DistributedDataParallel``.

Note that all-reducing the local Gramians ``J_r J_rᵀ`` would be wrong: the Gramian of the mean
Jacobian has cross terms, ``(1/R²) Σ_{r,s} J_r J_sᵀ``, that no process can compute alone.

When ``share_rng_state`` is set, the state of the global CPU generator of the group's first
process rides along in a collective that precedes the aggregation, and the aggregation runs with
that state on every process (see :class:`~torchjd.distributed._comm.RngScope`): randomised
aggregators draw the same numbers everywhere, those a single process would draw.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce
from typing import Any

import torch
from torch import Tensor

from torchjd.aggregation._bases import Aggregator
from torchjd.aggregation._random import RandomWeighting
from torchjd.autojac._jac_to_grad import (
    _aggregate_concatenated,
    _choose_route,
    _combine,
    _promoted_dtype,
    _Route,
    _weights_without_concatenation,
)
from torchjd.distributed._comm import (
    RngScope,
    all_gather,
    all_reduce,
    all_to_all,
    reduce_scatter,
    rng_slot,
    rng_state_from_slot,
    shard_size,
)


@dataclass(frozen=True)
class Exchange:
    """What a strategy needs to know about the process group and the reduction of the rows."""

    rows: str  # "mean" or "stack"
    group: Any  # the process group (None: the default one)
    rank: int
    world_size: int
    share_rng: bool  # send the first process's CPU generator state along

    @property
    def mean(self) -> bool:
        return self.rows == "mean"


def _common_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    return reduce(torch.promote_types, (t.dtype for t in tensors))


@torch.no_grad()
def exchange_jacobians(
    jacobians: list[Tensor], grads: list[Tensor], ex: Exchange
) -> tuple[list[Tensor], list[Tensor], Tensor | None]:
    """The global Jacobians (one per tensor, in its ``.jac``'s dtype), the reduced extra
    gradients, and the first process's generator state (``None`` unless ``ex.share_rng``), with
    one all-reduce (``mean``) or all-gather (``stack``)."""
    dtype = _common_dtype([*jacobians, *grads])
    device = jacobians[0].device
    m = jacobians[0].shape[0]
    sizes = [j.numel() for j in jacobians] + [g.numel() for g in grads]
    pieces = [j.reshape(-1) for j in jacobians] + [g.reshape(-1) for g in grads]
    n_data = sum(sizes)
    if ex.share_rng:
        pieces.append(rng_slot(ex.rank, dtype, device))
    local = torch.cat([p.to(dtype) for p in pieces])

    if ex.mean:
        local[:n_data].div_(ex.world_size)
        all_reduce(local, ex.group)
        blocks = local[:n_data].split(sizes)
        global_jacobians = [b.view(j.shape).to(j.dtype) for b, j in zip(blocks, jacobians)]
        reduced = [b.view(g.shape).to(g.dtype) for b, g in zip(blocks[len(jacobians) :], grads)]
        state = rng_state_from_slot(local[n_data:]) if ex.share_rng else None
        return global_jacobians, reduced, state

    gathered = torch.empty(ex.world_size * local.numel(), dtype=dtype, device=device)
    all_gather(gathered, local, ex.group)
    table = gathered.view(ex.world_size, local.numel())
    blocks = table[:, :n_data].split(sizes, dim=1)
    global_jacobians = [
        b.reshape(ex.world_size * m, *j.shape[1:]).to(j.dtype) for b, j in zip(blocks, jacobians)
    ]
    reduced = [
        b.sum(dim=0).view(g.shape).to(g.dtype) for b, g in zip(blocks[len(jacobians) :], grads)
    ]
    state = rng_state_from_slot(table[0, n_data:]) if ex.share_rng else None
    return global_jacobians, reduced, state


def jacobian_strategy(
    tensors: list[Tensor],
    jacobians: list[Tensor],
    grads: list[Tensor],
    aggregator: Aggregator,
    optimize_gramian_computation: bool,
    ex: Exchange,
) -> tuple[Tensor | None, list[Tensor], list[Tensor]]:
    """Exchange the Jacobians, then aggregate as :func:`torchjd.autojac.jac_to_grad` does."""
    global_jacobians, reduced, state = exchange_jacobians(jacobians, grads, ex)
    route = _choose_route(aggregator, optimize_gramian_computation)
    with RngScope(state, ex.rank):
        if route is _Route.CONCATENATE:
            weights, gradients = _aggregate_concatenated(tensors, global_jacobians, aggregator)
        else:
            weights = _weights_without_concatenation(global_jacobians, aggregator, route)
            gradients = _combine(tensors, global_jacobians, weights)
    return weights, gradients, reduced


@torch.no_grad()
def update_strategy(
    tensors: list[Tensor],
    jacobians: list[Tensor],
    grads: list[Tensor],
    aggregator: Aggregator,
    ex: Exchange,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Weights that do not depend on the Jacobian: aggregate locally, all-reduce the updates."""
    m_local = jacobians[0].shape[0]
    m = m_local if ex.mean else ex.world_size * m_local
    device = jacobians[0].device
    weighting = aggregator.weighting  # type: ignore[attr-defined]

    state = None
    if ex.share_rng and type(weighting) is RandomWeighting:
        # The only one of these weightings that draws random numbers: it needs the first
        # process's generator before anything else can be sent.
        slot = rng_slot(ex.rank, torch.float32, device)
        all_reduce(slot, ex.group)
        state = rng_state_from_slot(slot)
    with RngScope(state, ex.rank):
        weights = weighting(torch.empty((m, 0), dtype=_promoted_dtype(jacobians), device=device))
    _check_weights(weights, m, aggregator)

    local_weights = weights if ex.mean else weights[ex.rank * m_local : (ex.rank + 1) * m_local]
    contributions = _combine(tensors, jacobians, local_weights)  # w_rᵀ J_r, tensor by tensor
    pieces = [c.reshape(-1) for c in contributions] + [g.reshape(-1) for g in grads]
    buffer = torch.cat([p.to(_common_dtype(pieces)) for p in pieces])
    if ex.mean:
        buffer.div_(ex.world_size)
    all_reduce(buffer, ex.group)
    blocks = buffer.split([p.numel() for p in pieces])
    gradients = [b.view(t.shape).to(t.dtype) for b, t in zip(blocks, tensors)]
    reduced = [b.view(g.shape).to(g.dtype) for b, g in zip(blocks[len(tensors) :], grads)]
    return weights, gradients, reduced


@torch.no_grad()
def gramian_strategy(
    tensors: list[Tensor],
    jacobians: list[Tensor],
    grads: list[Tensor],
    aggregator: Aggregator,
    ex: Exchange,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Shard the columns of the Jacobian, all-reduce the partial Gramians, gather the update."""
    world_size = ex.world_size
    m_local = jacobians[0].shape[0]
    device = jacobians[0].device
    dtype = _common_dtype([*jacobians, *grads])
    jacobian_dtype = _promoted_dtype(jacobians)
    gramian_dtype = torch.promote_types(jacobian_dtype, torch.float32)
    numels = [t.numel() for t in tensors]
    grad_numels = [g.numel() for g in grads]
    n, n_grads = sum(numels), sum(grad_numels)
    c = shard_size(n, world_size)  # columns of the Jacobian per process
    h = math.ceil(n_grads / world_size)  # extra gradient entries per process
    width = m_local * c + h

    # Row s of `send` goes to process s: the columns [s·c, (s+1)·c) of the local Jacobian (an
    # [m, c] block, zero-padded), then the entries [s·h, (s+1)·h) of the extra gradients.
    send = torch.zeros((world_size, width), dtype=dtype, device=device)
    blocks = send[:, : m_local * c].view(world_size, m_local, c)
    start = 0
    for jacobian, numel in zip(jacobians, numels):
        flat = jacobian.reshape(m_local, numel)
        low, end = start, start + numel
        while low < end:
            shard = low // c
            high = min(end, (shard + 1) * c)
            offset = shard * c
            blocks[shard, :, low - offset : high - offset] = flat[:, low - start : high - start]
            low = high
        start = end
    if n_grads:
        flat_grads = torch.zeros(world_size * h, dtype=dtype, device=device)
        flat_grads[:n_grads] = torch.cat([g.reshape(-1) for g in grads])
        send[:, m_local * c :] = flat_grads.view(world_size, h)

    if ex.mean:
        send.div_(world_size)
        received = torch.empty(width, dtype=dtype, device=device)
        reduce_scatter(received, send.view(-1), ex.group)
        shard_rows = received[: m_local * c].view(m_local, c)
        grad_shard = received[m_local * c :]
    else:
        received = torch.empty((world_size, width), dtype=dtype, device=device)
        all_to_all(received.view(-1), send.view(-1), ex.group)
        shard_rows = received[:, : m_local * c].reshape(world_size * m_local, c)
        grad_shard = received[:, m_local * c :].sum(dim=0)
    del send
    m = shard_rows.shape[0]

    # G = Σ_r S_r S_rᵀ, with the first process's generator state in the same all-reduce.
    matrix = shard_rows.to(gramian_dtype)
    small = [(matrix @ matrix.T).reshape(-1)]
    if ex.share_rng:
        small.append(rng_slot(ex.rank, gramian_dtype, device))
    summed = torch.cat(small)
    all_reduce(summed, ex.group)
    gramian = summed[: m * m].view(m, m)
    state = rng_state_from_slot(summed[m * m :]) if ex.share_rng else None
    with RngScope(state, ex.rank):
        weights = aggregator.gramian_weighting(gramian)  # type: ignore[attr-defined]
    _check_weights(weights, m, aggregator)
    weights = weights.to(dtype=jacobian_dtype)

    piece = weights.to(dtype) @ shard_rows  # this process's columns of wᵀ J
    gathered = torch.empty(world_size * (c + h), dtype=dtype, device=device)
    all_gather(gathered, torch.cat([piece, grad_shard]), ex.group)
    table = gathered.view(world_size, c + h)
    update = table[:, :c].reshape(-1)[:n]
    gradients = [b.view(t.shape).to(t.dtype) for b, t in zip(update.split(numels), tensors)]
    grad_values = table[:, c:].reshape(-1)[:n_grads]
    reduced = [b.view(g.shape).to(g.dtype) for b, g in zip(grad_values.split(grad_numels), grads)]
    return weights, gradients, reduced


def _check_weights(weights: object, m: int, aggregator: Aggregator) -> None:
    if not isinstance(weights, Tensor) or weights.shape != (m,):
        got = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(
            f"The weighting of {aggregator!r} must return one weight per row ({m}), got {got}."
        )

"""The collective steps of the application pipeline, for :mod:`torchjd.distributed`.

Process ``r`` of ``R`` holds local Jacobians ``J_r`` and extra gradients (``grad_params``); the
global Jacobian is their mean or their stacked rows (the extra gradients: mean or sum). The local
Gramians cannot be all-reduced: the Gramian of the mean has cross terms. Each exchange moves all
the groups of a step in one buffer per collective, with the first process's generator state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import reduce
from typing import Any

import torch
from torch import Tensor

from torchjd._pipeline import Group, Steps, combine
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
from torchjd.linalg._gramian import sum_of_gramians


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
    sizes = [j.numel() for j in jacobians] + [g.numel() for g in grads]
    pieces = [j.reshape(-1) for j in jacobians] + [g.reshape(-1) for g in grads]
    n_data = sum(sizes)
    if ex.share_rng:
        pieces.append(rng_slot(ex.rank, dtype, device))
    local = torch.cat([p.to(dtype) for p in pieces])
    if ex.mean:
        local[:n_data].div_(ex.world_size)
        all_reduce(local, ex.group)
        table = local.view(1, -1)
    else:  # one row of the table per process, in rank order
        table = torch.empty((ex.world_size, local.numel()), dtype=dtype, device=device)
        all_gather(table.view(-1), local, ex.group)
    blocks = table[:, :n_data].split(sizes, dim=1)
    global_jacobians = [b.reshape(-1, *j.shape[1:]).to(j.dtype) for b, j in zip(blocks, jacobians)]
    n_jac = len(jacobians)
    reduced = [b.sum(dim=0).view(g.shape).to(g.dtype) for b, g in zip(blocks[n_jac:], grads)]
    state = rng_state_from_slot(table[0, n_data:]) if ex.share_rng else None
    return global_jacobians, reduced, state


class _CollectiveSteps(Steps):
    """Steps whose statistics and update come from collectives over the process group."""

    warns_unsynchronized = False  # these steps are the synchronisation

    def __init__(self, ex: Exchange, grads: list[Tensor]) -> None:
        self.ex = ex
        self.grads = grads
        self.reduced: list[Tensor] = []  # the reduced `.grad` fields of `grad_params`
        self.state: Tensor | None = None  # the first process's CPU generator state

    def scope(self) -> AbstractContextManager[object]:
        return RngScope(self.state, self.ex.rank)


class JacobianExchange(_CollectiveSteps):
    """One all-reduce (``mean``) or all-gather (``stack``) of every group's Jacobians, then the
    local steps on the global Jacobians. Works with every aggregator."""

    def prepare(self, groups: list[Group]) -> None:
        local = [j for g in groups for j in g.jacobians]
        global_jacobians, self.reduced, self.state = exchange_jacobians(local, self.grads, self.ex)
        start = 0
        for g in groups:
            g.jacobians = global_jacobians[start : start + len(g.jacobians)]
            g.m = g.jacobians[0].shape[0]
            start += len(g.jacobians)
        super().prepare(groups)


class UpdateExchange(_CollectiveSteps):
    """Weights that depend only on the number of rows: every process adds its ``w_rᵀ J_r`` and
    one all-reduce sums them, with the extra gradients."""

    def prepare(self, groups: list[Group]) -> None:
        self.local_m = [g.m for g in groups]
        if not self.ex.mean:
            for g in groups:
                g.m *= self.ex.world_size
        if self.ex.share_rng and any(g.aggregator.randomized for g in groups):
            # The weights are drawn before anything else is sent: one small collective first.
            slot = rng_slot(self.ex.rank, torch.float32, groups[0].device)
            all_reduce(slot, self.ex.group)
            self.state = rng_state_from_slot(slot)

    @torch.no_grad()
    def combine(self, groups: list[Group]) -> None:
        ex = self.ex
        pieces = []
        for g, m_local in zip(groups, self.local_m):
            assert g.weights is not None
            start = 0 if ex.mean else ex.rank * m_local
            contributions = combine(g.tensors, g.jacobians, g.weights[start : start + m_local])
            pieces.extend(c.reshape(-1) for c in contributions)
        pieces.extend(grad.reshape(-1) for grad in self.grads)
        buffer = torch.cat([p.to(_common_dtype(pieces)) for p in pieces])
        if ex.mean:
            buffer.div_(ex.world_size)
        all_reduce(buffer, ex.group)
        blocks = iter(buffer.split([p.numel() for p in pieces]))
        for g in groups:
            g.gradients = [next(blocks).view(t.shape).to(t.dtype) for t in g.tensors]
        self.reduced = [next(blocks).view(grad.shape).to(grad.dtype) for grad in self.grads]


class GramianExchange(_CollectiveSteps):
    """The columns of each group's Jacobian split into ``R`` shards: one reduce-scatter (``mean``)
    or all-to-all (``stack``) gives process ``r`` its shard ``S_{g,r}`` of every group ``g``; one
    all-reduce of the partial Gramians ``S_{g,r} S_{g,r}ᵀ`` of all groups gives the Gramians;
    each process computes its piece ``w_gᵀ S_{g,r}`` and one all-gather assembles the update."""

    @torch.no_grad()
    def prepare(self, groups: list[Group]) -> None:
        ex, R = self.ex, self.ex.world_size
        dtype = _common_dtype([*(j for g in groups for j in g.jacobians), *self.grads])
        device = groups[0].device
        self.numels = [[t.numel() for t in g.tensors] for g in groups]
        self.columns = [shard_size(sum(n), R) for n in self.numels]  # c_g, per process
        m_local = [g.m for g in groups]
        widths = [m * c for m, c in zip(m_local, self.columns)]
        n_grads = sum(grad.numel() for grad in self.grads)
        h = math.ceil(n_grads / R)  # extra gradient entries per process
        send = torch.zeros((R, sum(widths) + h), dtype=dtype, device=device)
        offset = 0
        for g, m, c, width in zip(groups, m_local, self.columns, widths):
            _fill_shards(send[:, offset : offset + width].view(R, m, c), g.jacobians)
            offset += width
        if n_grads:
            flat = torch.zeros(R * h, dtype=dtype, device=device)
            flat[:n_grads] = torch.cat([grad.reshape(-1) for grad in self.grads])
            send[:, offset:] = flat.view(R, h)
        if ex.mean:
            send.div_(R)
            received = torch.empty((1, send.shape[1]), dtype=dtype, device=device)
            reduce_scatter(received.view(-1), send.view(-1), ex.group)
        else:
            received = torch.empty_like(send)
            all_to_all(received.view(-1), send.view(-1), ex.group)
        self.grad_shard = received[:, offset:].sum(dim=0)
        del send
        self.shards, offset = [], 0
        for g, m, c, width in zip(groups, m_local, self.columns, widths):
            shard = received[:, offset : offset + width].reshape(received.shape[0] * m, c)
            self.shards.append(shard)  # rows in rank order for "stack"
            g.m = shard.shape[0]
            offset += width
        self._gramians(groups)

    def _gramians(self, groups: list[Group]) -> None:
        """``G_g = Σ_r S_{g,r} S_{g,r}ᵀ`` for the groups that want one, with the first process's
        generator state, in one all-reduce."""
        wanted = [(g, s) for g, s in zip(groups, self.shards) if g.wants_gramian]
        if not wanted and not self.ex.share_rng:
            return
        dtype = reduce(torch.promote_types, [g.gramian_dtype for g, _ in wanted], torch.float32)
        small = [sum_of_gramians([s], dtype).reshape(-1) for _, s in wanted]
        if self.ex.share_rng:
            small.append(rng_slot(self.ex.rank, dtype, groups[0].device))
        summed = torch.cat(small)
        all_reduce(summed, self.ex.group)
        start = 0
        for g, _ in wanted:
            g.gramian = summed[start : start + g.m * g.m].view(g.m, g.m).to(g.gramian_dtype)
            start += g.m * g.m
        if self.ex.share_rng:
            self.state = rng_state_from_slot(summed[start:])

    @torch.no_grad()
    def combine(self, groups: list[Group]) -> None:
        R = self.ex.world_size
        dtype = self.shards[0].dtype
        products = [g.weights.to(dtype) @ s for g, s in zip(groups, self.shards)]  # type: ignore[union-attr]
        local = torch.cat([*products, self.grad_shard])
        gathered = torch.empty(R * local.numel(), dtype=dtype, device=local.device)
        all_gather(gathered, local, self.ex.group)
        table = gathered.view(R, local.numel())
        offset = 0
        for g, c, numels in zip(groups, self.columns, self.numels):
            update = table[:, offset : offset + c].reshape(-1)[: sum(numels)]
            g.gradients = [
                b.view(t.shape).to(t.dtype) for b, t in zip(update.split(numels), g.tensors)
            ]
            offset += c
        grad_numels = [grad.numel() for grad in self.grads]
        values = table[:, offset:].reshape(-1)[: sum(grad_numels)]
        self.reduced = [
            b.view(grad.shape).to(grad.dtype)
            for b, grad in zip(values.split(grad_numels), self.grads)
        ]


def _fill_shards(blocks: Tensor, jacobians: list[Tensor]) -> None:
    """Copy column ``s·c + k`` of the concatenated ``jacobians`` into ``blocks[s, :, k]``
    (``blocks``: ``[R, m, c]``; the columns past the end stay zero)."""
    R, m, c = blocks.shape
    flat = torch.cat([j.reshape(m, -1).to(blocks.dtype) for j in jacobians], dim=1)
    flat = torch.nn.functional.pad(flat, (0, R * c - flat.shape[1]))
    blocks.copy_(flat.view(m, R, c).transpose(0, 1))

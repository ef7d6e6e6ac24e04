"""Several vector-Jacobian products through a recorded graph, one per row of stacked cotangents."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

_Target = Tensor | GradientEdge


@dataclass(frozen=True)
class TensorSpec:
    """Shape, dtype and device of a tensor that is not kept."""

    shape: torch.Size
    dtype: torch.dtype
    device: torch.device

    @staticmethod
    def of(t: Tensor) -> TensorSpec:
        return TensorSpec(t.shape, t.dtype, t.device)

    def zeros(self, *leading: int) -> Tensor:
        return torch.zeros((*leading, *self.shape), dtype=self.dtype, device=self.device)


def stacked_vjps(
    outputs: Sequence[Tensor],
    inputs: Sequence[_Target],
    cotangents: Sequence[Tensor],
    input_specs: Sequence[TensorSpec],
) -> tuple[Tensor | None, ...]:
    """For ``cotangents`` of shape ``[d, *output.shape]``, the ``d`` gradients of
    ``sum(cotangent[i] * output)`` w.r.t. each input, stacked: ``[d, *input.shape]``, or ``None``
    for an input that no row reaches.

    The ``d`` backward passes are vectorised (``is_grads_batched``); if some operation of the graph
    cannot be vectorised (or the vectorised pass fails, e.g. for lack of memory), they are run one
    after the other. The graph is retained. ``input_specs`` give the shape, dtype and device of the
    gradient of each input (to fill rows that do not reach it with zeros).
    """
    d = cotangents[0].shape[0]
    if d == 1:
        grads = torch.autograd.grad(
            outputs,
            inputs,
            grad_outputs=[c[0] for c in cotangents],
            retain_graph=True,
            allow_unused=True,
        )
        return tuple(None if g is None else g.unsqueeze(0) for g in grads)
    try:
        return torch.autograd.grad(
            outputs,
            inputs,
            grad_outputs=cotangents,
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=True,
        )
    except RuntimeError:
        pass
    per_row = [
        torch.autograd.grad(
            outputs,
            inputs,
            grad_outputs=[c[i] for c in cotangents],
            retain_graph=True,
            allow_unused=True,
        )
        for i in range(d)
    ]
    stacked: list[Tensor | None] = []
    for j, spec in enumerate(input_specs):
        column = [row[j] for row in per_row]
        if all(g is None for g in column):
            stacked.append(None)
        else:
            filled = [spec.zeros() if g is None else g for g in column]
            stacked.append(torch.stack(filled))
    return tuple(stacked)

"""Gramian helpers shared by the aggregators, :func:`torchjd.autojac.jac_to_grad` and autogram."""

import torch
from torch import Tensor


def compute_gramian(t: Tensor) -> Tensor:
    """Return ``M @ M.T`` where ``M`` views ``t`` as a matrix with one row per entry of dim 0.

    A 1-D tensor of length ``m`` is an ``[m, 1]`` column (the ``.jac`` of a scalar parameter); a
    tensor with more dimensions is flattened to ``[t.shape[0], -1]``.
    """
    matrix = t.reshape(t.shape[0], -1)
    return matrix @ matrix.T


def normalize(gramian: Tensor, eps: float) -> Tensor:
    """Divide the (batch of) Gramian(s) by its trace, or return zeros when the trace is ``< eps``.

    Branch-free on the tensor values, so it never synchronises with the host.
    """
    trace = gramian.diagonal(dim1=-2, dim2=-1).sum(dim=-1, keepdim=True).unsqueeze(-1)
    large_enough = trace >= eps
    safe_trace = torch.where(large_enough, trace, torch.ones_like(trace))
    return torch.where(large_enough, gramian / safe_trace, torch.zeros_like(gramian))


def regularize(gramian: Tensor, eps: float) -> Tensor:
    """Return ``gramian + eps * I`` (broadcast over leading batch dimensions)."""
    m = gramian.shape[-1]
    identity = torch.eye(m, dtype=gramian.dtype, device=gramian.device)
    return gramian + eps * identity

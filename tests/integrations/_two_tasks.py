"""A small two-task model for the integration tests, and its step written by hand."""

import torch
from torch import Tensor, nn
from torch.nn.functional import mse_loss
from torch.utils.data import DataLoader, TensorDataset

from torchjd.aggregation import UPGradWeighting


def data(n: int = 32) -> TensorDataset:
    gen = torch.Generator().manual_seed(7)
    return TensorDataset(torch.randn(n, 5, generator=gen), torch.randn(n, 2, generator=gen))


def loader(dataset: TensorDataset, batch_size: int = 8) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


def networks(seed: int = 0) -> tuple[nn.Module, nn.ModuleList]:
    torch.manual_seed(seed)
    trunk = nn.Sequential(
        nn.Linear(5, 12), nn.LayerNorm(12), nn.ReLU(), nn.Linear(12, 6), nn.ReLU()
    )
    heads = nn.ModuleList([nn.Linear(6, 1), nn.Linear(6, 1)])
    return trunk, heads


def hand_written_step(
    trunk: nn.Module, heads: nn.ModuleList, x: Tensor, y: Tensor
) -> tuple[list[Tensor], Tensor]:
    """The gradients of one step, from the flat Jacobian of the trunk (no engine, no hook): the
    trunk's is ``wᵀ J`` with ``w`` UPGrad's weights of ``J Jᵀ``, each head's is unweighted."""
    features = trunk(x)
    losses = [mse_loss(head(features), y[:, [i]]) for i, head in enumerate(heads)]
    shared = list(trunk.parameters())
    rows = [torch.autograd.grad(loss, shared, retain_graph=True) for loss in losses]
    jacobian = torch.stack([torch.cat([g.flatten() for g in row]) for row in rows])
    weights = UPGradWeighting()(jacobian @ jacobian.T)
    update = weights @ jacobian
    grads, offset = [], 0
    for p in shared:
        grads.append(update[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    for i, head in enumerate(heads):
        grads.extend(torch.autograd.grad(losses[i], list(head.parameters()), retain_graph=True))
    return grads, weights

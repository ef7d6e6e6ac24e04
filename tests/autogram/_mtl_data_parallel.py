"""Training with MTLEngine(data_parallel=True) in several processes (gloo, CPU), and the
single-process simulation of its rule: weights from the mean of the local Gramians, update
``w^T`` (mean of the local Jacobians), heads' gradients averaged."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from tests._gloo import init_gloo
from torchjd.aggregation import Aggregator, GradVac, Random, UPGrad
from torchjd.autogram import MTLEngine
from torchjd.autojac import mtl_backward
from torchjd.grouping import GroupedAggregator, per_tensor

STEPS = 2
BATCH = 8
N_TASKS = 3
RNG_SEED = 1000

# name: (aggregator factory, grouped per tensor, wrapped in DistributedDataParallel)
SCENARIOS: dict[str, tuple[Callable[[], Aggregator], bool, bool]] = {
    "upgrad-ddp": (UPGrad, False, True),
    "random-ddp": (Random, False, True),
    "gradvac-per-tensor": (GradVac, True, False),
}


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        state = torch.random.get_rng_state()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
        self.heads = nn.ModuleList(nn.Linear(3, 1) for _ in range(N_TASKS))
        torch.random.set_rng_state(state)
        self.double()

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        features = self.trunk(x)
        return features, [head(features) for head in self.heads]


def batch(step: int) -> tuple[Tensor, Tensor]:
    data = torch.Generator().manual_seed(50 + step)
    x = torch.randn(BATCH, 5, generator=data, dtype=torch.float64)
    return x, torch.randn(N_TASKS, BATCH, 1, generator=data, dtype=torch.float64)


def _losses(predictions: list[Tensor], targets: Tensor) -> list[Tensor]:
    return [((p - t) ** 2).mean() for p, t in zip(predictions, targets)]


def _sgd(model: Model) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
            p.grad = None


def train_distributed(name: str, rank: int, world: int) -> Tensor:
    make, grouped, ddp = SCENARIOS[name]
    model = Model()
    torch.manual_seed(RNG_SEED + rank)  # different generators: the engine must share one
    engine = MTLEngine(model.trunk, data_parallel=True)
    aggregator = GroupedAggregator(per_tensor(model.trunk), make) if grouped else make()
    runner: nn.Module = DistributedDataParallel(model) if ddp else model
    shard = BATCH // world
    for step in range(STEPS):
        x, targets = batch(step)
        rows = slice(rank * shard, (rank + 1) * shard)
        features, predictions = runner(x[rows])
        engine.backward(_losses(predictions, targets[:, rows]), features, aggregator)
        _sgd(model)
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def reference(name: str, world: int) -> Tensor:
    """One process simulates the rule on the ``world`` shards, with the first process's seed."""
    make, grouped, _ = SCENARIOS[name]
    model = Model()
    torch.manual_seed(RNG_SEED)
    trunk = list(model.trunk.parameters())
    groups = per_tensor(model.trunk) if grouped else [trunk]
    aggregators = [make() for _ in groups]
    shard = BATCH // world
    for step in range(STEPS):
        x, targets = batch(step)
        jacobians: list[list[Tensor]] = []
        head_grads: list[list[Tensor]] = []
        for r in range(world):
            rows = slice(r * shard, (r + 1) * shard)
            features, predictions = model(x[rows])
            mtl_backward(_losses(predictions, targets[:, rows]), features=features)
            jacobians.append([p.jac.reshape(N_TASKS, -1) for p in trunk])
            head_grads.append([p.grad for p in model.heads.parameters()])
            for p in model.parameters():
                del p.grad
                if hasattr(p, "jac"):
                    del p.jac
        index = {id(p): i for i, p in enumerate(trunk)}
        for group, aggregator in zip(groups, aggregators):
            blocks = [[jac[index[id(p)]] for p in group] for jac in jacobians]
            gramian = sum(sum(b @ b.T for b in shard_blocks) for shard_blocks in blocks) / world
            weighting = getattr(aggregator, "gramian_weighting", None) or aggregator.weighting
            weights = weighting(gramian)
            for p in group:
                mean_jacobian = sum(jac[index[id(p)]] for jac in jacobians) / world
                p.grad = (weights @ mean_jacobian).reshape(p.shape)
        for i, p in enumerate(model.heads.parameters()):
            p.grad = sum(grads[i] for grads in head_grads) / world
        _sgd(model)
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    init_gloo(rank, world, init_file)
    try:
        results = {name: train_distributed(name, rank, world) for name in SCENARIOS}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()

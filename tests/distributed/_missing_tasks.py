"""Missing labels under data parallelism: the cases run by two processes (gloo, CPU) and by one
process on the union of their batches.

Each sample has a label for some tasks only. The loss of task ``i`` on a batch is the mean over
its labelled samples, so on the union of the shards it is ``Σ_r n_{i,r} L_{i,r} / Σ_r n_{i,r}``:
its gradient is the global row that ``counts`` asks of ``torchjd.distributed``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from tests._gloo import init_gloo
from torchjd import autojac, distributed
from torchjd.aggregation import GradVac, Mean, UPGrad
from torchjd.grouping import GroupedAggregator

BATCH = 8
N_TASKS = 3
IN_FEATURES = 4

AGGREGATORS: dict[str, Callable[[], nn.Module]] = {
    "upgrad": UPGrad,
    "mean": Mean,
    "gradvac": GradVac,
}

# name: (aggregator, how, labels) with labels[s, i] = whether sample s has a label for task i.
# Rank r gets samples [4r, 4r + 4).
_EQUAL = torch.tensor([[1, 1, 0]] * BATCH, dtype=torch.bool)  # task 2 never labelled
_UNEQUAL = torch.tensor(
    [
        [1, 0, 1],
        [1, 0, 0],
        [1, 0, 0],
        [0, 0, 0],  # rank 0: n = (3, 0, 1)
        [1, 1, 1],
        [0, 1, 1],
        [0, 1, 1],
        [0, 1, 0],  # rank 1: n = (1, 4, 3)
    ],
    dtype=torch.bool,
)
_ALL = torch.ones(BATCH, N_TASKS, dtype=torch.bool)
CASES = {
    # Every task labelled everywhere, with and without counts: the same step, bit for bit.
    "all-upgrad-counts": ("upgrad", {"strategy": "gramian"}, _ALL),
    "all-upgrad-no-counts": ("upgrad", {"strategy": "gramian", "no_counts": True}, _ALL),
    "equal-upgrad-jacobian": ("upgrad", {"strategy": "jacobian"}, _EQUAL),
    "unequal-upgrad-jacobian": ("upgrad", {"strategy": "jacobian"}, _UNEQUAL),
    "unequal-upgrad-gramian": ("upgrad", {"strategy": "gramian"}, _UNEQUAL),
    "unequal-mean-update": ("mean", {"strategy": "update"}, _UNEQUAL),
    "unequal-gradvac-auto": ("gradvac", {}, _UNEQUAL),
    "unequal-gradvac-sync": ("gradvac", {"sync": True}, _UNEQUAL),
    "equal-upgrad-sync": ("upgrad", {"sync": True}, _EQUAL),
    "unequal-gradvac-grouped": ("gradvac", {"grouped": True}, _UNEQUAL),
    "unequal-upgrad-grouped-gramian": (
        "upgrad",
        {"grouped": True, "strategy": "gramian"},
        _UNEQUAL,
    ),
}
STEPS = 2


def _data() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(3)
    return torch.randn(BATCH, IN_FEATURES, generator=generator), torch.randn(
        BATCH, N_TASKS, generator=generator
    )


def _model() -> nn.Module:
    torch.manual_seed(11)
    return nn.ModuleDict(
        {
            "trunk": nn.Sequential(nn.Linear(IN_FEATURES, 5), nn.Tanh()),
            "heads": nn.Linear(5, N_TASKS),
        }
    )


def _losses(
    model: nn.Module, x: Tensor, y: Tensor, labels: Tensor
) -> tuple[list[Tensor], Tensor, Tensor]:
    """The mean squared error of each task over its labelled samples (NaN with none), the
    features and the label counts."""
    features = model["trunk"](x)
    predictions = model["heads"](features)
    counts = labels.sum(dim=0)
    squared = (predictions - y) ** 2
    # The plain mean over the labelled samples: NaN for a task without any (never read).
    losses = [squared[labels[:, i], i].sum() / counts[i] for i in range(N_TASKS)]
    return losses, features, counts


def train(name: str, x: Tensor, y: Tensor, labels: Tensor, step: Callable) -> list[Tensor]:
    aggregator_name, options, _ = CASES[name]
    model = _model()
    aggregator = AGGREGATORS[aggregator_name]()
    if options.get("grouped"):  # one aggregator per tensor of the trunk
        aggregator = GroupedAggregator([[p] for p in model["trunk"].parameters()], aggregator)
    trunk_grads = []
    for _ in range(STEPS):
        model.zero_grad()
        losses, features, counts = _losses(model, x, y, labels)
        present = counts > 0
        autojac.mtl_backward(losses, features=features, present=present, retain_graph=True)
        torch.manual_seed(5)
        step(model, aggregator, counts, present)
        trunk_grads.append(torch.cat([p.grad.reshape(-1) for p in model["trunk"].parameters()]))
        with torch.no_grad():
            for p in model["trunk"].parameters():
                p -= 0.1 * p.grad
    return trunk_grads


def reference(name: str) -> list[Tensor]:
    """One process on the union of the batches."""
    x, y = _data()

    def step(model: nn.Module, aggregator: nn.Module, counts: Tensor, present: Tensor) -> None:
        if isinstance(aggregator, GroupedAggregator):
            aggregator.jac_to_grad(present=present)
        else:
            autojac.jac_to_grad(model["trunk"].parameters(), aggregator, present=present)

    return train(name, x, y, CASES[name][2], step)


def distributed_run(name: str, rank: int) -> list[Tensor]:
    x, y = _data()
    shard = slice(4 * rank, 4 * rank + 4)
    _, options, labels = CASES[name]
    options = dict(options)
    sync = options.pop("sync", False)
    options.pop("grouped", None)
    use_counts = not options.pop("no_counts", False)

    def step(model: nn.Module, aggregator: nn.Module, counts: Tensor, present: Tensor) -> None:
        params = list(model["trunk"].parameters())
        if isinstance(aggregator, GroupedAggregator):
            distributed.jac_to_grad(aggregator, counts=counts, **options)
        elif sync:
            with distributed.sync_jac(params, counts=counts) as scope:
                autojac.jac_to_grad(params, aggregator, present=scope.present)
        else:
            given = {"counts": counts} if use_counts else {}
            distributed.jac_to_grad(params, aggregator, **given, **options)

    return train(name, x[shard], y[shard], labels[shard], step)


def worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    init_gloo(rank, world_size, init_file)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the no-task warning is not under test here
            results = {name: distributed_run(name, rank) for name in CASES}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()

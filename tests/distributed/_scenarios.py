"""Training scenarios run by several processes (gloo, CPU) and by one process on the whole batch.

Every scenario trains a small model for a few SGD steps. In the distributed run, process ``r`` of
``R`` gets the ``r``-th contiguous shard of each batch, the model is wrapped in
``DistributedDataParallel``, and the global generators are seeded differently on every process
(so randomised aggregators agree only if the generator state is shared). The reference run is one
process on the whole batch, with the first process's seeds.
"""

from __future__ import annotations

import gc
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.functional import cross_entropy, mse_loss
from torch.nn.parallel import DistributedDataParallel

from tests._gloo import init_gloo
from torchjd import autojac, distributed
from torchjd.aggregation import ConFIG, GradVac, Mean, PCGrad, Random, UPGrad
from torchjd.grouping import GroupedAggregator

STEPS = 3
BATCH = 8
N_TASKS = 3
N_CLASSES = 3
IN_FEATURES = 5
MODEL_SEED = 100
RNG_SEED = 1000
DATA_SEED = 7

AGGREGATORS: dict[str, Callable[[], nn.Module]] = {
    "mean": Mean,
    "upgrad": UPGrad,
    "gradvac": GradVac,
    "pcgrad": PCGrad,
    "random": Random,
    "config": ConFIG,
}


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # "mtl" (mtl_backward, rows="mean") or "iwrm" (backward, rows="stack")
    aggregator: str
    # "call": distributed.jac_to_grad; "per_group": one distributed.jac_to_grad per group;
    # "sync": sync_jac then one autojac.jac_to_grad per group; "sync_grouped": sync_jac then a
    # GroupedAggregator; "grouped_call": distributed.jac_to_grad on a GroupedAggregator (one
    # call for all the groups); "unsynced": autojac.jac_to_grad without synchronisation (misuse).
    method: str = "call"
    grouped: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> str:
        return "mean" if self.kind == "mtl" else "stack"


SCENARIOS = [
    Scenario("mtl-mean-auto", "mtl", "mean"),
    Scenario("mtl-mean-jacobian", "mtl", "mean", kwargs={"strategy": "jacobian"}),
    Scenario("mtl-upgrad-auto", "mtl", "upgrad"),  # "jacobian" on gloo
    Scenario("mtl-upgrad-gramian", "mtl", "upgrad", kwargs={"strategy": "gramian"}),
    Scenario("mtl-gradvac-auto", "mtl", "gradvac"),
    Scenario("mtl-gradvac-gramian", "mtl", "gradvac", kwargs={"strategy": "gramian"}),
    Scenario("mtl-pcgrad-gramian", "mtl", "pcgrad", kwargs={"strategy": "gramian"}),
    Scenario("mtl-random-auto", "mtl", "random"),
    Scenario("mtl-config-auto", "mtl", "config"),
    Scenario("mtl-gradvac-grouped-sync", "mtl", "gradvac", method="sync", grouped=True),
    Scenario("mtl-gradvac-grouped-call", "mtl", "gradvac", method="per_group", grouped=True),
    Scenario(
        "mtl-gradvac-grouped-aggregator", "mtl", "gradvac", method="sync_grouped", grouped=True
    ),
    Scenario("mtl-gradvac-grouped-one-call", "mtl", "gradvac", method="grouped_call", grouped=True),
    Scenario(
        "mtl-gradvac-grouped-one-call-gramian",
        "mtl",
        "gradvac",
        method="grouped_call",
        grouped=True,
        kwargs={"strategy": "gramian"},
    ),
    Scenario("mtl-mean-grouped-one-call", "mtl", "mean", method="grouped_call", grouped=True),
    Scenario("mtl-random-grouped-one-call", "mtl", "random", method="grouped_call", grouped=True),
    Scenario("iwrm-mean-auto", "iwrm", "mean"),
    Scenario("iwrm-upgrad-auto", "iwrm", "upgrad"),
    Scenario("iwrm-upgrad-jacobian", "iwrm", "upgrad", kwargs={"strategy": "jacobian"}),
    Scenario("iwrm-gradvac-auto", "iwrm", "gradvac"),
    Scenario("iwrm-random-auto", "iwrm", "random"),
    Scenario("iwrm-gradvac-grouped-sync", "iwrm", "gradvac", method="sync", grouped=True),
    Scenario("iwrm-upgrad-grouped-one-call", "iwrm", "upgrad", method="grouped_call", grouped=True),
    Scenario(
        "iwrm-gradvac-grouped-one-call-jacobian",
        "iwrm",
        "gradvac",
        method="grouped_call",
        grouped=True,
        kwargs={"strategy": "jacobian"},
    ),
]

# Scenarios that must NOT reproduce the single-process run: they show that the checks can fail.
UNSHARED_RNG_UPDATE = Scenario(
    "mtl-random-unshared", "mtl", "random", kwargs={"share_rng_state": False}
)
UNSHARED_RNG_JACOBIAN = Scenario(
    "mtl-random-jacobian-unshared",
    "mtl",
    "random",
    kwargs={"share_rng_state": False, "strategy": "jacobian"},
)
UNSYNCED = Scenario("mtl-upgrad-unsynced", "mtl", "upgrad", method="unsynced")
CONTROLS = [UNSHARED_RNG_UPDATE, UNSHARED_RNG_JACOBIAN, UNSYNCED]


class MTLNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(IN_FEATURES, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(N_TASKS))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        features = self.trunk(x)
        return features, [head(features).squeeze(-1) for head in self.heads]


def make_model(kind: str) -> nn.Module:
    torch.manual_seed(MODEL_SEED)
    if kind == "mtl":
        return MTLNet()
    return nn.Sequential(nn.Linear(IN_FEATURES, 8), nn.ReLU(), nn.Linear(8, N_CLASSES))


def make_data(kind: str) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(DATA_SEED)
    batches = []
    for _ in range(STEPS):
        x = torch.randn(BATCH, IN_FEATURES, generator=generator)
        if kind == "mtl":
            y = torch.randn(BATCH, N_TASKS, generator=generator)
        else:
            y = torch.randint(0, N_CLASSES, (BATCH,), generator=generator)
        batches.append((x, y))
    return batches


def shared_and_groups(model: nn.Module, kind: str) -> tuple[list[Tensor], list[list[Tensor]]]:
    layers = [model.trunk[0], model.trunk[2]] if kind == "mtl" else [model[0], model[2]]
    groups = [list(layer.parameters()) for layer in layers]
    return [p for g in groups for p in g], groups


def losses_of(model: nn.Module, kind: str, x: Tensor, y: Tensor) -> tuple[Any, Tensor | None]:
    """The objectives (a list of task losses, or the per-sample losses) and the features."""
    if kind == "mtl":
        features, outputs = model(x)
        return [mse_loss(out, y[:, i]) for i, out in enumerate(outputs)], features
    return cross_entropy(model(x), y, reduction="none"), None


def flat_params(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def reference(scenario: Scenario) -> Tensor:
    """The parameters after training in one process on the whole batches."""
    model = make_model(scenario.kind)
    torch.manual_seed(RNG_SEED)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    shared, groups = shared_and_groups(model, scenario.kind)
    parts = groups if scenario.grouped else [shared]
    aggregators = [AGGREGATORS[scenario.aggregator]() for _ in parts]
    for x, y in make_data(scenario.kind):
        objectives, features = losses_of(model, scenario.kind, x, y)
        if scenario.kind == "mtl":
            autojac.mtl_backward(objectives, features=features)
        else:
            autojac.backward(objectives)
        for part, aggregator in zip(parts, aggregators):
            autojac.jac_to_grad(part, aggregator)
        optimizer.step()
        optimizer.zero_grad()
    return flat_params(model)


# The collectives that torchjd.distributed may call, under their names in torch.distributed.
_COLLECTIVES = {
    "all_reduce": "all_reduce",
    "all_gather_single": "all_gather",
    "all_gather_into_tensor": "all_gather",
    "reduce_scatter_single": "reduce_scatter",
    "reduce_scatter_tensor": "reduce_scatter",
    "all_to_all_single": "all_to_all",
}


class CollectiveRecorder:
    """Records the collectives called through ``torch.distributed`` (name, entries sent)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self._originals: dict[str, Any] = {}

    def __enter__(self) -> CollectiveRecorder:
        for name, kind in _COLLECTIVES.items():
            original = getattr(dist, name, None)
            if original is None:
                continue
            self._originals[name] = original

            def wrapper(*args: Any, _kind: str = kind, _original: Any = original, **kw: Any) -> Any:
                sent = args[0] if _kind == "all_reduce" else args[1]
                self.calls.append((_kind, sent.numel()))
                return _original(*args, **kw)

            setattr(dist, name, wrapper)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)


def train_distributed(scenario: Scenario, rank: int, world_size: int) -> dict[str, Any]:
    model = make_model(scenario.kind)
    ddp = DistributedDataParallel(model)
    torch.manual_seed(RNG_SEED + 17 * rank)  # different generators on purpose
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    shared, groups = shared_and_groups(model, scenario.kind)
    parts = groups if scenario.grouped else [shared]
    aggregators = [AGGREGATORS[scenario.aggregator]() for _ in parts]
    heads = list(model.heads.parameters()) if scenario.kind == "mtl" else None
    b = BATCH // world_size
    result: dict[str, Any] = {"calls": [], "warnings": []}

    for step, (x, y) in enumerate(make_data(scenario.kind)):
        objectives, features = losses_of(
            ddp, scenario.kind, x[rank * b : (rank + 1) * b], y[rank * b : (rank + 1) * b]
        )
        if scenario.kind == "mtl":
            autojac.mtl_backward(objectives, features=features)
            if step == 0:
                result["local_head_grads"] = torch.cat([p.grad.reshape(-1) for p in heads])
        else:
            autojac.backward(objectives)
        with warnings.catch_warnings(record=True) as caught, CollectiveRecorder() as recorder:
            warnings.simplefilter("always")
            _aggregate(scenario, parts, aggregators, heads)
        result["calls"].append(recorder.calls)
        result["warnings"].extend(w.category.__name__ for w in caught)
        optimizer.step()
        optimizer.zero_grad()

    result["params"] = flat_params(model)
    del ddp
    return result


def _aggregate(
    scenario: Scenario,
    parts: list[list[Tensor]],
    aggregators: list[nn.Module],
    heads: list[Tensor] | None,
) -> None:
    rows = scenario.rows
    if scenario.method == "call":
        (part,), (aggregator,) = parts, aggregators
        distributed.jac_to_grad(part, aggregator, grad_params=heads, rows=rows, **scenario.kwargs)
    elif scenario.method == "per_group":
        for k, (part, aggregator) in enumerate(zip(parts, aggregators)):
            grad_params = heads if k == 0 else None
            distributed.jac_to_grad(part, aggregator, grad_params=grad_params, rows=rows)
    elif scenario.method == "sync":
        everything = [p for part in parts for p in part]
        with distributed.sync_jac(everything, grad_params=heads, rows=rows):
            for part, aggregator in zip(parts, aggregators):
                autojac.jac_to_grad(part, aggregator)
    elif scenario.method == "grouped_call":
        grouped = GroupedAggregator(parts, list(aggregators))
        distributed.jac_to_grad(grouped, grad_params=heads, rows=rows, **scenario.kwargs)
    elif scenario.method == "sync_grouped":
        grouped = GroupedAggregator(parts, list(aggregators))
        everything = [p for part in parts for p in part]
        with distributed.sync_jac(everything, grad_params=heads, rows=rows):
            grouped.jac_to_grad()
    else:  # "unsynced": the misuse that the warning is about
        (part,), (aggregator,) = parts, aggregators
        autojac.jac_to_grad(part, aggregator)


def worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """Entry point of each process: runs every scenario and saves the results."""
    init_gloo(rank, world_size, init_file)
    try:
        results = {s.name: train_distributed(s, rank, world_size) for s in SCENARIOS + CONTROLS}
        results["synced-no-warning"] = _warnings_after_sync()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        gc.collect()  # free the DistributedDataParallel modules (in reference cycles) first
        dist.destroy_process_group()


def _warnings_after_sync() -> list[str]:
    """The warnings of autojac.jac_to_grad on Jacobians synchronised by sync_jac."""
    p = torch.ones(3, requires_grad=True)
    p.jac = torch.ones(2, 3) * (dist.get_rank() + 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with distributed.sync_jac([p]):
            autojac.jac_to_grad([p], Mean())
    return [w.category.__name__ for w in caught]

"""One training run: a method, a grouping strategy, a set of tasks and a seed.

A multi-task step with Jacobian descent::

    features = trunk(x)
    losses = [loss of each head on features]
    mtl_backward(losses, features=features)  # heads: .grad; trunk: .jac, one row per task
    for group, aggregator in zip(groups, aggregators):
        jac_to_grad(group, aggregator)       # .jac of the group -> .grad
    optimizer.step()

Between the two calls the ``.jac`` fields hold the task gradients, which is where the gradient
conflict is measured: per group, the Gramian ``G = sum_p J_p J_p^T`` gives the cosine similarity
between the tasks' gradients, ``G_ij / sqrt(G_ii G_jj)``.

With ``gramian_first``, the same step runs without the trunk's Jacobian::

    engine.backward(losses, features, grouped)  # grouped: the groups and their aggregators

(``autogram.MTLEngine``: each group's Gramian from the layers' blocks, the same weights and
updates); the cosines then come from the Gramians it computed.
"""

import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.functional import cross_entropy, mse_loss
from tqdm.auto import tqdm

from torchjd.autogram import MTLEngine
from torchjd.autojac import jac_to_grad, mtl_backward
from torchjd.grouping import GroupedAggregator

from .data import MAX_SUM, MultiDigits, Split
from .methods import METHODS
from .model import make_heads, make_trunk, parameter_groups


@dataclass(frozen=True)
class Task:
    key: str
    label: str
    metric: str
    higher_is_better: bool
    outputs: int


TASKS = (
    Task("left", "left digit", "accuracy", True, 10),
    Task("right", "right digit", "accuracy", True, 10),
    Task("sum", "sum of digits", "MAE", False, 1),
)


@dataclass(frozen=True)
class RunConfig:
    method: str  # a key of METHODS
    grouping: str  # a grouping strategy (see model.py)
    tasks: tuple[int, ...]  # indices into TASKS; one index = a single-task model
    seed: int
    epochs: int
    batch_size: int = 64
    lr: float = 1e-3
    gramian_first: bool = False  # the trunk's step from block Gramians (no Jacobian) if possible

    @property
    def single_task(self) -> bool:
        return len(self.tasks) == 1

    @property
    def label(self) -> str:
        if self.single_task:
            return f"single-task ({TASKS[self.tasks[0]].key})"
        label = METHODS[self.method].label
        return label if self.grouping == "together" else f"{label} / {self.grouping}"


@dataclass
class RunResult:
    config: RunConfig
    metrics: list[float]  # test metric of each trained task (see Task.metric)
    losses: Tensor  # [steps, k]: training loss of each task at every step
    cosines: Tensor | None  # [steps, groups, k, k]: cosine between task gradients, per group
    group_names: list[str]
    seconds_per_step: float


def task_loss(task: int, output: Tensor, split: Split, index: Tensor) -> Tensor:
    if TASKS[task].key == "sum":
        return mse_loss(output.squeeze(1), split.sums[index])
    return cross_entropy(output, split.labels[index, task])


def group_gramians(groups: list[list[nn.Parameter]]) -> Tensor:
    """``[g, m, m]``: for each group, ``sum_p J_p J_p^T`` over the ``.jac`` of its parameters."""
    gramians = []
    for group in groups:
        rows = [p.jac.reshape(p.jac.shape[0], -1) for p in group]
        gramians.append(sum(j @ j.T for j in rows))
    return torch.stack(gramians)


def gramian_cosines(gramians: Tensor) -> Tensor:
    """Cosine similarity between the gradients whose Gramians are given (``[..., m, m]``)."""
    norms = gramians.diagonal(dim1=-2, dim2=-1).clamp(min=0.0).sqrt()
    return gramians / (norms.unsqueeze(-1) * norms.unsqueeze(-2)).clamp(min=1e-20)


@torch.no_grad()
def evaluate(
    trunk: nn.Module, heads: nn.ModuleList, tasks: tuple[int, ...], split: Split
) -> list[float]:
    features = trunk(split.images)
    metrics = []
    for task, head in zip(tasks, heads):
        output = head(features)
        if TASKS[task].key == "sum":
            metrics.append((output.squeeze(1) - split.sums).abs().mean().item() * MAX_SUM)
        else:
            metrics.append((output.argmax(dim=1) == split.labels[:, task]).float().mean().item())
    return metrics


def train_run(data: MultiDigits, config: RunConfig, progress: bool = True) -> RunResult:
    """Train a fresh model from ``config.seed`` and evaluate it on the test split."""
    torch.manual_seed(config.seed)  # same seed, same initial trunk for every method
    trunk = make_trunk()
    heads = make_heads([TASKS[t].outputs for t in config.tasks])
    optimizer = torch.optim.Adam([*trunk.parameters(), *heads.parameters()], lr=config.lr)
    batches = torch.Generator().manual_seed(config.seed)

    method = METHODS[config.method]
    jacobian_descent = not config.single_task and method.make is not None
    # M-ConFIG: one loss back-propagated per step, the direction written into every .grad.
    own_step = None
    if not config.single_task and method.make_step is not None:
        own_step = method.make_step([*trunk.parameters(), *heads.parameters()])
    named_groups = parameter_groups(trunk, config.grouping) if jacobian_descent else []
    groups = [params for _, params in named_groups]
    # One aggregator per group, created once: stateful ones (GradVac, Nash-MTL) keep one state each.
    aggregators = [method.make(len(config.tasks)) for _ in groups] if method.make else []
    # Gramian-first: only for aggregators that read the Gramian or the number of tasks.
    engine, grouped = None, None
    if config.gramian_first and aggregators and all(a.need.name != "MATRIX" for a in aggregators):
        engine = MTLEngine(trunk)  # before the first forward pass
        grouped = GroupedAggregator(groups, aggregators, compute_gramians=True)

    train = data.train
    n = len(train)
    steps_per_epoch = -(-n // config.batch_size)
    losses_log, cosines_log = [], []
    step_seconds = 0.0
    bar = tqdm(
        total=config.epochs * steps_per_epoch,
        desc=f"{config.label} [seed {config.seed}]",
        disable=not progress,
        leave=True,
        dynamic_ncols=True,
    )
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=batches)
        for start in range(0, n, config.batch_size):
            index = order[start : start + config.batch_size]
            begin = time.perf_counter()
            features = trunk(train.images[index])
            losses = [
                task_loss(task, head(features), train, index)
                for task, head in zip(config.tasks, heads)
            ]
            if engine is not None and grouped is not None:
                if getattr(aggregators[0], "requires_losses", False):
                    grouped.update_losses(losses)  # GradNorm, DB-MTL
                engine.backward(losses, features, grouped)
                monitor_begin = time.perf_counter()
                cosines_log.append(gramian_cosines(torch.stack(grouped.last_gramians)))
                begin += time.perf_counter() - monitor_begin
            elif jacobian_descent:
                mtl_backward(losses, features=features)
                monitor_begin = time.perf_counter()
                cosines_log.append(gramian_cosines(group_gramians(groups)))
                begin += time.perf_counter() - monitor_begin  # monitoring is not timed
                for group, aggregator in zip(groups, aggregators):
                    if getattr(aggregator, "requires_losses", False):
                        aggregator.update_losses(losses)  # GradNorm, DB-MTL
                    jac_to_grad(group, aggregator)
            elif own_step is not None:
                own_step.backward(losses)
            else:
                sum(losses).backward()
            optimizer.step()
            optimizer.zero_grad()
            step_seconds += time.perf_counter() - begin

            losses_log.append(torch.stack([loss.detach() for loss in losses]))
            bar.update()
            if bar.n % 10 == 0:
                bar.set_postfix_str(
                    " ".join(f"{loss:.3f}" for loss in losses_log[-1].tolist()), refresh=False
                )
    bar.close()

    return RunResult(
        config=config,
        metrics=evaluate(trunk, heads, config.tasks, data.test),
        losses=torch.stack(losses_log),
        cosines=torch.stack(cosines_log) if cosines_log else None,
        group_names=[name for name, _ in named_groups],
        seconds_per_step=step_seconds / len(losses_log),
    )

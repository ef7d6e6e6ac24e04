"""One MultiMNIST training run: a method, a grouping strategy, the tasks trained and a seed.

A Jacobian-descent step (see :mod:`.methods`)::

    features = trunk(x)
    losses = [cross_entropy(head(features), y_t) for each task t]
    mtl_backward(losses, features=features)  # heads: .grad; trunk: .jac, one row per task
    grouped.jac_to_grad()                    # GroupedAggregator: .jac of each group -> .grad
    optimizer.step()
"""

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.functional import cross_entropy

from .data import MultiMNIST, Split
from .methods import METHODS
from .model import make_head, make_trunk

TASKS = ("left", "right")


@dataclass(frozen=True)
class RunConfig:
    method: str  # a key of METHODS
    grouping: str  # a key of GROUPINGS
    tasks: tuple[int, ...]  # indices into TASKS; one index = a single-task model
    seed: int
    epochs: int
    batch_size: int = 64
    lr: float = 1e-3
    missing_labels: float = 0.0  # fraction of the training labels of each task dropped

    @property
    def single_task(self) -> bool:
        return len(self.tasks) == 1

    @property
    def label(self) -> str:
        if self.single_task:
            return f"single-task ({TASKS[self.tasks[0]]})"
        label = METHODS[self.method].label
        return label if self.grouping == "together" else f"{label} / {self.grouping}"


@dataclass
class RunResult:
    config: RunConfig
    accuracies: list[float]  # test accuracy of each trained task, in [0, 1]
    losses: Tensor  # [epochs, k]: mean training loss of each task over each epoch
    cosine: float | None  # mean over steps and groups of the cosine between the task gradients
    conflict: float | None  # fraction of (step, group) pairs whose task gradients conflict
    cpu_ms_per_step: float


def _masked_losses(
    features: Tensor,
    heads: nn.ModuleList,
    tasks: tuple[int, ...],
    train: Split,
    index: Tensor,
    labelled: Tensor,
) -> tuple[list[Tensor], Tensor | None]:
    """Each task's cross-entropy averaged over its labelled samples of the batch, and which tasks
    have one (``None`` when every label is there: the ordinary step)."""
    mask = labelled[index]
    if bool(mask.all()):
        losses = [cross_entropy(h(features), train.labels[index, t]) for t, h in zip(tasks, heads)]
        return losses, None
    counts = mask.sum(dim=0)
    losses = [
        (cross_entropy(h(features), train.labels[index, t], reduction="none") * mask[:, i]).sum()
        / counts[i]  # NaN (0 / 0) for a task without a label: absent, never read
        for i, (t, h) in enumerate(zip(tasks, heads))
    ]
    return losses, counts > 0


@torch.no_grad()
def evaluate(
    trunk: nn.Module, heads: nn.ModuleList, tasks: tuple[int, ...], split: Split
) -> list[float]:
    features = trunk(split.images)
    return [
        (head(features).argmax(dim=1) == split.labels[:, task]).float().mean().item()
        for task, head in zip(tasks, heads)
    ]


def train_run(
    data: MultiMNIST, config: RunConfig, report: Callable[[int, int, Tensor], None] | None = None
) -> RunResult:
    """Train a fresh model from ``config.seed`` and evaluate it on the test split.

    ``report(step, steps, losses)`` is called after every step with the task losses of the batch.
    """
    torch.manual_seed(config.seed)  # same seed, same initial trunk and batches for every method
    trunk = make_trunk()
    heads = nn.ModuleList(make_head() for _ in config.tasks)
    optimizer = torch.optim.Adam([*trunk.parameters(), *heads.parameters()], lr=config.lr)
    batches = torch.Generator().manual_seed(config.seed)
    method = METHODS["sum" if config.single_task else config.method]
    step = method.make_step(trunk, heads, config.grouping, len(config.tasks))

    train = data.train
    n = len(train)
    # The same labels are dropped for every method of a seed.
    drop = torch.Generator().manual_seed(10_000 + config.seed)
    labelled = torch.rand(n, len(config.tasks), generator=drop) >= config.missing_labels
    steps = config.epochs * -(-n // config.batch_size)
    epoch_losses, cosines = [], []
    cpu_seconds, done = 0.0, 0
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=batches)
        total = torch.zeros(len(config.tasks))
        for start in range(0, n, config.batch_size):
            index = order[start : start + config.batch_size]
            begin = time.process_time()  # CPU time: robust to other processes on the machine
            features = trunk(train.images[index])
            losses, present = _masked_losses(features, heads, config.tasks, train, index, labelled)
            step.backward(losses, features, present)
            optimizer.step()
            optimizer.zero_grad()
            cpu_seconds += time.process_time() - begin

            batch_losses = torch.stack([loss.detach() for loss in losses]).nan_to_num(0.0)
            total += batch_losses * len(index)
            cosine = step.cosines()
            if cosine is not None:
                cosines.append(cosine)
            done += 1
            if report is not None:
                report(done, steps, batch_losses)
        epoch_losses.append(total / n)

    all_cosines = torch.cat(cosines) if cosines else None
    return RunResult(
        config=config,
        accuracies=evaluate(trunk, heads, config.tasks, data.test),
        losses=torch.stack(epoch_losses),
        cosine=None if all_cosines is None else all_cosines.mean().item(),
        conflict=None if all_cosines is None else (all_cosines < 0).float().mean().item(),
        cpu_ms_per_step=1000 * cpu_seconds / steps,
    )

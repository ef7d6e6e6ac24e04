"""Instance-wise risk minimisation (IWRM): every training example is an objective of its own.

This is the experiment of Section 5 of Quinton & Rey, `Jacobian Descent for Multi-Objective
Optimization <https://arxiv.org/abs/2406.16232>`_ (2024): on a small training set, each step
sees a batch of ``B`` examples as ``B`` losses. Stochastic gradient descent follows the gradient
of their mean; Jacobian descent aggregates the ``B`` per-example gradients instead (UPGrad, which
never conflicts with any of them, and other aggregators). The comparison is the training loss
versus epochs, from the same initialisation and the same batches.

The weights of a Gramian-based aggregator depend only on the Gramian ``G = J J^T`` of the
per-example gradients (``[B, B]``); the autogram :class:`~torchjd.autogram.Engine` computes it
layer by layer without forming the Jacobian ``J``, and the update ``w^T J`` is one ordinary
backward pass of ``w^T losses``::

    losses = cross_entropy(model(x), y, reduction="none")  # [B]
    gramian = engine.compute_gramian(losses)               # [B, B]
    losses.backward(weighting(gramian))                    # .grad = sum_i w_i grad loss_i
"""

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.functional import cross_entropy

from torchjd import aggregation
from torchjd.aggregation import Weighting
from torchjd.autogram import Engine

from .model import FEATURES, make_trunk


@dataclass(frozen=True)
class IWRMMethod:
    key: str
    label: str
    make: Callable[[], Weighting]  # a fresh weighting of the Gramian of the per-example gradients


IWRM_METHODS: dict[str, IWRMMethod] = {
    method.key: method
    for method in (
        # Mean weights 1/B: w^T J is the gradient of the mean loss, i.e. plain SGD.
        IWRMMethod("sgd", "SGD (mean)", aggregation.MeanWeighting),
        IWRMMethod("upgrad", "UPGrad", aggregation.UPGradWeighting),
        IWRMMethod("dualproj", "DualProj", aggregation.DualProjWeighting),
        IWRMMethod("mgda", "MGDA", aggregation.MGDAWeighting),
        IWRMMethod("imtlg", "IMTL-G", aggregation.IMTLGWeighting),
    )
}


@dataclass(frozen=True)
class IWRMConfig:
    method: str  # a key of IWRM_METHODS
    seed: int
    epochs: int
    batch_size: int = 32
    lr: float = 0.05

    @property
    def label(self) -> str:
        return IWRM_METHODS[self.method].label


@dataclass
class IWRMResult:
    config: IWRMConfig
    losses: Tensor  # [epochs + 1]: mean training loss over the whole training set, after each epoch
    cpu_ms_per_step: float


def make_model() -> nn.Sequential:
    """The LeNet trunk of the MultiMNIST model with one 10-class linear head."""
    return nn.Sequential(make_trunk(), nn.Linear(FEATURES, 10))


@torch.no_grad()
def training_loss(model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
    return cross_entropy(model(images), labels)


def train_iwrm(
    images: Tensor,
    labels: Tensor,
    config: IWRMConfig,
    report: Callable[[int, int, Tensor], None] | None = None,
) -> IWRMResult:
    """Train a fresh model by SGD whose update is ``w^T J`` with ``w`` the weights of the method;
    ``report(step, steps, loss)`` is called after every step with the mean loss of the batch."""
    torch.manual_seed(config.seed)  # same seed, same initial model and batches for every method
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
    engine = Engine(model, batch_dim=0)
    weighting = IWRM_METHODS[config.method].make()
    batches = torch.Generator().manual_seed(config.seed)

    n = len(labels)
    steps = config.epochs * -(-n // config.batch_size)
    curve = [training_loss(model, images, labels)]
    cpu_seconds, done = 0.0, 0
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=batches)
        for start in range(0, n, config.batch_size):
            index = order[start : start + config.batch_size]
            begin = time.process_time()
            losses = cross_entropy(model(images[index]), labels[index], reduction="none")
            gramian = engine.compute_gramian(losses)
            losses.backward(weighting(gramian))
            optimizer.step()
            optimizer.zero_grad()
            cpu_seconds += time.process_time() - begin
            done += 1
            if report is not None:
                report(done, steps, losses.detach().mean().unsqueeze(0))
        curve.append(training_loss(model, images, labels))
    return IWRMResult(config, torch.stack(curve), 1000 * cpu_seconds / steps)

"""The two-task model of ``_two_tasks`` as a JacobianDescentModule."""

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.functional import mse_loss

from torchjd.aggregation import Aggregator, UPGrad
from torchjd.grouping import GroupedAggregator, per_layer
from torchjd.integrations.lightning import JacobianDescentModule

from ._two_tasks import data, hand_written_step, loader, networks

__all__ = ["PerLayerTwoTasks", "TwoTasks", "data", "hand_written_step", "loader", "networks"]


class TwoTasks(JacobianDescentModule):
    def __init__(self, aggregator: Aggregator, lr: float = 0.1, seed: int = 0) -> None:
        super().__init__(aggregator=aggregator, task_names=["a", "b"])
        self.trunk, self.heads = networks(seed)
        self.lr = lr

    def shared_modules(self) -> list[nn.Module]:
        return [self.trunk]

    def training_step(self, batch: list[Tensor], batch_idx: int) -> list[Tensor]:
        x, y = batch
        views = self.task_views(self.trunk(x), 2)
        return [mse_loss(head(v), y[:, [i]]) for i, (head, v) in enumerate(zip(self.heads, views))]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class PerLayerTwoTasks(TwoTasks):
    """The same model, aggregated layer by layer: one aggregator per layer of the trunk."""

    def __init__(self, lr: float = 0.1, aggregator: Callable[[], Aggregator] = UPGrad) -> None:
        trunk, heads = networks()
        super().__init__(GroupedAggregator(per_layer(trunk), aggregator), lr=lr)
        self.trunk, self.heads = trunk, heads

"""The training methods of the MultiMNIST benchmark: one entry each in :data:`METHODS`.

Every method builds a :class:`Step`, which turns the task losses of a batch into the ``.grad`` of
the trunk and heads; the optimiser step is common. Three kinds of step cover the methods:

- :class:`SummedLoss`: one backward pass of the summed loss (the usual baseline, no Jacobian);
- :class:`JacobianDescent`: ``mtl_backward`` fills the trunk's ``.jac`` (one row per task), then
  a :class:`~torchjd.grouping.GroupedAggregator` aggregates each group of the chosen grouping
  strategy with its own aggregator (one group for ``together``);
- :class:`MomentumConfig`: M-ConFIG's own step, one loss back-propagated per step;
- :class:`GramianFirst`: the same aggregation as :class:`JacobianDescent`, from the block Gramians
  of :class:`~torchjd.autogram.MTLEngine` (the trunk's Jacobian is never stored).

A new method (or a new kind of step) is one more entry in :data:`METHODS`.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from torchjd import aggregation
from torchjd.aggregation import Aggregator, MConFIGBackward
from torchjd.autogram import MTLEngine
from torchjd.autojac import mtl_backward
from torchjd.grouping import GroupedAggregator

from .model import GROUPINGS


class Step:
    """Turns the task losses of a batch into ``.grad`` fields; ``present`` (one boolean per task,
    ``None``: all) marks the tasks with at least one labelled sample in the batch."""

    def backward(
        self, losses: list[Tensor], features: Tensor, present: Tensor | None = None
    ) -> None:
        raise NotImplementedError

    def cosines(self) -> Tensor | None:
        """``[groups]``: cosine between the two first tasks' gradients in each group, at the last
        step (``None`` for a step that never sees the task gradients)."""
        return None


class SummedLoss(Step):
    def backward(
        self, losses: list[Tensor], features: Tensor, present: Tensor | None = None
    ) -> None:
        kept = losses if present is None else [x for x, p in zip(losses, present) if p]
        if kept:  # a single-task model on a batch without any label: no gradient
            torch.stack(kept).sum().backward()


class JacobianDescent(Step):
    def __init__(self, trunk: nn.Module, grouping: str, make: Callable[[], Aggregator]) -> None:
        self.grouped = GroupedAggregator(GROUPINGS[grouping](trunk), make, compute_gramians=True)
        self.uses_losses = any(hasattr(a, "update_losses") for a in self.grouped.aggregators)

    def backward(
        self, losses: list[Tensor], features: Tensor, present: Tensor | None = None
    ) -> None:
        # heads: .grad; trunk: .jac, one row per task
        mtl_backward(losses, features=features, present=present)
        if self.uses_losses:
            # GradNorm, DB-MTL; an absent task's value (NaN) is never read
            self.grouped.update_losses([x.detach().nan_to_num(0.0) for x in losses])
        self.grouped.jac_to_grad(present=present)

    def cosines(self) -> Tensor:
        return torch.stack([c[0, 1] for c in self.grouped.cosine_similarities()])


class MomentumConfig(Step):
    def __init__(self, params: list[nn.Parameter], beta: float) -> None:
        self.step = MConFIGBackward(params, beta=beta)

    def backward(
        self, losses: list[Tensor], features: Tensor, present: Tensor | None = None
    ) -> None:
        self.step.backward(losses, present=present)


class GramianFirst(Step):
    def __init__(self, trunk: nn.Module, grouping: str, make: Callable[[], Aggregator]) -> None:
        self.engine = MTLEngine(trunk)
        self.grouped = GroupedAggregator(GROUPINGS[grouping](trunk), make, compute_gramians=True)

    def backward(
        self, losses: list[Tensor], features: Tensor, present: Tensor | None = None
    ) -> None:
        self.engine.backward(losses, features, self.grouped, present=present)

    def cosines(self) -> Tensor:
        return torch.stack([c[0, 1] for c in self.grouped.cosine_similarities()])


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    # (trunk, heads, grouping, number of tasks) -> the training step of one run
    make_step: Callable[[nn.Module, nn.ModuleList, str, int], Step]
    groupable: bool = False  # whether the grouping strategy changes anything
    default: bool = True  # run without being named in --methods


def _jd(make: Callable[[int], Aggregator]) -> Callable[[nn.Module, nn.ModuleList, str, int], Step]:
    return lambda trunk, heads, grouping, m: JacobianDescent(trunk, grouping, lambda: make(m))


def _m_config(trunk: nn.Module, heads: nn.ModuleList, grouping: str, m: int) -> Step:
    # Each momentum is refreshed every m steps and Adam adds its own momentum on top: the paper's
    # beta = 0.9 averages over too many steps for these short runs.
    return MomentumConfig([*trunk.parameters(), *heads.parameters()], beta=0.5)


METHODS: dict[str, Method] = {
    method.key: method
    for method in (
        Method("sum", "Sum (summed loss)", lambda *_: SummedLoss()),
        Method("upgrad", "UPGrad", _jd(lambda m: aggregation.UPGrad()), groupable=True),
        Method("mgda", "MGDA", _jd(lambda m: aggregation.MGDA()), groupable=True),
        Method("pcgrad", "PCGrad", _jd(lambda m: aggregation.PCGrad()), groupable=True),
        Method("gradvac", "GradVac", _jd(lambda m: aggregation.GradVac()), groupable=True),
        Method("cagrad", "CAGrad(c=0.4)", _jd(lambda m: aggregation.CAGrad(c=0.4)), groupable=True),
        Method("nashmtl", "Nash-MTL", _jd(lambda m: aggregation.NashMTL(n_tasks=m))),
        Method("gradnorm", "GradNorm", _jd(lambda m: aggregation.GradNorm())),
        Method("dbmtl", "DB-MTL", _jd(lambda m: aggregation.DBMTL())),
        Method("moco", "MoCo", _jd(lambda m: aggregation.MoCo())),
        Method("mconfig", "M-ConFIG(β=0.5)", _m_config),
        Method(
            "upgrad-gf",
            "UPGrad (Gramian-first)",
            lambda trunk, heads, grouping, m: GramianFirst(trunk, grouping, aggregation.UPGrad),
            groupable=True,
            default=False,
        ),
    )
}
GROUPABLE = tuple(key for key, method in METHODS.items() if method.groupable)

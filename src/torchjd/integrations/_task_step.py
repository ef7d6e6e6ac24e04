"""The Gramian-first step shared by the framework integrations.

One training step of Jacobian descent in the form that frameworks with their own ``backward`` need:

1. during the forward pass, the tasks read their views of the shared features
   (:func:`task_views`), recorded while :func:`recording_views` is active: views of a detached
   copy of the features, so that the framework's backward pass stops there;
2. :func:`descend` takes each task's gradient w.r.t. its view (one backward pass through the
   heads), and :class:`~torchjd.autogram.MTLEngine` turns them into the block Gramians of the
   shared modules, the weights, and the update of each shared parameter (one product per layer:
   the trunk's activation gradients are never computed a second time);
3. the framework back-propagates the scalar that :func:`descend` returns: the sum of the losses,
   which gives the heads their unweighted gradients, through a node whose backward pass also
   hands each shared parameter its update times the incoming gradient (the framework's loss scale
   and accumulation factor), so that its hooks (gradient scaling, DDP's reducer) see it.

:func:`descend` is the only place that knows how the weights and the update are obtained.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from torchjd._protocol import Need
from torchjd.aggregation import Aggregator
from torchjd.autogram import MTLEngine
from torchjd.grouping import GroupedAggregator


@dataclass
class Recorded:
    """One :func:`task_views` call of a training step: the trunk's output and the tasks' views."""

    features: Tensor
    views: list[Tensor]


_RECORDED: ContextVar[list[Recorded] | None] = ContextVar("torchjd_task_views", default=None)


def task_views(features: Tensor, num_tasks: int) -> list[Tensor]:
    """Return ``num_tasks`` views of ``features``, one for each task to read.

    Inside a training step of :class:`~torchjd.integrations.lightning.JacobianDescentModule` or
    :class:`~torchjd.integrations.transformers.JacobianDescentTrainer`, task ``i`` must compute its
    loss from view ``i`` only: the views are then taken on a detached copy of ``features``, the
    step reads each task's gradient from its view, the shared modules receive the aggregated
    update, and the task's own modules (its head) their unweighted gradient. Elsewhere
    (evaluation, plain PyTorch), the views are ordinary aliases of ``features``.

    :param features: The output of the shared modules, read by every task.
    :param num_tasks: The number of tasks (at least 1).
    """
    if not isinstance(features, Tensor):
        raise TypeError(f"`features` must be a Tensor, got {type(features).__name__}.")
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"`num_tasks` must be a positive int, got {num_tasks!r}.")
    recorded = _RECORDED.get()
    if recorded is None or not features.requires_grad:
        return [features.view_as(features) for _ in range(num_tasks)]
    detached = features.detach().requires_grad_()
    views = [detached.view_as(detached) for _ in range(num_tasks)]
    recorded.append(Recorded(features, views))
    return views


@contextlib.contextmanager
def recording_views() -> Iterator[list[Recorded]]:
    """Collect the :func:`task_views` calls made inside the ``with`` block."""
    recorded: list[Recorded] = []
    token = _RECORDED.set(recorded)
    try:
        yield recorded
    finally:
        _RECORDED.reset(token)


def check_aggregator(aggregator: object) -> None:
    """The step reads only the Gramian (or the number of losses): refuse other aggregators."""
    if isinstance(aggregator, GroupedAggregator):
        for each in aggregator.aggregators:
            check_aggregator(each)
        return
    if not isinstance(aggregator, Aggregator):
        raise TypeError(
            "`aggregator` must be a torchjd Aggregator or a GroupedAggregator, got "
            f"{type(aggregator).__name__}."
        )
    if aggregator.need not in (Need.GRAMIAN, Need.ROW_COUNT):
        raise ValueError(
            f"{aggregator!r} needs the whole Jacobian, but this step computes only the Gramian of "
            "the losses. Use an aggregator whose weights come from the Gramian (UPGrad, DualProj, "
            "MGDA, PCGrad, ...), or the autojac route with manual optimisation "
            "(`mtl_backward` then `jac_to_grad`)."
        )


def stack_losses(losses: Tensor | Sequence[Tensor]) -> Tensor:
    """The task losses as one vector ``[m]``."""
    if isinstance(losses, Tensor):
        stacked = losses.reshape(-1)
    elif isinstance(losses, (list, tuple)) and all(isinstance(x, Tensor) for x in losses):
        if any(x.numel() != 1 for x in losses):
            shapes = [tuple(x.shape) for x in losses]
            raise ValueError(f"Each task loss must be a scalar, got shapes {shapes}.")
        stacked = torch.stack([x.reshape(()) for x in losses])
    else:
        raise TypeError(
            "The training step must return the task losses as a Tensor or a list/tuple of scalar "
            f"Tensors, got {type(losses).__name__}."
        )
    if stacked.numel() == 0:
        raise ValueError("The training step returned no task loss.")
    return stacked


@dataclass
class Step:
    """What :func:`descend` gives the framework: the scalar to back-propagate, the weights (one
    vector per group when grouped) and the Gramian of the whole trunk (``None`` if not formed)."""

    objective: Tensor
    weights: Tensor | list[Tensor | None]
    gramian: Tensor | None


def descend(
    engine: MTLEngine,
    aggregator: Aggregator | GroupedAggregator,
    losses: Tensor,
    recorded: Sequence[Recorded],
    *,
    with_gramian: bool = False,
    loss_scale: Tensor | None = None,
) -> Step:
    """The step of Jacobian descent on the task ``losses`` (``[m]``), to be completed by the
    framework's backward pass of ``Step.objective``.

    With task views (one :func:`task_views` call of ``m`` views), the weights and the shared
    parameters' update come from the engine, and the objective is the sum of the losses, whose
    backward pass gives the heads their gradients and the shared parameters their update.
    Without, the objective is the weighted sum of the losses (a full backward pass: the heads
    get weighted gradients too); a grouped aggregator needs the views. ``with_gramian``: also form
    the Gramian when the aggregator does not read it (for the logged cosine similarities).
    ``loss_scale``: the framework's gradient-scaler scale (float16), applied to the gradients
    that the engine propagates through the trunk so that the small ones survive, and undone on
    the Gramian and the update.
    """
    m = losses.shape[0]
    if len(recorded) > 1:
        raise ValueError(
            f"`task_views` was called {len(recorded)} times in one training step: call it once, "
            "on the output of the shared modules, and compute loss i from view i only."
        )
    if not recorded:
        return _descend_without_views(engine, aggregator, losses, with_gramian)
    features, views = recorded[0].features, recorded[0].views
    if len(views) != m:
        raise ValueError(
            f"The training step returned {m} task losses but read {len(views)} task views: call "
            f"`task_views(features, {m})` once and compute loss i from view i only."
        )
    total = losses.sum()
    # The engine's products would otherwise run in the autocast dtype: the Gramian must be as
    # precise as the parameters for the weighting's thresholds to mean something.
    with _without_autocast(losses.device.type):
        seed = None if loss_scale is None else loss_scale.to(total.dtype)
        grads = torch.autograd.grad(total, views, seed, retain_graph=True, allow_unused=True)
        feature_grads = torch.stack(
            [torch.zeros_like(v) if g is None else g for v, g in zip(views, grads)]
        )
        weights, gramians, update = engine.gradients(
            feature_grads, features, aggregator, compute_gramians=with_gramian, scale=loss_scale
        )
    objective = _ApplyUpdate.apply(total, _Once(update), *update.parameters)
    return Step(objective, _detached(weights), _whole(gramians))


def scale_of(scaler: object, like: Tensor) -> Tensor | None:
    """The current scale of a framework's enabled ``GradScaler`` (``None`` without one), as a
    tensor on ``like``'s device: read without a host synchronisation."""
    if not isinstance(scaler, torch.amp.GradScaler) or not scaler.is_enabled():
        return None
    return scaler.scale(torch.ones((), dtype=torch.float32, device=like.device))


def _descend_without_views(
    engine: MTLEngine,
    aggregator: Aggregator | GroupedAggregator,
    losses: Tensor,
    with_gramian: bool,
) -> Step:
    if isinstance(aggregator, GroupedAggregator):
        raise ValueError(
            "With a GroupedAggregator, the training step must read the shared features through "
            "`task_views(features, m)` (loss i from view i only): each group has its own weights, "
            "which no weighted sum of the losses can apply."
        )
    m = losses.shape[0]
    eye = torch.eye(m, dtype=losses.dtype, device=losses.device)
    with _without_autocast(losses.device.type):
        # The engine differentiates the trunk from the losses themselves; its pending update is
        # never made (the framework's backward pass of the weighted sum writes it).
        weights, gramian, _ = engine.gradients(
            eye, losses, aggregator, compute_gramians=with_gramian
        )
    assert isinstance(weights, Tensor)
    weights = weights.detach()
    return Step(losses @ weights.to(losses.dtype), weights, _whole(gramian))


def _without_autocast(device_type: str) -> contextlib.AbstractContextManager[object]:
    """Autocast switched off (entered only where it is on: the context costs a little)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


class _Once:
    """The shared parameters' pending update, made by the first backward pass."""

    def __init__(self, update: Callable[[Tensor], list[Tensor]]) -> None:
        self.update: Callable[[Tensor], list[Tensor]] | None = update

    def __call__(self, factor: Tensor) -> list[Tensor]:
        if self.update is None:
            raise RuntimeError(
                "The objective of a Jacobian descent step was back-propagated twice: its update "
                "is applied once (do not use `retain_graph=True` to back-propagate it again)."
            )
        update, self.update = self.update, None
        return update(factor)


class _ApplyUpdate(torch.autograd.Function):
    """The identity on the objective; in the backward pass, each shared parameter also receives
    its update times the incoming gradient (the loss scale and accumulation factor)."""

    # The form with `ctx` in `forward`: a third of the cost of the `setup_context` form per call.
    @staticmethod
    def forward(ctx: Any, total: Tensor, pending: _Once, *params: Tensor) -> Tensor:
        ctx.pending = pending
        return total.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        # The engine makes the update now, with `grad` folded into the weights: the parameters'
        # `.grad` then take its buffers over, without a copy.
        return (grad, None, *ctx.pending(grad))


def _detached(weights: Tensor | list[Tensor | None]) -> Tensor | list[Tensor | None]:
    if isinstance(weights, Tensor):
        return weights.detach()
    return [None if w is None else w.detach() for w in weights]


def _whole(gramians: Tensor | list[Tensor | None] | None) -> Tensor | None:
    """The Gramian of the whole trunk: the sum of the groups' (``None`` if one is missing)."""
    if gramians is None or isinstance(gramians, Tensor):
        return gramians
    if not gramians or any(g is None for g in gramians):
        return None
    return torch.stack(gramians).sum(dim=0)  # type: ignore[arg-type]


def cosine_similarities(gramian: Tensor) -> Tensor:
    """``G_ij / sqrt(G_ii G_jj)``: the cosine similarities of the tasks' gradients (0 where a
    gradient is zero)."""
    norms = gramian.diagonal().clamp(min=0).sqrt()
    outer = norms.unsqueeze(0) * norms.unsqueeze(1)
    return torch.where(outer > 0, gramian / outer.clamp(min=torch.finfo(gramian.dtype).tiny), 0.0)


def metrics(
    names: Sequence[str],
    losses: Tensor,
    weights: Tensor | list[Tensor | None],
    gramian: Tensor | None,
) -> dict[str, Tensor]:
    """Per-task losses and weights (``weight/<group>/<task>`` when grouped), and the cosine
    similarity of every pair of tasks' gradients over the shared modules."""
    logged = {}
    detached = losses.detach()
    for i, name in enumerate(names):
        logged[f"loss/{name}"] = detached[i]
    if isinstance(weights, Tensor):
        logged.update((f"weight/{name}", weights[i]) for i, name in enumerate(names))
    else:
        for k, group_weights in enumerate(weights):
            if group_weights is not None:
                logged.update(
                    (f"weight/{k}/{name}", group_weights[i]) for i, name in enumerate(names)
                )
    if gramian is not None:
        cosines = cosine_similarities(gramian)
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                logged[f"cosine/{names[i]}-{names[j]}"] = cosines[i, j]
    return logged


def task_names(names: Sequence[str] | None, m: int) -> list[str]:
    if names is None:
        return [str(i) for i in range(m)]
    if len(names) != m:
        raise ValueError(f"`task_names` has {len(names)} names but the step returned {m} losses.")
    return list(names)


def shared_engine(modules: Sequence[nn.Module], *, data_parallel: bool) -> MTLEngine:
    if len(modules) == 0:
        raise ValueError("At least one shared module is needed (the modules all tasks read).")
    return MTLEngine(*modules, data_parallel=data_parallel)

"""The Gramian step shared by the framework integrations.

One training step of Jacobian descent in the form that frameworks with their own ``backward`` need:

1. during the forward pass, each task reads its own view of the shared features
   (:func:`task_views`), recorded while :func:`recording_views` is active;
2. :func:`weigh_and_hook` computes the Gramian of the task losses over the shared modules, the
   weights from it, and registers on each view a hook that scales the gradient entering it by its
   task's weight;
3. the framework back-propagates the plain sum of the losses: the heads get their unweighted
   gradients, the shared modules ``Σ_i w_i ∂L_i/∂θ``.

:func:`weigh_and_hook` is the only place that knows how the Gramian is obtained.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar

import torch
from torch import Tensor, nn

from torchjd._protocol import Need
from torchjd.aggregation import Aggregator
from torchjd.autogram import Engine

_RECORDED: ContextVar[list[Tensor] | None] = ContextVar("torchjd_task_views", default=None)


def task_views(features: Tensor, num_tasks: int) -> list[Tensor]:
    """Return ``num_tasks`` views of ``features``, one for each task to read.

    Inside a training step of :class:`~torchjd.integrations.lightning.JacobianDescentModule` or
    :class:`~torchjd.integrations.transformers.JacobianDescentTrainer`, task ``i`` must compute its
    loss from view ``i`` only: the gradient entering the shared modules through view ``i`` is
    then multiplied by the weight of task ``i``, and the task's own modules (its head) receive
    their unweighted gradient. Elsewhere (evaluation, plain PyTorch), the views are ordinary
    aliases of ``features``.

    :param features: The output of the shared modules, read by every task.
    :param num_tasks: The number of tasks (at least 1).
    """
    if not isinstance(features, Tensor):
        raise TypeError(f"`features` must be a Tensor, got {type(features).__name__}.")
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"`num_tasks` must be a positive int, got {num_tasks!r}.")
    views = [features.view_as(features) for _ in range(num_tasks)]
    recorded = _RECORDED.get()
    if recorded is not None and features.requires_grad:
        recorded.extend(views)
    return views


@contextlib.contextmanager
def recording_views() -> Iterator[list[Tensor]]:
    """Collect the views that :func:`task_views` creates inside the ``with`` block."""
    recorded: list[Tensor] = []
    token = _RECORDED.set(recorded)
    try:
        yield recorded
    finally:
        _RECORDED.reset(token)


def check_aggregator(aggregator: object) -> None:
    """The step reads only the Gramian (or the number of losses): refuse other aggregators."""
    if not isinstance(aggregator, Aggregator):
        raise TypeError(
            f"`aggregator` must be a torchjd Aggregator, got {type(aggregator).__name__}."
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


def weigh_and_hook(
    engine: Engine,
    aggregator: Aggregator,
    losses: Tensor,
    views: Sequence[Tensor],
    reduce: Callable[[Tensor], Tensor],
) -> tuple[Tensor, Tensor]:
    """Weights of the task ``losses`` (``[m]``) and the Gramian they come from.

    The Gramian is that of the losses over the engine's modules, computed in the parameters'
    precision even under autocast, then passed through ``reduce`` (the mean over the processes
    under data parallelism, so that every process uses the same weights and keeps the same
    aggregator state). With ``views`` (one per loss), a hook on view ``i`` scales the gradient
    entering it by ``w_i``; the caller back-propagates the sum of the losses.
    """
    m = losses.shape[0]
    if views and len(views) != m:
        raise ValueError(
            f"The training step returned {m} task losses but read {len(views)} task views: call "
            f"`task_views(features, {m})` once and compute loss i from view i only."
        )
    # The engine's products would otherwise run in the autocast dtype: the Gramian must be as
    # precise as the parameters for the weighting's thresholds to mean something.
    with torch.autocast(device_type=losses.device.type, enabled=False):
        gramian = reduce(engine.compute_gramian(losses))
    if aggregator.need is Need.GRAMIAN:
        weights = aggregator.gramian_weighting(gramian)  # type: ignore[attr-defined]
    else:  # the weighting reads the number of rows only
        weights = aggregator.weighting(gramian.new_empty((m, 0)))  # type: ignore[attr-defined]
    weights = weights.detach()
    for view, w in zip(views, weights.unbind(0)):
        view.register_hook(_scaler(w))
    return weights, gramian


def _scaler(weight: Tensor) -> Callable[[Tensor], Tensor]:
    def scale(grad: Tensor) -> Tensor:
        # Multiplied in the weight's precision, returned in the gradient's (autograd requires it).
        return (grad * weight).to(grad.dtype)

    return scale


def objective(losses: Tensor, weights: Tensor, views: Sequence[Tensor]) -> Tensor:
    """The scalar that the framework back-propagates: the sum of the losses when the views carry
    the weights, else the weighted sum (the heads then get weighted gradients too)."""
    if views:
        return losses.sum()
    return losses @ weights.to(losses.dtype)


def cosine_similarities(gramian: Tensor) -> Tensor:
    """``G_ij / sqrt(G_ii G_jj)``: the cosine similarities of the tasks' gradients (0 where a
    gradient is zero)."""
    norms = gramian.diagonal().clamp(min=0).sqrt()
    outer = norms.unsqueeze(0) * norms.unsqueeze(1)
    return torch.where(outer > 0, gramian / outer.clamp(min=torch.finfo(gramian.dtype).tiny), 0.0)


def metrics(
    names: Sequence[str], losses: Tensor, weights: Tensor, gramian: Tensor
) -> dict[str, Tensor]:
    """Per-task losses and weights, and the cosine similarity of every pair of tasks."""
    logged = {}
    detached = losses.detach()
    for i, name in enumerate(names):
        logged[f"loss/{name}"] = detached[i]
        logged[f"weight/{name}"] = weights[i]
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


def shared_engine(modules: Sequence[nn.Module]) -> Engine:
    if len(modules) == 0:
        raise ValueError("At least one shared module is needed (the modules all tasks read).")
    return Engine(*modules, batch_dim=None)

"""Jacobian descent under PyTorch Lightning's automatic optimisation (extra ``lightning``)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from torchjd._optional import require

require("torchjd.integrations.lightning", ("lightning",), "lightning")

from lightning.pytorch import LightningModule  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from torchjd.aggregation import Aggregator  # noqa: E402
from torchjd.autogram import MTLEngine  # noqa: E402
from torchjd.grouping import GroupedAggregator  # noqa: E402
from torchjd.integrations._task_step import (  # noqa: E402
    Recorded,
    check_aggregator,
    descend,
    metrics,
    recording_views,
    scale_of,
    shared_engine,
    stack_losses,
    task_names,
    task_views,
)

__all__ = ["JacobianDescentModule"]


class JacobianDescentModule(LightningModule):
    r"""A ``LightningModule`` whose ``training_step`` returns the task losses, trained by Jacobian
    descent under Lightning's automatic optimisation.

    Subclass it like a ``LightningModule``, and:

    - pass the aggregator to ``super().__init__`` (one whose weights come from the Gramian, such
      as :class:`~torchjd.aggregation.UPGrad`; it is registered as the submodule ``aggregator``,
      so its state is saved in checkpoints);
    - implement :meth:`shared_modules`: the modules that every task reads (the trunk);
    - in ``training_step``, read the trunk's output through ``self.task_views(features, m)`` (task
      ``i`` from view ``i`` only) and return the ``m`` task losses (a list of scalars or a vector).

    Each step then computes, with :class:`~torchjd.autogram.MTLEngine` (no Jacobian is formed),
    the Gramian :math:`G` of the losses over the shared modules, the weights :math:`w` from it and
    the shared parameters' update :math:`\sum_i w_i \nabla L_i` (one product per layer, from the
    gradients that the Gramian needed anyway), and returns :math:`\sum_i L_i` to Lightning. The
    tasks read views of a detached copy of the features, so Lightning's own backward pass runs
    through the heads only, giving each its unweighted gradient, and hands every shared parameter
    its update times the gradient it receives (the loss scale and the accumulation factor).
    Everything that Lightning does around its backward therefore works unchanged: precision
    plugins, gradient clipping and accumulation, schedulers, checkpointing, data parallelism.
    Without task views, the step returns :math:`\sum_i w_i L_i` (one more backward pass through
    the trunk; the heads then get weighted gradients).

    With a :class:`~torchjd.grouping.GroupedAggregator` whose groups partition the trainable
    parameters of the shared modules (e.g. ``per_layer(trunk)``), each group gets its own weights
    from its own Gramian, and its parameters the update of these weights (task views required).

    Under data parallelism (``ddp``), every process uses the mean of the processes' Gramians, so
    all use the same weights and keep the same aggregator state; the gradients are then averaged
    by DDP as usual.

    Logged at the steps that the trainer's loggers write (every ``log_every_n_steps``):
    ``loss/<task>``, ``weight/<task>`` (``weight/<group>/<task>`` when grouped) and
    ``cosine/<task>-<task>`` (the cosine similarity of two tasks' gradients over the shared
    modules), unless ``log_metrics`` is False.

    :param aggregator: Keyword-only. An aggregator that reads the Gramian or only the number of
        rows (its ``need``), or a ``GroupedAggregator`` of such aggregators over the shared
        parameters; others raise a ``ValueError`` naming the autojac route.
    :param task_names: Keyword-only. Names used in the logged metrics (default: ``0``, ``1``...).
    :param log_metrics: Keyword-only. Whether to log the metrics above (default: True).
    """

    def __init__(
        self,
        *,
        aggregator: Aggregator | GroupedAggregator,
        task_names: Sequence[str] | None = None,
        log_metrics: bool = True,
    ) -> None:
        super().__init__()
        check_aggregator(aggregator)
        self.aggregator = aggregator
        self._task_names = None if task_names is None else list(task_names)
        self._log_metrics = log_metrics
        self._engine: MTLEngine | None = None
        self._in_step = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        step = cls.__dict__.get("training_step")
        if step is not None:
            cls.training_step = _descending(step)  # type: ignore[method-assign]

    def shared_modules(self) -> Sequence[nn.Module]:
        """The modules whose parameters every task uses (the trunk). To implement."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement `shared_modules()`, returning the modules "
            "that every task reads (e.g. `[self.trunk]`)."
        )

    def task_views(self, features: Tensor, num_tasks: int) -> list[Tensor]:
        """One view of ``features`` per task: see :func:`torchjd.integrations.task_views`."""
        return task_views(features, num_tasks)

    def _jacobian_descent(self, output: Any, recorded: list[Recorded]) -> Tensor:
        losses = stack_losses(output)
        assert self._engine is not None
        logging = self._log_metrics and self._logging_step()
        scaler = getattr(self.trainer.precision_plugin, "scaler", None) if self._trainer else None
        scale = scale_of(scaler, losses)
        step = descend(
            self._engine, self.aggregator, losses, recorded, with_gramian=logging, loss_scale=scale
        )
        if logging:
            names = task_names(self._task_names, losses.shape[0])
            logged = metrics(names, losses, step.weights, step.gramian)
            self.log_dict(logged, on_step=True, on_epoch=False)
        return step.objective

    def _logging_step(self) -> bool:
        """Whether the trainer's loggers write this step: each ``self.log`` call costs about as
        much as a small layer's backward, and a value logged at another step is never written."""
        if self._trainer is None:  # called outside of a Trainer: nothing would receive the logs
            return False
        every = self.trainer.log_every_n_steps
        return every > 0 and (self.global_step + 1) % every == 0

    def _data_parallel(self) -> bool:
        return self._trainer is not None and self.trainer.world_size > 1


def _descending(step: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a subclass's ``training_step``: record the task views, then turn the returned losses
    into the scalar that Lightning back-propagates (outermost call only, so that a
    ``super().training_step`` call inside it is not processed twice)."""

    @functools.wraps(step)
    def training_step(self: JacobianDescentModule, *args: Any, **kwargs: Any) -> Any:
        if self._in_step:
            return step(self, *args, **kwargs)
        if not self.automatic_optimization:
            raise RuntimeError(
                "JacobianDescentModule trains under automatic optimisation: leave "
                "`automatic_optimization` to True (the aggregation happens in `training_step`)."
            )
        if self._engine is None:
            # Created before the first forward pass, which the engine must see.
            modules = list(self.shared_modules())
            self._engine = shared_engine(modules, data_parallel=self._data_parallel())
        self._in_step = True
        try:
            with recording_views() as recorded:
                output = step(self, *args, **kwargs)
        finally:
            self._in_step = False
        if output is None:  # Lightning skips the step: its forward calls are not for the next one
            self._engine.discard()
            return None
        return self._jacobian_descent(output, recorded)

    return training_step

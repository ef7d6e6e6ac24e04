"""Jacobian descent with the Hugging Face ``Trainer`` (extra ``transformers``)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from torchjd._optional import require

require("torchjd.integrations.transformers", ("transformers",), "transformers")

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from transformers import Trainer  # noqa: E402

from torchjd.aggregation import Aggregator  # noqa: E402
from torchjd.grouping import GroupedAggregator  # noqa: E402
from torchjd.integrations._task_step import (  # noqa: E402
    check_aggregator,
    descend,
    metrics,
    recording_views,
    scale_of,
    shared_engine,
    stack_losses,
    task_names,
)

__all__ = ["JacobianDescentTrainer"]

_AGGREGATOR_FILE = "aggregator.pt"


class JacobianDescentTrainer(Trainer):
    r"""A ``transformers.Trainer`` for models that return several task losses, trained by Jacobian
    descent.

    The model's output must hold the task losses under the key ``"losses"`` (a dict or a
    ``ModelOutput``: a list of scalars or a vector), and each task must read its own view of the
    shared features, made by :func:`torchjd.integrations.task_views`. Each training step computes,
    with :class:`~torchjd.autogram.MTLEngine` (no Jacobian is formed), the Gramian of the losses
    over ``shared_modules``, the aggregator's weights :math:`w` from it and the shared parameters'
    update :math:`\sum_i w_i \nabla L_i`, and gives the Trainer the plain sum of the losses: its
    own backward pass gives each task's own modules their unweighted gradient and the shared
    parameters their update (times the Trainer's loss scale and accumulation factor). With a
    :class:`~torchjd.grouping.GroupedAggregator` over the shared parameters, each group gets the
    update of its own weights. Mixed precision, gradient clipping and accumulation, schedulers and
    data parallelism are the Trainer's own; under data parallelism every process uses the mean of
    the processes' Gramians.
    Evaluation reports the sum of the losses.

    The aggregator's state is saved with each checkpoint (``aggregator.pt``) and restored by
    ``train(resume_from_checkpoint=...)``. The logs of the training loss also carry, for the last
    step, ``loss/<task>``, ``weight/<task>`` and ``cosine/<a>-<b>`` (the cosine similarity of two
    tasks' gradients over the shared modules).

    :param args: Positional arguments of ``transformers.Trainer``.
    :param aggregator: Keyword-only. An aggregator that reads the Gramian or only the number of
        rows (its ``need``), or a ``GroupedAggregator`` of such aggregators whose groups hold the
        trainable parameters of ``shared_modules``; others raise a ``ValueError`` naming the
        autojac route.
    :param shared_modules: Keyword-only. The modules that every task reads (the trunk).
    :param task_names: Keyword-only. Names used in the logs (default: ``0``, ``1``...).
    :param kwargs: Keyword arguments of ``transformers.Trainer``.
    """

    def __init__(
        self,
        *args: Any,
        aggregator: Aggregator | GroupedAggregator,
        shared_modules: Sequence[nn.Module],
        task_names: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        check_aggregator(aggregator)
        super().__init__(*args, **kwargs)
        self.aggregator = aggregator.to(self.args.device)
        parallel = self.accelerator.num_processes > 1
        self._engine = shared_engine(list(shared_modules), data_parallel=parallel)
        self._task_names = None if task_names is None else list(task_names)
        self._last_metrics: dict[str, Tensor] = {}
        # The returned loss is a per-batch value: the Trainer divides it for accumulation.
        self.model_accepts_loss_kwargs = False

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        """The step's scalar: the sum of the task losses, the views carrying the weights (in
        training); the sum of the task losses (in evaluation)."""
        with recording_views() as recorded:
            outputs = model(**inputs)
        losses = stack_losses(_task_losses(outputs))
        if model.training and torch.is_grad_enabled():
            scale = scale_of(getattr(self.accelerator, "scaler", None), losses)
            step = descend(
                self._engine, self.aggregator, losses, recorded, with_gramian=True, loss_scale=scale
            )
            names = task_names(self._task_names, losses.shape[0])
            self._last_metrics = metrics(names, losses, step.weights, step.gramian)
            loss = step.objective
        else:
            self._engine.discard()  # calls recorded with gradient enabled, outside training
            loss = losses.sum()
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._last_metrics:
            # Converted here, once per logging step, not at every training step.
            logs = {**logs, **{k: float(v) for k, v in self._last_metrics.items()}}
        super().log(logs, *args, **kwargs)

    # The Trainer saves the model, the optimizer and the scheduler; the aggregator's state travels
    # with the latter two (these are the Trainer's own hooks for them).
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            torch.save(self.aggregator.state_dict(), os.path.join(output_dir, _AGGREGATOR_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            path = os.path.join(checkpoint, _AGGREGATOR_FILE)
            if os.path.isfile(path):
                state = torch.load(path, map_location=self.args.device, weights_only=False)
                self.aggregator.load_state_dict(state)


def _task_losses(outputs: Any) -> Any:
    if isinstance(outputs, Mapping) and "losses" in outputs:
        return outputs["losses"]
    raise ValueError(
        "JacobianDescentTrainer needs the model to return its task losses under the key "
        f"'losses' (a dict or a ModelOutput), got {type(outputs).__name__}"
        + (f" with keys {list(outputs.keys())}." if isinstance(outputs, Mapping) else ".")
    )

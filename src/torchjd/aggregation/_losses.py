"""How an aggregator or a weighting that needs the current loss values receives them.

A weighting only sees the Jacobian (or its Gramian), not the losses. Methods that also need the
loss values (GradNorm, DB-MTL) receive them through ``update_losses(losses)``, called once per
step before the aggregation (before :func:`torchjd.autojac.jac_to_grad`, or before calling the
weighting on a Gramian). The values are used by the next call only, so that a step that forgets
to give them fails loudly instead of silently reusing old ones.
"""

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn


def losses_as_vector(losses: Tensor | Sequence[Tensor]) -> Tensor:
    """The loss values as a detached 1-D tensor (one entry per objective)."""
    if isinstance(losses, Tensor):
        vector = losses.detach()
    else:
        items = list(losses)
        if not all(isinstance(item, Tensor) for item in items):
            raise TypeError(
                "`losses` must be a tensor or a sequence of tensors, got a sequence holding "
                f"{sorted({type(item).__name__ for item in items})}."
            )
        if not items:
            raise ValueError("`losses` must hold at least one loss, got an empty sequence.")
        if any(item.numel() != 1 for item in items):
            shapes = [tuple(item.shape) for item in items]
            raise ValueError(f"`losses` must be scalars (one value per loss), got shapes {shapes}.")
        vector = torch.stack([item.detach().reshape(()) for item in items])
    if vector.ndim == 0:
        vector = vector.reshape(1)
    if vector.ndim != 1:
        raise ValueError(
            "`losses` must be one value per objective (a 1-D tensor or a sequence of scalars), got "
            f"a tensor of shape {tuple(vector.shape)}."
        )
    if not vector.is_floating_point():
        vector = vector.to(torch.get_default_dtype())
    return vector


class LossesInputMixin(nn.Module):
    """Keeps the loss values given by :meth:`update_losses` until the next call consumes them.

    The values are held in the buffer ``_losses`` (empty when none are pending), registered at
    construction so that ``state_dict()`` always has the same keys. ``requires_losses`` tells
    callers (the application pipeline, generic tests) that the class needs them.
    """

    requires_losses: ClassVar[bool] = True

    def _register_losses_buffer(self) -> None:
        self.register_buffer("_losses", torch.empty(0), persistent=True)

    def update_losses(self, losses: Tensor | Sequence[Tensor]) -> None:
        """Give the loss values of the current step, one per objective (row of the Jacobian), in
        the order of the rows. Call it before each aggregation: the values are used by the next
        call only."""
        self._losses = losses_as_vector(losses)

    def _take_losses(self, m: int, like: Tensor) -> Tensor:
        """The pending losses, in ``like``'s dtype and on its device, and forget them."""
        self._check_pending_losses(m)
        pending = self._losses
        self._losses = torch.empty(0, device=pending.device)
        return pending.to(dtype=like.dtype, device=like.device)

    def _check_pending_losses(self, m: int) -> None:
        """Raise ``ValueError`` unless ``m`` loss values are pending."""
        pending = self._losses
        name = type(self).__name__
        if pending.numel() == 0:
            raise ValueError(
                f"{name} needs the current loss values: call `update_losses(losses)` before each "
                "aggregation (before `jac_to_grad`, or before calling the weighting)."
            )
        if pending.shape[0] != m:
            raise ValueError(
                f"{name} received {pending.shape[0]} loss values for {m} objectives (rows): give "
                "one loss per row, in the order of the rows."
            )

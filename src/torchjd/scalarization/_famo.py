import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from torchjd._precision import promoted
from torchjd._stateful import Stateful
from torchjd._tasks import restricted, validated_present, warn_no_task_present
from torchjd.scalarization._scalarizer import Scalarizer
from torchjd.scalarization._utils import (
    as_shape,
    check_built_shape,
    check_values,
    check_values_tensor,
)

_EPS = 1e-8


class FAMO(Scalarizer, Stateful):
    r"""Fast Adaptive Multitask Optimization: a weighted sum of log-losses whose weights are
    learned so that all the losses decrease at a similar rate.

    From `FAMO: Fast Adaptive Multitask Optimization <https://arxiv.org/abs/2306.03792>`_ (Liu et
    al., NeurIPS 2023). With logits :math:`\xi` (one per value), :math:`z = \mathrm{softmax}(\xi)`,
    the lower bounds :math:`b` (``min_losses``) and :math:`\epsilon = 10^{-8}`, the forward pass
    returns

    .. math::

        c \sum_{k=1}^K z_k \log(L_k - b_k + \epsilon), \qquad
        c = \Big(\sum_{k=1}^K \frac{z_k}{L_k - b_k + \epsilon}\Big)^{-1},

    where :math:`z` and :math:`c` are constants for autograd, so the gradient with respect to
    :math:`L_k` is :math:`c \, z_k / (L_k - b_k + \epsilon)`: once chained, the update direction is
    a convex combination of the per-task gradients. The logits are not trained by back-propagation
    (backward never writes their ``.grad``) but by :meth:`update`, to be called after the model's
    optimizer step with the values recomputed on the same batch:

    .. math::

        \delta_k = \log(L_k^{\text{before}} - b_k + \epsilon)
                   - \log(L_k^{\text{after}} - b_k + \epsilon), \qquad
        g_k = z_k \Big(\delta_k - \sum_{j=1}^K z_j \delta_j\Big),

    then one step of :class:`torch.optim.Adam` (learning rate ``lr``, L2 weight decay
    ``weight_decay``, default betas) on the logits with :math:`g` as their gradient. A value that
    decreased more than the others thus loses weight. The Adam optimizer is created at the first
    :meth:`update` (after construction or :meth:`reset`) with the ``lr`` and ``weight_decay`` of
    that moment.

    The values must be finite and ``>= min_losses`` (else ``ValueError``: their logarithm is
    taken), in the forward pass and in :meth:`update`.

    :param shape: the shape of the values: an int ``n`` for ``(n,)`` or a sequence of sizes, with
        at least one element.
    :param min_losses: the lower bounds :math:`b` of the values (a finite tensor of shape
        ``shape``), or ``None`` (default) for zeros. Stored (as a copy) in the buffer
        ``min_losses``.
    :param lr: the learning rate of the logits, in :math:`[0, \infty)`; default ``0.025``.
    :param weight_decay: the weight decay of the logits, in :math:`[0, \infty)`; default ``1e-3``.

    >>> import torch
    >>> from torchjd.scalarization import FAMO
    >>> famo = FAMO(2)
    >>> famo(torch.tensor([1.0, 2.0]))
    tensor(0.4621)
    >>> famo.update(torch.tensor([0.5, 1.5]))
    >>> famo._w
    Parameter containing:
    tensor([-0.0250,  0.0250], requires_grad=True)
    """

    _task_vectors = ("min_losses",)
    _task_state = (("_w", 1, 0.0),)

    def __init__(
        self,
        shape: int | Sequence[int],
        min_losses: Tensor | None = None,
        lr: float = 0.025,
        weight_decay: float = 1e-3,
    ) -> None:
        super().__init__()
        self.lr = lr
        self.weight_decay = weight_decay
        sizes = as_shape(shape)
        if torch.Size(sizes).numel() == 0:
            raise ValueError(f"`shape` must describe at least one value, got {sizes!r}.")
        self._w = nn.Parameter(torch.zeros(sizes))
        if min_losses is None:
            min_losses = torch.zeros(sizes)
        elif not isinstance(min_losses, Tensor):
            raise TypeError(f"`min_losses` must be a Tensor or None, got {type(min_losses)}.")
        elif min_losses.shape != self._w.shape:
            raise ValueError(
                f"`min_losses` must have the shape {sizes!r} given by `shape`, got a tensor of "
                f"shape {tuple(min_losses.shape)}."
            )
        elif not bool(torch.isfinite(min_losses).all()):
            raise ValueError(f"`min_losses` must be finite, got {min_losses}.")
        self.register_buffer("min_losses", min_losses.detach().clone())
        self._optimizer: torch.optim.Adam | None = None
        self._prev_losses: Tensor | None = None

    @property
    def lr(self) -> float:
        return self._lr

    @lr.setter
    def lr(self, lr: float) -> None:
        if not lr >= 0.0:
            raise ValueError(f"`lr` must be non-negative, got {lr}.")
        self._lr = lr

    @property
    def weight_decay(self) -> float:
        return self._weight_decay

    @weight_decay.setter
    def weight_decay(self, weight_decay: float) -> None:
        if not weight_decay >= 0.0:
            raise ValueError(f"`weight_decay` must be non-negative, got {weight_decay}.")
        self._weight_decay = weight_decay

    def _check(self, values: Tensor) -> Tensor:
        """Check ``values`` and return the lower bounds in their dtype and on their device."""
        check_values_tensor(values)
        check_built_shape(str(self), self._w.shape, values)
        b = self.min_losses.to(values)
        check_values(
            values,
            lower_bound=b,
            lower_bound_text="at least `min_losses` (FAMO takes the logarithm of their excess)",
        )
        return b

    def forward(self, values: Tensor, /) -> Tensor:
        b = self._check(values)
        self._prev_losses = values.detach().clone()
        # The softmax is computed in the dtype of the sum, so that its entries sum to 1 there.
        z = torch.softmax(self._w.detach().flatten().to(values), dim=0).reshape(values.shape)
        u = values - b + _EPS
        c = 1.0 / (z / u.detach()).sum()
        return c * (z * torch.log(u)).sum()

    def update(self, values: Tensor, *, present: Tensor | Sequence[bool] | None = None) -> None:
        """Move the logits using the values recomputed after the model's optimizer step.

        :param values: the values of the same objectives, on the same batch, after the step (same
            shape as in the forward pass). They are used detached.
        :param present: the tasks present in this step, as given to the forward pass (a vector
            of values then): only their logits move, and Adam's moments of the absent ones are
            kept as they were. Default ``None``: all present.
        """
        if present is None:
            self._step(self._logit_gradient(values), None)
            return
        if values.ndim != 1:
            raise ValueError(
                f"`present` needs a vector of values (one per task), got shape "
                f"{tuple(values.shape)}."
            )
        m = values.shape[0]
        indices = validated_present(present, m)
        if indices is None:
            self._step(self._logit_gradient(values), None)
            return
        if len(indices) == 0:
            warn_no_task_present("the logits are left as they were", 2)
            return
        with restricted(self, indices, m):
            sub = self._logit_gradient(values.index_select(0, indices.to(values.device)))
        gradient = torch.zeros_like(self._w)
        gradient[indices.to(gradient.device)] = sub
        absent = torch.ones(m, dtype=torch.bool)
        absent[indices] = False
        self._step(gradient, absent.to(self._w.device))

    def _logit_gradient(self, values: Tensor) -> Tensor:
        """The gradient ``g`` of the logits, of their shape."""
        if self._prev_losses is None:
            raise ValueError(
                "`update` needs the values of a previous forward pass: call the FAMO instance on "
                "the values before the optimizer step, then `update` with the new values."
            )
        values = promoted(values)
        b = self._check(values)
        with torch.no_grad():
            prev = self._prev_losses.to(values)
            delta = (torch.log(prev - b + _EPS) - torch.log(values - b + _EPS)).flatten()
            # In the dtype of the sum below: a float32 softmax sums to 1 only up to about 3e-8
            # in float64, which biases g when the values barely move (Adam rescales it).
            z = torch.softmax(self._w.flatten().to(delta), dim=0)
            grad = z * (delta - (z * delta).sum())
            return grad.reshape(self._w.shape).to(self._w)

    def _step(self, gradient: Tensor, frozen: Tensor | None) -> None:
        """One Adam step of the logits; the entries ``frozen`` (absent tasks) keep their logit
        and their moments."""
        if self._optimizer is None:
            self._optimizer = torch.optim.Adam(
                [self._w], lr=self.lr, weight_decay=self.weight_decay
            )
        self._move_optimizer_state()
        saved = None
        if frozen is not None:
            state = self._optimizer.state.get(self._w, {})
            moments = {k: state[k][frozen].clone() for k in ("exp_avg", "exp_avg_sq") if k in state}
            saved = (self._w.detach()[frozen].clone(), moments)
        self._w.grad = gradient
        self._optimizer.step()
        self._w.grad = None
        if saved is not None:
            logits, moments = saved
            with torch.no_grad():
                self._w[frozen] = logits
            state = self._optimizer.state[self._w]
            for key, value in moments.items():
                state[key][frozen] = value

    def _move_optimizer_state(self) -> None:
        """Keep Adam's moments next to the logits if the module was moved to another device."""
        assert self._optimizer is not None
        state = self._optimizer.state.get(self._w)
        if state is None:
            return
        for key in ("exp_avg", "exp_avg_sq"):
            moment = state.get(key)
            if moment is not None and moment.device != self._w.device:
                state[key] = moment.to(self._w.device)

    def reset(self) -> None:
        """Zero the logits in place, drop the Adam optimizer and forget the stored values."""
        with torch.no_grad():
            self._w.zero_()
        self._optimizer = None
        self._prev_losses = None

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "prev_losses": None if self._prev_losses is None else self._prev_losses.clone(),
            "optimizer": (
                None if self._optimizer is None else copy.deepcopy(self._optimizer.state_dict())
            ),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        prev = state["prev_losses"]
        self._prev_losses = None if prev is None else prev.clone()
        optimizer_state = state["optimizer"]
        if optimizer_state is None:
            self._optimizer = None
        else:
            self._optimizer = torch.optim.Adam(
                [self._w], lr=self.lr, weight_decay=self.weight_decay
            )
            self._optimizer.load_state_dict(copy.deepcopy(optimizer_state))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(shape={tuple(self._w.shape)}, lr={self.lr}, "
            f"weight_decay={self.weight_decay})"
        )

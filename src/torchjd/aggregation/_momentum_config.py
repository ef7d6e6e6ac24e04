"""Momentum ConFIG (M-ConFIG): the ConFIG direction of per-loss momenta, one loss per step."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from torchjd._stateful import Stateful
from torchjd._tasks import validated_present, warn_no_task_present
from torchjd.aggregation._bases import Aggregator, NoGrad
from torchjd.aggregation._config import _config_weights, _solver_dtype
from torchjd.aggregation._lazy_state import LazyStateMixin, warn_reinitialised
from torchjd.linalg._matrix import Matrix
from torchjd.linalg._nonfinite import finite_part, poison

_STATE = ("_momenta", "_counts", "_gramian")


def _check_beta(value: float) -> float:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"`beta` must be in [0, 1), got {value!r}.")
    return value


def _gramian_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision states are multiplied in float32: their inner products overflow easily."""
    return torch.promote_types(dtype, torch.float32)


class MomentumConFIG(NoGrad, LazyStateMixin, Aggregator, Stateful):
    r"""The direction of Momentum ConFIG (M-ConFIG), from `ConFIG: Towards Conflict-free Training
    of Physics Informed Neural Networks <https://arxiv.org/abs/2408.11104>`_ (Liu et al., ICLR
    2025), Section 3.3: the :class:`ConFIG` direction of momenta of the rows instead of the rows.

    Each row :math:`g_i` updates its momentum, :math:`m_i \leftarrow \beta m_i + (1 - \beta)
    g_i`, which is bias-corrected as in Adam, :math:`\hat m_i = m_i / (1 - \beta^{t_i})` with
    :math:`t_i` the number of updates of :math:`m_i`; the result is
    :math:`\mathcal A_{\text{ConFIG}}(\hat m_1, \dots, \hat m_m)`. Called on a whole Jacobian, all
    momenta are updated (the first call returns ``ConFIG()(J)``). The paper's method updates
    **one** momentum per training step, back-propagating one loss only:
    :class:`MConFIGBackward` runs that loop with this direction, and updates the Gramian of the
    momenta one row at a time, so a step costs one backward pass and two passes over the momenta.

    The ConFIG weights come from the Gramian of the bias-corrected momenta, as in
    :class:`ConFIG` (float64 eigendecomposition, then cast back); the result is a combination of
    the momenta.

    State: the momenta (``[m, n]``, as large as the Jacobian, in the input's dtype), the update
    counts and the Gramian of the momenta (in float32 for half-precision inputs, where inner
    products overflow easily), following the input's device; re-initialised (with a warning)
    when the shape or the dtype changes; :meth:`reset` forgets them. ``state_dict()`` of a used
    instance loads into a fresh one. Not differentiable (runs under :func:`torch.no_grad`).

    :param beta: the momentum rate :math:`\beta \in [0, 1)` (default ``0.9``); ``0`` gives
        :class:`ConFIG` of the current rows.

    >>> import torch
    >>> from torchjd.aggregation import MomentumConFIG
    >>> MomentumConFIG()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([0.1588, 2.0706, 2.0706])
    """

    _task_state = (("_momenta", 1, 0.0), ("_counts", 1, 0.0), ("_gramian", 2, 0.0))

    def __init__(self, beta: float = 0.9) -> None:
        super().__init__()
        self.beta = beta
        for name in _STATE:
            self.register_buffer(name, torch.empty(0), persistent=True)

    @property
    def beta(self) -> float:
        return self._beta

    @beta.setter
    def beta(self, value: float) -> None:
        self._beta = _check_beta(value)

    def reset(self) -> None:
        """Forget the momenta, their update counts and their Gramian."""
        for name in _STATE:
            setattr(self, name, torch.empty(0))

    def forward(self, matrix: Matrix, /) -> Tensor:
        m, n = matrix.shape
        if m == 0:
            return matrix.new_zeros(n)
        self._prepare_state(m, n, matrix.dtype, matrix.device)
        # In place: the momenta are as large as the Jacobian.
        self._momenta.lerp_(matrix, 1.0 - self.beta)
        self._counts = self._counts + 1
        wide = self._momenta.to(_gramian_dtype(self._momenta.dtype))
        self._gramian = wide @ wide.T
        return self._direction()

    def _prepare_state(self, m: int, n: int, dtype: torch.dtype, device: torch.device) -> None:
        """Make the state ``[m, n]`` in ``dtype`` on ``device`` (zeros if it was not)."""
        if self._momenta.numel() > 0 or self._counts.numel() > 0:
            old = (tuple(self._momenta.shape), self._momenta.dtype)
            if old == ((m, n), dtype):
                for name in _STATE:
                    setattr(self, name, getattr(self, name).to(device))
                return
            warn_reinitialised(
                type(self).__name__, f"shape {old[0]} in {old[1]}", f"shape {(m, n)} in {dtype}"
            )
        self._momenta = torch.zeros(m, n, dtype=dtype, device=device)
        self._counts = torch.zeros(m, dtype=torch.long, device=device)
        self._gramian = torch.zeros(m, m, dtype=_gramian_dtype(dtype), device=device)

    def _update_row(self, i: int, gradient: Sequence[Tensor], slices: Sequence[slice]) -> None:
        """Update the momentum of row ``i`` with a gradient given by pieces (``gradient[k]`` fills
        ``slices[k]`` of the row; a missing piece, ``None``, is a zero gradient), and the row and
        column ``i`` of the Gramian of the momenta."""
        row = self._momenta[i]
        for piece, where in zip(gradient, slices):
            segment = row[where]
            if piece is None:
                segment.mul_(self.beta)
            else:
                segment.lerp_(piece.reshape(-1), 1.0 - self.beta)
        self._counts[i] += 1
        wide = _gramian_dtype(row.dtype)
        products = self._momenta.to(wide) @ row.to(wide)  # m_j . m_i for every j
        self._gramian[i] = products
        self._gramian[:, i] = products

    def _direction(self) -> Tensor:
        """ConFIG of the bias-corrected momenta; a momentum never updated counts as a zero row."""
        momenta = self._momenta
        solver = _solver_dtype(momenta.device)
        corrections = 1.0 - torch.pow(self.beta, self._counts.to(solver))
        scale = torch.where(
            corrections > 0, 1.0 / torch.where(corrections > 0, corrections, 1.0), 0.0
        )
        corrected_gramian = scale[:, None] * self._gramian.to(solver) * scale[None, :]
        # A non-finite Gramian would make eigh raise: NaN weights instead.
        corrected_gramian, nan_where_non_finite = finite_part(corrected_gramian)
        weights = _config_weights(
            corrected_gramian, torch.ones_like(scale), momenta.shape[1]
        )  # on m_hat
        weights = poison(weights, nan_where_non_finite)
        return (weights * scale).to(momenta.dtype) @ momenta

    def __repr__(self) -> str:
        return f"{type(self).__name__}(beta={self.beta!r})"


class MConFIGBackward(Stateful):
    r"""The training step of Momentum ConFIG (M-ConFIG), from `ConFIG: Towards Conflict-free
    Training of Physics Informed Neural Networks <https://arxiv.org/abs/2408.11104>`_ (Liu et al.,
    ICLR 2025), Section 3.3: back-propagates **one** loss per step, updates that loss's momentum,
    and writes the :class:`MomentumConFIG` direction of all the momenta into the ``.grad`` fields.

    Use it in place of ``loss.backward()``, then step any optimiser::

        step = MConFIGBackward(model.parameters())
        for x, y in data:
            losses = [...]           # one scalar per loss, computed as usual
            step.backward(losses)    # one backward pass, then .grad += the M-ConFIG direction
            optimizer.step()
            optimizer.zero_grad()

    At the first call every loss is back-propagated (``m`` backward passes), so that every
    momentum starts from a real gradient; afterwards one loss per call, in turn
    (``0, 1, ..., m - 1, 0, ...``), the losses not chosen being left un-differentiated. The
    momenta of the other losses keep their values: that is what makes a step cost about one
    backward pass. The direction is accumulated into ``.grad`` (summed with what is there, as
    :func:`torch.Tensor.backward` does).

    **Second moment.** The paper rescales the direction by an Adam-like second moment; here that
    is left to the optimiser: ``torch.optim.Adam(params, betas=(0.0, beta2))`` divides the
    direction by the square root of a moving average of its squares (a simplification: the
    paper's second moment is that of a pseudo-gradient built from the ConFIG direction), and
    plain SGD uses the direction as is.

    State: that of its ``aggregator``, a :class:`MomentumConFIG` (momenta ``[m, n]`` over all
    the parameters, in the parameters' dtype, on their device), and the index of the next loss.
    :meth:`state_dict` / :meth:`load_state_dict` save and restore it (a fresh instance continues
    identically); :meth:`reset` forgets it.

    :param params: the parameters to update (an iterable of tensors that require grad); they
        must share a dtype and a device.
    :param beta: the momentum rate :math:`\beta \in [0, 1)` (default ``0.9``).
    """

    def __init__(self, params: Iterable[Tensor], beta: float = 0.9) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError("`params` must hold at least one tensor, got none.")
        if any(not isinstance(p, Tensor) or not p.requires_grad for p in self.params):
            raise ValueError("`params` must be tensors that require grad.")
        dtypes = {p.dtype for p in self.params}
        devices = {p.device for p in self.params}
        if len(dtypes) > 1 or len(devices) > 1:
            raise ValueError(
                f"`params` must share one dtype and one device, got {sorted(map(str, dtypes))} "
                f"on {sorted(map(str, devices))}."
            )
        self.aggregator = MomentumConFIG(beta=beta)
        offsets = [0]
        for p in self.params:
            offsets.append(offsets[-1] + p.numel())
        self._slices = [slice(a, b) for a, b in itertools.pairwise(offsets)]
        self._n = offsets[-1]
        self._next = 0

    @property
    def beta(self) -> float:
        return self.aggregator.beta

    @beta.setter
    def beta(self, value: float) -> None:
        self.aggregator.beta = value

    def backward(
        self, losses: Sequence[Tensor], *, present: Tensor | Sequence[bool] | None = None
    ) -> int:
        """Back-propagate the loss whose turn it is (every loss at the first call), update its
        momentum and accumulate the M-ConFIG direction into the parameters' ``.grad``.

        :param losses: the ``m`` scalar losses of this step, in the same order at every step.
        :param present: which losses exist in this step (one boolean per loss): an absent loss
            is never back-propagated (its value may be NaN) and its momentum is left as it was;
            the turn goes to the next present loss. With none present, ``.grad`` is left
            untouched (with a warning) and ``-2`` is returned. Default ``None``: all present.
        :return: the index of the loss back-propagated (``-1`` at the first call, when all are).
        """
        losses = list(losses)
        m = len(losses)
        indices = None if present is None else validated_present(present, m)
        if indices is not None and len(indices) == 0:
            warn_no_task_present("`.grad` is left untouched", 2)
            return -2
        absent = set() if indices is None else set(range(m)) - set(indices.tolist())
        if m == 0:
            raise ValueError("`losses` must hold at least one loss, got none.")
        if any(not isinstance(loss, Tensor) or loss.numel() != 1 for loss in losses):
            raise ValueError("`losses` must be scalar tensors (one per loss).")
        first = self.params[0]
        aggregator = self.aggregator
        fresh = (
            aggregator._momenta.shape != (m, self._n) or aggregator._momenta.dtype != first.dtype
        )
        aggregator._prepare_state(m, self._n, first.dtype, first.device)
        with torch.no_grad():
            if fresh:
                # Every momentum starts from a real gradient.
                kept = [i for i in range(m) if i not in absent]
                for i in kept:
                    self._absorb(i, losses[i], retain_graph=i != kept[-1])
                chosen = -1
            else:
                chosen = self._next % m
                while chosen in absent:  # the turn passes to the next present loss
                    chosen = (chosen + 1) % m
                self._absorb(chosen, losses[chosen], retain_graph=False)
                self._next = (chosen + 1) % m
            direction = aggregator._direction()
        for p, where in zip(self.params, self._slices):
            piece = direction[where].view_as(p)
            if p.grad is None:
                p.grad = piece
            else:
                p.grad.add_(piece)
        return chosen

    def _absorb(self, i: int, loss: Tensor, retain_graph: bool) -> None:
        with torch.enable_grad():
            gradient = torch.autograd.grad(
                loss, self.params, retain_graph=retain_graph, allow_unused=True
            )
        self.aggregator._update_row(i, gradient, self._slices)

    def reset(self) -> None:
        """Forget the momenta: the next call back-propagates every loss again."""
        self.aggregator.reset()
        self._next = 0

    def state_dict(self) -> dict[str, Any]:
        """The momenta, their counts and Gramian, and the index of the next loss."""
        return {"aggregator": self.aggregator.state_dict(), "next": self._next}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (into an instance over parameters of the same
        shapes)."""
        self.aggregator.load_state_dict(state_dict["aggregator"])
        self._next = int(state_dict["next"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(<{len(self.params)} tensors>, beta={self.beta!r})"

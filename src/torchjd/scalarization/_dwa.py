from typing import Any

import torch
from torch import Tensor

from torchjd._stateful import Stateful
from torchjd.scalarization._scalarizer import Scalarizer
from torchjd.scalarization._utils import check_values, check_values_tensor


class DWA(Scalarizer, Stateful):
    r"""Dynamic Weight Average: weights each value by how slowly it decreased over the last epochs.

    From `End-to-End Multi-Task Learning with Attention <https://arxiv.org/abs/1803.10704>`_ (Liu,
    Johns and Davison, CVPR 2019). Let :math:`\bar L(e)` be the average of the values over the
    batches of epoch :math:`e`. During epoch :math:`t`, with :math:`T` the temperature,

    .. math::

        r_k = \frac{\bar L_k(t-1)}{\bar L_k(t-2)}, \qquad
        \lambda_k = K \, \frac{\exp(r_k / T)}{\sum_{i=1}^K \exp(r_i / T)}, \qquad
        \text{result} = \sum_{k=1}^K \lambda_k L_k.

    The weights sum to :math:`K` (a value whose loss decreased more slowly gets more weight). They
    are computed from the detached history only: the gradient with respect to :math:`L` is
    :math:`\lambda`. During the first two epochs (fewer than two epoch averages are known),
    :math:`\lambda = 1` and the result is the plain sum.

    Usage: call the scalarizer on every batch and :meth:`step` once at the end of every epoch.
    The epoch averages are running sums of the detached values divided by the number of batches;
    only the two most recent averages are kept. The shape of the values must not change within an
    epoch, nor between the epochs whose averages are used (``ValueError``). Negative values work if
    each one keeps the same sign (so that the ratios stay positive).

    :param temperature: the temperature :math:`T`, in :math:`(0, \infty)`; default ``2.0``. A large
        temperature makes the weights closer to uniform.

    >>> import torch
    >>> from torchjd.scalarization import DWA
    >>> dwa = DWA()
    >>> dwa(torch.tensor([1.0, 1.0]))
    tensor(2.)
    >>> dwa.step()
    >>> dwa(torch.tensor([1.0, 4.0]))
    tensor(5.)
    >>> dwa.step()
    >>> dwa(torch.tensor([3.0, 5.0]))
    tensor(9.2703)
    """

    # With `present`, the running sums and counts of the absent values, and their averages, are
    # left as they were; a value absent from a whole epoch keeps its last average.
    _task_state = (
        ("_loss_sum", 1, 0.0),
        ("_counts", 1, 0.0),
        ("_older", 1, 1.0),
        ("_newer", 1, 1.0),
    )

    def __init__(self, temperature: float = 2.0) -> None:
        super().__init__()
        self.temperature = temperature
        self._loss_sum: Tensor | None = None
        self._counts: Tensor | None = None  # per value: the batches where it was present
        self._n_batches: int = 0
        self._older: Tensor | None = None
        self._newer: Tensor | None = None

    @property
    def _previous_averages(self) -> list[Tensor]:
        """The (at most two) most recent epoch averages, oldest first."""
        return [a for a in (self._older, self._newer) if a is not None]

    @_previous_averages.setter
    def _previous_averages(self, averages: list[Tensor]) -> None:
        padded = [None, None, *averages][-2:]
        self._older, self._newer = padded

    @property
    def temperature(self) -> float:
        return self._temperature

    @temperature.setter
    def temperature(self, temperature: float) -> None:
        if not temperature > 0.0:
            raise ValueError(f"`temperature` must be positive, got {temperature}.")
        self._temperature = temperature

    def forward(self, values: Tensor, /) -> Tensor:
        check_values_tensor(values)
        weights = self._weights(values)
        if self._loss_sum is not None and self._loss_sum.shape != values.shape:
            raise ValueError(
                "The shape of `values` changed within an epoch: the running sum has shape "
                f"{tuple(self._loss_sum.shape)} but `values` has shape {tuple(values.shape)}. "
                "Call `step()` at the end of each epoch."
            )
        check_values(values)

        detached = values.detach()
        if self._loss_sum is None:
            self._loss_sum = detached.clone()
            self._counts = torch.ones_like(detached)
        else:
            self._loss_sum = self._loss_sum.to(values.device) + detached
            self._counts = self._counts.to(values.device) + 1  # type: ignore[union-attr]
        self._n_batches += 1
        return (weights * values).sum()

    def _weights(self, values: Tensor) -> Tensor:
        if len(self._previous_averages) < 2:
            return torch.ones_like(values)
        older, newer = self._previous_averages
        for average in (older, newer):
            if average.shape != values.shape:
                raise ValueError(
                    "The weights of DWA come from the epoch averages of the values, of shape "
                    f"{tuple(average.shape)}, but `values` has shape {tuple(values.shape)}."
                )
        rates = (newer.to(values.device) / older.to(values.device)).flatten()
        # A value not yet averaged over an epoch (absent so far) has a neutral rate.
        rates = torch.where(rates.isnan(), 1.0, rates)
        k = values.numel()
        weights = k * torch.softmax(rates / self.temperature, dim=0)
        return weights.reshape(values.shape).to(values.dtype)

    def step(self) -> None:
        """End the current epoch: store the average of its values (no-op if there was no call)."""
        if self._loss_sum is None:
            return
        counts = self._n_batches if self._counts is None else self._counts
        average = self._loss_sum / counts
        if self._counts is not None and bool((self._counts == 0).any()):
            # A value absent from the whole epoch keeps its last average (NaN if it has none).
            last = self._newer if self._newer is not None else torch.full_like(average, torch.nan)
            average = torch.where(self._counts > 0, average, last.to(average.device))
        self._previous_averages = [*self._previous_averages, average][-2:]
        self._loss_sum = None
        self._counts = None
        self._n_batches = 0

    def reset(self) -> None:
        """Forget the running sum, the batch count and the epoch averages."""
        self._loss_sum = None
        self._counts = None
        self._n_batches = 0
        self._previous_averages = []

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "loss_sum": None if self._loss_sum is None else self._loss_sum.clone(),
            "counts": None if self._counts is None else self._counts.clone(),
            "n_batches": self._n_batches,
            "previous_averages": [average.clone() for average in self._previous_averages],
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        loss_sum = state["loss_sum"]
        self._loss_sum = None if loss_sum is None else loss_sum.clone()
        self._n_batches = int(state["n_batches"])
        counts = state.get("counts")
        if counts is None and self._loss_sum is not None:  # saved before per-value counts
            counts = torch.full_like(self._loss_sum, float(self._n_batches))
        self._counts = None if counts is None else counts.clone()
        self._previous_averages = [average.clone() for average in state["previous_averages"]]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(temperature={self.temperature})"

import torch
from torch import Tensor

from torchjd._precision import promoted
from torchjd._stateful import Stateful
from torchjd.aggregation._bases import Weighting
from torchjd.aggregation._lazy_state import LazyStateMixin, warn_reinitialised
from torchjd.linalg._matrix import Matrix
from torchjd.linalg._nonfinite import finite_part, poison
from torchjd.linalg._simplex import project_onto_simplex


class MoDoWeighting(LazyStateMixin, Weighting[Matrix], Stateful):
    r"""Multi-objective gradient with double sampling (MoDo): one projected gradient step on the
    task weights per call.

    From `Three-Way Trade-Off in Multi-Objective Learning: Optimization, Generalization and
    Conflict-Avoidance <https://jmlr.org/papers/v25/23-1287.html>`_ (L. Chen et al., JMLR 25,
    2024). The input is the ``[m, m]`` cross-batch matrix :math:`M = J_1 J_2^\top` of the
    Jacobians of two independent mini-batches (not symmetric in general; a Gramian
    :math:`J J^\top` also works). With the stored weights :math:`\lambda` (uniform at the first
    call), each call does

    .. math::

        \lambda \leftarrow \Pi_\Delta\big(\lambda - \gamma (M \lambda + \rho \lambda)\big)

    where :math:`\Pi_\Delta` is the Euclidean projection onto the probability simplex, stores
    :math:`\lambda` and returns it. Only ``M.shape[0]`` is used as :math:`m`; shape and symmetry are
    not checked.

    :param gamma: step size :math:`\gamma > 0` of the weight update (default ``0.1``).
    :param rho: regularisation :math:`\rho \ge 0` (default ``0.1``).

    In float16 and bfloat16 the step is computed in float32 (see :mod:`torchjd._precision`) and the
    weights are returned in the input's dtype.

    State: :math:`\lambda`, a tensor in the input's working dtype (float32 for half-precision
    inputs, the input's dtype otherwise) that follows the input's device. It is re-initialised to
    uniform (with a warning) when the number of rows or the working dtype changes;
    :meth:`reset` clears it. Runs under :func:`torch.no_grad` (the weights are an optimiser state,
    not a function to differentiate through).

    >>> import torch
    >>> from torchjd.aggregation import MoDoWeighting
    >>> MoDoWeighting()(torch.zeros(3, 3))
    tensor([0.3333, 0.3333, 0.3333])
    """

    _task_state = (("_weights", 1, "mean"),)

    def __init__(self, gamma: float = 0.1, rho: float = 0.1) -> None:
        super().__init__()
        self.gamma = gamma
        self.rho = rho
        self.register_buffer("_weights", torch.empty(0), persistent=True)

    @property
    def gamma(self) -> float:
        return self._gamma

    @gamma.setter
    def gamma(self, value: float) -> None:
        if not value > 0:
            raise ValueError(f"`gamma` must be > 0, got {value!r}.")
        self._gamma = value

    @property
    def rho(self) -> float:
        return self._rho

    @rho.setter
    def rho(self, value: float) -> None:
        if not value >= 0:
            raise ValueError(f"`rho` must be >= 0, got {value!r}.")
        self._rho = value

    def reset(self) -> None:
        self._weights = torch.empty(0)

    @torch.no_grad()
    def forward(self, stat: Tensor, /) -> Tensor:
        m = stat.shape[0]
        if m == 0:
            raise ValueError("`MoDoWeighting` needs at least one objective, got a 0-row input.")
        matrix, nan_where_non_finite = finite_part(promoted(stat))
        previous = self._current_weights(m, matrix)
        gradient = matrix @ previous + self.rho * previous
        lam = project_onto_simplex(previous - self.gamma * gradient)
        # A non-finite input leaves the state as it was and gives NaN weights (the projection
        # onto the simplex would hide it).
        self._weights = torch.where(nan_where_non_finite.isnan(), previous, lam)
        return poison(lam, nan_where_non_finite).to(dtype=stat.dtype, copy=True)

    def _current_weights(self, m: int, stat: Tensor) -> Tensor:
        lam = self._weights
        if lam.numel() > 0 and (lam.shape[0] != m or lam.dtype != stat.dtype):
            warn_reinitialised(
                type(self).__name__, f"{lam.shape[0]} rows, {lam.dtype}", f"{m} rows, {stat.dtype}"
            )
            lam = torch.empty(0)
        if lam.numel() == 0:
            return torch.full((m,), 1.0 / m, dtype=stat.dtype, device=stat.device)
        return lam.to(device=stat.device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(gamma={self.gamma!r}, rho={self.rho!r})"

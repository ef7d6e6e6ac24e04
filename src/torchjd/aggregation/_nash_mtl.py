import torch
from torch import Tensor

from torchjd._stateful import Stateful
from torchjd.aggregation._bases import Forwarded, GramianWeightedAggregator, NoGrad, Weighting
from torchjd.aggregation._fairgrad import solve_fair_weights
from torchjd.aggregation._lazy_state import LazyStateMixin, warn_reinitialised
from torchjd.linalg._matrix import PSDMatrix

# Newton steps allowed per unit of ``optim_niter`` (the default 20 gives 100).
_NEWTON_STEPS_PER_OPTIM_ITER = 5


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`{name}` must be an integer > 0, got {value!r}.")


class _NashMTLWeighting(LazyStateMixin, Weighting[PSDMatrix], Stateful):
    """The weights of :class:`NashMTL` (see there), from the Gramian of the matrix."""

    _task_counts = ("n_tasks",)
    _task_state = (("_previous", 1, "mean"),)

    _extra_state_names = ("_step",)

    def __init__(
        self, n_tasks: int, max_norm: float, update_weights_every: int, optim_niter: int
    ) -> None:
        super().__init__()
        self.n_tasks = n_tasks
        self.max_norm = max_norm
        self.update_weights_every = update_weights_every
        self.optim_niter = optim_niter
        self.register_buffer("_previous", torch.empty(0, dtype=torch.float64), persistent=True)
        self._step = 0

    @property
    def n_tasks(self) -> int:
        return self._n_tasks

    @n_tasks.setter
    def n_tasks(self, value: int) -> None:
        _check_positive_int("n_tasks", value)
        self._n_tasks = value

    @property
    def max_norm(self) -> float:
        return self._max_norm

    @max_norm.setter
    def max_norm(self, value: float) -> None:
        if not value >= 0:
            raise ValueError(f"`max_norm` must be >= 0 (0 disables the clipping), got {value!r}.")
        self._max_norm = value

    @property
    def update_weights_every(self) -> int:
        return self._update_weights_every

    @update_weights_every.setter
    def update_weights_every(self, value: int) -> None:
        _check_positive_int("update_weights_every", value)
        self._update_weights_every = value

    @property
    def optim_niter(self) -> int:
        return self._optim_niter

    @optim_niter.setter
    def optim_niter(self, value: int) -> None:
        _check_positive_int("optim_niter", value)
        self._optim_niter = value

    def reset(self) -> None:
        self._previous = torch.empty(0, dtype=torch.float64)
        self._step = 0

    @torch.no_grad()
    def forward(self, stat: Tensor, /) -> Tensor:
        m = stat.shape[0]
        if m != self.n_tasks:
            raise ValueError(
                f"`n_tasks` is {self.n_tasks} but the matrix has {m} rows (objectives): create "
                f"the aggregator with `n_tasks={m}` (and call `reset()` after changing it)."
            )
        previous = self._previous
        if previous.numel() > 0 and previous.shape[0] != m:
            warn_reinitialised("NashMTL", f"{previous.shape[0]} rows", f"{m} rows")
            self._previous = previous = torch.empty(0, dtype=torch.float64)
            self._step = 0

        if self._step % self.update_weights_every == 0 or previous.numel() == 0:
            max_iters = _NEWTON_STEPS_PER_OPTIM_ITER * self.optim_niter
            previous = solve_fair_weights(stat, 1.0, max_iters)
            self._previous = previous
        self._step += 1

        weights = previous.to(dtype=stat.dtype, device=stat.device, copy=True)
        if self.max_norm > 0:
            # ||J^T w|| from the Gramian, clipped to max_norm without reading it on the host.
            norm = torch.sqrt(torch.clamp(weights @ stat @ weights, min=0.0))
            too_long = norm > self.max_norm
            scale = self.max_norm / torch.where(too_long, norm, torch.ones_like(norm))
            weights = weights * torch.where(too_long, scale, torch.ones_like(scale))
        return weights


class NashMTL(NoGrad, GramianWeightedAggregator, Stateful):
    r"""Nash-MTL: the rows weighted by the Nash bargaining solution among the tasks.

    From `Multi-Task Learning as a Bargaining Game <https://arxiv.org/abs/2202.01017>`_
    (A. Navon et al., ICML 2022), Algorithm 1. With :math:`\Gamma = J J^\top`, the weights
    :math:`\alpha > 0` solve the bargaining condition

    .. math:: \alpha \odot (\Gamma \alpha) = \mathbf 1,

    i.e. :math:`\alpha_i \, g_i^\top (J^\top \alpha) = 1` for every task. They are recomputed every
    ``update_weights_every`` calls (the first call always solves) and reused in between. On every
    call, if ``max_norm > 0`` and :math:`\|J^\top \alpha\| > \mathrm{max\_norm}`, :math:`\alpha` is
    rescaled so that :math:`\|J^\top \alpha\| = \mathrm{max\_norm}`. Returns :math:`J^\top \alpha`.

    Solver: TorchJD approximates the solution by a sequence of convex problems solved with cvxpy
    and ECOS, whose fixed point is the root above (it equals
    :class:`FairGradWeighting` with ``alpha=1``). This implementation needs no optional dependency:
    it computes that root directly with the torch-native Newton solver of :class:`FairGrad`, in
    float64 on the Gramian's device, with at most ``5 * optim_niter`` Newton steps (it usually
    converges in fewer than 10). Results agree with TorchJD's to its solver tolerance on
    full-rank inputs; solver-failure paths of the reference are not reproduced. Where no root
    exists (Pareto-stationary rows: a zero row, two opposite rows, rows with 0 in their convex
    hull), the limit of the aggregate is returned, as in :class:`FairGradWeighting`: the
    stationary rows are projected out and the others share the update fairly, so the result
    conflicts with no row; e.g. ``[[0, 0], [0, 1]]`` gives ``[0, 1]`` (in every dtype), rows with
    0 in their convex hull give zeros, and so does the zero matrix, where the reference fails
    inside cvxpy. Near such points, an unreached root is replaced by the scaled min-norm
    direction, which conflicts with no row (see :class:`FairGradWeighting`).

    :param n_tasks: the number of rows :math:`m` expected, ``> 0`` (another number of rows raises
        ``ValueError``).
    :param max_norm: the maximum norm of the output, ``>= 0``; ``0`` disables the clipping
        (default ``1.0``).
    :param update_weights_every: recompute the weights every this many calls, ``> 0`` (default
        ``1``).
    :param optim_niter: the iteration budget of the solver, ``> 0`` (default ``20``).

    State: the step count and the last solved weights (float64, on the input's device).
    :meth:`reset` restores the freshly constructed behaviour; changing a parameter does not reset
    the state. Not differentiable (runs under :func:`torch.no_grad`). The whole computation needs
    only the Gramian, so this is a :class:`GramianWeightedAggregator`.

    >>> import torch
    >>> from torchjd.aggregation import NashMTL
    >>> NashMTL(n_tasks=2)(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([0.0542, 0.7061, 0.7061])
    """

    def __init__(
        self,
        n_tasks: int,
        max_norm: float = 1.0,
        update_weights_every: int = 1,
        optim_niter: int = 20,
    ) -> None:
        super().__init__(_NashMTLWeighting(n_tasks, max_norm, update_weights_every, optim_niter))

    n_tasks = Forwarded[int]()
    max_norm = Forwarded[float]()
    update_weights_every = Forwarded[int]()
    optim_niter = Forwarded[int]()

    def reset(self) -> None:
        self.gramian_weighting.reset()

"""Gradient Vaccine: move conflicting gradients towards an adaptive cosine-similarity target."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache

import torch
from torch import Tensor

from torchjd._host_values import host_tensor
from torchjd._permutations import permuted, randperm_rows
from torchjd._precision import working_dtype
from torchjd._stateful import Stateful
from torchjd.aggregation._bases import Forwarded, GramianWeightedAggregator, NoGrad, Weighting
from torchjd.aggregation._lazy_state import LazyStateMixin, warn_reinitialised
from torchjd.aggregation._pcgrad import _step_indices
from torchjd.linalg._matrix import PSDMatrix
from torchjd.linalg._nonfinite import finite_part, poison

# Up to this many tasks, one Gramian on the CPU is weighed with Python numbers (see _on_host).
_HOST_MAX_M = 8


def _draw_orders(n_problems: int, m: int) -> Tensor:
    """Draw GradVac's visiting orders, shape ``[n_problems, m, m - 1]``, on the CPU.

    For each problem in turn and for ``i = 0, ..., m - 1``, one ``torch.randperm(m - 1)`` on the
    global CPU generator (TorchJD's order of draws, so a seed gives the same numbers), which orders
    the other tasks ``[0, ..., i - 1, i + 1, ..., m - 1]``: entry ``k`` is task ``k + (k >= i)``.
    """
    permutations = randperm_rows(n_problems * m, max(m - 1, 0))
    if m <= 1 or n_problems == 0:
        return torch.zeros(n_problems, m, max(m - 1, 0), dtype=torch.long)
    if m == 2:  # one partner each: task 0 visits 1, task 1 visits 0
        return _TWO_TASK_ORDERS.expand(n_problems, 2, 1)
    tasks = torch.arange(m).repeat(n_problems)[:, None]
    return (permutations + (permutations >= tasks)).view(n_problems, m, m - 1)


_TWO_TASK_ORDERS = torch.tensor([[[1], [0]]])


def _per_task(value: float | Tensor, n_problems: int, m: int, like: Tensor) -> Tensor:
    """A hyper-parameter as a vector over the ``n_problems * m`` tasks (one value per problem)."""
    if isinstance(value, Tensor):
        per_problem = value.to(dtype=like.dtype, device=like.device).reshape(n_problems)
        return per_problem.repeat_interleave(m)
    return torch.full((n_problems * m,), value, dtype=like.dtype, device=like.device)


def _gradvac_weights(
    gramian: Tensor,
    phi_hat: Tensor,
    orders: Tensor,
    beta: float | Tensor,
    eps: float | Tensor,
) -> tuple[Tensor, Tensor]:
    """:func:`_finite_gradvac_weights`, with NaN weights and untouched targets for the Gramians
    that hold an infinity or a NaN (whose comparisons with the targets would all be False, which
    would give weights of 1)."""
    safe, nan_where_non_finite = finite_part(gramian)
    weights, new_phi_hat = _finite_gradvac_weights(safe, phi_hat, orders, beta, eps)
    skipped = torch.isnan(nan_where_non_finite)[..., None, None]
    return poison(weights, nan_where_non_finite), torch.where(skipped, phi_hat, new_phi_hat)


def _finite_gradvac_weights(
    gramian: Tensor,
    phi_hat: Tensor,
    orders: Tensor,
    beta: float | Tensor,
    eps: float | Tensor,
) -> tuple[Tensor, Tensor]:
    r"""GradVac's weights for a batch of Gramians ``[..., m, m]`` and the updated targets.

    Task ``i``'s modified gradient is :math:`g_i^{PC} = \sum_k C_{ik} g_k`, with :math:`C = I` at
    first. When it visits ``j``, with :math:`a = \|g_i^{PC}\|`, :math:`b = \|g_j\|`,
    :math:`\phi = g_i^{PC} \cdot g_j / (a b + \epsilon)` and :math:`\hat\phi = \hat\Phi_{ij}`: if
    :math:`\phi < \hat\phi`, then :math:`C_{ij}` grows by

    .. math::

        \omega = \frac{a \left(\hat\phi \sqrt{1 - \phi^2} - \phi \sqrt{1 - \hat\phi^2}\right)}
                      {b \sqrt{1 - \hat\phi^2} + \epsilon};

    in every case :math:`\hat\Phi_{ij} \leftarrow (1 - \beta) \hat\phi + \beta \phi`. The weights
    are the column sums of ``C``. All tasks (of all problems) take their ``s``-th step at once; only
    the ``m - 1`` steps are sequential. ``P = C G`` and :math:`\|g_i^{PC}\|^2` are updated instead
    of ``C``, whose only off-diagonal entries are the recorded corrections.

    Where the sequential definition divides by zero (only possible with ``eps = 0``) the quotient is
    replaced by 0, so the result stays finite.

    :param gramian: the Gramians ``[..., m, m]``.
    :param phi_hat: the targets ``[..., m, m]`` (same dtype and device; the diagonal is unused).
    :param orders: the visiting orders ``[..., m, m - 1]``, on any device (moved once).
    :param beta: the EMA rate, a float or one value per Gramian (shape ``[...]``).
    :param eps: the stabiliser of the divisions, a float or one value per Gramian.
    :return: the weights ``[..., m]`` and the new targets ``[..., m, m]``.
    """
    *batch, m, _ = gramian.shape
    n_problems = math.prod(batch)
    n_tasks = n_problems * m
    if m <= 1:
        return torch.ones(*batch, m, dtype=gramian.dtype, device=gramian.device), phi_hat
    if m == 2:
        return _two_tasks(gramian, phi_hat, beta, eps)
    rows, entries = _step_indices(orders.reshape(-1, m, m - 1), gramian.device)
    stacked = gramian.reshape(n_tasks, m)
    squared_norms = gramian.diagonal(dim1=-2, dim2=-1).reshape(n_tasks)
    partner_squared_norms = squared_norms[rows]  # ||g_j||^2 at each step, [m - 1, n_tasks]
    partner_norms = partner_squared_norms.clamp(min=0.0).sqrt()  # b
    eps_per_task = _per_task(eps, n_problems, m, gramian)
    # The targets read at each step: each pair (i, j) is visited once, so they are read up front.
    targets = phi_hat.reshape(-1)[entries]  # phi_hat
    target_sines = (1.0 - targets.square()).clamp_(min=0.0).sqrt_()  # sqrt(1 - phi_hat^2)
    omega_denominators = torch.addcmul(eps_per_task, partner_norms, target_sines)
    inverse_omega_denominators = torch.where(
        omega_denominators > 0, omega_denominators.reciprocal(), 0.0
    )
    guard_zero_division = not (isinstance(eps, float) and eps > 0.0)

    products = stacked.clone()  # P = C G with C = I
    flat_products = products.view(-1)
    norms_pc_squared = squared_norms.clone()  # ||g_i^PC||^2
    ones = torch.ones(n_tasks, dtype=gramian.dtype, device=gramian.device)
    zero = torch.zeros((), dtype=gramian.dtype, device=gramian.device)
    partner_rows = torch.empty_like(stacked)
    cosines = torch.empty(m - 1, n_tasks, dtype=gramian.dtype, device=gramian.device)
    corrections = torch.empty_like(cosines)
    # One view per step of every per-step tensor, made once (indexing in the loop costs time).
    steps = zip(
        entries.unbind(0),
        rows.unbind(0),
        partner_norms.unbind(0),
        partner_squared_norms.unbind(0),
        targets.unbind(0),
        target_sines.unbind(0),
        inverse_omega_denominators.unbind(0),
        cosines.unbind(0),
        corrections.unbind(0),
        corrections.unsqueeze(-1).unbind(0),
    )
    for entry, row, b, b_squared, target, target_sine, inverse, phi, omega, omega_column in steps:
        inner = flat_products.index_select(0, entry)  # g_i^PC . g_j
        a = norms_pc_squared.clamp(min=0.0).sqrt_()  # ||g_i^PC||
        phi_denominator = torch.addcmul(eps_per_task, a, b)
        torch.div(inner, phi_denominator, out=phi)
        if guard_zero_division:
            phi.copy_(torch.where(phi_denominator > 0, phi, 0.0))
        sine = torch.addcmul(ones, phi, phi, value=-1.0).clamp_(min=0.0).sqrt_()
        candidate = sine.mul_(target).addcmul_(phi, target_sine, value=-1.0)
        candidate.mul_(a).mul_(inverse)
        torch.where(phi < target, candidate, zero, out=omega)
        torch.index_select(stacked, 0, row, out=partner_rows)
        products.addcmul_(omega_column, partner_rows)
        # ||g + omega g_j||^2 = ||g||^2 + 2 omega (g . g_j + omega ||g_j||^2 / 2)
        half_update = torch.addcmul(inner, omega, b_squared, value=0.5)
        norms_pc_squared.addcmul_(omega, half_update, value=2.0)

    weights = torch.ones(n_tasks, dtype=gramian.dtype, device=gramian.device)
    weights.index_add_(0, rows.reshape(-1), corrections.reshape(-1))
    beta_per_task = beta if isinstance(beta, float) else _per_task(beta, n_problems, m, gramian)
    new_targets = targets * (1.0 - beta_per_task) + beta_per_task * cosines
    new_phi_hat = phi_hat.reshape(-1).clone()
    new_phi_hat.index_copy_(0, entries.reshape(-1), new_targets.reshape(-1))
    return weights.view(*batch, m), new_phi_hat.view(phi_hat.shape)


def _two_tasks(
    gramian: Tensor, phi_hat: Tensor, beta: float | Tensor, eps: float | Tensor
) -> tuple[Tensor, Tensor]:
    """:func:`_gradvac_weights` for ``m = 2``: each task has one step, against the other's
    original gradient, so both steps are computed at once, in the same order of operations."""
    batch = gramian.shape[:-2]
    if isinstance(eps, Tensor):
        eps = eps.to(dtype=gramian.dtype, device=gramian.device).view(*batch, 1)
    if isinstance(beta, Tensor):
        beta = beta.to(dtype=gramian.dtype, device=gramian.device).view(*batch, 1)
    norms = gramian.diagonal(dim1=-2, dim2=-1).clamp(min=0.0).sqrt_()  # a of each task
    partner_norms = norms.flip(-1)  # b
    # (M_01, M_10) of a 2 x 2 M, by basic indexing (index tensors would be copied to the device).
    inner = gramian.flip(-1).diagonal(dim1=-2, dim2=-1)  # g_i . g_j
    targets = phi_hat.flip(-1).diagonal(dim1=-2, dim2=-1)
    guard_zero_division = not (isinstance(eps, float) and eps > 0.0)
    phi_denominator = norms * partner_norms + eps
    phi = inner / phi_denominator
    if guard_zero_division:
        phi = torch.where(phi_denominator > 0, phi, 0.0)
    # 1 - x as torch.rsub (the operator form goes through a slower Python wrapper).
    target_sines = torch.rsub(targets.square(), 1.0).clamp_(min=0.0).sqrt_()
    omega_denominator = partner_norms * target_sines + eps
    sines = torch.rsub(phi.square(), 1.0).clamp_(min=0.0).sqrt_()
    candidate = torch.addcmul(sines * targets, phi, target_sines, value=-1.0).mul_(norms)
    if guard_zero_division:
        candidate.mul_(torch.where(omega_denominator > 0, omega_denominator.reciprocal(), 0.0))
    else:  # b sqrt(1 - phi_hat^2) + eps > 0
        candidate.div_(omega_denominator)
    omega = torch.where(phi < targets, candidate, 0.0)
    new_targets = targets * (1.0 - beta) + beta * phi
    # The new targets off the diagonal (an anti-diagonal matrix), the old diagonal kept.
    new_phi_hat = torch.diagonal_scatter(
        torch.diag_embed(new_targets).flip(-1), phi_hat.diagonal(dim1=-2, dim2=-1), 0, -2, -1
    )
    return omega.flip(-1).add_(1.0), new_phi_hat


@cache
def _other_tasks(m: int) -> list[list[int]]:
    """For each task ``i``, the other tasks ``[0, ..., i - 1, i + 1, ..., m - 1]``."""
    return [[k + (k >= i) for k in range(m - 1)] for i in range(m)]


def _on_host(gramian: Tensor, phi_hat: Tensor, beta: float, eps: float) -> tuple[Tensor, Tensor]:
    """:func:`_gradvac_weights` of one small Gramian on the CPU, with Python numbers (in double
    precision), drawing the visiting orders as :func:`_draw_orders` does: reading a CPU tensor
    synchronises with nothing, and the ``m (m - 1)`` steps, of ``O(m)`` scalar operations each,
    cost less than the tensor operations of the vectorised kernel for ``m <= _HOST_MAX_M``.
    Returns the weights and the new targets, in ``gramian``'s dtype."""
    m = gramian.shape[0]
    # The draws of _draw_orders; torch.randperm(1) leaves the generator as it is: two tasks need
    # none.
    orders = permuted(_other_tasks(m)) if m > 2 else _TWO_TASK_ORDER_LISTS
    g = gramian.tolist()
    if not math.isfinite(sum(map(sum, g))):  # NaN weights, targets left as they were
        return torch.full((m,), math.nan, dtype=gramian.dtype), phi_hat
    targets = phi_hat.tolist()  # updated in place: each pair (i, j) is read once, then written
    weights = _pair_steps(g, targets, orders, beta, eps)
    new_phi_hat = host_tensor([x for row in targets for x in row], phi_hat.dtype).view(m, m)
    return host_tensor(weights, gramian.dtype), new_phi_hat


def _pair_steps(
    g: list[list[float]],
    targets: list[list[float]],
    orders: Sequence[Sequence[int]],
    beta: float,
    eps: float,
) -> list[float]:
    """The weights of the ``m (m - 1)`` steps of :func:`_on_host`; ``targets[i][j]`` becomes the
    new target of each visited pair. This loop is the whole cost of a call: names are local and
    ``sqrt`` of a positive part is written out."""
    sqrt = math.sqrt
    keep = 1.0 - beta
    norms = [sqrt(row[j]) if row[j] > 0.0 else 0.0 for j, row in enumerate(g)]
    weights = [1.0] * len(g)
    for i, order in enumerate(orders):
        row = g[i]  # g_i . g_k for every k
        # The corrections so far, (omega, g_j . g_k for every k): g_i^PC . g_k is row[k] plus
        # their terms, added in order (the very sums that updating all the products after each
        # correction would make, without the entries that are never read again).
        corrections: list[tuple[float, list[float]]] = []
        squared_norm = row[i]  # ||g_i^PC||^2
        a = sqrt(squared_norm) if squared_norm > 0.0 else 0.0
        row_targets = targets[i]
        for j in order:
            inner = row[j]  # g_i^PC . g_j
            for earlier_omega, earlier_partner in corrections:
                inner += earlier_omega * earlier_partner[j]
            b = norms[j]
            target = row_targets[j]
            phi_denominator = a * b + eps
            phi = inner / phi_denominator if phi_denominator > 0.0 else 0.0
            if phi < target:
                target_cosine_gap = 1.0 - target * target
                target_sine = sqrt(target_cosine_gap) if target_cosine_gap > 0.0 else 0.0
                omega_denominator = b * target_sine + eps
                if omega_denominator > 0.0:
                    cosine_gap = 1.0 - phi * phi
                    sine = sqrt(cosine_gap) if cosine_gap > 0.0 else 0.0
                    omega = a * (target * sine - phi * target_sine) / omega_denominator
                    weights[j] += omega
                    partner = g[j]
                    # ||g + omega g_j||^2 = ||g||^2 + 2 omega (g . g_j + omega ||g_j||^2 / 2)
                    squared_norm += 2.0 * omega * (inner + 0.5 * omega * partner[j])
                    a = sqrt(squared_norm) if squared_norm > 0.0 else 0.0
                    corrections.append((omega, partner))
            row_targets[j] = target * keep + beta * phi
    return weights


# Two tasks: one partner each, no draw.
_TWO_TASK_ORDER_LISTS = ((1,), (0,))


def _check_beta(beta: float) -> float:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"`beta` must be in [0, 1], got {beta!r}.")
    return beta


def _check_eps(eps: float) -> float:
    if not eps >= 0.0:
        raise ValueError(f"`eps` must be a non-negative number, got {eps!r}.")
    return eps


class GradVacWeighting(NoGrad, LazyStateMixin, Weighting[PSDMatrix], Stateful):
    r"""Weighting of :class:`GradVac`: the weights ``w`` such that ``w @ J`` is the sum of the
    vaccinated gradients.

    The algorithm only needs inner products, so it runs on the Gramian :math:`G = J J^\top`. Each
    task ``i`` visits the other tasks ``j`` in a random order; with :math:`g_i^{PC}` its current
    gradient, :math:`\phi = \cos(g_i^{PC}, g_j)` and :math:`\hat\phi_{ij}` the target kept from
    earlier calls, if :math:`\phi < \hat\phi_{ij}` it adds to :math:`g_i^{PC}`

    .. math::

        \frac{\|g_i^{PC}\| \left(\hat\phi_{ij} \sqrt{1 - \phi^2} - \phi \sqrt{1 -
        \hat\phi_{ij}^2}\right)}{\|g_j\| \sqrt{1 - \hat\phi_{ij}^2} + \epsilon} \, g_j,

    which moves its cosine with :math:`g_j` up to the target; then (whether or not it corrected)
    :math:`\hat\phi_{ij} \leftarrow (1 - \beta) \hat\phi_{ij} + \beta \phi`. Cosines use
    :math:`g_i^{PC} \cdot g_j / (\|g_i^{PC}\| \|g_j\| + \epsilon)`; norms are clamped at 0 before
    the square root. The weights are the coefficients of :math:`\sum_i g_i^{PC}` on the original
    gradients. With zero targets (the first call, or ``beta = 0``) a correction is exactly a PCGrad
    projection up to :math:`\epsilon`.

    State: the targets :math:`\hat\Phi` (``[m, m]``, zeros at first, in the input's dtype, float32
    for half precision, on the input's device). They are re-created as zeros when ``m`` or the
    dtype changes (with a warning when this discards targets of an earlier call) and follow the
    input's device. :meth:`reset` forgets them. ``state_dict()`` of a used instance loads into a
    fresh one.

    Randomness: for ``i = 0, ..., m - 1``, one ``torch.randperm(m - 1)`` on the global CPU
    generator, whatever the input's device (the order of TorchJD, so a seed gives the same numbers;
    all of a call's draws are replayed from one random call, with the same values); the drawn
    indices are moved to the input's device once per call and the computation stays there, without
    host synchronisation. With at most 8 tasks on the CPU (where reading values
    synchronises with nothing), a call is computed with Python numbers in double precision
    instead, with the same draws: its ``m (m - 1)`` steps are cheaper as scalar operations than as
    tensor ones. Not differentiable: runs under :func:`torch.no_grad`.

    Half precision: float16 and bfloat16 Gramians are computed in float32 (``eps`` would underflow
    and the norms overflow), and so are the stored targets; the weights are in the input's dtype.

    :param beta: EMA rate of the targets, the weight of the new cosine, in ``[0, 1]``
        (default ``0.5``); ``0`` keeps the targets at 0 forever.
    :param eps: non-negative stabiliser added to the denominators (default ``1e-8``). With
        ``eps = 0`` a division by zero (zero rows) gives 0 instead of ``nan``.
    """

    _task_state = (("phi_hat", 2, 0.0),)

    randomized = True

    def __init__(self, beta: float = 0.5, eps: float = 1e-8) -> None:
        super().__init__()
        self.beta = beta
        self.eps = eps
        # Empty (1-D) until the first call; [m, m] afterwards.
        self.register_buffer("phi_hat", torch.zeros(0), persistent=True)

    @property
    def beta(self) -> float:
        return self._beta

    @beta.setter
    def beta(self, value: float) -> None:
        self._beta = _check_beta(value)

    @property
    def eps(self) -> float:
        return self._eps

    @eps.setter
    def eps(self, value: float) -> None:
        self._eps = _check_eps(value)

    def reset(self) -> None:
        """Forget the targets: the next call behaves as the first call of a fresh instance."""
        self.phi_hat = torch.zeros(0, device=self.phi_hat.device)

    def forward(self, stat: Tensor, /) -> Tensor:
        m, dtype = stat.shape[0], stat.dtype
        phi_hat = self._targets_for(m, dtype, stat.device)
        if 2 <= m <= _HOST_MAX_M and stat.is_cpu:
            weights, new_phi_hat = _on_host(stat, phi_hat, self.beta, self.eps)
            self._store_buffer("phi_hat", new_phi_hat)
            return weights
        compute = working_dtype(dtype)
        weights, new_phi_hat = _gradvac_weights(
            stat[None].to(compute),
            phi_hat[None].to(compute),
            _draw_orders(1, m),
            float(self.beta),
            float(self.eps),
        )
        self.phi_hat = new_phi_hat[0].to(dtype)
        return weights[0].to(dtype)

    @classmethod
    @torch.no_grad()
    def _forward_grouped(cls, weightings: Sequence[GradVacWeighting], gramians: Tensor) -> Tensor:
        """Weights ``[b, m]`` of Gramians ``[b, m, m]``, the ``k``-th one weighted by
        ``weightings[k]`` with its own state, as ``b`` successive calls would (random orders drawn
        Gramian by Gramian); each instance's targets are updated. The instances must be distinct
        (one state per Gramian)."""
        n_problems, m = gramians.shape[0], gramians.shape[-1]
        if len(weightings) != n_problems:
            raise ValueError(
                f"Got {len(weightings)} weightings for {n_problems} Gramians: give one weighting "
                "per Gramian."
            )
        if n_problems == 0:
            return gramians.new_zeros(0, m)
        dtype = gramians.dtype
        states = [w._targets_for(m, dtype, gramians.device) for w in weightings]
        compute = working_dtype(dtype)
        weights, new_states = _gradvac_weights(
            gramians.to(compute),
            torch.stack(states).to(compute),
            _draw_orders(n_problems, m),
            _shared_or_stacked([float(w.beta) for w in weightings]),
            _shared_or_stacked([float(w.eps) for w in weightings]),
        )
        for weighting, state in zip(weightings, new_states.to(dtype)):
            # A copy each: a view would make every instance's state_dict hold the whole batch.
            weighting._store_buffer("phi_hat", state.clone())
        return weights.to(dtype)

    def _targets_for(self, m: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The stored targets, re-created as zeros if ``m`` or the dtype changed, on ``device``."""
        # From the buffer table: nn.Module.__getattr__ costs about a microsecond a call.
        phi_hat = self._buffers["phi_hat"]
        if phi_hat.ndim != 2 or phi_hat.shape[0] != m or phi_hat.dtype != dtype:
            if phi_hat.ndim == 2:
                old = f"{phi_hat.shape[0]} objectives in {phi_hat.dtype}"
                warn_reinitialised(type(self).__name__, old, f"{m} objectives in {dtype}")
            return torch.zeros(m, m, dtype=dtype, device=device)
        return phi_hat.to(device)


def _shared_or_stacked(values: list[float]) -> float | Tensor:
    """One float if all groups share the value, else one value per group."""
    if all(value == values[0] for value in values):
        return values[0]
    return torch.tensor(values, dtype=torch.float64)


class GradVac(NoGrad, GramianWeightedAggregator, Stateful):
    r"""Gradient Vaccine, from `Gradient Vaccine: Investigating and Improving Multi-task
    Optimization in Massively Multilingual Models <https://arxiv.org/abs/2010.05874>`_ (Wang et al.,
    ICLR 2021).

    Like PCGrad, each row :math:`g_i` visits the other rows :math:`g_j` in a random order, but
    instead of removing the conflict it raises the cosine similarity :math:`\phi` of
    :math:`g_i^{PC}` and :math:`g_j` to a target :math:`\hat\phi_{ij}` whenever
    :math:`\phi < \hat\phi_{ij}`, and the targets follow an exponential moving average of the
    observed cosines across calls: :math:`\hat\phi_{ij} \leftarrow (1 - \beta) \hat\phi_{ij} +
    \beta \phi`. The result is :math:`\sum_i g_i^{PC}`. Computed from the Gramian by
    :class:`GradVacWeighting` (see there for the exact update, the state and the random draws);
    stateful (:meth:`reset` forgets the targets) and not differentiable.

    :param beta: EMA rate of the targets, in ``[0, 1]`` (default ``0.5``).
    :param eps: non-negative stabiliser of the divisions (default ``1e-8``).

    >>> import torch
    >>> from torchjd.aggregation import GradVac
    >>> GradVac()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([0.5848, 3.8012, 3.8012])
    """

    def __init__(self, beta: float = 0.5, eps: float = 1e-8) -> None:
        super().__init__(GradVacWeighting(beta=beta, eps=eps))

    beta = Forwarded[float]()
    eps = Forwarded[float]()

    def reset(self) -> None:
        """Forget the targets of the weighting."""
        self.gramian_weighting.reset()

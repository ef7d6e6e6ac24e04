import torch
from torch import Tensor

from torchjd._precision import promoted
from torchjd._stateful import Stateful
from torchjd.aggregation._bases import Weighting
from torchjd.aggregation._lazy_state import LazyStateMixin, warn_reinitialised
from torchjd.aggregation._utils import check_pref_vector
from torchjd.linalg._matrix import Matrix
from torchjd.linalg._simplex import project_onto_simplex


class SDMGradWeighting(LazyStateMixin, Weighting[Matrix], Stateful):
    r"""Stochastic direction-oriented multi-objective gradient (SDMGrad) weights.

    From `Direction-oriented Multi-objective Learning: Simple and Provable Stochastic Algorithms
    <https://arxiv.org/abs/2305.18409>`_ (P. Xiao et al., NeurIPS 2023). The input is the
    ``[m, m]`` cross-batch matrix :math:`A = J_1 J_2^\top` of the Jacobians of two independent
    mini-batches (not symmetric nor PSD in general; a Gramian :math:`J J^\top` also works).

    With the preference vector :math:`\tilde w` (``pref_vector``, default uniform :math:`\frac1m
    \mathbf 1`) and the stored weights :math:`w` (uniform at the first call), one call does

    1. :math:`\sigma = \frac1m \sum_i \sqrt{\max(A_{ii}, 0)}`,
       :math:`\bar A = A / (\sigma^2 + 10^{-8})`;
    2. ``n_iter`` steps of projected gradient descent with heavy-ball momentum on
       :math:`w \mapsto \frac12 (w + \lambda \tilde w)^\top \bar A (w + \lambda \tilde w)`:
       :math:`\nabla = \bar A (w + \lambda \tilde w)`, :math:`v = \nabla` at the first step and
       :math:`v = \mathrm{momentum}\cdot v + \nabla` afterwards,
       :math:`w \leftarrow \Pi_\Delta(w - \mathrm{lr}\cdot v)` (projection onto the simplex);
    3. stores :math:`w` (the warm start of the next call; the momentum is not kept) and returns
       :math:`(w + \lambda \tilde w) / (1 + \lambda)`, on the simplex when :math:`\tilde w` is.

    :param lr: step size of the inner solver, ``> 0`` (default ``10.0``).
    :param momentum: momentum of the inner solver, in ``[0, 1)`` (default ``0.5``).
    :param n_iter: number of inner steps per call, ``>= 1`` (default ``20``).
    :param lambda_: weight :math:`\lambda \ge 0` of the preference direction (default ``0.3``, as
        in the authors' experiments and LibMTL).
    :param pref_vector: the vector :math:`\tilde w` (1-D, one entry per row, cast to the input's
        dtype and device) or ``None`` for uniform.

    In float16 and bfloat16 the call is computed in float32 (where :math:`10^{-8}` does not
    underflow; see :mod:`torchjd._precision`) and the weights are returned in the input's dtype.

    State: :math:`w`, in the input's working dtype (float32 for half-precision inputs, the input's
    dtype otherwise), following the input's device; re-initialised to uniform (with a warning)
    when the number of rows or the working dtype changes; :meth:`reset` clears it.
    Runs under :func:`torch.no_grad` (the weights come from an inner optimisation loop).
    """

    _task_vectors = ("pref_vector",)
    _task_state = (("_weights", 1, "mean"),)

    def __init__(
        self,
        lr: float = 10.0,
        momentum: float = 0.5,
        n_iter: int = 20,
        lambda_: float = 0.3,
        pref_vector: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.lr = lr
        self.momentum = momentum
        self.n_iter = n_iter
        self.lambda_ = lambda_
        self.pref_vector = pref_vector
        self.register_buffer("_weights", torch.empty(0), persistent=True)

    @property
    def lr(self) -> float:
        return self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        if not value > 0:
            raise ValueError(f"`lr` must be > 0, got {value!r}.")
        self._lr = value

    @property
    def momentum(self) -> float:
        return self._momentum

    @momentum.setter
    def momentum(self, value: float) -> None:
        if not 0 <= value < 1:
            raise ValueError(f"`momentum` must be in [0, 1), got {value!r}.")
        self._momentum = value

    @property
    def n_iter(self) -> int:
        return self._n_iter

    @n_iter.setter
    def n_iter(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`n_iter` must be an integer >= 1, got {value!r}.")
        self._n_iter = value

    @property
    def lambda_(self) -> float:
        return self._lambda

    @lambda_.setter
    def lambda_(self, value: float) -> None:
        if not value >= 0:
            raise ValueError(f"`lambda_` must be >= 0, got {value!r}.")
        self._lambda = value

    @property
    def pref_vector(self) -> Tensor | None:
        return self._pref_vector

    @pref_vector.setter
    def pref_vector(self, value: Tensor | None) -> None:
        check_pref_vector(value)
        self._pref_vector = value

    def reset(self) -> None:
        self._weights = torch.empty(0)

    @torch.no_grad()
    def forward(self, stat: Tensor, /) -> Tensor:
        m = stat.shape[0]
        if m == 0:
            raise ValueError("`SDMGradWeighting` needs at least one objective, got a 0-row input.")
        matrix = promoted(stat)
        pref = self._preference(m, matrix)
        w = self._current_weights(m, matrix)

        sigma = matrix.diagonal().clamp(min=0.0).sqrt().mean()
        a_bar = matrix / (sigma**2 + 1e-8)
        lambda_pref = self.lambda_ * pref
        velocity = None
        for _ in range(self.n_iter):
            gradient = a_bar @ (w + lambda_pref)
            velocity = gradient if velocity is None else self.momentum * velocity + gradient
            w = project_onto_simplex(w - self.lr * velocity)

        self._weights = w
        return ((w + lambda_pref) / (1.0 + self.lambda_)).to(dtype=stat.dtype)

    def _preference(self, m: int, stat: Tensor) -> Tensor:
        if self.pref_vector is None:
            return torch.full((m,), 1.0 / m, dtype=stat.dtype, device=stat.device)
        if self.pref_vector.shape[0] != m:
            raise ValueError(
                f"`pref_vector` has {self.pref_vector.shape[0]} entries but the input has {m} "
                "rows (objectives): give one entry per objective."
            )
        return self.pref_vector.to(dtype=stat.dtype, device=stat.device)

    def _current_weights(self, m: int, stat: Tensor) -> Tensor:
        w = self._weights
        if w.numel() > 0 and (w.shape[0] != m or w.dtype != stat.dtype):
            warn_reinitialised(
                type(self).__name__, f"{w.shape[0]} rows, {w.dtype}", f"{m} rows, {stat.dtype}"
            )
            w = torch.empty(0)
        if w.numel() == 0:
            return torch.full((m,), 1.0 / m, dtype=stat.dtype, device=stat.device)
        return w.to(device=stat.device)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(lr={self.lr!r}, momentum={self.momentum!r}, "
            f"n_iter={self.n_iter!r}, lambda_={self.lambda_!r}, pref_vector={self.pref_vector!r})"
        )

import torch
from torch import Tensor

from torchjd._stateful import Stateful
from torchjd.aggregation._bases import WeightedAggregator, Weighting
from torchjd.aggregation._lazy_state import LazyStateMixin, warn_reinitialised
from torchjd.linalg._matrix import Matrix

_EPS = 1e-7


class ExcessMTLWeighting(LazyStateMixin, Weighting[Matrix], Stateful):
    r"""Task weights of ExcessMTL, updated from estimated excess risks.

    From `Robust Multi-Task Learning with Excess Risks <https://arxiv.org/abs/2402.02009>`_
    (Y. He et al., ICML 2024), Eqs. 6, 7 and 9, Sec. 3.2 and App. C.1. A matrix weighting: it
    receives the Jacobian :math:`J` itself. It keeps the running sum :math:`S` of the squared
    entries of :math:`J` (a diagonal AdaGrad preconditioner), the weights :math:`q` (uniform at
    first) and a baseline :math:`b`. One call:

    1. :math:`Q = J \odot J`, :math:`S \leftarrow S + Q`, :math:`H = \sqrt{S + 10^{-7}}`;
       excess-risk proxy :math:`r_i = \sum_j Q_{ij} / H_{ij}`.
    2. During the first ``n_warmup_steps`` calls: accumulate :math:`r` and return the current
       (uniform) weights.
    3. At the first call after the warm-up, the baseline is set: :math:`b` is the mean of the
       warm-up risks and :math:`r \leftarrow r \oslash (b + 10^{-7})`; without warm-up
       :math:`b = r` and this first :math:`r` is used raw. Later calls use
       :math:`r \oslash (b + 10^{-7})`.
    4. :math:`q \leftarrow \mathrm{softmax}(\log q + \eta r)`, stored and returned.

    The update is done in log space, so a very large :math:`r` saturates to a one-hot vector
    instead of overflowing. At the first call without warm-up :math:`r_i \approx \|g_i\|_1`, so
    :math:`q = \mathrm{softmax}(\eta \|g_i\|_1)`. The weights always lie on the simplex. (The
    original code starts from weights 1; this API starts from :math:`\frac1m \mathbf 1`, as
    TorchJD.)

    :param robust_step_size: the step size :math:`\eta > 0` of the weight update (default ``1.0``).
    :param n_warmup_steps: number of calls used to estimate the baseline, ``>= 0`` (default ``0``).

    State: :math:`S` (``[m, n]``), the warm-up sum, :math:`q`, :math:`b` and the step count, in the
    input's dtype (float32 for half precision), following its device; all are re-initialised (with a
    warning) when :math:`m`, :math:`n` or the dtype changes, and cleared by :meth:`reset` (the next
    call then behaves like a fresh instance, warm-up included). Runs under :func:`torch.no_grad`
    (the weights are an optimiser state). An input with no row raises ``ValueError``. Entries whose
    square overflows the dtype (above about ``1e19`` in float32) and non-finite entries give NaN
    weights.
    """

    _task_state = tuple(
        (name, 1, "mean") for name in ("_square_sum", "_warmup_sum", "_weights", "_baseline")
    )

    _extra_state_names = ("_step",)

    def __init__(self, robust_step_size: float = 1.0, n_warmup_steps: int = 0) -> None:
        super().__init__()
        self.robust_step_size = robust_step_size
        self.n_warmup_steps = n_warmup_steps
        for name in ("_square_sum", "_warmup_sum", "_weights", "_baseline"):
            self.register_buffer(name, torch.empty(0), persistent=True)
        self._step = 0

    @property
    def robust_step_size(self) -> float:
        return self._robust_step_size

    @robust_step_size.setter
    def robust_step_size(self, value: float) -> None:
        if not value > 0:
            raise ValueError(f"`robust_step_size` must be > 0, got {value!r}.")
        self._robust_step_size = value

    @property
    def n_warmup_steps(self) -> int:
        return self._n_warmup_steps

    @n_warmup_steps.setter
    def n_warmup_steps(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"`n_warmup_steps` must be an integer >= 0, got {value!r}.")
        self._n_warmup_steps = value

    def reset(self) -> None:
        for name in ("_square_sum", "_warmup_sum", "_weights", "_baseline"):
            setattr(self, name, torch.empty(0))
        self._step = 0

    @torch.no_grad()
    def forward(self, stat: Tensor, /) -> Tensor:
        m = stat.shape[0]
        if m == 0:
            raise ValueError(
                "`ExcessMTLWeighting` needs at least one objective, got a 0-row input."
            )
        self._prepare_state(stat)

        squares = stat * stat
        self._square_sum = self._square_sum + squares
        risks = (squares / torch.sqrt(self._square_sum + _EPS)).sum(dim=1)

        if self._step < self.n_warmup_steps:
            self._warmup_sum = self._warmup_sum + risks
            self._step += 1
            return self._weights.clone()
        self._step += 1

        if self._baseline.numel() == 0:
            if self.n_warmup_steps > 0:
                self._baseline = self._warmup_sum / self.n_warmup_steps
                risks = risks / (self._baseline + _EPS)
            else:
                self._baseline = risks
        else:
            risks = risks / (self._baseline + _EPS)

        logits = torch.log(self._weights) + self.robust_step_size * risks
        # Saturate to a one-hot vector instead of producing inf - inf = NaN inside the softmax.
        logits = torch.nan_to_num(logits, nan=torch.nan, posinf=torch.finfo(logits.dtype).max)
        self._weights = torch.softmax(logits, dim=0)
        return self._weights.clone()

    def _prepare_state(self, stat: Tensor) -> None:
        m, n = stat.shape
        if self._weights.numel() > 0:
            old = (tuple(self._square_sum.shape), self._square_sum.dtype)
            new = ((m, n), stat.dtype)
            if old == new:
                if self._weights.device != stat.device:
                    for name in ("_square_sum", "_warmup_sum", "_weights", "_baseline"):
                        setattr(self, name, getattr(self, name).to(stat.device))
                return
            warn_reinitialised(
                type(self).__name__, f"shape {old[0]}, {old[1]}", f"shape {new[0]}, {new[1]}"
            )
        options = {"dtype": stat.dtype, "device": stat.device}
        self._square_sum = torch.zeros(m, n, **options)
        self._warmup_sum = torch.zeros(m, **options)
        self._weights = torch.full((m,), 1.0 / m, **options)
        self._baseline = torch.empty(0, **options)
        self._step = 0

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(robust_step_size={self.robust_step_size!r}, "
            f"n_warmup_steps={self.n_warmup_steps!r})"
        )


class ExcessMTL(WeightedAggregator, Stateful):
    r"""ExcessMTL: weights the rows by their estimated excess risks (see
    :class:`ExcessMTLWeighting`), from `Robust Multi-Task Learning with Excess Risks
    <https://arxiv.org/abs/2402.02009>`_ (Y. He et al., ICML 2024). Returns :math:`J^\top q`.

    :param robust_step_size: the step size :math:`\eta > 0` of the weight update (default ``1.0``).
    :param n_warmup_steps: number of calls used to estimate the baseline, ``>= 0`` (default ``0``).

    Stateful (see :class:`ExcessMTLWeighting`); :meth:`reset` clears the state. Not
    differentiable (runs under :func:`torch.no_grad`).

    >>> import torch
    >>> from torchjd.aggregation import ExcessMTL
    >>> ExcessMTL()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([4.8080, 1.0000, 1.0000])
    """

    def __init__(self, robust_step_size: float = 1.0, n_warmup_steps: int = 0) -> None:
        super().__init__(ExcessMTLWeighting(robust_step_size, n_warmup_steps))

    @property
    def robust_step_size(self) -> float:
        return self.weighting.robust_step_size

    @robust_step_size.setter
    def robust_step_size(self, value: float) -> None:
        self.weighting.robust_step_size = value

    @property
    def n_warmup_steps(self) -> int:
        return self.weighting.n_warmup_steps

    @n_warmup_steps.setter
    def n_warmup_steps(self, value: int) -> None:
        self.weighting.n_warmup_steps = value

    def reset(self) -> None:
        self.weighting.reset()

    @torch.no_grad()
    def forward(self, matrix: Tensor, /) -> Tensor:
        return super().forward(matrix)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(robust_step_size={self.robust_step_size!r}, "
            f"n_warmup_steps={self.n_warmup_steps!r})"
        )

"""ConFIG: the direction with equal cosine to every row, scaled by the sum of the projections."""

import torch
from torch import Tensor

from torchjd._precision import promoted
from torchjd.aggregation._bases import Aggregator, NoGrad
from torchjd.aggregation._sum import SumWeighting
from torchjd.aggregation._utils import pref_vector_str, pref_vector_to_weighting
from torchjd.linalg._matrix import Matrix
from torchjd.linalg._nonfinite import finite_part, poison

# The direction d is normalised by max(||d||, _NORM_EPS), as torch.nn.functional.normalize does.
_NORM_EPS = 1e-12
# Eigenvalues of the matrix of cosines below _NOISE * m * eps (relative to the largest) are not
# resolved by the Gramian (computed in the input dtype): they are treated as zero.
_NOISE = 10.0


def _solver_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _config_weights(gramian: Tensor, prefs: Tensor, n: int) -> Tensor:
    r"""The weights ``w`` (``[m]``, ``m >= 1``, in the Gramian's dtype) such that ConFIG's result
    is ``w @ J``, from the Gramian ``G = J J^T`` of the ``[m, n]`` matrix ``J``.

    With :math:`D = \mathrm{diag}(\|g_i\|)` (zero rows map to zero rows),
    :math:`\hat U = D^+ J` and :math:`C = \hat U \hat U^\top = D^+ G D^+`, the pseudo-inverse
    satisfies :math:`\hat U^+ p = \hat U^\top C^+ p`, so :math:`d = J^\top v` with
    :math:`v = D^+ C^+ p` and :math:`\|d\|^2 = c^\top C c` where :math:`c = C^+ p`. The singular
    values of :math:`\hat U` are the square roots of the eigenvalues of :math:`C`; those at most
    ``max(m, n) * eps * sigma_max`` are dropped, as :func:`torch.linalg.pinv` does on
    :math:`\hat U` (``eps`` of the input dtype), and so are those whose square is below the
    accuracy of the eigenvalues, ``_NOISE * m * eps * sigma_max^2``.
    """
    m = gramian.shape[0]
    eps = torch.finfo(gramian.dtype).eps
    rtol = eps * max(m, n)
    # Relative threshold on the eigenvalues of C = sigma^2.
    threshold = max(rtol * rtol, _NOISE * m * eps)
    G = gramian.to(dtype=_solver_dtype(gramian.device))
    p = prefs.to(dtype=G.dtype, device=G.device)
    norms = G.diagonal().clamp(min=0.0).sqrt()
    nonzero = norms > 0.0
    inverse_norms = torch.where(nonzero, 1.0 / torch.where(nonzero, norms, 1.0), 0.0)
    cosines = inverse_norms.unsqueeze(1) * G * inverse_norms.unsqueeze(0)  # C
    eigenvalues, eigenvectors = torch.linalg.eigh(cosines)
    kept = eigenvalues > threshold * eigenvalues.max().clamp(min=0.0)
    safe = torch.where(kept, eigenvalues, 1.0)
    c = eigenvectors @ torch.where(kept, (eigenvectors.T @ p) / safe, 0.0)  # C^+ p
    v = inverse_norms * c  # d = J^T v
    squared_norm_d = c @ (cosines @ c)
    projections_sum = (G @ v).sum()  # 1^T J d
    scale = projections_sum / squared_norm_d.clamp(min=_NORM_EPS**2)
    return (scale * v).to(dtype=gramian.dtype)


class ConFIG(NoGrad, Aggregator):
    r"""Conflict-free direction, from `ConFIG: Towards Conflict-free Training of Physics Informed
    Neural Networks <https://arxiv.org/abs/2408.11104>`_ (Liu et al., ICLR 2025), Equation 2.

    With the unit rows :math:`\hat u_i = g_i / \|g_i\|` (a zero row stays zero) stacked in
    :math:`\hat U`, the direction :math:`d = \hat U^+ p` has the cosine :math:`p_i` (up to a common
    factor) with every row; it is normalised, :math:`u = d / \max(\|d\|, 10^{-12})`, and scaled
    by the sum of the projections of the rows on it:

    .. math:: \mathcal A_{\text{ConFIG}}(J) = \Big(\sum_i g_i^\top u\Big)\, u .

    The pseudo-inverse drops the singular values of :math:`\hat U` below
    ``max(m, n) * eps`` times the largest one, as :func:`torch.linalg.pinv`'s default does
    (``eps`` of the input dtype).

    **Computation.** Everything goes through the Gramian :math:`G = J J^\top`: the result is
    :math:`J^\top w` for weights :math:`w` computed from :math:`G`, the row norms
    :math:`\sqrt{G_{ii}}` and an eigendecomposition of the ``m x m`` matrix of cosines (in float64,
    then cast back), so the cost is that of ``J @ J.T`` and ``w @ J`` and no ``m x n`` temporary is
    created. The Gramian cannot resolve singular values below about
    :math:`\sqrt{10\, m\, \varepsilon}\, \sigma_{\max}`: those are dropped too (TorchJD keeps those
    above ``max(m, n) * eps * sigma_max``); this only changes the result of nearly rank-deficient
    matrices with few columns, on which the pseudo-inverse is ill-conditioned. The squared row
    norms must not overflow the input dtype (in float32, row norms below about :math:`10^{19}`); a
    row whose squared norm underflows to 0 counts as a zero row. Not differentiable.

    :param pref_vector: the preference vector :math:`p` (1-D, one entry per row), or None for
        :math:`p = \mathbf 1`. It is held by the child weighting ``weighting`` (``SumWeighting``
        or ``ConstantWeighting``), applied to the matrix.

    >>> import torch
    >>> from torchjd.aggregation import ConFIG
    >>> ConFIG()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([0.1588, 2.0706, 2.0706])
    """

    _task_vectors = ("pref_vector",)

    def __init__(self, pref_vector: Tensor | None = None) -> None:
        super().__init__()
        self.pref_vector = pref_vector

    @property
    def pref_vector(self) -> Tensor | None:
        return self._pref_vector

    @pref_vector.setter
    def pref_vector(self, value: Tensor | None) -> None:
        self.weighting = pref_vector_to_weighting(value, SumWeighting())
        self._pref_vector = value

    def forward(self, matrix: Matrix, /) -> Tensor:
        m, n = matrix.shape
        prefs = self.weighting(matrix)
        if m == 0:
            return matrix.new_zeros(n)
        # Half-precision rows: the Gramian, its eigenvalue cut and the sum are done in float32.
        work = promoted(matrix)
        # A non-finite Gramian would make eigh raise: NaN weights instead.
        gramian, nan_where_non_finite = finite_part(work @ work.T)
        weights = poison(_config_weights(gramian, prefs, n), nan_where_non_finite)
        return (weights @ work).to(dtype=matrix.dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(pref_vector={self.pref_vector!r})"

    def __str__(self) -> str:
        return pref_vector_str(type(self).__name__, self.pref_vector)

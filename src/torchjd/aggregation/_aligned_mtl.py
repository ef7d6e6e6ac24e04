"""Aligned-MTL: align the principal components of the rows, then weight them by preference."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from torchjd.aggregation._bases import Forwarded, GramianWeightedAggregator, Weighting
from torchjd.aggregation._mean import MeanWeighting
from torchjd.aggregation._utils import (
    check_one_weighting_per_gramian,
    pref_vector_str,
    pref_vector_to_weighting,
    stacked_preferences,
)
from torchjd.linalg._matrix import PSDMatrix
from torchjd.linalg._nonfinite import finite_part, poison

_SCALE_MODES = ("min", "median", "rmse")


def _aligned_mtl_weights(gramians: Tensor, prefs: Tensor, scale_mode: str) -> Tensor:
    """Aligned-MTL's weights ``B p`` of Gramians ``[..., m, m]`` (``m >= 1``) with preference
    weights ``[..., m]``, differentiable (NaN for a Gramian holding an infinity or a NaN, on which
    ``eigh`` would raise)."""
    m = gramians.shape[-1]
    gramians, nan_where_non_finite = finite_part(gramians)
    eigenvalues, eigenvectors = torch.linalg.eigh(gramians, UPLO="U")  # ascending
    largest = eigenvalues[..., -1:]
    tolerance = largest * m * torch.finfo(gramians.dtype).eps
    kept = eigenvalues > tolerance  # a suffix: the r largest eigenvalues
    rank = kept.sum(dim=-1, keepdim=True)
    if scale_mode not in _SCALE_MODES:
        # Reading the rank synchronises with the device, but only on this error path.
        if bool((rank > 0).any()):
            raise ValueError(
                f"Invalid scale_mode={scale_mode!r}. Expected one of {list(_SCALE_MODES)}."
            )
        return prefs
    # Masked-out eigenvalues are replaced by 1 so that no inf or NaN appears, even in gradients.
    safe = torch.where(kept, eigenvalues, torch.ones_like(eigenvalues))
    if scale_mode == "min":
        index = m - rank.clamp(min=1)  # the smallest kept eigenvalue
        scale = safe.gather(-1, index)
    elif scale_mode == "median":
        # Lower median of the r kept values (index (r - 1) // 2 among them, ascending).
        index = m - rank + torch.div(rank - 1, 2, rounding_mode="floor")
        scale = safe.gather(-1, index.clamp(max=m - 1))
    else:  # "rmse": the mean of the kept eigenvalues
        scale = torch.where(kept, eigenvalues, 0.0).sum(dim=-1, keepdim=True) / rank.clamp(min=1)
    # B p = sqrt(s) V_r diag(lambda^-1/2) V_r^T p.
    projections = (eigenvectors.mT @ prefs.unsqueeze(-1)).squeeze(-1)
    coefficients = torch.where(kept, projections / safe.sqrt(), 0.0)
    weights = scale.clamp(min=0.0).sqrt() * (eigenvectors @ coefficients.unsqueeze(-1)).squeeze(-1)
    return poison(torch.where(rank > 0, weights, prefs), nan_where_non_finite)


class AlignedMTLWeighting(Weighting[PSDMatrix]):
    r"""Weighting of :class:`AlignedMTL`: :math:`w = B p` with
    :math:`B = \sqrt{s}\, V_r \Lambda_r^{-1/2} V_r^\top`.

    :math:`G = V \Lambda V^\top` is the eigendecomposition of the Gramian (upper triangle);
    :math:`\Lambda_r`, :math:`V_r` keep the :math:`r` eigenvalues above
    :math:`\lambda_{\max} \cdot m \cdot \varepsilon` (:math:`\varepsilon` the machine epsilon of
    the Gramian's dtype); when :math:`r = 0`, :math:`B = I`. The scale :math:`s` is the smallest
    kept eigenvalue (``"min"``), their lower median (``"median"``), or their mean (``"rmse"``).
    ``p`` are the preference weights, given by the child weighting ``weighting`` applied to the
    Gramian. Differentiable (through the eigendecomposition). The scale mode is checked at call
    time, only when :math:`r > 0` (a zero Gramian gives ``p`` whatever the mode).

    :param pref_vector: the preference vector (1-D, one entry per row), or None for
        :math:`p = \frac1m \mathbf 1`.
    :param scale_mode: ``"min"`` (default), ``"median"`` or ``"rmse"``.
    """

    _task_vectors = ("pref_vector",)

    def __init__(
        self,
        pref_vector: Tensor | None = None,
        scale_mode: Literal["min", "median", "rmse"] = "min",
    ) -> None:
        super().__init__()
        self.pref_vector = pref_vector
        self.scale_mode = scale_mode

    @property
    def pref_vector(self) -> Tensor | None:
        return self._pref_vector

    @pref_vector.setter
    def pref_vector(self, value: Tensor | None) -> None:
        self.weighting = pref_vector_to_weighting(value, MeanWeighting())
        self._pref_vector = value

    def forward(self, stat: Tensor, /) -> Tensor:
        prefs = self.weighting(stat).to(dtype=stat.dtype, device=stat.device)
        return _aligned_mtl_weights(stat, prefs, self.scale_mode)

    @classmethod
    def _forward_grouped(
        cls, weightings: Sequence[AlignedMTLWeighting], gramians: Tensor
    ) -> Tensor:
        """Weights ``[b, m]`` of Gramians ``[b, m, m]``, the ``k``-th one weighted by
        ``weightings[k]`` (with its preference vector and scale mode). Gramians whose weightings
        have the same scale mode are computed in one batch."""
        b, m = gramians.shape[0], gramians.shape[-1]
        check_one_weighting_per_gramian(weightings, gramians)
        if b == 0:
            return gramians.new_zeros(0, m)
        device = gramians.device
        prefs = stacked_preferences(weightings, gramians)
        modes: dict[str, list[int]] = {}
        for k, w in enumerate(weightings):
            modes.setdefault(w.scale_mode, []).append(k)
        if len(modes) == 1:
            return _aligned_mtl_weights(gramians, prefs, weightings[0].scale_mode)
        parts = []
        for mode, indices in modes.items():
            index = torch.tensor(indices, device=device)
            parts.append((index, _aligned_mtl_weights(gramians[index], prefs[index], mode)))
        weights = torch.empty(b, m, dtype=parts[0][1].dtype, device=device)
        for index, part in parts:
            weights[index] = part
        return weights


class AlignedMTL(GramianWeightedAggregator):
    r"""Aligned multi-task learning, from `Independent Component Alignment for Multi-Task Learning
    <https://arxiv.org/abs/2305.19000>`_ (Senushkin et al., CVPR 2023), Algorithm 1.

    The rows are made orthogonal with equal norms (the condition number of the result is 1) by
    :math:`\hat J = B J`, :math:`B = \sqrt{s}\, V_r \Lambda_r^{-1/2} V_r^\top`, where
    :math:`J J^\top = V \Lambda V^\top` and the :math:`r` numerically non-zero eigenvalues are
    kept, and the result is :math:`\hat J^\top p = J^\top (B p)`. The scale :math:`s` is the
    smallest kept eigenvalue (``"min"``), their lower median (``"median"``: the smaller middle one
    for an even count), or their mean (``"rmse"``, despite its name). See
    :class:`AlignedMTLWeighting`. Differentiable.

    :param pref_vector: the preference vector :math:`p` (1-D, one entry per row), or None for
        :math:`p = \frac1m \mathbf 1`.
    :param scale_mode: ``"min"`` (default), ``"median"`` or ``"rmse"``; another value raises a
        ``ValueError`` at call time when the matrix is not zero.

    >>> import torch
    >>> from torchjd.aggregation import AlignedMTL
    >>> AlignedMTL()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    tensor([0.2133, 0.9673, 0.9673])
    """

    def __init__(
        self,
        pref_vector: Tensor | None = None,
        scale_mode: Literal["min", "median", "rmse"] = "min",
    ) -> None:
        super().__init__(AlignedMTLWeighting(pref_vector, scale_mode))

    pref_vector = Forwarded[Tensor | None]()
    scale_mode = Forwarded[str]()

    def __str__(self) -> str:
        return pref_vector_str(type(self).__name__, self.pref_vector)

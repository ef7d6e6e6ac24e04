"""Branch-free propagation of non-finite inputs through routines that would raise or hide them.

The policy of the aggregators: a non-finite input gives a non-finite output, without raising and
without reading any value on the host (a gradient scaler must see the infinity or NaN to skip the
step). Decompositions such as ``eigh`` and ``pinv`` raise on non-finite matrices, and thresholds
(``trace < eps``) can turn a NaN into zeros: those computations run on :func:`finite_part` and
their result is passed through :func:`poison`.
"""

from torch import Tensor


def finite_part(stat: Tensor, dims: int = 2) -> tuple[Tensor, Tensor]:
    """``(safe, nan_where_non_finite)`` for a batch of inputs, each made of the last ``dims`` dims.

    ``safe`` is ``stat`` with every input that holds an infinity or a NaN replaced by zeros (so
    that a decomposition of it cannot fail, and an algorithm that needs a positive semi-definite
    input still gets one); ``nan_where_non_finite`` has shape ``stat.shape[:-dims]`` and holds NaN
    for those inputs, 0 for the others.
    """
    # 0 * x is NaN exactly where x is not finite, and a sum holding a NaN is NaN: few operations,
    # which matters for the small inputs of an aggregation.
    marker = stat.mul(0.0)
    if dims:
        marker = marker.sum(dim=tuple(range(stat.ndim - dims, stat.ndim)))
    bad = marker.isnan().view(*marker.shape, *(1,) * dims)
    return stat.masked_fill(bad, 0.0), marker


def poison(result: Tensor, nan_where_non_finite: Tensor) -> Tensor:
    """``result`` (shape ``batch + [k]``) made NaN for the inputs marked by :func:`finite_part`."""
    return result + nan_where_non_finite.unsqueeze(-1).to(dtype=result.dtype)

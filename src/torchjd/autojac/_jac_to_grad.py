from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, overload

from torch import Tensor

from torchjd._pipeline import Steps, check_aggregator, prepare, run
from torchjd._validation import materialise
from torchjd.aggregation import Aggregator, GramianWeightedAggregator, WeightedAggregator


@overload
def jac_to_grad(
    tensors: Iterable[Tensor],
    /,
    aggregator: GramianWeightedAggregator,
    *,
    retain_jac: bool = False,
    optimize_gramian_computation: bool = False,
) -> Tensor: ...


@overload
def jac_to_grad(
    tensors: Iterable[Tensor],
    /,
    aggregator: WeightedAggregator,
    *,
    retain_jac: bool = False,
    optimize_gramian_computation: Literal[False] = False,
) -> Tensor: ...


@overload
def jac_to_grad(
    tensors: Iterable[Tensor],
    /,
    aggregator: Aggregator,
    *,
    retain_jac: bool = False,
    optimize_gramian_computation: Literal[False] = False,
) -> None: ...


def jac_to_grad(
    tensors: Iterable[Tensor],
    /,
    aggregator: Aggregator,
    *,
    retain_jac: bool = False,
    optimize_gramian_computation: bool = False,
) -> Tensor | None:
    r"""Aggregate the ``.jac`` fields of ``tensors`` into one update, accumulated into ``.grad``.

    Mathematically, the Jacobians ``t.jac`` (shape ``[m, *t.shape]``, e.g. filled by
    :func:`~torchjd.autojac.backward` or :func:`~torchjd.autojac.mtl_backward`) are flattened to
    ``[m, t.numel()]`` and concatenated, in the order of ``tensors``, into a matrix
    :math:`J \in \mathbb R^{m \times N}`; the aggregate :math:`g = \mathcal A(J) \in \mathbb R^N`
    is split back into one piece per tensor, cast to its dtype, and added to its ``.grad`` (or
    stored there if it is ``None``).

    How it is computed depends on what the aggregator declares it needs
    (:attr:`~torchjd.aggregation.Aggregator.need`); every way gives the same result up to
    rounding:

    - the Gramian (a :class:`~torchjd.aggregation.GramianWeightedAggregator` that does not
      override ``forward``): ``J`` is never built; :math:`G = \sum_t J_t J_t^\top` is accumulated
      tensor by tensor (in float32 at least), :math:`w` = ``aggregator.gramian_weighting(G)`` (its
      hooks run) and each tensor receives :math:`w^\top J_t`;
    - the number of rows only (Mean, Sum, Constant, Random): not even the Gramian is computed;
    - the whole matrix (any other aggregator, or forward hooks or pre-hooks on the aggregator, on
      ``aggregator.weighting`` or global ones): the aggregator is called on the concatenated
      ``J``, so that every hook sees exactly ``J`` and the aggregate.

    :param tensors: The tensors whose ``.jac`` to aggregate (any iterable, e.g.
        ``model.parameters()``, iterated once). Non-empty, without the same tensor twice; each must
        have a ``.jac`` of shape ``[m, *t.shape]`` with one common ``m >= 1``, require grad and be
        a leaf (or retain its grad).
    :param aggregator: The aggregator mapping the ``[m, N]`` matrix to a vector of length ``N``.
    :param retain_jac: Keep the ``.jac`` fields. Default ``False``: they are deleted once the
        arguments are validated, before the aggregation.
    :param optimize_gramian_computation: Require the Gramian computation described above: the
        aggregator must then be a :class:`~torchjd.aggregation.GramianWeightedAggregator` with no
        forward hook or pre-hook on itself or on ``aggregator.weighting`` (``ValueError``
        otherwise); its own ``forward`` is not called. Default ``False``: the computation is chosen
        automatically.
    :return: The weights of a :class:`~torchjd.aggregation.WeightedAggregator` (shape ``[m]``, as
        returned by ``aggregator.weighting`` on ``J``, hooks on it included), ``None`` for other
        aggregators.

    Non-finite values are not checked (that would synchronise with the device): NaN in, NaN out.

    >>> import torch
    >>> from torchjd.aggregation import Mean
    >>> from torchjd.autojac import jac_to_grad
    >>> p = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> p.jac = torch.tensor([[2.0, -1.0], [-1.0, 3.0]])
    >>> jac_to_grad([p], Mean())
    tensor([0.5000, 0.5000])
    >>> p.grad
    tensor([0.5000, 1.0000])
    """
    tensors_ = materialise(tensors, "tensors")
    check_aggregator(aggregator)
    (group,) = prepare(
        [tensors_],
        [aggregator],
        ["tensors"],
        optimize_gramian_computation=optimize_gramian_computation,
    )
    run([group], Steps(), retain_jac=retain_jac, stacklevel=2)
    return group.weights

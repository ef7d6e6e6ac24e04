from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal, overload

from torch import Tensor

from torchjd._pipeline import apply_local
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
    present: Tensor | Sequence[bool] | None = None,
) -> Tensor: ...


@overload
def jac_to_grad(
    tensors: Iterable[Tensor],
    /,
    aggregator: WeightedAggregator,
    *,
    retain_jac: bool = False,
    optimize_gramian_computation: Literal[False] = False,
    present: Tensor | Sequence[bool] | None = None,
) -> Tensor: ...


@overload
def jac_to_grad(
    tensors: Iterable[Tensor],
    /,
    aggregator: Aggregator,
    *,
    retain_jac: bool = False,
    optimize_gramian_computation: Literal[False] = False,
    present: Tensor | Sequence[bool] | None = None,
) -> None: ...


def jac_to_grad(
    tensors: Iterable[Tensor],
    /,
    aggregator: Aggregator,
    *,
    retain_jac: bool = False,
    optimize_gramian_computation: bool = False,
    present: Tensor | Sequence[bool] | None = None,
) -> Tensor | None:
    r"""Aggregate the ``.jac`` fields of ``tensors`` into one update, accumulated into ``.grad``.

    The Jacobians ``t.jac`` (shape ``[m, *t.shape]``, e.g. filled by
    :func:`~torchjd.autojac.backward` or :func:`~torchjd.autojac.mtl_backward`), flattened and
    concatenated in the order of ``tensors``, form :math:`J \in \mathbb R^{m \times N}`; the
    aggregate :math:`\mathcal A(J) \in \mathbb R^N` is split back into one piece per tensor, cast
    to its dtype and added to its ``.grad`` (stored there if it is ``None``).

    The computation follows what the aggregator declares it needs
    (:attr:`~torchjd.aggregation.Aggregator.need`), with the same result up to rounding: the
    Gramian (:math:`G = \sum_t J_t J_t^\top`, accumulated tensor by tensor in float32 at least,
    :math:`w` = ``aggregator.gramian_weighting(G)``, each tensor receives :math:`w^\top J_t`; ``J``
    is never built); the number of rows only (Mean, Sum, Constant, Random: not even ``G``); or the
    whole matrix (any other aggregator, or forward hooks or pre-hooks on the aggregator, on
    ``aggregator.weighting`` or global ones: the aggregator is called on the concatenated ``J``).

    :param tensors: The tensors whose ``.jac`` to aggregate (any iterable, iterated once).
        Non-empty, without repetition; each must have a ``.jac`` of shape ``[m, *t.shape]`` with
        one common ``m >= 1``, require grad and be a leaf (or retain its grad).
    :param aggregator: The aggregator mapping the ``[m, N]`` matrix to a vector of length ``N``.
    :param retain_jac: Keep the ``.jac`` fields. Default ``False``: they are deleted once the
        arguments are validated.
    :param optimize_gramian_computation: Require the Gramian computation: the aggregator must be
        a :class:`~torchjd.aggregation.GramianWeightedAggregator` without forward hooks or
        pre-hooks on itself or on ``aggregator.weighting`` (``ValueError`` otherwise).
        Default ``False``: chosen automatically.
    :param present: Which tasks (rows) are present in this step: a boolean tensor or a sequence
        of ``m`` booleans. The aggregator then sees only the ``k`` present rows (their ``k x k``
        Gramian), with its per-task hyper-parameters and state restricted to these tasks (see
        :doc:`/missing_tasks`); the absent rows are never read and get weight 0. With no task
        present, ``.grad`` is left untouched and a warning is issued. Default ``None``: all
        present, exactly as without it. A tensor on a device costs one synchronisation.
    :return: The weights of a :class:`~torchjd.aggregation.WeightedAggregator` (shape ``[m]``,
        after the hooks of its weighting; 0 for the absent tasks), ``None`` for other
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
    return apply_local(
        materialise(tensors, "tensors"),
        aggregator,
        retain_jac=retain_jac,
        optimize_gramian_computation=optimize_gramian_computation,
        present=present,
        stacklevel=2,
    )

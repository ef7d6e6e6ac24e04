from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from torchjd.aggregation._bases import Aggregator, GramianWeightedAggregator
from torchjd.autojac._accumulation import accumulate_grads, check_grad_targets
from torchjd.autojac._jac_to_grad import _choose_route, _Route, _validated_jacobians
from torchjd.autojac._validation import materialise
from torchjd.distributed._arguments import (
    ROWS,
    check_bool,
    check_choice,
    check_one_device,
    validated_grad_params,
)
from torchjd.distributed._comm import backend, group_rank_and_size
from torchjd.distributed._exchange import (
    Exchange,
    gramian_strategy,
    jacobian_strategy,
    update_strategy,
)

_STRATEGIES = ("auto", "jacobian", "gramian", "update")


def jac_to_grad(
    tensors: Iterable[Tensor],
    /,
    aggregator: Aggregator,
    *,
    retain_jac: bool = False,
    optimize_gramian_computation: bool = False,
    grad_params: Iterable[Tensor] | None = None,
    rows: Literal["mean", "stack"] = "mean",
    strategy: Literal["auto", "jacobian", "gramian", "update"] = "auto",
    group: Any = None,
    share_rng_state: bool = True,
) -> Tensor | None:
    r"""Aggregate the Jacobian of the whole process group into ``.grad``, identically everywhere.

    The data-parallel counterpart of :func:`torchjd.autojac.jac_to_grad`, to be called by every
    process of ``group`` with the same arguments (same tensors, same numbers of rows) after
    :func:`~torchjd.autojac.backward` or :func:`~torchjd.autojac.mtl_backward` has filled the
    local ``.jac`` fields (``DistributedDataParallel`` does not synchronise them: its hooks run
    when ``.grad`` is accumulated by ``loss.backward()``, which Jacobian computation never does).

    With :math:`R` processes, process :math:`r` holding the local Jacobian :math:`J_r` (the
    ``.jac`` fields of ``tensors``, flattened and concatenated, :math:`m` rows), the global
    Jacobian is

    - ``rows="mean"`` (default): :math:`J = \frac1R \sum_r J_r`. This is the Jacobian of the
      objectives :math:`\frac1R \sum_r L_{i,r}` when every process evaluates the same objectives
      :math:`L_{i,r}` on its shard of the batch, e.g. the mean loss of each task: with equal
      shards, :math:`J` is the Jacobian a single process gets on the whole batch.
    - ``rows="stack"``: the rows of :math:`J_0, \dots, J_{R-1}` stacked in rank order
      (:math:`Rm` rows), when every process has objectives of its own, e.g. one loss per sample
      (instance-wise risk minimisation): the single-process Jacobian of the whole batch, if
      process :math:`r` holds the :math:`r`-th contiguous shard.

    The aggregator is applied to :math:`J` (not to each :math:`J_r`: aggregators are not linear,
    so averaging local aggregations would be wrong), and every process adds the same
    :math:`\mathcal A(J)` to the ``.grad`` of ``tensors``. The ``.grad`` fields of ``grad_params``
    (e.g. the heads, which :func:`~torchjd.autojac.mtl_backward` gives ordinary gradients) are
    replaced, in place, by their mean over the processes (``rows="mean"``) or their sum
    (``rows="stack"``), in the same collectives.

    Strategies (payloads in numbers of entries per process; :math:`N` = entries of ``tensors``,
    :math:`H` = entries of ``grad_params``; ``DistributedDataParallel`` all-reduces
    :math:`N + H`):

    - ``"jacobian"``: one all-reduce (``mean``) or all-gather (``stack``) of the Jacobians,
      :math:`mN + H` entries, then every process aggregates :math:`J` as
      :func:`torchjd.autojac.jac_to_grad` does. Works with every aggregator (the aggregator and
      its hooks see the concatenated :math:`J`, as in a single process).
    - ``"gramian"``: for aggregators whose weights come from the Gramian
      :math:`G = JJ^\top` (UPGrad, MGDA, DualProj, PCGrad, GradVac, ...). The columns are split
      into :math:`R` shards: a reduce-scatter (``mean``) or all-to-all (``stack``) of
      :math:`mN + H` entries gives process :math:`r` the shard :math:`S_r` of :math:`J`; one
      all-reduce of the partial Gramians :math:`S_r S_r^\top` (:math:`m^2` entries) gives
      :math:`G`; every process computes the weights :math:`w` and the piece
      :math:`w^\top S_r`, and an all-gather of :math:`N + H` entries assembles the update. A
      ring all-reduce moves twice what a reduce-scatter moves, so this sends about
      :math:`\frac{m + 1}{2m}` of the traffic of ``"jacobian"`` with ``mean`` (and :math:`R`
      times less with ``stack``), and each process computes :math:`1/R` of the Gramian. Note
      that all-reducing the local Gramians :math:`J_r J_r^\top` would be wrong: the Gramian of
      the mean Jacobian contains the cross terms :math:`J_r J_s^\top`.
    - ``"update"``: when the weights do not depend on :math:`J` (Mean, Sum, Constant, Random),
      :math:`\mathcal A(J) = w^\top J` is the sum (or mean) of the local :math:`w_r^\top J_r`:
      one all-reduce of :math:`N + H` entries, the traffic of ``DistributedDataParallel``.
    - ``"auto"`` (default): ``"update"`` where it applies, else ``"gramian"`` where
      :func:`torchjd.autojac.jac_to_grad` would use the Gramian (no hooks on the aggregator or on
      its ``weighting``, ``forward`` not overridden), else ``"jacobian"``. Exception: with
      ``rows="mean"`` on the gloo backend, ``"jacobian"`` rather than ``"gramian"``, because
      gloo's reduce-scatter takes longer than its all-reduce of the same buffer.

    Randomised aggregators (Random, PCGrad, GradVac, ...) draw from the global CPU generator.
    With ``share_rng_state=True`` (default), the state of that generator on the group's first
    process is sent along with the data (about 5 KB in a collective that happens anyway, or one
    more small collective for Random with ``"update"``), and every process aggregates with it:
    all processes draw the numbers the first process draws, which are those a single process
    would draw, even if their own generators differ (e.g. seeded with their rank). The other
    processes get their own generator state back afterwards. Stateful aggregators then update
    their state identically everywhere, so the replicas never drift apart. On a GPU, the shared
    state comes back to the host (one synchronisation); set ``False`` to avoid it when the
    aggregator is deterministic or the generators are known to agree. Only the CPU generator is
    shared (torchjd's aggregators draw from it); an aggregator drawing from a GPU generator needs
    that generator seeded identically on every process.

    :param tensors: The tensors whose ``.jac`` to aggregate, as for
        :func:`torchjd.autojac.jac_to_grad`: same order and same shapes on every process.
    :param aggregator: The aggregator, one instance per process (each applies it to the same
        :math:`J`, so stateful ones keep equal states).
    :param retain_jac: Keep the (local) ``.jac`` fields. Default ``False``: deleted once the
        arguments are validated.
    :param optimize_gramian_computation: As in :func:`torchjd.autojac.jac_to_grad`: require the
        Gramian path (``ValueError`` for an aggregator that cannot take it).
    :param grad_params: Tensors whose ``.grad`` to reduce with the same collectives, e.g. the
        task-specific parameters after :func:`~torchjd.autojac.mtl_backward`. Each must have a
        ``.grad`` and not be in ``tensors``. Default ``None``: none.
    :param rows: ``"mean"`` (default) or ``"stack"``, see above.
    :param strategy: ``"auto"`` (default), ``"jacobian"``, ``"gramian"`` or ``"update"``, see
        above.
    :param group: The process group (``None``, default: the default group).
    :param share_rng_state: Aggregate with the first process's CPU generator state. Default
        ``True``.
    :return: The weights, as :func:`torchjd.autojac.jac_to_grad` returns them (the same on every
        process; :math:`Rm` of them with ``rows="stack"``), or ``None`` for an aggregator that is
        not weighted.

    The processes must hold the same number of rows (with ``rows="stack"``, use equal local
    batch sizes, e.g. ``drop_last=True``): the collectives need equal sizes everywhere.
    """
    check_choice(rows, "rows", ROWS)
    check_choice(strategy, "strategy", _STRATEGIES)
    check_bool(share_rng_state, "share_rng_state")
    tensors_ = materialise(tensors, "tensors")
    jacobians = _validated_jacobians(tensors_)
    check_grad_targets(tensors_, "tensors", requires_grad_error=ValueError)
    grads = validated_grad_params(grad_params, tensors_)
    chosen = _choose_strategy(aggregator, strategy, optimize_gramian_computation)
    check_one_device(jacobians, grads)
    rank, world_size = group_rank_and_size(group)
    if chosen == "gramian" and strategy == "auto" and rows == "mean" and backend(group) == "gloo":
        # Gloo's reduce-scatter is slower than its all-reduce of the same buffer (measured on CPU:
        # 44 ms against 20 ms for 35 MB), so the fewer bytes do not pay there.
        chosen = "jacobian"

    if not retain_jac:
        for t in tensors_:
            del t.jac

    ex = Exchange(rows, group, rank, world_size, share_rng_state)
    if chosen == "update":
        weights, gradients, reduced = update_strategy(tensors_, jacobians, grads, aggregator, ex)
    elif chosen == "gramian":
        weights, gradients, reduced = gramian_strategy(tensors_, jacobians, grads, aggregator, ex)
    else:
        weights, gradients, reduced = jacobian_strategy(
            tensors_, jacobians, grads, aggregator, optimize_gramian_computation, ex
        )
    accumulate_grads(tensors_, gradients)
    with torch.no_grad():
        for g, value in zip(grads, reduced):
            g.copy_(value)
    return weights


def _has_forward_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _choose_strategy(aggregator: Aggregator, strategy: str, optimize: bool) -> str:
    route = _choose_route(aggregator, optimize)  # validates `optimize_gramian_computation`
    if strategy == "auto":
        if route is _Route.ROW_COUNT:
            return "update"
        return "gramian" if route is _Route.GRAMIAN else "jacobian"
    if strategy == "update" and route is not _Route.ROW_COUNT:
        raise ValueError(
            "`strategy='update'` needs an aggregator whose weights depend only on the number of "
            "rows (Mean, Sum, Constant or Random, without forward hooks), got "
            f"{aggregator!r}. Use 'auto' to choose the strategy automatically."
        )
    if strategy == "gramian" and (
        not isinstance(aggregator, GramianWeightedAggregator)
        or _has_forward_hooks(aggregator)
        or _has_forward_hooks(aggregator.weighting)
    ):
        raise ValueError(
            "`strategy='gramian'` needs an aggregator whose weights come from the Gramian (a "
            "GramianWeightedAggregator) without forward hooks or pre-hooks on itself or on its "
            f"`weighting`, got {aggregator!r}. Use 'jacobian', which works with every aggregator."
        )
    return strategy

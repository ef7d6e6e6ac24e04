from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor

from torchjd._pipeline import Group, Steps, check_aggregator, prepare, run
from torchjd._protocol import Need
from torchjd._validation import materialise
from torchjd.aggregation import Aggregator
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
    GramianExchange,
    JacobianExchange,
    UpdateExchange,
)
from torchjd.grouping import GroupedAggregator

_STRATEGIES = ("auto", "jacobian", "gramian", "update")


def jac_to_grad(
    tensors: Iterable[Tensor] | GroupedAggregator,
    /,
    aggregator: Aggregator | None = None,
    *,
    retain_jac: bool = False,
    optimize_gramian_computation: bool = False,
    grad_params: Iterable[Tensor] | None = None,
    rows: Literal["mean", "stack"] = "mean",
    strategy: Literal["auto", "jacobian", "gramian", "update"] = "auto",
    group: Any = None,
    share_rng_state: bool = True,
) -> Tensor | list[Tensor | None] | None:
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
    holder: dict[str, Steps] = {}

    def steps_for(groups: list[Group]) -> Steps:
        tensors_ = [t for g in groups for t in g.tensors]
        grads = validated_grad_params(grad_params, tensors_)
        chosen = _choose_strategy(groups, strategy)
        check_one_device([j for g in groups for j in g.jacobians], grads)
        rank, world_size = group_rank_and_size(group)
        ex = Exchange(rows, group, rank, world_size, share_rng_state)
        if chosen == "gramian" and strategy == "auto" and ex.mean and backend(group) == "gloo":
            # Gloo's reduce-scatter is slower than its all-reduce of the same buffer (measured
            # on CPU: 44 ms against 20 ms for 35 MB), so the fewer bytes do not pay there.
            chosen = "jacobian"
        steps = _STEPS[chosen](ex, grads)
        holder["steps"] = steps
        return steps

    if isinstance(tensors, GroupedAggregator):
        if aggregator is not None or optimize_gramian_computation:
            raise TypeError(
                "With a GroupedAggregator (which holds one aggregator per group), give no "
                "`aggregator` and no `optimize_gramian_computation`."
            )
        result: Tensor | list[Tensor | None] | None = tensors._apply(
            steps_for, retain_jac=retain_jac, stacklevel=2
        )
    else:
        tensors_ = materialise(tensors, "tensors")
        check_aggregator(aggregator)
        assert aggregator is not None
        groups = prepare(
            [tensors_],
            [aggregator],
            ["tensors"],
            optimize_gramian_computation=optimize_gramian_computation,
        )
        run(groups, steps_for(groups), retain_jac=retain_jac, stacklevel=2)
        result = groups[0].weights
    with torch.no_grad():
        for grad, value in zip(holder["steps"].grads, holder["steps"].reduced):  # type: ignore[attr-defined]
            grad.copy_(value)
    return result


def _choose_strategy(groups: list[Group], strategy: str) -> str:
    routes = {g.route for g in groups}
    if strategy == "auto":
        if routes == {Need.ROW_COUNT}:
            return "update"
        return "jacobian" if Need.MATRIX in routes else "gramian"
    if strategy == "update" and routes != {Need.ROW_COUNT}:
        raise ValueError(
            "`strategy='update'` needs an aggregator (for every group) whose weights depend only "
            "on the number of rows (Mean, Sum, Constant or Random, without forward hooks), got "
            f"{_names(groups)}. Use 'auto' to choose the strategy automatically."
        )
    if strategy == "gramian" and routes != {Need.GRAMIAN}:
        raise ValueError(
            "`strategy='gramian'` needs an aggregator (for every group) whose weights come from "
            "the Gramian (a GramianWeightedAggregator) without forward hooks or pre-hooks on "
            f"itself or on its `weighting`, got {_names(groups)}. Use 'jacobian', which works "
            "with every aggregator."
        )
    return strategy


def _names(groups: list[Group]) -> str:
    return ", ".join(repr(g.aggregator) for g in groups)


_STEPS = {"jacobian": JacobianExchange, "gramian": GramianExchange, "update": UpdateExchange}

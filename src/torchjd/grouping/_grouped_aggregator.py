"""One aggregator per group of parameters, applied to all groups in one call."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from torchjd._pipeline import Group, Steps, prepare, run
from torchjd._stateful import Stateful

_AggregatorSpec = nn.Module | Callable[[], nn.Module] | Sequence[nn.Module]


class GroupedAggregator(nn.Module, Stateful):
    r"""Aggregate each group of parameters with its own aggregator, all groups in one call.

    This is the per-group aggregation of `Gradient Vaccine <https://arxiv.org/abs/2010.05874>`_
    (Wang et al., ICLR 2021): the parameters are partitioned into groups (for example by
    :func:`~torchjd.grouping.per_layer`), and the Jacobian :math:`J_k` of group :math:`k` (the
    ``.jac`` fields of its tensors, concatenated) is aggregated on its own, so that conflicts are
    measured, and resolved, within the group:
    :math:`\mathcal A_k(J_k) = w_k^\top J_k` for a weighted aggregator.

    :meth:`jac_to_grad` gives the same result as the loop

    .. code-block:: python

        for group, aggregator in zip(grouped.groups, grouped.aggregators):
            jac_to_grad(group, aggregator)

    (same weights and gradients up to rounding, the same random numbers for a seed, the same state
    updates), but faster: when consecutive groups have aggregators whose weights come from the
    Gramian with the same weighting class (UPGrad, DualProj, MGDA, PCGrad, GradVac, IMTLG,
    AlignedMTL), the weighting runs once on the stack of their Gramians ``[b, m, m]``; Mean and
    Sum compute their weights once. Other aggregators, and groups whose aggregator or weighting
    has forward hooks (so that the hooks see what they expect), are handled group by group as by
    :func:`~torchjd.autojac.jac_to_grad`.

    Every group has its own aggregator instance, hence its own state (GradVac's targets, for
    example), held as a submodule in ``aggregators`` (a :class:`~torch.nn.ModuleList`, in the
    order of the groups): ``state_dict()`` saves the state of all the groups and loads
    (strict) into a fresh ``GroupedAggregator`` built the same way, and :meth:`reset` resets them
    all. The groups themselves (references to the parameters) are not part of the state.

    :param groups: the groups, in order: an iterable of non-empty ordered collections of tensors
        (lists, tuples, ``module.parameters()``...), e.g. the output of one of the strategies of
        :mod:`torchjd.grouping`. A tensor may appear in one group only, once. Sets are refused:
        their order changes from run to run.
    :param aggregator: how to get one aggregator per group: an aggregator instance, used as a
        template and deep-copied for every group (its state included, so give a fresh one); a
        factory called once per group with no argument (an aggregator class such as ``UPGrad``,
        a ``functools.partial`` or a ``lambda``); or a sequence of aggregators, one per group,
        all distinct.
    :param compute_gramians: also compute the Gramian of the groups whose aggregator does not
        need it (Mean, Sum, Constant, Random, and aggregators that receive the concatenated
        matrix), so that :attr:`last_gramians` and :meth:`cosine_similarities` cover every group.
        Default ``False``: the Gramians are kept only where they are computed anyway.

    After each :meth:`jac_to_grad` call, :attr:`last_weights` holds the weights of each group and
    :attr:`last_gramians` its Gramian; :meth:`cosine_similarities` gives the pairwise cosine
    similarities of the objectives' gradients within each group.

    >>> import torch
    >>> from torchjd.aggregation import Mean
    >>> from torchjd.grouping import GroupedAggregator
    >>> p, q = torch.ones(2, requires_grad=True), torch.ones(3, requires_grad=True)
    >>> grouped = GroupedAggregator([[p], [q]], Mean)
    >>> p.jac, q.jac = torch.ones(2, 2), torch.full((2, 3), 2.0)
    >>> grouped.jac_to_grad()
    [tensor([0.5000, 0.5000]), tensor([0.5000, 0.5000])]
    >>> p.grad, q.grad
    (tensor([1., 1.]), tensor([2., 2., 2.]))
    """

    def __init__(
        self,
        groups: Iterable[Iterable[Tensor]],
        aggregator: _AggregatorSpec,
        *,
        compute_gramians: bool = False,
    ) -> None:
        super().__init__()
        self._groups = _check_groups(groups)
        self.aggregators = nn.ModuleList(_make_aggregators(aggregator, len(self._groups)))
        self.compute_gramians = compute_gramians
        self._last_weights: list[Tensor | None] = []
        self._last_gramians: list[Tensor | None] = []

    @property
    def groups(self) -> list[list[Tensor]]:
        """The groups of tensors, in order (a new list at each access)."""
        return [list(group) for group in self._groups]

    @property
    def compute_gramians(self) -> bool:
        return self._compute_gramians

    @compute_gramians.setter
    def compute_gramians(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"`compute_gramians` must be a bool, got {value!r}.")
        self._compute_gramians = value

    @property
    def last_weights(self) -> list[Tensor | None]:
        """The weights of each group at the last :meth:`jac_to_grad` call (``None`` for a group
        whose aggregator is not weighted); empty before the first call and after :meth:`reset`.
        """
        return list(self._last_weights)

    @property
    def last_gramians(self) -> list[Tensor | None]:
        """The Gramian ``[m, m]`` of each group at the last :meth:`jac_to_grad` call, ``None``
        for a group whose Gramian was not computed (see ``compute_gramians``); empty before the
        first call and after :meth:`reset`."""
        return list(self._last_gramians)

    def __len__(self) -> int:
        return len(self._groups)

    def jac_to_grad(
        self, *, retain_jac: bool = False, present: Tensor | Sequence[bool] | None = None
    ) -> list[Tensor | None]:
        r"""Aggregate the ``.jac`` fields of every group with the group's aggregator and
        accumulate the result into the ``.grad`` fields, as one
        :func:`~torchjd.autojac.jac_to_grad` call per group would.

        Every tensor of every group must have a ``.jac`` of shape ``[m, *t.shape]`` (one common
        ``m`` within a group), require grad and be a leaf (or retain its grad). All the groups are
        checked before anything is modified.

        :param retain_jac: keep the ``.jac`` fields. Default ``False``: they are deleted once all
            the groups are validated, before the aggregation.
        :param present: which tasks (rows) are present in this step, one boolean per row, as in
            :func:`~torchjd.autojac.jac_to_grad`: every group sees only the present rows, and
            each aggregator acts on these tasks; the weights and Gramians recorded keep one
            entry per task (0 for the absent ones). Default ``None``: all present.
        :return: the weights of each group: a tensor of shape ``[m]`` for a weighted aggregator
            (as :func:`~torchjd.autojac.jac_to_grad` returns them), ``None`` for another one.
            Also stored in :attr:`last_weights`.

        Non-finite values are not checked (that would synchronise with the device): NaN in, NaN
        out.
        """
        return self._aggregate_groups(
            lambda _groups: Steps(), retain_jac=retain_jac, stacklevel=2, present=present
        )

    def _aggregate_groups(
        self,
        steps_for: Callable[[list[Group]], Steps],
        *,
        retain_jac: bool,
        stacklevel: int,
        present: object = None,
        prepared: list[Group] | None = None,
    ) -> list[Tensor | None]:
        """Run the application pipeline on every group, with the steps that ``steps_for`` gives
        for the validated groups (local, or the collective steps of :mod:`torchjd.distributed`),
        and record the weights and Gramians. ``prepared``: groups validated elsewhere, whose
        statistics do not come from ``.jac`` fields (the block Gramians of autogram)."""
        groups = self._prepared(present) if prepared is None else prepared
        run(groups, steps_for(groups), retain_jac=retain_jac, stacklevel=stacklevel + 1)
        self._last_weights = [g.weights for g in groups]
        self._last_gramians = [g.gramian for g in groups]
        return list(self._last_weights)

    def _prepared(self, present: object = None) -> list[Group]:
        names = [f"groups[{k}]" for k in range(len(self._groups))]
        options = {"compute_gramians": self.compute_gramians, "present": present}
        return prepare(self._groups, list(self.aggregators), names, **options)

    def update_losses(self, losses: Tensor | Sequence[Tensor]) -> None:
        """Give the current loss values to the aggregator of every group that uses them (e.g.
        GradNorm), before :meth:`jac_to_grad`: one call for all the groups."""
        receivers = [a for a in self.aggregators if callable(getattr(a, "update_losses", None))]
        if not receivers:
            raise TypeError(
                "None of the aggregators of this GroupedAggregator uses loss values (none has an "
                "`update_losses` method): there is nothing to update."
            )
        for aggregator in receivers:
            aggregator.update_losses(losses)

    def cosine_similarities(self) -> list[Tensor | None]:
        r"""The cosine similarities :math:`\frac{g_i^\top g_j}{\|g_i\| \|g_j\|}` of the
        objectives' gradients restricted to each group, at the last :meth:`jac_to_grad` call: one
        ``[m, m]`` matrix per group computed from :attr:`last_gramians`, ``None`` for a group
        whose Gramian was not computed (see ``compute_gramians``). A pair involving a zero gradient
        has cosine 0. Empty before the first call."""
        return [None if gramian is None else _cosines(gramian) for gramian in self._last_gramians]

    def reset(self) -> None:
        """Reset the aggregator of every group that is :class:`~torchjd.Stateful`, and forget the
        last weights and Gramians."""
        for aggregator in self.aggregators:
            if isinstance(aggregator, Stateful):
                aggregator.reset()
        self._last_weights = []
        self._last_gramians = []

    def forward(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(
            "A GroupedAggregator is not called on a matrix: fill the `.jac` fields of the grouped "
            "parameters (with `backward` or `mtl_backward`), then call its `jac_to_grad()` method."
        )

    def extra_repr(self) -> str:
        sizes = ", ".join(str(len(group)) for group in self._groups)
        return f"groups={len(self._groups)} (tensors per group: {sizes})"


def _cosines(gramian: Tensor) -> Tensor:
    norms = gramian.diagonal().clamp(min=0.0).sqrt()
    products = norms[:, None] * norms[None, :]
    safe = torch.where(products > 0, products, torch.ones_like(products))
    return torch.where(products > 0, gramian / safe, 0.0).clamp(-1.0, 1.0)


def _check_groups(groups: object) -> tuple[tuple[Tensor, ...], ...]:
    if isinstance(groups, Tensor) or not isinstance(groups, Iterable):
        raise TypeError(
            "`groups` must be an iterable of groups (each an ordered collection of tensors), got "
            f"an object of type {type(groups).__name__}."
        )
    if isinstance(groups, (set, frozenset)):
        raise ValueError(
            "`groups` must be ordered (a list or tuple), got a set, whose order changes from run "
            "to run."
        )
    result = []
    owner: dict[int, tuple[int, int]] = {}
    for k, group in enumerate(groups):
        if isinstance(group, Tensor):
            raise TypeError(
                f"Each element of `groups` must be a collection of tensors, but groups[{k}] is a "
                f"single tensor of shape {tuple(group.shape)}: wrap it in a list, e.g. `[t]`."
            )
        if isinstance(group, nn.Module):
            raise TypeError(
                f"groups[{k}] is a module ({type(group).__name__}), not a collection of tensors: "
                "give its parameters, e.g. `list(module.parameters())`, or build the groups with "
                "a strategy of torchjd.grouping (`per_network(encoder, decoder)`...)."
            )
        if isinstance(group, (set, frozenset)):
            raise ValueError(
                f"groups[{k}] is a set: each group must be ordered (a list or a tuple), since the "
                "order of a set changes from run to run."
            )
        if isinstance(group, (Mapping, str)) or not isinstance(group, Iterable):
            raise TypeError(
                f"Each element of `groups` must be an ordered collection of tensors, but "
                f"groups[{k}] is of type {type(group).__name__}."
            )
        tensors = tuple(group)
        if not tensors:
            raise ValueError(f"groups[{k}] is empty: every group must contain at least one tensor.")
        for i, t in enumerate(tensors):
            if not isinstance(t, Tensor):
                raise TypeError(
                    f"groups[{k}] must contain only tensors, but its element {i} is of type "
                    f"{type(t).__name__}."
                )
            if id(t) in owner:
                k0, i0 = owner[id(t)]
                where = "earlier in the same group" if k0 == k else f"in groups[{k0}]"
                raise ValueError(
                    f"A tensor may be in one group only, once: element {i} of groups[{k}] (shape "
                    f"{tuple(t.shape)}) is also element {i0} {where}."
                )
            owner[id(t)] = (k, i)
        result.append(tensors)
    if not result:
        raise ValueError("`groups` must contain at least one group, got none.")
    return tuple(result)


def _make_aggregators(aggregator: object, n_groups: int) -> list[nn.Module]:
    if isinstance(aggregator, nn.Module) and not isinstance(aggregator, nn.ModuleList):
        aggregators = [copy.deepcopy(aggregator) for _ in range(n_groups)]
        source = "the copies of the template `aggregator`"
    elif isinstance(aggregator, (Sequence, nn.ModuleList)) and not isinstance(aggregator, str):
        aggregators = list(aggregator)
        if len(aggregators) != n_groups:
            raise ValueError(
                f"`aggregator` must give one aggregator per group: got {len(aggregators)} "
                f"aggregators for {n_groups} groups."
            )
        source = "`aggregator`"
    elif callable(aggregator):
        aggregators = [aggregator() for _ in range(n_groups)]
        source = "the aggregators made by the factory `aggregator`"
    else:
        raise TypeError(
            "`aggregator` must be an aggregator (used as a template), a factory of aggregators "
            "or a sequence of aggregators (one per group), got an object of type "
            f"{type(aggregator).__name__}."
        )
    owner: dict[int, int] = {}
    for k, agg in enumerate(aggregators):
        if not isinstance(agg, nn.Module) or not callable(agg):
            raise TypeError(
                f"Every aggregator must be a torch.nn.Module (an Aggregator of "
                f"torchjd.aggregation), but {source} include an object of type "
                f"{type(agg).__name__} for group {k}."
            )
        for module in agg.modules():
            if id(module) in owner and owner[id(module)] != k:
                shared = "the same aggregator" if module is agg else f"the module {module!r}"
                raise ValueError(
                    f"Groups {owner[id(module)]} and {k} share {shared}: every group needs its own "
                    "aggregator instance, so that each keeps its own state. Give a template or a "
                    "factory, or distinct instances."
                )
            owner[id(module)] = k
    return aggregators

r"""The multi-task step without the Jacobian: block Gramians, weights, one update per module.

Setting (as for :func:`torchjd.autojac.mtl_backward`): a shared trunk computes ``features``, head
``i`` computes the scalar loss ``L_i`` from them. The trunk's hooked units ``u`` (see
:class:`~torchjd.autogram.Engine`) have parameters ``theta_u``; a group ``g`` (one for a plain
aggregator, several for a :class:`~torchjd.grouping.GroupedAggregator`) owns some of them. With
``delta_{i,u}`` the gradient of ``L_i`` w.r.t. an output of ``u`` (one vectorised backward pass
gives all of them),

.. math::

    G_g = \sum_{(u, k) \in g} J_{u,k} J_{u,k}^\top, \qquad
    w_g = \mathcal W_g(G_g), \qquad
    \Delta\theta_{u,k} = \sum_i w_{g,i} \frac{\partial L_i}{\partial \theta_{u,k}}
    = \Big(\frac{\partial f_u}{\partial \theta_{u,k}}\Big)^\top \sum_i w_{g,i}\, \delta_{i,u}

where ``(u, k)`` is the part of unit ``u``'s parameters in group ``g`` and ``J_{u,k}`` its block of
columns of the trunk's Jacobian: every block is formed by the per-layer rules of
:mod:`torchjd.autogram._layer_gramians` and the whole Jacobian never exists. With one group, the
update is simply the backward pass of ``sum_i L_i`` in which the gradient entering the features is
``sum_i w_i dL_i/df``: one ordinary backward pass, and the heads get their unweighted gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import reduce

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from torchjd._accumulation import accumulate_grads, check_grad_targets
from torchjd._graph import infer_leaves
from torchjd._pipeline import Group, Steps, choose_route, run
from torchjd._protocol import Need
from torchjd._tasks import validated_present, warn_no_task_present
from torchjd._validation import check_aggregator
from torchjd.aggregation import Aggregator
from torchjd.autogram._engine import (
    Deltas,
    Engine,
    _identity_seed,
    _recording_paused,
    output_gradients,
)
from torchjd.autogram._layer_gramians import (
    Items,
    Rows,
    module_gramians,
    module_update,
    trainable,
)
from torchjd.grouping import GroupedAggregator

# A tensor for the whole trunk, or one per group of a GroupedAggregator.
_PerGroup = Tensor | list[Tensor | None]

# One part of a unit's trainable parameters that falls in one group: (unit, group, parameters).
_Part = tuple[nn.Module, int, list[Tensor]]


class MTLEngine:
    r"""Multi-task steps of Jacobian descent on a shared trunk, without the trunk's Jacobian.

    The engine hooks the modules of the shared trunk (as :class:`Engine` does, with
    ``batch_dim=None``). After a forward pass, :meth:`backward` takes the task losses and the
    features the heads read, as :func:`~torchjd.autojac.mtl_backward` does, and an aggregator or a
    :class:`~torchjd.grouping.GroupedAggregator`; it fills the ``.grad`` fields with what
    ``mtl_backward`` followed by :func:`~torchjd.autojac.jac_to_grad` (or
    :meth:`GroupedAggregator.jac_to_grad() <torchjd.grouping.GroupedAggregator.jac_to_grad>`) would
    give, up to rounding, while holding only ``m × m`` Gramians and one module's block at a time
    instead of the ``m × n`` Jacobian (``m`` tasks, ``n`` shared parameters).

    - The Gramian of each group is the sum of the blocks ``J_u J_uᵀ`` of the hooked units in it
      (per-parameter blocks where a unit's parameters fall in several groups, e.g. with
      :func:`~torchjd.grouping.per_tensor`).
    - The weights of all groups come from the application pipeline of ``jac_to_grad``: batched
      across the groups of one weighting class, one state per group.
    - Ungrouped (a plain aggregator), the update is one ordinary backward pass of
      ``sum(losses)`` in which the gradient entering the features is
      ``sum_i w_i dL_i/dfeatures``; grouped, each hooked unit receives
      ``sum_i w_{g,i} dL_i/dtheta_u`` from one vector-Jacobian product with the combined
      output-gradients, and the heads a backward pass that stops at the features. Either way the
      heads get their unweighted gradients ``dL_i/dtheta_head``.

    Only aggregators whose weights come from the Gramian or from the number of rows can be used
    (every :class:`~torchjd.aggregation.GramianWeightedAggregator`, Mean, Sum, Constant,
    Random...); another one (or forward hooks on it) needs the Jacobian itself: use
    :func:`~torchjd.autojac.mtl_backward` and :func:`~torchjd.autojac.jac_to_grad`.

    >>> import torch
    >>> from torch import nn
    >>> from torchjd.aggregation import UPGrad
    >>> from torchjd.autogram import MTLEngine
    >>> trunk = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    >>> heads = [nn.Linear(8, 1), nn.Linear(8, 1)]
    >>> engine = MTLEngine(trunk)  # before the forward pass
    >>> features = trunk(torch.randn(16, 4))
    >>> losses = [head(features).pow(2).mean() for head in heads]
    >>> engine.backward(losses, features, UPGrad()).shape  # the weights
    torch.Size([2])

    :meth:`task_views` and :meth:`weigh` split the ungrouped step in two, for a training framework
    that runs its own ``loss.backward()`` (with gradient scaling, DDP's reducer...): the heads
    read one view of the features each, :meth:`weigh` returns the weights and registers on each
    view a hook that scales its gradient by the task's weight, and the framework's backward pass
    of ``sum(losses)`` (times any scale) then writes the update. :meth:`gradients` serves such a
    framework better, grouped or not: the heads read a detached copy of the features, the engine
    returns the weights and an update made per layer (no second backward pass through the trunk),
    and the framework's backward pass, which then stops at the features, hands it over.

    Data-parallel training (``data_parallel=True``, every process of the default process group
    calling the engine on its shard of the batch): the Jacobian of the whole batch is never
    formed, so the Gramian used is the **mean of the local Gramians**,
    :math:`\tilde G = \frac1R \sum_r J_r J_r^\top`, all-reduced in one collective for all the
    groups. It is not the Gramian of the mean Jacobian :math:`\bar J = \frac1R \sum_r J_r`:
    :math:`\tilde G = \bar J \bar J^\top + \frac1R \sum_r (J_r - \bar J)(J_r - \bar J)^\top`,
    the second term being the spread of the tasks' gradients between the shards (it vanishes when
    the shards agree, and shrinks as the local batches grow). The weights are computed with the
    first process's CPU generator (its state is broadcast, then every process gets its own back),
    so all processes use the same weights and keep identical aggregator states. The update
    :math:`w^\top \bar J` is then the mean of the local updates: ungrouped, the ordinary backward
    pass writes the local one and ``DistributedDataParallel``'s reducer averages it (wrap the
    model in it as usual); grouped, the engine averages the trunk's updates and the heads'
    gradients itself (one all-reduce each), so the model must not be wrapped in
    ``DistributedDataParallel`` (or the step must run under its ``no_sync()``).

    :param modules: The modules of the shared trunk (see :class:`Engine` for which submodules are
        hooked). A parameter must not be used by two hooked units (tied weights).
    :param data_parallel: Keyword-only. Average the Gramians (and, grouped, the updates) over the
        processes of the default process group, as described above. Default ``False``.
    """

    def __init__(self, *modules: nn.Module, data_parallel: bool = False) -> None:
        if not isinstance(data_parallel, bool):
            raise TypeError(f"`data_parallel` must be a bool, got {data_parallel!r}.")
        self._engine = Engine(*modules, batch_dim=None)
        self._views: list[Tensor] | None = None  # of the last task_views call
        self.data_parallel = data_parallel

    def backward(
        self,
        losses: Sequence[Tensor],
        /,
        features: Sequence[Tensor] | Tensor,
        aggregator: Aggregator | GroupedAggregator,
        *,
        present: Tensor | Sequence[bool] | None = None,
    ) -> Tensor | list[Tensor | None]:
        """Accumulate the step into ``.grad``: the trunk's update aggregated from the Gramians,
        the heads' unweighted gradients.

        Consumes the forward calls recorded since the previous step (every grad-enabled forward
        pass through the trunk must flow into ``losses``) and frees the graph.

        :param losses: One scalar loss per task, computed by the heads from ``features``.
        :param features: The tensor, or sequence of tensors, output by the trunk and read by the
            heads.
        :param aggregator: An aggregator whose weights come from the Gramian or from the number
            of rows, or a :class:`~torchjd.grouping.GroupedAggregator` whose groups hold exactly
            the trainable parameters of the hooked units.
        :param present: Keyword-only. One boolean per task (see the page on missing tasks): only
            the present tasks' losses are differentiated, the aggregators see their ``k`` rows
            (hyper-parameters and state restricted to them) and an absent task weighs 0. No task
            present: a warning, and no ``.grad`` is touched. Default ``None``: all present.
        :return: The weights (``[m]``); with a ``GroupedAggregator``, the list of each group's
            weights (also in its ``last_weights``).
        """
        losses_ = _checked_losses(losses)
        features_ = _checked_features(features)
        grouped = isinstance(aggregator, GroupedAggregator)
        for each in aggregator.aggregators if grouped else [aggregator]:  # type: ignore[union-attr]
            _checked_route(each)
        m = len(losses_)
        indices = None if present is None else validated_present(present, m)
        if indices is not None:
            if len(indices) == 0:
                self._engine._recorder.records = []  # the step's forward calls are dropped
                warn_no_task_present("`.grad` is left untouched", 1)
                zeros = losses_[0].new_zeros(m)
                return [zeros for _ in aggregator.aggregators] if grouped else zeros  # type: ignore[union-attr]
            losses_ = [losses_[i] for i in indices.tolist()]
        tasks = _Tasks(indices, m)
        by_module, feature_grads = self._output_gradients(losses_, [] if grouped else features_)
        if isinstance(aggregator, GroupedAggregator):
            return self._grouped_step(losses_, features_, by_module, aggregator, tasks)
        weights = self._ungrouped_weights(by_module, aggregator, len(losses_), tasks)
        del by_module
        present_weights = weights if indices is None else weights[indices.to(weights.device)]
        _backward_with_feature_gradients(losses_, features_, feature_grads, present_weights)
        return weights

    def task_views(self, features: Tensor, n_tasks: int) -> list[Tensor]:
        """One view of ``features`` per task, for the heads to read in place of ``features``
        before :meth:`weigh`: the view of task ``i`` is where its weight will apply."""
        if not isinstance(features, Tensor) or not features.requires_grad:
            raise ValueError(
                "`features` must be a tensor that requires grad: the output of the trunk."
            )
        if isinstance(n_tasks, bool) or not isinstance(n_tasks, int) or n_tasks < 1:
            raise ValueError(f"`n_tasks` must be an int >= 1, got {n_tasks!r}.")
        views = [features.view_as(features) for _ in range(n_tasks)]
        self._views = views
        return views

    def weigh(self, losses: Sequence[Tensor], /, aggregator: Aggregator) -> Tensor:
        """The weights of the ungrouped step, from the Gramian; registers on the view of each
        task (from the last :meth:`task_views` call) a hook that multiplies its gradient by the
        task's weight, so that the backward pass of ``sum(losses)`` then writes the update (the
        graph is kept for it).

        :param losses: One scalar loss per task; loss ``i`` read the view ``i`` only.
        :param aggregator: An aggregator whose weights come from the Gramian or the row count.
        :return: The weights, ``[m]``.
        """
        if isinstance(aggregator, GroupedAggregator):
            raise TypeError(
                "`weigh` is the ungrouped step (one weight per task for the whole trunk). With a "
                "GroupedAggregator, use `backward`, which writes each module's update itself."
            )
        _checked_route(aggregator)
        losses_ = _checked_losses(losses)
        views = self._views
        if views is None or len(views) != len(losses_):
            raise ValueError(
                f"Call `task_views(features, {len(losses_)})` before the heads, have head `i` read "
                "view `i`, then `weigh` the losses (one per view)."
            )
        self._views = None
        by_module, _ = self._output_gradients(losses_, [])
        weights = self._ungrouped_weights(by_module, aggregator, len(losses_))
        del by_module
        for view, w in zip(views, weights.unbind(0)):
            view.register_hook(lambda g, w=w: g * w.to(g.dtype))
        return weights

    def gradients(
        self,
        feature_grads: Tensor,
        /,
        features: Tensor,
        aggregator: Aggregator | GroupedAggregator,
        *,
        compute_gramians: bool = False,
        scale: Tensor | None = None,
    ) -> tuple[_PerGroup, _PerGroup | None, PendingUpdate]:
        """The weights and the trunk's update, without writing ``.grad``: for a training framework
        that applies the update in its own backward pass (with its gradient scaling,
        accumulation, data-parallel reducer...), while the heads' backward pass stops at the
        features (they read a detached copy of them).

        The trunk is differentiated from ``features`` seeded with ``feature_grads``, the gradient
        of each task's loss w.r.t. the features; the update of each hooked unit is one
        vector-Jacobian product with its combined output-gradients (the trunk's full backward
        pass, which would also compute the gradients of its activations, is never run), made when
        the returned ``PendingUpdate`` is called (typically inside the framework's backward
        pass, with the gradient that reaches the loss as ``factor``). With ``data_parallel``, the
        Gramians are averaged over the processes as in :meth:`backward`, but the update is this
        process's own: the framework's data-parallel wrapper averages it, as it does the heads'
        gradients.

        :param feature_grads: ``[m, *features.shape]``: row ``i`` is the gradient of task ``i``'s
            loss w.r.t. ``features``.
        :param features: The output of the trunk (with its graph), computed by the forward pass
            recorded since the previous step.
        :param aggregator: As in :meth:`backward`: an aggregator whose weights come from the
            Gramian or the row count, or a :class:`~torchjd.grouping.GroupedAggregator`.
        :param compute_gramians: Keyword-only. Also form the Gramian of the groups whose
            aggregator reads only the row count (e.g. to log the tasks' cosine similarities).
            Default ``False``.
        :param scale: Keyword-only. A positive scalar tensor by which ``feature_grads`` are
            multiplied (a gradient scaler's scale, so that small gradients survive float16): the
            Gramians are divided by its square before the weighting and the update by it, so both
            are those of the unscaled losses (exactly, for a power of two). An overflow gives a
            non-finite update, which the scaler then skips. Default ``None``: unscaled.
        :return: The weights (``[m]``, or one per group), the Gramians they come from (``[m, m]``,
            or one per group; ``None`` where not formed), and the pending update of the
            trainable parameters of the hooked units that the tasks reached.
        """
        _check_feature_grads(feature_grads, features)
        grouped = isinstance(aggregator, GroupedAggregator)
        if isinstance(aggregator, GroupedAggregator):
            tensor_groups = aggregator.groups
            aggregators = list(aggregator.aggregators)
            compute_gramians = compute_gramians or aggregator.compute_gramians
        else:
            tensor_groups = [[p for unit in self._engine._units for p in trainable(unit)]]
            aggregators = [aggregator]
        for each in aggregators:
            _checked_route(each)
        m = feature_grads.shape[0]
        records = self._engine._recorder.records
        self._engine._recorder.records = []
        seed = feature_grads.to(features.dtype)
        by_module, _ = output_gradients(features, seed, _task_rows(m), records, [])
        parts = _parts(self._engine._units, by_module, tensor_groups)
        steps = _BlockSteps(by_module, parts, m, self._world(), collect=True, scale=scale)
        groups = steps.groups(
            [[] for _ in tensor_groups], aggregators, compute_gramians=compute_gramians
        )
        if isinstance(aggregator, GroupedAggregator):
            weights: _PerGroup = aggregator._aggregate_groups(
                lambda _groups: steps, retain_jac=True, stacklevel=3, prepared=groups
            )
        else:
            run(groups, steps, retain_jac=True, stacklevel=3)
            assert groups[0].weights is not None
            weights = groups[0].weights
        gramians = [g.gramian for g in groups]
        return weights, gramians if grouped else gramians[0], PendingUpdate(steps, groups)

    def discard(self) -> None:
        """Forget the forward calls recorded since the previous step, for a step that stops after
        its forward pass (a training framework skipping a batch, say): the next step would
        otherwise see calls that do not reach its losses."""
        self._engine._recorder.records = []
        self._views = None

    def _grouped_step(
        self,
        losses: list[Tensor],
        features: list[Tensor],
        by_module: Deltas,
        grouped: GroupedAggregator,
        tasks: _Tasks | None = None,
    ) -> list[Tensor | None]:
        """Weights per group, each unit's update from one VJP per part, the heads' gradients."""
        tensor_groups = grouped.groups
        parts = _parts(self._engine._units, by_module, tensor_groups)
        steps = _BlockSteps(by_module, parts, len(losses), self._world(), tasks=tasks)
        prepared = steps.groups(
            tensor_groups, list(grouped.aggregators), compute_gramians=grouped.compute_gramians
        )
        result = grouped._aggregate_groups(
            lambda _groups: steps, retain_jac=True, stacklevel=3, prepared=prepared
        )
        trunk = {id(t) for group in tensor_groups for t in group}
        _backward_heads(losses, features, trunk, self._world())
        return result

    def _ungrouped_weights(
        self, by_module: Deltas, aggregator: Aggregator, m: int, tasks: _Tasks | None = None
    ) -> Tensor:
        """The weights of one group holding the whole trunk; the update is left to a backward."""
        units = self._engine._units
        every = [[p for unit in units for p in trainable(unit)]]
        parts = _parts(units, by_module, every)
        steps = _BlockSteps(by_module, parts, m, self._world(), update=False, tasks=tasks)
        (group,) = steps.groups([[]], [aggregator])
        run([group], steps, retain_jac=True, stacklevel=3)
        assert group.weights is not None
        return group.weights

    def _world(self) -> int:
        """The number of processes to average over (1 without ``data_parallel``)."""
        if not self.data_parallel:
            return 1
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "`data_parallel=True` needs an initialised default process group "
                "(`torch.distributed.init_process_group`)."
            )
        return dist.get_world_size()

    def _output_gradients(
        self, losses: list[Tensor], extra: list[Tensor]
    ) -> tuple[Deltas, list[Tensor | None]]:
        records = self._engine._recorder.records
        self._engine._recorder.records = []
        m = len(losses)
        target = torch.stack(losses).reshape(m, 1)
        seed = _identity_seed(m, 1, target)
        return output_gradients(target, seed, _task_rows(m), records, extra)


@dataclass(frozen=True)
class _Tasks:
    """The present tasks of a step: their indices among ``n_tasks`` (``None``: all present)."""

    indices: Tensor | None
    n_tasks: int


class _BlockSteps(Steps):
    """The pipeline's steps for block Gramians: each group's Gramian is the sum of the blocks of
    its parts; the update of a group is one VJP per part (``update``), or left to a backward
    pass."""

    warns_unsynchronized = False  # there are no `.jac` fields

    def __init__(
        self,
        by_module: Deltas,
        parts: list[_Part],
        m: int,
        world: int,
        update: bool = True,
        tasks: _Tasks | None = None,
        collect: bool = False,
        scale: Tensor | None = None,
    ) -> None:
        self.tasks = tasks if tasks is not None else _Tasks(None, m)
        # `collect`: no update here, the caller makes it later (`PendingUpdate`), unaveraged.
        self.collect = collect
        self.scale = scale  # of the output-gradients, undone on the Gramians and the updates
        self.by_module = by_module
        self.parts = parts
        self.m = m
        self.world = world  # processes whose Gramians and updates are averaged
        self.update = update

    def scope(self) -> AbstractContextManager[object]:
        return _FirstProcessGenerator() if self.world > 1 else contextlib.nullcontext()

    def groups(
        self,
        tensors: list[list[Tensor]],
        aggregators: list[Aggregator],
        compute_gramians: bool = False,
    ) -> list[Group]:
        """The pipeline's groups, checked; ``tensors`` empty for an update left to a backward;
        ``compute_gramians``: also for the aggregators that read only the row count."""
        result = []
        params = [p for _, _, ps in self.parts for p in ps]
        dtype = reduce(torch.promote_types, (p.dtype for p in params))
        for k, (group_tensors, aggregator) in enumerate(zip(tensors, aggregators)):
            route = _checked_route(aggregator)
            check_grad_targets(group_tensors, f"groups[{k}]", requires_grad_error=ValueError)
            wants = route is Need.GRAMIAN or compute_gramians
            result.append(
                Group(
                    group_tensors,
                    [],
                    aggregator,
                    route,
                    self.m,
                    wants,
                    dtype,
                    params[0].device,
                    present=self.tasks.indices,
                    n_tasks=self.tasks.n_tasks,
                )
            )
        return result

    def prepare(self, groups: list[Group]) -> None:
        gramians: list[Tensor | None] = [None] * len(groups)
        with torch.no_grad(), _recording_paused():
            for unit, items in self.by_module.items():
                unit_parts = [(k, ps) for u, k, ps in self.parts if u is unit]
                if not any(groups[k].wants_gramian for k, _ in unit_parts):
                    continue
                blocks = module_gramians(
                    unit, items, _task_rows(self.m), [ps for _, ps in unit_parts]
                )
                for (k, _), block in zip(unit_parts, blocks):
                    block = block.to(groups[k].gramian_dtype)
                    total = gramians[k]
                    gramians[k] = block if total is None else total + block
        wanting = [(g, gramian) for g, gramian in zip(groups, gramians) if g.wants_gramian]
        for group, gramian in wanting:
            # A group whose units the losses did not reach has a zero Jacobian.
            zeros = torch.zeros((self.m, self.m), dtype=group.gramian_dtype, device=group.device)
            group.gramian = zeros if gramian is None else gramian
            if self.scale is not None:
                group.gramian = group.gramian / self.scale.to(group.gramian_dtype).square()
        if self.world > 1 and wanting:
            # The mean of the local Gramians, all the groups in one collective.
            stacked = torch.stack([group.gramian for group, _ in wanting])  # type: ignore[misc]
            for (group, _), mean in zip(wanting, _all_mean([stacked], self.world)[0]):
                group.gramian = mean

    def combine(self, groups: list[Group]) -> None:
        if not self.update or self.collect:
            return
        updates: dict[int, Tensor] = {}
        with torch.no_grad(), _recording_paused():
            for unit, k, params in self.parts:
                weights = groups[k].weights
                assert weights is not None
                grads = module_update(unit, self.by_module[unit], params, weights)
                updates.update((id(p), g) for p, g in zip(params, grads))
        for group in groups:
            group.gradients = [
                updates[id(t)].to(t.dtype) if id(t) in updates else torch.zeros_like(t)
                for t in group.tensors
            ]
        if self.world > 1:
            means = iter(_all_mean([g for group in groups for g in group.gradients], self.world))
            for group in groups:
                group.gradients = [next(means) for _ in group.gradients]


class PendingUpdate:
    """The trunk's update of an :meth:`MTLEngine.gradients` call, made when called (once).

    ``parameters`` lists the parameters it updates; ``update(factor)`` returns, in that order,
    ``factor * sum_i w_i dL_i/dtheta`` for each (``factor``: a scalar tensor, e.g. the gradient
    that reaches the loss in the framework's backward pass; default 1), with the weights of each
    parameter's group. Until then it holds, for each hooked unit, its output-gradients already
    combined with the weights (the size of one task's, not ``m`` tasks'), and the graph.
    """

    def __init__(self, steps: _BlockSteps, groups: list[Group]) -> None:
        self._scale = steps.scale
        self._parts: list[tuple[nn.Module, list[Tensor], Items]] | None = []
        for unit, k, params in steps.parts:
            weights = groups[k].weights
            assert weights is not None
            combined = [
                (call, tuple(_combined(weights, delta) for delta in deltas))
                for call, deltas in steps.by_module[unit]
            ]
            self._parts.append((unit, params, combined))
        self.parameters = [p for _, params, _ in self._parts for p in params]

    def __call__(self, factor: Tensor | None = None) -> list[Tensor]:
        parts = self._parts
        if parts is None:
            raise RuntimeError("This update was already made: a PendingUpdate is called once.")
        self._parts = None  # frees the output-gradients
        ratio = factor
        if self._scale is not None:
            ratio = 1 / self._scale if factor is None else factor / self._scale
        result = []
        with torch.no_grad(), _recording_paused():
            for unit, params, items in parts:
                # The ratio goes into the one-row weights (free) unless the output-gradients are
                # in half precision: a loss scale's inverse, or a factor like 1/3, would then
                # lose digits or underflow there, so it multiplies the results instead.
                low = items[0][1][0].dtype in (torch.float16, torch.bfloat16)
                fold = ratio is not None and not low
                one = torch.ones(1, dtype=torch.float32, device=items[0][1][0].device)
                weights = ratio.reshape(1).to(one) if fold else one  # type: ignore[union-attr]
                grads = module_update(unit, items, params, weights)
                if ratio is not None and not fold:
                    grads = [g.mul_(ratio.to(g.dtype)) for g in grads]
                result.extend(grads)
        return result


def _combined(weights: Tensor, delta: Tensor) -> Tensor:
    """``sum_i w_i delta_i`` as the one row of a ``[1, ...]`` stack of output-gradients."""
    return torch.tensordot(weights.to(delta.dtype), delta, dims=1).unsqueeze(0)


def _checked_route(aggregator: object) -> Need:
    """What ``aggregator`` reads (the Gramian or the row count); anything else is refused."""
    check_aggregator(aggregator)
    assert isinstance(aggregator, Aggregator)
    route = choose_route(aggregator)
    if route is Need.MATRIX:
        raise ValueError(
            f"The aggregator {aggregator!r} needs the whole Jacobian (it declares "
            "`need = matrix`, or forward hooks on it or on its weighting must see the "
            "matrix), which this engine never forms. Use torchjd.autojac: `mtl_backward` "
            "then `jac_to_grad` (or `GroupedAggregator.jac_to_grad`)."
        )
    return route


def _task_rows(m: int) -> Rows:
    """The rows of the trunk's Jacobian: one per task, without batch structure."""
    return Rows(d=m, n_samples=1, batched=False)


def _checked_losses(losses: object) -> list[Tensor]:
    if isinstance(losses, Tensor) or not isinstance(losses, Sequence) or not losses:
        raise TypeError(
            "`losses` must be a non-empty sequence (list or tuple) of scalar tensors, one per "
            f"task, got {type(losses).__name__}."
        )
    result = list(losses)
    for i, loss in enumerate(result):
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            got = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(
                f"Element {i} of `losses` must be a scalar tensor (one loss per task), got "
                f"{got}. Reduce each task's loss to a scalar (e.g. `.mean()`)."
            )
        if not loss.requires_grad:
            raise RuntimeError(
                f"Element {i} of `losses` does not require grad: is it detached or computed "
                "under no_grad?"
            )
    if len({loss.dtype for loss in result}) > 1:
        raise ValueError("The losses must have one dtype, got several.")
    return [loss.reshape(()) for loss in result]


def _checked_features(features: object) -> list[Tensor]:
    result = [features] if isinstance(features, Tensor) else features
    if not isinstance(result, Sequence) or not result:
        raise TypeError(
            "`features` must be a tensor or a non-empty sequence of tensors (the outputs of the "
            f"trunk read by the heads), got {type(features).__name__}."
        )
    for i, f in enumerate(result):
        if not isinstance(f, Tensor) or f.grad_fn is None:
            raise ValueError(
                f"Element {i} of `features` must be a tensor computed by the trunk (with a "
                "`grad_fn`): the output the heads read."
            )
    return list(result)


def _check_feature_grads(feature_grads: object, features: object) -> None:
    if not isinstance(features, Tensor) or features.grad_fn is None:
        raise ValueError(
            "`features` must be a tensor computed by the trunk (with a `grad_fn`): the output the "
            "heads read."
        )
    if not isinstance(feature_grads, Tensor) or feature_grads.shape[1:] != features.shape:
        got = tuple(feature_grads.shape) if isinstance(feature_grads, Tensor) else None
        raise ValueError(
            f"`feature_grads` must have shape [m, *features.shape] = [m, "
            f"{', '.join(map(str, features.shape))}], got {got}."
        )


def _parts(units: list[nn.Module], reached: Deltas, groups: list[list[Tensor]]) -> list[_Part]:
    """The parts of the reached units' parameters, one per (unit, group) pair, in group order;
    every trainable parameter of a hooked unit must be in one group, and every grouped tensor a
    trainable parameter of a hooked unit."""
    group_of = {id(t): k for k, group in enumerate(groups) for t in group}
    hooked: set[int] = set()
    parts = []
    for unit in units:
        by_group: dict[int, list[Tensor]] = {}
        for name, param in unit.named_parameters():
            if not param.requires_grad:
                continue
            hooked.add(id(param))
            if id(param) not in group_of:
                raise ValueError(
                    f"The parameter `{name}` of the hooked module `{type(unit).__name__}` is in "
                    "no group: the groups must hold every trainable parameter of the trunk given "
                    "to the engine (build them from the same modules)."
                )
            by_group.setdefault(group_of[id(param)], []).append(param)
        if unit in reached:
            parts.extend((unit, k, params) for k, params in sorted(by_group.items()))
    for k, group in enumerate(groups):
        for i, t in enumerate(group):
            if id(t) not in hooked:
                raise ValueError(
                    f"Element {i} of groups[{k}] (shape {tuple(t.shape)}) is not a trainable "
                    "parameter of the modules the engine hooks: the groups must be made of the "
                    "trunk's parameters only (the heads get their gradients separately)."
                )
    return parts


def _backward_heads(
    losses: list[Tensor], features: list[Tensor], trunk: set[int], world: int
) -> None:
    """The heads' unweighted gradients (averaged over ``world`` processes): a backward pass of
    ``sum(losses)`` that stops at the features (the graph is freed)."""
    heads = infer_leaves(losses, excluded=features)
    for param in heads:
        if id(param) in trunk:
            raise ValueError(
                f"A parameter of the trunk (shape {tuple(param.shape)}) is also read by a head "
                "without going through `features`: pass the features the heads read."
            )
    if not heads:
        return
    grads = list(torch.autograd.grad(torch.stack(losses).sum(), heads))
    if world > 1:
        grads = _all_mean(grads, world)
    accumulate_grads(heads, grads)


def _all_mean(tensors: list[Tensor], world: int) -> list[Tensor]:
    """The mean of ``tensors`` over the processes of the default group, in one all-reduce."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world
    pieces = flat.split([t.numel() for t in tensors])
    return [piece.view_as(t) for piece, t in zip(pieces, tensors)]


class _FirstProcessGenerator:
    """Within the context, every process draws from the first process's CPU generator: the first
    process keeps its own (it draws what a single process would), the others take a copy of its
    state and get their own back on exit."""

    def __enter__(self) -> None:
        state = torch.get_rng_state()
        dist.broadcast(state, src=0)
        self.saved = None if dist.get_rank() == 0 else torch.get_rng_state()
        if self.saved is not None:
            torch.set_rng_state(state)

    def __exit__(self, *exc: object) -> None:
        if self.saved is not None:
            torch.set_rng_state(self.saved)


def _backward_with_feature_gradients(
    losses: list[Tensor],
    features: list[Tensor],
    feature_grads: list[Tensor | None],
    weights: Tensor,
) -> None:
    """One backward pass of ``sum(losses)`` in which the gradient of each feature is replaced by
    ``sum_i w_i dL_i/df``: the heads get their own gradients, the trunk the update."""
    handles: list[RemovableHandle] = []
    for feature, grads in zip(features, feature_grads):
        if grads is None:
            continue
        combined = torch.tensordot(weights.to(grads.dtype), grads, dims=1)
        handles.append(feature.register_hook(lambda _g, c=combined: c))
    try:
        torch.autograd.backward(torch.stack(losses).sum())
    finally:
        for handle in handles:
            handle.remove()

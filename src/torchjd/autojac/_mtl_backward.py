from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from torchjd._accumulation import (
    accumulate_grads,
    accumulate_jacs,
    check_grad_targets,
    check_jac_targets,
)
from torchjd._graph import infer_leaves
from torchjd._tasks import validated_present
from torchjd._validation import (
    as_tensor_list,
    check_chunk_size,
    check_has_grad_fn,
    check_non_empty,
    check_unique,
    deduplicate,
    materialise,
)
from torchjd.autojac._engine import (
    GivenRows,
    grad,
    reaches,
    scatter_rows,
    vjp_rows,
)


def mtl_backward(
    tensors: Sequence[Tensor],
    /,
    features: Sequence[Tensor] | Tensor,
    *,
    grad_tensors: Sequence[Tensor] | None = None,
    tasks_params: Sequence[Iterable[Tensor]] | None = None,
    shared_params: Iterable[Tensor] | None = None,
    retain_graph: bool = False,
    parallel_chunk_size: int | None = None,
    present: Tensor | Sequence[bool] | None = None,
) -> None:
    r"""Backward pass of multi-task learning: Jacobian for the shared part, gradients for the heads.

    Setting: a shared trunk computes ``features``, and head ``i`` computes ``tensors[i]`` (typically
    the loss of task ``i``) from them. Let :math:`s_i = \langle v_i,` ``tensors[i]`` :math:`\rangle`
    with :math:`v_i` = ``grad_tensors[i]`` (``1`` for a scalar loss). This function

    1. accumulates :math:`\partial s_i / \partial \theta` into ``.grad`` of each parameter
       :math:`\theta` of task ``i`` (a parameter of several tasks receives the sum);
    2. stacks the gradients :math:`\partial s_i / \partial f` w.r.t. the features into a
       ``k``-row Jacobian (``k = len(tensors)``; zeros for a feature a task does not use);
    3. back-propagates it through the trunk with vectorised vector-Jacobian products and
       accumulates into ``.jac`` of each shared parameter a Jacobian of shape ``[k, *p.shape]``
       whose row ``i`` is :math:`\partial s_i / \partial p` through the features.

    Then :func:`torchjd.autojac.jac_to_grad` aggregates the shared ``.jac`` fields into ``.grad``.

    :param tensors: One tensor per task (usually its scalar loss), a sequence without the same
        tensor twice. A single tensor is one task.
    :param features: The tensor or sequence of tensors output by the shared trunk and used by the
        heads. Non-empty, without the same tensor twice.
    :param grad_tensors: One tensor per task, of exactly the shape of ``tensors[i]``, weighting its
        entries; required when a task tensor is not a scalar. ``None`` (default): ``1`` for each.
    :param tasks_params: One iterable of tensors per task: the parameters of its head (repeated
        ones count once). ``None`` (default): for each task, the leaves requiring grad that it
        depends on without going through the features.
    :param shared_params: The parameters of the trunk (any iterable; repeated ones count once).
        ``None`` (default): the leaves requiring grad that the features depend on. It must not
        share a tensor with ``tasks_params``.
    :param retain_graph: Keep the autograd graph after the call. Default ``False``. Each task's
        gradient is one ``autograd.grad`` call above the features, with this value: if two task
        tensors share part of their graph above the features, ``retain_graph=True`` is needed.
    :param parallel_chunk_size: Number of tasks (rows) back-propagated through the trunk in one
        vectorised call (an int ``>= 1``); ``None`` (default): all of them at once. ``1`` avoids
        :func:`torch.vmap`.
    :param present: Which tasks are present in this step: a boolean tensor or a sequence of
        ``k`` booleans. An absent task's tensor is not differentiated at all (its value may be
        anything, e.g. the NaN of a mean over no labelled sample): its parameters' ``.grad`` is
        left untouched and its row of the shared ``.jac`` is zero (see :doc:`/missing_tasks`).
        Default ``None``: every task.

    >>> import torch
    >>> from torchjd.autojac import mtl_backward
    >>> p0 = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> w1 = torch.tensor([1.0, 0.0], requires_grad=True)
    >>> w2 = torch.tensor([0.0, 1.0], requires_grad=True)
    >>> f = p0 * 3
    >>> mtl_backward([w1 @ f, w2 @ f], features=f)
    >>> p0.jac
    tensor([[3., 0.],
            [0., 3.]])
    >>> w1.grad
    tensor([3., 6.])
    """
    check_chunk_size(parallel_chunk_size)
    tensors_ = as_tensor_list(tensors, "tensors")
    features_ = as_tensor_list(features, "features")
    check_unique(tensors_, "tensors")
    check_unique(features_, "features")
    if shared_params is None or tasks_params is None:
        check_has_grad_fn(features_, "features", "infer the parameters")
    if tasks_params is None:
        check_has_grad_fn(tensors_, "tensors", "infer the task-specific parameters")
    check_non_empty(features_, "features")
    check_non_empty(tensors_, "tensors")

    if shared_params is None:
        shared = infer_leaves(features_)
    else:
        shared = deduplicate(materialise(shared_params, "shared_params"))
    if shared and not reaches(tensors_, features_):
        raise ValueError(
            "No task tensor depends on `features`: the features must be the output of the shared "
            "trunk that the heads read (e.g. `features = trunk(x)`, then `loss_i = "
            "criterion(head_i(features), y_i)`). Pass the tensor the heads actually use."
        )
    tasks = _tasks_params(tasks_params, tensors_, features_)
    _check_disjoint(shared, tasks, inferred=(shared_params is None, tasks_params is None))
    task_grad_tensors = _grad_tensors(grad_tensors, tensors_)

    k = len(tensors_)
    indices = None if present is None else validated_present(present, k)
    chosen = range(k) if indices is None else indices.tolist()
    for i, params in enumerate(tasks):
        check_grad_targets(params, f"tasks_params[{i}]")
    check_jac_targets(shared, k, "shared_params")

    # Steps 1 and 2: one gradient per task, w.r.t. its parameters and the features.
    task_grads: list[list[Tensor]] = []
    feature_grads: list[list[Tensor]] = [[] for _ in features_]
    for i in chosen:
        y, v, params = tensors_[i], task_grad_tensors[i], tasks[i]
        wrt = [*params, *features_] if shared else params
        grads = grad(y, wrt, v, retain_graph)
        task_grads.append(grads[: len(params)])
        for rows, g in zip(feature_grads, grads[len(params) :]):
            rows.append(g)

    # Step 3: the k-row Jacobian w.r.t. the features, back-propagated to the shared parameters.
    shared_jacobians: list[Tensor] = []
    if shared and chosen:
        rows = GivenRows([torch.stack(g) for g in feature_grads])
        shared_jacobians = vjp_rows(features_, shared, rows, retain_graph, parallel_chunk_size)
        if indices is not None:  # the absent tasks' rows are zero
            shared_jacobians = scatter_rows(shared_jacobians, indices, k)
    elif shared:  # no task present
        shared_jacobians = [
            torch.zeros((k, *p.shape), dtype=p.dtype, device=p.device) for p in shared
        ]

    for i, grads in zip(chosen, task_grads):
        accumulate_grads(tasks[i], grads)
    accumulate_jacs(shared, shared_jacobians)


def _tasks_params(
    tasks_params: Sequence[Iterable[Tensor]] | None,
    tensors: list[Tensor],
    features: list[Tensor],
) -> list[list[Tensor]]:
    if tasks_params is None:
        return [infer_leaves([y], excluded=features) for y in tensors]
    if not isinstance(tasks_params, Sequence) or isinstance(tasks_params, (str, Tensor)):
        raise TypeError(
            "`tasks_params` must be a sequence (list or tuple) with one iterable of tensors per "
            f"task, got an object of type {type(tasks_params).__name__}."
        )
    if len(tasks_params) != len(tensors):
        raise ValueError(
            f"`tasks_params` must hold one iterable of parameters per task: got "
            f"{len(tasks_params)} for {len(tensors)} task tensor(s)."
        )
    return [
        deduplicate(materialise(params, f"tasks_params[{i}]"))
        for i, params in enumerate(tasks_params)
    ]


def _check_disjoint(
    shared: list[Tensor], tasks: list[list[Tensor]], inferred: tuple[bool, bool]
) -> None:
    shared_ids = {id(p) for p in shared}
    for i, params in enumerate(tasks):
        for p in params:
            if id(p) in shared_ids:
                how = (
                    " (the parameters were inferred: task tensor "
                    f"{i} uses this shared parameter without going through the features)"
                    if any(inferred)
                    else ""
                )
                raise ValueError(
                    f"A tensor of shape {tuple(p.shape)} is both a shared parameter and a "
                    f"parameter of task {i}{how}. Each parameter must be either shared (it gets a "
                    "`.jac`) or task-specific (it gets a `.grad`): pass `shared_params` and "
                    "`tasks_params` explicitly."
                )


def _grad_tensors(grad_tensors: Sequence[Tensor] | None, tensors: list[Tensor]) -> list[Tensor]:
    if grad_tensors is None:
        for i, y in enumerate(tensors):
            if y.ndim > 0:
                raise ValueError(
                    f"`tensors[{i}]` has shape {tuple(y.shape)}: a non-scalar task tensor needs "
                    "`grad_tensors` (one tensor of the same shape per task, weighting its entries)."
                )
        return [torch.ones_like(y) for y in tensors]
    grad_tensors_ = as_tensor_list(grad_tensors, "grad_tensors")
    if len(grad_tensors_) != len(tensors):
        raise ValueError(
            f"`grad_tensors` must hold one tensor per task tensor: got {len(grad_tensors_)} for "
            f"{len(tensors)} task tensor(s)."
        )
    for i, (v, y) in enumerate(zip(grad_tensors_, tensors)):
        if v.shape != y.shape:
            raise ValueError(
                f"`grad_tensors[{i}]` must have exactly the shape of `tensors[{i}]`, "
                f"{tuple(y.shape)}, got {tuple(v.shape)}."
            )
    return grad_tensors_

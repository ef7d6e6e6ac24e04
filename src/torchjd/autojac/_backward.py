from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from torchjd._accumulation import accumulate_jacs, check_jac_targets
from torchjd._graph import infer_leaves
from torchjd._tasks import validated_present
from torchjd._validation import (
    as_tensor_list,
    check_chunk_size,
    check_has_grad_fn,
    check_initial_jacobians,
    check_non_empty,
    check_unique,
    deduplicate,
    materialise,
)
from torchjd.autojac._engine import (
    GivenRows,
    IdentityRows,
    Rows,
    check_requires_grad,
    scatter_rows,
    select_rows,
    vjp_rows,
)


def backward(
    tensors: Sequence[Tensor] | Tensor,
    /,
    *,
    jac_tensors: Sequence[Tensor] | Tensor | None = None,
    inputs: Iterable[Tensor] | None = None,
    retain_graph: bool = False,
    parallel_chunk_size: int | None = None,
    present: Tensor | Sequence[bool] | None = None,
) -> None:
    r"""Compute the Jacobian of ``tensors`` w.r.t. ``inputs`` and accumulate it into their ``.jac``.

    The objectives are, by default, all the scalar entries of ``tensors``: with
    :math:`m = \sum_i` ``tensors[i].numel()``, each input ``x`` receives the Jacobian of shape
    ``[m, *x.shape]`` whose row ``r`` is the gradient of the ``r``-th entry (tensors in the order
    given, entries in row-major order). It is the analogue of :func:`torch.autograd.backward` for
    several objectives at once: the rows are stored in the ``.jac`` field of each input instead of
    being summed into ``.grad``, which this function never touches. An existing ``.jac`` (with the
    same shape) is added to in place, so call :func:`torchjd.autojac.jac_to_grad` (or
    ``del x.jac``) before the next call.

    The ``m`` rows are ``m`` vector-Jacobian products of one graph, computed by vectorised calls of
    :func:`torch.autograd.grad` (see ``parallel_chunk_size``).

    :param tensors: The tensor or sequence of tensors to differentiate. Non-empty, without the
        same tensor twice.
    :param jac_tensors: Initial Jacobians to multiply on the left, one per tensor of ``tensors``,
        of shape ``[m, *tensors[i].shape]`` with one common ``m >= 1``: input ``x`` then receives
        :math:`\sum_i` ``jac_tensors[i]`` :math:`\cdot \partial` ``tensors[i]`` :math:`/\partial x`
        (the multi-row analogue of ``grad_tensors``; it lets the chain rule be applied in steps).
        ``None`` (default) means the identity described above.
    :param inputs: The tensors w.r.t. which to differentiate (any iterable, e.g.
        ``model.parameters()``; repeated tensors count once). Each must require grad and be a leaf
        or retain its grad. ``None`` (default) means every leaf requiring grad that ``tensors``
        depend on (found by walking the autograd graph). Inputs that ``tensors`` do not depend on
        receive zeros. Empty: nothing is done.
    :param retain_graph: Keep the autograd graph after the call, so that it can be differentiated
        again. Default ``False``.
    :param parallel_chunk_size: Number of rows differentiated in one vectorised call (an int
        ``>= 1``); ``None`` (default) differentiates all ``m`` rows at once. Smaller values use
        less memory. ``1`` avoids :func:`torch.vmap` altogether, which is needed when the graph
        contains operations that ``vmap`` does not support (e.g. outputs of compiled functions,
        some RNNs on CUDA, intermediate tensors with ``retain_grad()``).
    :param present: Which objectives (rows) are present in this step: a boolean tensor or a
        sequence of ``m`` booleans. Only the present rows are computed; the absent ones are zero
        in ``.jac``, which keeps its ``m`` rows (see :doc:`/missing_tasks`). A tensor of
        ``tensors`` none of whose entries is present is not differentiated at all, so its value
        may be anything (e.g. NaN). Default ``None``: every row.

    >>> import torch
    >>> from torchjd.autojac import backward
    >>> p = torch.tensor([3.0, -1.0], requires_grad=True)
    >>> backward([2 * p[0] - p[1], p[0] * p[1]])
    >>> p.jac
    tensor([[ 2., -1.],
            [-1.,  3.]])
    """
    check_chunk_size(parallel_chunk_size)
    tensors_ = as_tensor_list(tensors, "tensors")
    check_unique(tensors_, "tensors")
    check_non_empty(tensors_, "tensors")
    if inputs is None:
        check_has_grad_fn(tensors_, "tensors", "infer the inputs")

    rows: Rows
    if jac_tensors is None:
        rows = IdentityRows(tensors_)
        if rows.m == 0:
            raise ValueError(
                "`tensors` have no entries (all of them have 0 elements), so there is no "
                "objective to differentiate."
            )
    else:
        rows = GivenRows(check_initial_jacobians(jac_tensors, tensors_, "jac_tensors", "tensors"))

    if inputs is None:
        inputs_ = infer_leaves(tensors_)
    else:
        inputs_ = deduplicate(materialise(inputs, "inputs"))
    if len(inputs_) == 0:
        return
    check_requires_grad(tensors_, "tensors")
    check_jac_targets(inputs_, rows.m, "inputs")

    indices = None if present is None else validated_present(present, rows.m)
    if indices is None:
        jacobians = vjp_rows(tensors_, inputs_, rows, retain_graph, parallel_chunk_size)
    elif len(indices) == 0:  # nothing to differentiate
        jacobians = [
            torch.zeros((rows.m, *x.shape), dtype=x.dtype, device=x.device) for x in inputs_
        ]
    else:
        outputs, selected = select_rows(tensors_, rows, indices)
        jacobians = vjp_rows(outputs, inputs_, selected, retain_graph, parallel_chunk_size)
        jacobians = scatter_rows(jacobians, indices, rows.m)
    accumulate_jacs(inputs_, jacobians)

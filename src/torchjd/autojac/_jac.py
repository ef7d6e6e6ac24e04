from collections.abc import Sequence

from torch import Tensor

from torchjd._validation import (
    as_tensor_list,
    check_chunk_size,
    check_initial_jacobians,
    check_non_empty,
    check_unique,
    deduplicate,
    materialise,
)
from torchjd.autojac._engine import GivenRows, IdentityRows, Rows, check_requires_grad, vjp_rows


def jac(
    outputs: Sequence[Tensor] | Tensor,
    inputs: Sequence[Tensor] | Tensor,
    *,
    jac_outputs: Sequence[Tensor] | Tensor | None = None,
    retain_graph: bool = False,
    parallel_chunk_size: int | None = None,
) -> tuple[Tensor, ...]:
    r"""Return the Jacobians of ``outputs`` w.r.t. each of ``inputs``, without side effects.

    The same computation as :func:`torchjd.autojac.backward` (one row per scalar entry of
    ``outputs`` by default, or ``jac_outputs`` multiplied on the left), but the Jacobians are
    returned, as :func:`torch.autograd.grad` returns gradients, instead of being accumulated into
    ``.jac``; no ``.jac`` or ``.grad`` field is read or written. The inputs may be any tensors that
    require grad, intermediate ones included.

    :param outputs: The tensor or sequence of tensors to differentiate. Non-empty, without the
        same tensor twice.
    :param inputs: The tensor or collection of tensors w.r.t. which to differentiate (iterated
        once). The result has one Jacobian per element, in the same order, of shape
        ``[m, *inputs[i].shape]`` (the same tensor object at each position of a repeated input);
        inputs that ``outputs`` do not depend on get zeros. Empty: ``()`` and nothing is computed.
    :param jac_outputs: Initial Jacobians, one per output, of shape ``[m, *outputs[i].shape]``
        with one common ``m >= 1``; the result for ``x`` is
        :math:`\sum_i` ``jac_outputs[i]`` :math:`\cdot \partial` ``outputs[i]``
        :math:`/\partial x`. ``None`` (default) means the identity, with
        :math:`m = \sum_i` ``outputs[i].numel()``. Chaining ``jac`` calls through ``jac_outputs``
        applies the chain rule.
    :param retain_graph: Keep the autograd graph after the call. Default ``False``.
    :param parallel_chunk_size: Number of rows differentiated in one vectorised call (an int
        ``>= 1``); ``None`` (default): all rows at once. ``1`` avoids :func:`torch.vmap`.

    >>> import torch
    >>> from torchjd.autojac import jac
    >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> h = x**2
    >>> jac([h[0] + h[1], h[0] - h[1]], [x, h])
    (tensor([[ 2.,  4.],
            [ 2., -4.]]), tensor([[ 1.,  1.],
            [ 1., -1.]]))
    """
    check_chunk_size(parallel_chunk_size)
    outputs_ = as_tensor_list(outputs, "outputs")
    check_unique(outputs_, "outputs")
    check_non_empty(outputs_, "outputs")

    rows: Rows
    if jac_outputs is None:
        rows = IdentityRows(outputs_)
        if rows.m == 0:
            raise ValueError(
                "`outputs` have no entries (all of them have 0 elements), so there is no "
                "objective to differentiate."
            )
    else:
        rows = GivenRows(check_initial_jacobians(jac_outputs, outputs_, "jac_outputs", "outputs"))

    inputs_ = [inputs] if isinstance(inputs, Tensor) else materialise(inputs, "inputs")
    if len(inputs_) == 0:
        return ()
    check_requires_grad(outputs_, "outputs")
    check_requires_grad(inputs_, "inputs")

    unique_inputs = deduplicate(inputs_)
    jacobians = vjp_rows(outputs_, unique_inputs, rows, retain_graph, parallel_chunk_size)
    by_input = {id(x): j for x, j in zip(unique_inputs, jacobians)}
    return tuple(by_input[id(x)] for x in inputs_)

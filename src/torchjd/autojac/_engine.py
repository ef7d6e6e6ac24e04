"""The one place where Jacobians are computed.

The leaves that a collection of tensors depends on are found by ``torchjd._graph.infer_leaves``
(shared with the Gramian engine). :func:`vjp_rows` computes the Jacobian of ``outputs`` w.r.t.
``inputs`` multiplied on the left by initial Jacobians (one per output, ``[m, *output.shape]``).
Its ``m`` rows are ``m`` vector-Jacobian products of the same graph: they are computed with one
batched call of :func:`torch.autograd.grad` (``is_grads_batched=True``, i.e. ``vmap`` over the
rows) per chunk of at most ``parallel_chunk_size`` rows. A chunk of one row is a plain
``autograd.grad`` call (no ``vmap``). Every chunk but the last retains the graph, so the graph is
freed once, at the end, unless ``retain_graph`` is set.

  Through a ``torch.compile``d region, the batched products may fail (inductor's backward has no
  batching rules); they are then tried once with the graph retained and, on failure, replaced by
  one backward pass per row, with a warning. A compiled backward that donates its buffers runs
  only once: then no route exists and one error names the fixes.

The initial Jacobians are given by a :class:`Rows` object that produces the rows of one chunk on
demand, so that the identity (the default: one objective per entry of the outputs) is never
materialised beyond the chunk being differentiated.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from torchjd._graph import any_node


def reaches(roots: Sequence[Tensor], targets: Sequence[Tensor]) -> bool:
    """Whether the graph of any of ``roots`` goes through the ``grad_fn`` of one of ``targets``.

    Breadth-first from the roots, so it stops early when the targets are close to them (the
    usual case: features read by the heads)."""
    target_nodes = {t.grad_fn for t in targets if t.grad_fn is not None}
    return any_node(roots, lambda node: node in target_nodes)


class Rows:
    """Initial Jacobians (one per output, ``[m, *output.shape]``) produced chunk by chunk.

    :meth:`chunk` returns the rows ``start:stop`` of each initial Jacobian, or ``None`` for an
    output whose rows in that range are known to be all zero (its differentiation may be skipped).
    """

    def __init__(self, m: int) -> None:
        self.m = m

    def chunk(self, start: int, stop: int) -> list[Tensor | None]:
        raise NotImplementedError


class GivenRows(Rows):
    """Initial Jacobians given as tensors: chunks are slices of them (views, no copy)."""

    def __init__(self, jacobians: Sequence[Tensor]) -> None:
        super().__init__(jacobians[0].shape[0])
        self.jacobians = jacobians

    def chunk(self, start: int, stop: int) -> list[Tensor | None]:
        if start == 0 and stop == self.m:
            return list(self.jacobians)
        return [j[start:stop] for j in self.jacobians]


class IdentityRows(Rows):
    """The identity ``I_m`` with ``m = Σ numel(outputs)``, split into one block per output.

    Row ``r`` is the objective "entry ``r`` of the flattened concatenation of the outputs".
    """

    def __init__(self, outputs: Sequence[Tensor]) -> None:
        numels = [t.numel() for t in outputs]
        super().__init__(sum(numels))
        self.outputs = outputs
        self.offsets = [sum(numels[:i]) for i in range(len(numels))]

    def chunk(self, start: int, stop: int) -> list[Tensor | None]:
        blocks: list[Tensor | None] = []
        for t, offset in zip(self.outputs, self.offsets):
            low, high = max(start, offset), min(stop, offset + t.numel())
            if low >= high:
                blocks.append(None)
                continue
            block = torch.zeros(stop - start, t.numel(), dtype=t.dtype, device=t.device)
            block[low - start : high - start, low - offset : high - offset].fill_diagonal_(1)
            blocks.append(block.reshape(stop - start, *t.shape))
        return blocks


def select_rows(
    outputs: list[Tensor], rows: Rows, indices: Tensor
) -> tuple[list[Tensor], GivenRows]:
    """The outputs to differentiate and their initial Jacobians, restricted to the rows
    ``indices`` (at least one). With identity rows, an output none of whose entries is selected
    is left out, so that its graph is never traversed (its value may be NaN, e.g. a mean over no
    labelled sample)."""
    blocks = rows.chunk(0, rows.m)
    keep = [True] * len(outputs)
    if isinstance(rows, IdentityRows):
        keep = [
            bool(((indices >= offset) & (indices < offset + y.numel())).any())
            for y, offset in zip(outputs, rows.offsets)
        ]
    kept = [(y, b) for y, b, k in zip(outputs, blocks, keep) if k]
    selected = []
    for y, b in kept:
        full = b if b is not None else y.new_zeros((rows.m, *y.shape))
        selected.append(full.index_select(0, indices.to(full.device)))
    return [y for y, _ in kept], GivenRows(selected)


def scatter_rows(jacobians: list[Tensor], indices: Tensor, m: int) -> list[Tensor]:
    """Jacobians of ``m`` rows whose rows ``indices`` are ``jacobians`` and the others zero."""
    result = []
    for j in jacobians:
        full = j.new_zeros((m, *j.shape[1:]))
        result.append(full.index_copy_(0, indices.to(j.device), j))
    return result


def check_requires_grad(tensors: Sequence[Tensor], name: str) -> None:
    """Differentiating a tensor that does not require grad is torch's ``RuntimeError``."""
    for i, t in enumerate(tensors):
        if not t.requires_grad:
            raise RuntimeError(
                f"Element {i} of `{name}` (shape {tuple(t.shape)}) does not require grad, so it "
                "cannot be differentiated. Make sure it is computed from tensors with "
                "`requires_grad=True` and outside of `torch.no_grad()`."
            )


def vjp_rows(
    outputs: Sequence[Tensor],
    inputs: Sequence[Tensor],
    rows: Rows,
    retain_graph: bool,
    parallel_chunk_size: int | None,
) -> list[Tensor]:
    """Jacobians ``[m, *x.shape]`` of ``outputs`` w.r.t. each input ``x``, ``rows`` on the left.

    Row ``r`` of the result for input ``x`` is ``∂/∂x Σ_i <rows_i[r], outputs[i]>``; an input that
    the outputs do not depend on gets zeros. With no inputs, nothing is computed (the graph is
    kept). ``inputs`` must be duplicate-free.
    """
    if len(inputs) == 0:
        return []
    check_requires_grad(outputs, "outputs")
    check_requires_grad(inputs, "inputs")

    m = rows.m
    chunk_size = m if parallel_chunk_size is None else min(parallel_chunk_size, m)
    compiled = m > 1 and _through_compiled_code(outputs)
    if compiled and chunk_size > 1:
        try:
            # Retained, so that the graph survives a failure of the batched products and the
            # rows can then be computed one backward pass at a time.
            return _chunked_rows(outputs, inputs, rows, True, chunk_size)
        except RuntimeError as error:
            if _DONATED_BUFFERS in str(error):
                return _batched_once(outputs, inputs, rows, retain_graph, chunk_size, error)
            warnings.warn(
                "The batched vector-Jacobian products (`vmap`) failed through a "
                f"`torch.compile`d part of the graph ({_first_line(error)}); the {m} rows are "
                "computed one backward pass at a time instead. Pass `parallel_chunk_size=1` to "
                "go there directly, without this warning.",
                UserWarning,
                stacklevel=3,
            )
            chunk_size = 1
    try:
        return _chunked_rows(outputs, inputs, rows, retain_graph, chunk_size)
    except RuntimeError as error:
        if compiled and _DONATED_BUFFERS in str(error):
            raise _compiled_graph_error(m) from error
        raise


# The phrase of torch's error when a compiled backward that donates its buffers is asked to keep
# the graph for another pass.
_DONATED_BUFFERS = "donated buffers"


def _batched_once(
    outputs: Sequence[Tensor],
    inputs: Sequence[Tensor],
    rows: Rows,
    retain_graph: bool,
    chunk_size: int,
    donated_error: RuntimeError,
) -> list[Tensor]:
    """The last route through a compiled backward that donates its buffers: all the rows in one
    batched pass that frees the graph (some backends, such as ``aot_eager``, batch it)."""
    if retain_graph or chunk_size < rows.m:
        raise _compiled_graph_error(rows.m) from donated_error
    try:
        return _chunked_rows(outputs, inputs, rows, False, chunk_size)
    except RuntimeError:
        raise _compiled_graph_error(rows.m) from donated_error  # the cause that has a fix


def _through_compiled_code(outputs: Sequence[Tensor]) -> bool:
    """Whether the graph of ``outputs`` goes through the backward of a ``torch.compile``d region
    (an AOTAutograd ``CompiledFunctionBackward`` node)."""
    return any_node(outputs, lambda node: type(node).__name__ == "CompiledFunctionBackward")


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _compiled_graph_error(m: int) -> RuntimeError:
    return RuntimeError(
        f"The {m} rows of the Jacobian need several backward passes through a `torch.compile`d "
        "part of the graph, but its compiled backward donates its buffers, so it can run only "
        "once. Either set `torch._functorch.config.donated_buffer = False` before the first call "
        "of the compiled model (rows are then computed one backward pass at a time), or weigh "
        "the losses from their Gramian with `torchjd.autogram.Engine(..., batch_dim=None)` and "
        "apply the weights in one ordinary backward (as `torchjd.integrations.lightning` does), "
        "or compile only the modules that the losses do not share."
    )


def _chunked_rows(
    outputs: Sequence[Tensor],
    inputs: Sequence[Tensor],
    rows: Rows,
    retain_graph: bool,
    chunk_size: int,
) -> list[Tensor]:
    """:func:`vjp_rows` with chunks of at most ``chunk_size`` rows."""
    m = rows.m
    bounds = [(start, min(start + chunk_size, m)) for start in range(0, m, chunk_size)]
    if len(bounds) == 1:
        grads = _differentiate_chunk(outputs, inputs, rows.chunk(0, m), retain_graph, m)
        return [
            g if g is not None else torch.zeros((m, *x.shape), dtype=x.dtype, device=x.device)
            for g, x in zip(grads, inputs)
        ]

    # Several chunks: each one is copied into its rows of the result as soon as it is computed,
    # so that at most one chunk lives beside the result (chunking is there to save memory).
    jacobians = [torch.empty((m, *x.shape), dtype=x.dtype, device=x.device) for x in inputs]
    for index, (start, stop) in enumerate(bounds):
        retain = retain_graph or index < len(bounds) - 1
        grads = _differentiate_chunk(outputs, inputs, rows.chunk(start, stop), retain, stop - start)
        for jacobian, g in zip(jacobians, grads):
            if g is None:
                jacobian[start:stop].zero_()
            else:
                jacobian[start:stop].copy_(g)
    return jacobians


def _differentiate_chunk(
    outputs: Sequence[Tensor],
    inputs: Sequence[Tensor],
    blocks: list[Tensor | None],
    retain_graph: bool,
    n_rows: int,
) -> tuple[Tensor | None, ...]:
    """One (batched if ``n_rows > 1``) ``autograd.grad`` call for the rows of one chunk.

    Outputs whose block is ``None`` (all zero) are left out when the graph is retained anyway;
    otherwise they get explicit zeros so that the whole graph is traversed and freed.
    """
    if retain_graph:
        kept = [(y, b) for y, b in zip(outputs, blocks) if b is not None]
    else:
        kept = [
            (y, b if b is not None else y.new_zeros((n_rows, *y.shape)))
            for y, b in zip(outputs, blocks)
        ]
    selected_outputs = [y for y, _ in kept]
    if n_rows == 1:
        grads = torch.autograd.grad(
            selected_outputs,
            inputs,
            grad_outputs=[b[0] for _, b in kept],
            retain_graph=retain_graph,
            allow_unused=True,
        )
        return tuple(None if g is None else g.unsqueeze(0) for g in grads)
    return torch.autograd.grad(
        selected_outputs,
        inputs,
        grad_outputs=[b for _, b in kept],
        retain_graph=retain_graph,
        allow_unused=True,
        is_grads_batched=True,
    )


def grad(
    output: Tensor, inputs: Sequence[Tensor], grad_output: Tensor, retain_graph: bool
) -> list[Tensor]:
    """Gradient of ``<grad_output, output>`` w.r.t. each input (zeros for unused inputs)."""
    if len(inputs) == 0:
        return []
    check_requires_grad([output], "output")
    check_requires_grad(inputs, "inputs")
    grads = torch.autograd.grad(
        [output], inputs, grad_outputs=[grad_output], retain_graph=retain_graph, allow_unused=True
    )
    return [
        g if g is not None else torch.zeros_like(x, memory_format=torch.contiguous_format)
        for g, x in zip(grads, inputs)
    ]

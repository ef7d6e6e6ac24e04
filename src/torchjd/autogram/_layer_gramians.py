r"""Per-module blocks ``J_u J_u^T`` of the Gramian, from recorded inputs and output-gradients.

Notation. The rows of ``J`` are indexed by ``r = (i, b)``: ``b`` runs over the ``B`` samples of
the module inputs and ``i`` over the ``d`` rows per sample (``d = 1`` for a per-sample loss
vector). With ``batch_dim=None`` there is no per-sample structure: everything a call sees is one
"sample" (``B = 1``) and ``d = m``. For a call of the module, ``delta[i, b]`` is the gradient of
row ``(i, b)`` w.r.t. the call's output at sample ``b`` (the backward pass of the engine gives all
of them at once), and the row of ``J_u`` is the vector-Jacobian product of the module at sample
``b`` with ``delta[i, b]``, summed over the calls of the module.

Linear-like layers (``Linear``, ``Conv1d``/``Conv2d`` seen through ``unfold``). At position ``p``
of sample ``b`` (sequence positions, pixels, or other calls of the same module) the layer computes
``z_bp = W x_bp + c``, so the per-row gradients are

.. math::

    \nabla_W = \sum_p \delta_{ibp} x_{bp}^T, \qquad \nabla_c = \sum_p \delta_{ibp}.

Appending a constant feature ``1`` to ``x`` for the bias, their Gramian is either

* *direct*: form the per-row gradients (``[R, out, in]``, ``R = d B``) and take inner products
  (cost ``R P out in + R^2 out in``), or
* *kernel*: :math:`G_{(i,b),(j,c)} = \sum_{p,q} (x_{bp} \cdot x_{cq} + 1)(\delta_{ibp} \cdot
  \delta_{jcq})`, from the two kernel matrices of the inputs and of the output-gradients, without
  any per-row gradient (cost ``(BP)^2 in + (RP)^2 out``; with ``P = 1``, e.g. an MLP, this is
  ``(X X^T + 1) * (Delta Delta^T)``).

The cheaper one is used, per layer and per call. Grouped convolutions are the same per group.

Element-wise affine parameters (``LayerNorm``, ``GroupNorm``, ``RMSNorm``, and the affine
``BatchNorm``/``InstanceNorm`` where accepted): ``z = xhat * gamma + beta`` with ``xhat`` the
normalised input (recomputed from the recorded input), so
:math:`\nabla_\gamma = \sum_p \delta_{ibp} \odot \hat x_{bp}` and :math:`\nabla_\beta = \sum_p
\delta_{ibp}`: small vectors formed directly.

``Embedding``: :math:`\nabla_W = \sum_p e_{k_{bp}} \delta_{ibp}^T`, so either the dense per-row
gradients or the kernel :math:`\sum_{p,q} [k_{bp} = k_{cq}] (\delta_{ibp} \cdot \delta_{jcq})`.

Any other module (including a module whose ``forward`` was overridden): with a batch, the module is
re-run functionally on one sample at a time (``torch.func.functional_call`` vectorised with
``vmap``) and its VJPs with the output-gradients give the per-row gradients; without a batch, the
VJPs are taken through the recorded graph (or through a functional re-run when the module was
called several times, so that only its local derivative is used).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import reduce
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils._pytree import tree_flatten, tree_unflatten

from torchjd.autogram._vjp import TensorSpec, stacked_vjps
from torchjd.linalg._gramian import sum_of_gramians


@dataclass(frozen=True)
class Rows:
    """How the rows of ``J`` map to the module inputs: ``d`` rows for each of ``n_samples``."""

    d: int
    n_samples: int
    batched: bool

    @property
    def n_rows(self) -> int:
        return self.d * self.n_samples


@dataclass
class Call:
    """One recorded forward call of a hooked module."""

    module: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output_specs: tuple[TensorSpec, ...]  # of the distinct output tensors that require grad
    positions: tuple[int, ...]  # their positions among the flattened output leaves
    versions: tuple[tuple[Tensor, int], ...]  # version counters of the tensor inputs at call time
    # The output tensors themselves and their versions, kept only without batch dimension (to
    # differentiate through the recorded graph).
    outputs: tuple[Tensor, ...] | None = None
    output_versions: tuple[int, ...] = ()


Items = list[tuple[Call, tuple[Tensor, ...]]]

# ---------------------------------------------------------------------------------------------
# Dispatch


# The parameters a block covers, by id: a part of the trainable parameters of one module.
On = frozenset[int]


def _is_on(param: object, on: On) -> bool:
    return isinstance(param, Tensor) and id(param) in on


def trainable(module: nn.Module) -> list[Tensor]:
    """The trainable parameters of ``module``, its submodules included."""
    return [p for p in module.parameters() if p.requires_grad]


def module_gramian(module: nn.Module, items: Items, rows: Rows) -> Tensor | None:
    """The block ``J_u J_u^T`` (``[R, R]``) of ``module`` (``None`` if it has no trainable param).

    ``items`` pairs each call that reached the output with the gradients of its outputs, each
    ``[d, *output.shape]``.
    """
    params = trainable(module)
    if not params:
        return None
    return module_gramians(module, items, rows, [params])[0]


def module_gramians(
    module: nn.Module, items: Items, rows: Rows, parts: list[list[Tensor]]
) -> list[Tensor]:
    """One block ``J_{u,k} J_{u,k}^T`` per part ``k`` (non-empty lists of trainable parameters of
    ``module``): the Jacobian's columns restricted to the parameters of the part."""
    rule = _fast_rule(module)
    if rule is not None:
        for call, _ in items:
            _check_inputs_unchanged(call)
        blocks = [rule(module, items, rows, frozenset(id(p) for p in part)) for part in parts]
        if all(block is not None for block in blocks):
            return blocks  # type: ignore[return-value]
    if rows.batched:
        jacobians = _per_sample_rule(module, items, rows)
    else:
        jacobians = _batched_vjp_rule(module, items, rows)
    names = {id(p): name for name, p in module.named_parameters()}
    return [_gramian_of_jacobians([jacobians[names[id(p)]] for p in part]) for part in parts]


def module_update(
    module: nn.Module, items: Items, part: list[Tensor], weights: Tensor
) -> list[Tensor]:
    """``sum_i w_i dy_i/dtheta`` for each parameter ``theta`` of ``part`` (trainable parameters of
    ``module``), without batch structure: one vector-Jacobian product of the module with the
    combined output-gradients ``sum_i w_i delta_i`` of its calls."""
    combined = [
        tuple(torch.tensordot(weights.to(delta.dtype), delta, dims=1) for delta in deltas)
        for _, deltas in items
    ]
    call = items[0][0]
    if len(items) == 1 and _outputs_intact(call):
        # One call: the parameters reach its outputs only through it (local derivative).
        grads = torch.autograd.grad(
            call.outputs, part, combined[0], retain_graph=True, allow_unused=True
        )
        return [torch.zeros_like(p) if g is None else g for p, g in zip(part, grads)]
    names = {id(p): name for name, p in module.named_parameters()}
    params = {names[id(p)]: p.detach() for p in part}
    total: dict[str, Tensor] | None = None
    for (call, _), cotangents in zip(items, combined):
        _check_inputs_unchanged(call)
        f, tensors = _functional(module, call)
        _, vjp_fn = torch.func.vjp(lambda q, f=f, tensors=tensors: f(q, tensors), params)
        total = _accumulate(total, vjp_fn(cotangents)[0])
    assert total is not None
    return [total[names[id(p)]] for p in part]


def _outputs_intact(call: Call) -> bool:
    """Whether the outputs of ``call`` were kept and not modified in place since."""
    return call.outputs is not None and all(
        t._version == v for t, v in zip(call.outputs, call.output_versions)
    )


def _fast_rule(module: nn.Module) -> Callable[[Any, Items, Rows, On], Tensor | None] | None:
    forward = type(module).forward
    for cls, rule in _FAST_RULES:
        if isinstance(module, cls) and forward is cls.forward:
            if (
                cls in (nn.Conv1d, nn.Conv2d)
                and type(module)._conv_forward is not cls._conv_forward
            ):
                return None
            return rule
    return None


def _check_inputs_unchanged(call: Call) -> None:
    for tensor, version in call.versions:
        if tensor._version != version:
            raise RuntimeError(
                f"An input of the hooked module `{type(call.module).__name__}` was modified in "
                "place after the module was called; the engine needs the inputs of hooked modules "
                "unchanged until compute_gramian. Avoid in-place operations on them (e.g. use "
                "`inplace=False` in the activation that follows)."
            )


def _not_batched_error(module: nn.Module, what: str, shape: torch.Size, rows: Rows) -> ValueError:
    return ValueError(
        f"The hooked module `{type(module).__name__}` got {what} of shape {tuple(shape)}, which is "
        f"not batched on dim 0 with the batch size of `output` ({rows.n_samples}). With "
        "`batch_dim` set, every tensor entering or leaving a hooked module must be batched on "
        "dim 0 (e.g. use `batch_first=True`, expand shared masks to the batch), or use "
        "`batch_dim=None`."
    )


def _sample_first(t: Tensor, rows: Rows, module: nn.Module, min_ndim: int = 1) -> Tensor:
    """An input of a call as ``[n_samples, ...]``."""
    if not rows.batched:
        return t.unsqueeze(0)
    if t.ndim < min_ndim or t.shape[0] != rows.n_samples:
        raise _not_batched_error(module, "an input", t.shape, rows)
    return t


def _delta_sample_first(delta: Tensor, rows: Rows, module: nn.Module) -> Tensor:
    """An output-gradient ``[d, *output.shape]`` as ``[d, n_samples, ...]``."""
    if not rows.batched:
        return delta.unsqueeze(1)
    if delta.ndim < 2 or delta.shape[1] != rows.n_samples:
        raise _not_batched_error(module, "an output", delta.shape[1:], rows)
    return delta


def _input(call: Call) -> Tensor | None:
    x = call.args[0] if call.args else call.kwargs.get("input")
    return x if isinstance(x, Tensor) else None


def _gram(jac: Tensor) -> Tensor:
    return jac @ jac.T


# ---------------------------------------------------------------------------------------------
# Linear-like layers

# Above this number of elements, an intermediate tensor is considered large: the route with the
# smaller intermediate is then preferred when the cheaper one would be 4 times bigger.
_LARGE = 1 << 24


def _use_kernel(direct_cost: int, kernel_cost: int, direct_size: int, kernel_size: int) -> bool:
    """Whether to use the kernel route rather than the direct one (costs in multiply-adds, sizes
    of the largest intermediate in elements)."""
    if kernel_cost < direct_cost:
        return kernel_size <= max(4 * direct_size, _LARGE)
    return direct_size > max(4 * kernel_size, _LARGE)


def _linear_like_route(
    d: int, n_samples: int, groups: int, positions: int, o: int, n: int, with_ones: bool
) -> str:
    """Route for :func:`_linear_like_gramian` (shapes as there; ``n = 0`` without x): ``"direct"``,
    ``"kernel"`` or, with one sample (no batch structure), ``"sandwich"``."""
    n_features = n + int(with_ones)
    r = d * n_samples
    direct_cost = groups * (r * positions * o * n_features + r * r * o * n_features)
    kernel_cost = groups * ((n_samples * positions) ** 2 * n + (r * positions) ** 2 * (o + 1))
    direct_size = r * groups * o * n_features
    kernel_size = groups * (r * positions) ** 2
    if n_samples == 1 and n > 0:
        # Sandwich: K_x Delta_j, then <Delta_i, K_x Delta_j>; its intermediates are the size of
        # the output-gradients.
        sandwich_cost = groups * (positions**2 * n + d * positions**2 * o + d * d * positions * o)
        sandwich_size = groups * max(positions**2, d * positions * o)
        if sandwich_cost < min(direct_cost, kernel_cost) and sandwich_size <= max(
            4 * direct_size, _LARGE
        ):
            return "sandwich"
    return "kernel" if _use_kernel(direct_cost, kernel_cost, direct_size, kernel_size) else "direct"


def _linear_like_uses_kernel(
    d: int, n_samples: int, groups: int, positions: int, o: int, n: int, with_ones: bool
) -> bool:
    """Whether :func:`_linear_like_gramian` needs the inputs position by position (the kernel and
    sandwich routes) rather than summed into per-row gradients."""
    return _linear_like_route(d, n_samples, groups, positions, o, n, with_ones) != "direct"


def _sandwich_gramian(x: Tensor, delta: Tensor, with_ones: bool) -> Tensor:
    r""":math:`G_{ij} = \sum_{g,p,q} (x_{gp} \cdot x_{gq} + 1)(\delta_{igp} \cdot \delta_{jgq})`
    for one sample: ``x`` ``[1, G, P, n]``, ``delta`` ``[d, 1, G, P, o]``, without any per-row
    gradient nor the ``[dP, dP]`` kernel."""
    xm = x[0]  # [G, P, n]
    kx = torch.bmm(xm, xm.transpose(1, 2))  # [G, P, P]
    if with_ones:
        kx += 1
    dg = delta[:, 0].transpose(0, 1)  # [G, d, P, o]
    sandwich = torch.matmul(kx.unsqueeze(1), dg)  # [G, d, P, o]
    d = dg.shape[1]
    left = dg.transpose(0, 1).reshape(d, -1)
    return left @ sandwich.transpose(0, 1).reshape(d, -1).T


def _linear_like_gramian(x: Tensor | None, delta: Tensor, with_ones: bool) -> Tensor:
    """Gramian of the per-row gradients ``sum_p delta[i,b,g,p] (x) [x[b,g,p], 1]``.

    ``x``: ``[B, G, P, n]`` (``None``: only the constant feature), ``delta``: ``[d, B, G, P, o]``
    (``G`` independent groups of weights). Returns ``[d B, d B]`` with rows ``(i, b)``.
    """
    d, n_samples, groups, positions, o = delta.shape
    n = 0 if x is None else x.shape[-1]
    r = d * n_samples
    route = _linear_like_route(d, n_samples, groups, positions, o, n, with_ones)
    if route == "direct":
        parts = []
        if x is not None:
            parts.append(torch.einsum("ibgpo,bgpn->ibgon", delta, x).reshape(r, -1))
        if with_ones:
            parts.append(delta.sum(dim=3).reshape(r, -1))
        return _gram(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
    if route == "sandwich":
        assert x is not None
        return _sandwich_gramian(x, delta, with_ones)

    if groups == 1 and positions == 1 and d == 1:  # the MLP case: (X X^T + 1) * (D D^T)
        dm = delta.reshape(n_samples, o)
        gramian = dm @ dm.T
        if x is not None:
            xm = x.reshape(n_samples, n)
            kx = xm @ xm.T
            if with_ones:
                kx += 1
            gramian *= kx
        return gramian
    dm = delta.permute(2, 0, 1, 3, 4).reshape(groups, r * positions, o)
    kd = torch.bmm(dm, dm.transpose(1, 2))
    if x is not None:
        xm = x.transpose(0, 1).reshape(groups, n_samples * positions, n)
        kx = torch.bmm(xm, xm.transpose(1, 2))
        if with_ones:
            kx += 1
        kd = kd.view(groups, d, n_samples, positions, d, n_samples, positions)
        kd = kd * kx.view(groups, 1, n_samples, positions, 1, n_samples, positions)
    else:
        kd = kd.view(groups, d, n_samples, positions, d, n_samples, positions)
    return kd.sum(dim=(0, 3, 6)).reshape(r, r)


def _linear_rule(module: nn.Linear, items: Items, rows: Rows, on: On) -> Tensor | None:
    weight_on = _is_on(module.weight, on)
    bias_on = _is_on(module.bias, on)
    dtype = module.weight.dtype
    xs, deltas = [], []
    for call, (delta,) in items:
        x = _input(call)
        if x is None:
            return None
        x = _sample_first(x, rows, module, min_ndim=2)
        delta = _delta_sample_first(delta, rows, module)
        xs.append(x.reshape(x.shape[0], -1, x.shape[-1]))
        deltas.append(delta.reshape(rows.d, delta.shape[1], -1, delta.shape[-1]))
    x = torch.cat(xs, dim=1) if len(xs) > 1 else xs[0]
    delta = torch.cat(deltas, dim=2) if len(deltas) > 1 else deltas[0]
    features = x.to(dtype).unsqueeze(1) if weight_on else None
    return _linear_like_gramian(features, delta.to(dtype).unsqueeze(2), bias_on)


def _pad(module: nn.Conv1d | nn.Conv2d, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """``x`` padded as the convolution does it, or the zero padding left to the kernel."""
    padding: Any = module.padding
    if module.padding_mode == "zeros" and not isinstance(padding, str):
        return x, tuple(padding)
    if padding != "valid":
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
    return x, (0,) * len(module.kernel_size)


def _unfold(module: nn.Conv1d | nn.Conv2d, x: Tensor, padding: tuple[int, ...]) -> Tensor:
    """The patches of ``x`` (``[N, C, *spatial]``) seen by the kernel: ``[N, C * prod(k), L]``."""
    kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(2)
        kernel, dilation, padding, stride = (
            (1, kernel[0]),
            (1, dilation[0]),
            (0, padding[0]),
            (1, stride[0]),
        )
    return F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)


def _conv_weight_grads_by_groups(
    module: nn.Conv1d | nn.Conv2d, x: Tensor, padding: tuple[int, ...], delta: Tensor, rows: Rows
) -> Tensor:
    """Per-row weight gradients ``[R, Cout * Cin/G * prod(k)]`` from the weight-gradient kernel of
    a convolution in which every row is a separate group of channels."""
    d = rows.d
    n_images, channels = x.shape[:2]
    spatial, out_spatial = x.shape[2:], delta.shape[3:]
    out_channels = delta.shape[2]
    if rows.batched:  # one image per row: groups over (i, b)
        inputs = x.unsqueeze(0).expand(d, *x.shape).reshape(1, d * n_images * channels, *spatial)
        grads = delta.reshape(1, d * n_images * out_channels, *out_spatial)
        n_rows = d * n_images
    else:  # every image for every row: groups over i
        inputs = x.unsqueeze(1).expand(n_images, d, *x.shape[1:])
        inputs = inputs.reshape(n_images, d * channels, *spatial)
        grads = delta.transpose(0, 1).reshape(n_images, d * out_channels, *out_spatial)
        n_rows = d
    # Only the shape of the weight matters for its gradient.
    weight = torch.empty(
        (n_rows * out_channels, *module.weight.shape[1:]), dtype=x.dtype, device=x.device
    )
    _, weight_grad, _ = torch.ops.aten.convolution_backward(
        grads,
        inputs,
        weight,
        None,
        list(module.stride),
        list(padding),
        list(module.dilation),
        False,
        [0] * len(spatial),
        n_rows * module.groups,
        [False, True, False],
    )
    return weight_grad.reshape(n_rows, -1)


# Per-row weight gradients of a convolution come from a grouped convolution backward when the
# output has at least this many positions (it avoids materialising the patches; with fewer
# positions and many channels it is slower than unfold and batched products).
_GROUPED_MIN_POSITIONS = 64


def _conv_rule(module: nn.Conv1d | nn.Conv2d, items: Items, rows: Rows, on: On) -> Tensor | None:
    weight_on = _is_on(module.weight, on)
    bias_on = _is_on(module.bias, on)
    dtype = module.weight.dtype
    groups = module.groups
    spatial_dims = len(module.kernel_size)
    calls = []
    for call, (delta,) in items:
        x = _input(call)
        if x is None:
            return None
        if x.ndim == spatial_dims + 1:  # a single unbatched input
            if rows.batched:
                raise _not_batched_error(module, "an unbatched input", x.shape, rows)
            x = x.unsqueeze(0)
            delta = delta.unsqueeze(1)
        elif rows.batched and x.shape[0] != rows.n_samples:
            raise _not_batched_error(module, "an input", x.shape, rows)
        x, padding = _pad(module, x.to(dtype))
        calls.append((x, padding, delta.to(dtype)))

    n_samples = rows.n_samples if rows.batched else 1
    positions = sum(
        delta[0, 0, 0].numel() * (1 if rows.batched else delta.shape[1]) for _, _, delta in calls
    )
    o = module.out_channels // groups
    n = module.weight[0].numel() if weight_on else 0
    if _linear_like_uses_kernel(rows.d, n_samples, groups, positions, o, n, bias_on):
        xs, deltas = [], []
        for x, padding, delta in calls:
            n_images = x.shape[0]
            cols = _unfold(module, x, padding)
            n_cols = cols.shape[-1]
            xg = cols.view(n_images, groups, -1, n_cols).transpose(2, 3)  # [N, G, L, n]
            dg = delta.reshape(rows.d, n_images, groups, -1, n_cols).transpose(3, 4)
            if not rows.batched:  # every position of every image belongs to the one "sample"
                xg = xg.transpose(0, 1).reshape(1, groups, n_images * n_cols, -1)
                dg = dg.transpose(1, 2).reshape(rows.d, 1, groups, n_images * n_cols, -1)
            xs.append(xg)
            deltas.append(dg)
        x = torch.cat(xs, dim=2) if len(xs) > 1 else xs[0]
        delta = torch.cat(deltas, dim=3) if len(deltas) > 1 else deltas[0]
        return _linear_like_gramian(x if weight_on else None, delta, bias_on)

    # Direct route: per-row gradients, summed over the calls.
    jacobian: Tensor | None = None
    r = rows.n_rows
    for x, padding, delta in calls:
        parts = []
        if weight_on:
            if delta[0, 0, 0].numel() >= _GROUPED_MIN_POSITIONS:
                parts.append(_conv_weight_grads_by_groups(module, x, padding, delta, rows))
            else:
                n_images = x.shape[0]
                cols = _unfold(module, x, padding)
                n_cols = cols.shape[-1]
                xg = cols.view(n_images, groups, -1, n_cols)  # [N, G, n, L]
                dg = delta.reshape(rows.d, n_images, groups, -1, n_cols)  # [d, N, G, o, L]
                equation = "ibgol,bgnl->ibgon" if rows.batched else "ibgol,bgnl->igon"
                parts.append(torch.einsum(equation, dg, xg).reshape(r, -1))
        if bias_on:
            sum_dims = (*range(3, delta.ndim),) if rows.batched else (1, *range(3, delta.ndim))
            parts.append(delta.sum(dim=sum_dims).reshape(r, -1))
        call_jacobian = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        jacobian = call_jacobian if jacobian is None else jacobian + call_jacobian
    assert jacobian is not None
    return _gram(jacobian)


# ---------------------------------------------------------------------------------------------
# Element-wise affine parameters of normalisation layers


def _affine_gramian(
    xhat: Tensor | None, delta: Tensor, weight_on: bool, bias_on: bool
) -> Tensor | None:
    """``xhat``: ``[B, P, C]``, ``delta``: ``[d, B, P, C]``; per-row gradients of ``gamma``
    (``sum_p delta * xhat``) and ``beta`` (``sum_p delta``)."""
    d, n_samples, _, channels = delta.shape
    parts = []
    if weight_on and xhat is not None:
        parts.append((delta * xhat).sum(dim=2).reshape(d * n_samples, channels))
    if bias_on:
        parts.append(delta.sum(dim=2).reshape(d * n_samples, channels))
    if not parts:
        return None
    return _gram(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))


def _affine_rule(
    module: nn.Module,
    items: Items,
    rows: Rows,
    on: On,
    normalize: Callable[[Tensor], Tensor],
    channels_last: bool,
    min_ndim: int,
    unbatched_ndim: int | None = None,
) -> Tensor | None:
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    weight_on = _is_on(weight, on)
    bias_on = _is_on(bias, on)
    reference = weight if isinstance(weight, Tensor) else bias
    assert isinstance(reference, Tensor)
    dtype = reference.dtype
    channels = reference.numel()
    xhats, deltas = [], []
    for call, (delta,) in items:
        x = _input(call)
        if x is None:
            return None
        if x.ndim == unbatched_ndim:  # one unbatched input: add its batch dim
            if rows.batched:
                raise _not_batched_error(module, "an unbatched input", x.shape, rows)
            x = x.unsqueeze(0)
            delta = delta.unsqueeze(1)
        if rows.batched and (x.ndim < min_ndim or x.shape[0] != rows.n_samples):
            raise _not_batched_error(module, "an input", x.shape, rows)
        xhat = normalize(x).to(dtype)
        delta = delta.to(dtype)
        if not channels_last:  # [N, C, *spatial] -> [N, P, C]
            if xhat.ndim < 2:
                return None
            xhat = xhat.reshape(xhat.shape[0], channels, -1).transpose(1, 2)
            delta = delta.reshape(rows.d, *xhat.shape[:1], channels, -1).transpose(2, 3)
        if rows.batched:
            xhats.append(xhat.reshape(rows.n_samples, -1, channels))
            deltas.append(delta.reshape(rows.d, rows.n_samples, -1, channels))
        else:
            xhats.append(xhat.reshape(1, -1, channels))
            deltas.append(delta.reshape(rows.d, 1, -1, channels))
    xhat = torch.cat(xhats, dim=1) if len(xhats) > 1 else xhats[0]
    delta = torch.cat(deltas, dim=2) if len(deltas) > 1 else deltas[0]
    return _affine_gramian(xhat, delta, weight_on, bias_on)


def _layer_norm_rule(module: nn.LayerNorm, items: Items, rows: Rows, on: On) -> Tensor | None:
    shape = module.normalized_shape
    return _affine_rule(
        module,
        items,
        rows,
        on,
        lambda x: F.layer_norm(x, shape, None, None, module.eps),
        channels_last=True,
        min_ndim=len(shape) + 1,
    )


def _rms_norm_rule(module: nn.Module, items: Items, rows: Rows, on: On) -> Tensor | None:
    shape = module.normalized_shape
    return _affine_rule(
        module,
        items,
        rows,
        on,
        lambda x: F.rms_norm(x, shape, None, module.eps),
        channels_last=True,
        min_ndim=len(shape) + 1,
    )


def _group_norm_rule(module: nn.GroupNorm, items: Items, rows: Rows, on: On) -> Tensor | None:
    return _affine_rule(
        module,
        items,
        rows,
        on,
        lambda x: F.group_norm(x, module.num_groups, None, None, module.eps),
        channels_last=False,
        min_ndim=2,
    )


def _batch_norm_rule(
    module: nn.modules.batchnorm._BatchNorm, items: Items, rows: Rows, on: On
) -> Tensor | None:
    # Only reached with batch_dim=None (rejected otherwise). Batch statistics are those of the
    # recorded input, running statistics those of the module now.
    def normalize(x: Tensor) -> Tensor:
        use_batch_stats = module.training or (
            module.running_mean is None and module.running_var is None
        )
        mean = None if use_batch_stats else module.running_mean
        var = None if use_batch_stats else module.running_var
        return F.batch_norm(x, mean, var, None, None, use_batch_stats, 0.0, module.eps)

    return _affine_rule(module, items, rows, on, normalize, channels_last=False, min_ndim=2)


def _instance_norm_rule(
    module: nn.modules.instancenorm._InstanceNorm, items: Items, rows: Rows, on: On
) -> Tensor | None:
    def normalize(x: Tensor) -> Tensor:
        use_input_stats = module.training or not module.track_running_stats
        mean = None if use_input_stats else module.running_mean
        var = None if use_input_stats else module.running_var
        return F.instance_norm(x, mean, var, None, None, use_input_stats, 0.0, module.eps)

    unbatched_ndim = module._get_no_batch_dim()
    return _affine_rule(
        module,
        items,
        rows,
        on,
        normalize,
        channels_last=False,
        min_ndim=unbatched_ndim + 1,
        unbatched_ndim=unbatched_ndim,
    )


# ---------------------------------------------------------------------------------------------
# Embedding


def _embedding_rule(module: nn.Embedding, items: Items, rows: Rows, on: On) -> Tensor | None:
    n_embeddings, dim = module.weight.shape
    dtype = module.weight.dtype
    all_indices, deltas = [], []
    for call, (delta,) in items:
        indices = _input(call)
        if indices is None:
            return None
        delta = _delta_sample_first(delta.to(dtype), rows, module)
        by_sample = _sample_first(indices, rows, module)
        by_sample = by_sample.reshape(by_sample.shape[0], -1)  # [B, P]
        delta = delta.reshape(rows.d, by_sample.shape[0], -1, dim)  # [d, B, P, dim]
        if module.padding_idx is not None:
            keep = (by_sample != module.padding_idx).to(dtype)
            delta = delta * keep[None, :, :, None]
        if module.scale_grad_by_freq:
            counts = torch.bincount(indices.reshape(-1), minlength=n_embeddings).to(dtype)
            delta = delta / counts[by_sample][None, :, :, None]
        all_indices.append(by_sample)
        deltas.append(delta)
    indices = torch.cat(all_indices, dim=1) if len(all_indices) > 1 else all_indices[0]
    delta = torch.cat(deltas, dim=2) if len(deltas) > 1 else deltas[0]
    d, n_samples, positions, _ = delta.shape
    r = d * n_samples

    dense_cost = r * r * n_embeddings * dim
    kernel_cost = (r * positions) ** 2 * (dim + 1)
    dense_size = r * n_embeddings * dim
    kernel_size = (r * positions) ** 2
    if not _use_kernel(dense_cost, kernel_cost, dense_size, kernel_size):
        row_ids = torch.arange(r, device=indices.device).view(d, n_samples, 1)
        flat = (row_ids * n_embeddings + indices.unsqueeze(0)).reshape(-1)
        jac = torch.zeros(r * n_embeddings, dim, dtype=dtype, device=delta.device)
        jac.index_add_(0, flat, delta.reshape(-1, dim))
        return _gram(jac.view(r, n_embeddings * dim))
    flat_indices = indices.reshape(-1)
    same = (flat_indices[:, None] == flat_indices[None, :]).to(dtype)
    dm = delta.reshape(r * positions, dim)
    kd = (dm @ dm.T).view(d, n_samples, positions, d, n_samples, positions)
    kd = kd * same.view(1, n_samples, positions, 1, n_samples, positions)
    return kd.sum(dim=(2, 5)).reshape(r, r)


_FAST_RULES: list[tuple[type[nn.Module], Callable[[Any, Items, Rows, On], Tensor | None]]] = [
    (nn.Linear, _linear_rule),
    (nn.Conv1d, _conv_rule),
    (nn.Conv2d, _conv_rule),
    (nn.LayerNorm, _layer_norm_rule),
    (nn.GroupNorm, _group_norm_rule),
    (nn.modules.batchnorm._BatchNorm, _batch_norm_rule),
    (nn.modules.instancenorm._InstanceNorm, _instance_norm_rule),
    (nn.Embedding, _embedding_rule),
]
if hasattr(nn, "RMSNorm") and hasattr(F, "rms_norm"):
    _FAST_RULES.append((nn.RMSNorm, _rms_norm_rule))


# ---------------------------------------------------------------------------------------------
# General rules


def _trainable(module: nn.Module) -> dict[str, Tensor]:
    return {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}


def _gramian_of_jacobians(blocks: list[Tensor]) -> Tensor:
    """``sum_p J_p J_p^T`` for per-parameter Jacobians ``[n_rows, *p.shape]``."""
    return sum_of_gramians(blocks, reduce(torch.promote_types, (b.dtype for b in blocks)))


def _accumulate(total: dict[str, Tensor] | None, jac: dict[str, Tensor]) -> dict[str, Tensor]:
    if total is None:
        return dict(jac)
    return {name: total[name] + jac[name] for name in total}


def _rerun_failed(module: nn.Module, error: Exception) -> RuntimeError:
    return RuntimeError(
        f"Could not re-run the hooked module `{type(module).__name__}` to get its per-sample "
        f"gradients ({type(error).__name__}: {error}). With `batch_dim` set, a hooked module must "
        "process the samples independently and deterministically (randomness such as dropout "
        "only in submodules without trainable parameters), without side effects, and with every "
        "tensor input batched on dim 0; otherwise use `batch_dim=None`."
    )


_Pure = Callable[[dict[str, Tensor], tuple[Tensor, ...]], tuple[Tensor, ...]]


def _functional(module: nn.Module, call: Call) -> tuple[_Pure, tuple[Tensor, ...]]:
    """A pure version of ``call``: ``f(params, tensors)`` re-runs the module with the given
    parameters and tensor arguments (the other arguments as recorded) and returns the outputs
    that required grad. Also returns the recorded tensor arguments, detached."""
    leaves, spec = tree_flatten((call.args, call.kwargs))
    tensor_positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]
    tensors = tuple(leaves[i].detach() for i in tensor_positions)

    def f(params: dict[str, Tensor], new_tensors: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        new_leaves = list(leaves)
        for i, t in zip(tensor_positions, new_tensors):
            new_leaves[i] = t
        args, kwargs = tree_unflatten(new_leaves, spec)
        out_leaves = tree_flatten(torch.func.functional_call(module, params, args, kwargs))[0]
        return tuple(out_leaves[j] for j in call.positions)

    return f, tensors


@contextmanager
def _composite_attention() -> Iterator[None]:
    """Use the composite ("math") scaled-dot-product attention: the fused kernels have no
    batching rule, so under ``vmap`` they would run sample by sample."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # older torch: nothing to select
        yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield


def _per_sample_rule(module: nn.Module, items: Items, rows: Rows) -> dict[str, Tensor]:
    """Per-row gradients (by parameter name) from per-sample VJPs of the module re-run
    functionally, vectorised over the samples (and rows)."""
    params = _trainable(module)
    total: dict[str, Tensor] | None = None
    for call, deltas in items:
        _check_inputs_unchanged(call)
        f, tensors = _functional(module, call)
        for t in tensors:
            if t.ndim == 0 or t.shape[0] != rows.n_samples:
                raise _not_batched_error(module, "a tensor argument", t.shape, rows)
        deltas = tuple(_delta_sample_first(delta, rows, module) for delta in deltas)

        def per_sample(
            sample: tuple[Tensor, ...],
            sample_deltas: tuple[Tensor, ...],
            f: _Pure = f,
        ) -> dict[str, Tensor]:
            rebatched = tuple(t.unsqueeze(0) for t in sample)
            _, vjp_fn = torch.func.vjp(lambda p: f(p, rebatched), params)
            if rows.d == 1:
                return vjp_fn(tuple(delta[0].unsqueeze(0) for delta in sample_deltas))[0]
            return torch.func.vmap(vjp_fn)(tuple(delta.unsqueeze(1) for delta in sample_deltas))[0]

        try:
            with _composite_attention():
                jac = torch.func.vmap(per_sample, in_dims=(0, 1))(tensors, deltas)
        except (RuntimeError, ValueError, TypeError) as error:
            raise _rerun_failed(module, error) from error
        if rows.d > 1:  # [B, d, *shape] -> [d * B, *shape], rows (i, b)
            jac = {
                name: j.transpose(0, 1).reshape(rows.n_rows, *j.shape[2:])
                for name, j in jac.items()
            }
        total = _accumulate(total, jac)
    assert total is not None
    return total


def _batched_vjp_rule(module: nn.Module, items: Items, rows: Rows) -> dict[str, Tensor]:
    """Without a batch: per-row gradients (by parameter name) from the VJPs of the module with the
    ``d`` output-gradients of each call."""
    named = {name: p for name, p in module.named_parameters() if p.requires_grad}
    call, deltas = items[0]
    outputs = call.outputs
    if len(items) == 1 and outputs is not None and _outputs_intact(call):
        # Through the recorded graph: with a single call, the parameters reach the outputs only
        # through that call, so the total derivative is the local one.
        params = list(named.values())
        grads = stacked_vjps(outputs, params, deltas, [TensorSpec.of(p) for p in params])
        jac = {
            name: p.new_zeros((rows.d, *p.shape)) if g is None else g
            for (name, p), g in zip(named.items(), grads)
        }
        return jac

    # Several calls (or outputs modified in place): local derivatives through a functional re-run.
    params = {name: p.detach() for name, p in named.items()}
    total: dict[str, Tensor] | None = None
    for call, deltas in items:
        _check_inputs_unchanged(call)
        f, tensors = _functional(module, call)
        _, vjp_fn = torch.func.vjp(lambda p, f=f, tensors=tensors: f(p, tensors), params)
        if rows.d == 1:
            jac = vjp_fn(tuple(delta[0] for delta in deltas))[0]
            jac = {name: j.unsqueeze(0) for name, j in jac.items()}
        else:
            jac = torch.func.vmap(vjp_fn)(deltas)[0]
        total = _accumulate(total, jac)
    assert total is not None
    return total

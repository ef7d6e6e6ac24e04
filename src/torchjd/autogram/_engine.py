r"""The autogram :class:`Engine`: Gramian of a Jacobian without materialising the Jacobian.

Mathematics
-----------
Let ``y = output.reshape(-1)`` have ``m`` entries and ``theta`` be the trainable parameters of the
hooked modules. The engine returns ``G = J J^T`` with ``J = dy/dtheta`` (``[m, n]``). Split
``theta`` into the parameter blocks ``theta_u`` of the hooked modules ``u`` (disjoint by
requirement); the columns of ``J`` split the same way and

.. math::

    G = \sum_u J_u J_u^T, \qquad
    J_u = \frac{\partial y}{\partial \theta_u} \in \mathbb{R}^{m \times n_u},

so each hooked module contributes its own ``[m, m]`` block-Gramian and the full ``J`` never exists
(Section 6 and Algorithm 3 of `Jacobian Descent for Multi-Objective Optimization
<https://arxiv.org/abs/2406.16232>`_).

Per module, ``J_u`` is a function of the module's recorded inputs and of its *output-gradients*.
If the module is called ``K`` times with inputs ``x^k`` and outputs ``z^k = f_u(theta_u, x^k)``, the
chain rule gives, for row ``r`` of ``J``,

.. math::

    (J_u)_r = \sum_k \Big(\frac{\partial f_u}{\partial \theta_u}(\theta_u, x^k)\Big)^T \delta^k_r,
    \qquad \delta^k_r = \frac{\partial y_r}{\partial z^k}

(partial derivatives: the inputs ``x^k`` are held fixed; module reuse is handled by the sum over
calls, cross terms included). The output-gradients ``delta`` of all calls come out of **one**
backward pass from ``output`` that stops at the recorded module outputs:

* ``batch_dim`` not ``None``, output ``[B]``: the backward is seeded with ones. Because samples are
  processed independently, the gradient reaching sample ``b`` of a module output is exactly
  ``dy_b/dz_b``, and row ``b`` of ``J_u`` is the *per-sample* gradient of that module at sample
  ``b``. An output with extra dims is viewed as ``[d, B]`` and the backward is vectorised over the
  ``d`` rows of the identity (seeds ``e_i (x) 1_B``), giving rows ``(i, b)``.
* ``batch_dim=None``: the backward is vectorised over the ``m`` rows of the identity.

The per-module block ``J_u J_u^T`` is then formed by a rule chosen per layer type
(:mod:`torchjd.autogram._layer_gramians`): closed forms for linear layers, convolutions (via
unfold), embeddings and the element-wise affine parameters of normalisation layers, which never
build per-sample gradients when it is cheaper not to, and a general rule (per-sample VJPs of the
module re-run with :mod:`torch.func`, or a batched VJP through the recorded graph) for the rest.

Only one module's block is alive at a time, on top of the output-gradients of the hooked modules
(the size of the activations, times ``d`` for outputs with extra dims).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.hooks import RemovableHandle

from torchjd.autogram._layer_gramians import Call, Rows, module_gramian
from torchjd.autogram._vjp import TensorSpec, stacked_vjps
from torchjd.linalg._gramian import flatten_gramian, movedim_gramian, reshape_gramian

# Number of engines currently computing a Gramian. Forward calls made meanwhile (re-runs of
# modules by torch.func, recomputations of activation checkpointing) must not be recorded.
_computing = 0


@contextmanager
def _recording_paused() -> Iterator[None]:
    global _computing
    _computing += 1
    try:
        yield
    finally:
        _computing -= 1


def _in_backward_pass() -> bool:
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current is not None and current() != -1


class _Identity(torch.autograd.Function):
    """Copies several outputs of one module call so that each gets its own gradient edge."""

    @staticmethod
    def forward(*tensors: Tensor) -> tuple[Tensor, ...]:
        return tuple(t.clone() for t in tensors)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor, ...]:
        return grads


@dataclass
class _Record:
    call: Call
    edges: tuple[GradientEdge, ...]


class _Recorder:
    """Forward hook shared by the hooked modules of one engine; holds the recorded calls."""

    def __init__(self, keep_outputs: bool) -> None:
        self.records: list[_Record] = []
        self.keep_outputs = keep_outputs

    def _call(
        self,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        outputs: tuple[Tensor, ...],
        positions: tuple[int, ...],
    ) -> Call:
        call = Call(
            module,
            args,
            kwargs,
            tuple(TensorSpec.of(t) for t in outputs),
            positions,
            _versions(args, kwargs),
        )
        if self.keep_outputs:
            call.outputs = outputs
            call.output_versions = tuple(t._version for t in outputs)
        return call

    def __call__(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> Any:
        if _computing or not torch.is_grad_enabled() or _in_backward_pass():
            return None
        if isinstance(output, Tensor):
            if not output.requires_grad:
                return None
            call = self._call(module, args, kwargs, (output,), (0,))
            self.records.append(_Record(call, (get_gradient_edge(output),)))
            return None

        leaves, spec = tree_flatten(output)
        positions: list[int] = []
        seen: set[int] = set()
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, Tensor) and leaf.requires_grad and id(leaf) not in seen:
                seen.add(id(leaf))
                positions.append(i)
        if not positions:
            return None
        raw = tuple(leaves[i] for i in positions)
        call = self._call(module, args, kwargs, raw, tuple(positions))
        if len(raw) == 1:
            self.records.append(_Record(call, (get_gradient_edge(raw[0]),)))
            return None
        # Several outputs: give each one its own node, so that the gradient of one output does not
        # include what flows into it from another output computed from it inside the module.
        copies = _Identity.apply(*raw)
        by_id = {id(t): c for t, c in zip(raw, copies)}
        new_leaves = [
            by_id.get(id(leaf), leaf) if isinstance(leaf, Tensor) else leaf for leaf in leaves
        ]
        self.records.append(_Record(call, tuple(get_gradient_edge(c) for c in copies)))
        return tree_unflatten(new_leaves, spec)


def _versions(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Tensor, int], ...]:
    if not kwargs and all(isinstance(a, Tensor) for a in args):
        leaves: list[Any] = list(args)
    else:
        leaves = tree_flatten((args, kwargs))[0]
    return tuple((t, t._version) for t in leaves if isinstance(t, Tensor))


def _remove_handles(handles: list[RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()


def _find_units(module: nn.Module) -> Iterator[nn.Module]:
    """Yield the modules hooked for ``module``: the first ones, top-down, with a direct trainable
    parameter (each is then a unit, with all its parameters); modules without any are skipped."""
    if any(p.requires_grad for p in module.parameters(recurse=False)):
        yield module
        return
    for child in module.children():
        yield from _find_units(child)


def _check_no_shared_parameters(units: list[nn.Module]) -> None:
    """Each block ``J_u J_u^T`` is formed from one unit's calls only: a parameter that two units
    use (weight tying) would miss the cross terms between them, so it is refused."""
    owner: dict[int, tuple[nn.Module, str]] = {}
    for unit in units:
        for name, param in unit.named_parameters():
            if not param.requires_grad:
                continue
            if id(param) in owner:
                first, first_name = owner[id(param)]
                raise ValueError(
                    f"The parameter `{first_name}` of `{type(first).__name__}` is also the "
                    f"parameter `{name}` of `{type(unit).__name__}` (tied weights): the engine "
                    "hooks them as two units and would miss the terms that cross them. Untie "
                    "them, freeze the shared parameter, or use torchjd.autojac, whose Jacobians "
                    "account for tied parameters."
                )
            owner[id(param)] = (unit, name)


_RUNNING_STATS_NORMS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
)


def _check_batched_compatibility(unit: nn.Module, batch_dim: int) -> None:
    """Reject, for ``batch_dim`` not None, the modules whose per-sample gradients are not what one
    backward pass gives."""
    for name, sub in unit.named_modules():
        where = f"`{type(unit).__name__}`" + (f" (in its submodule `{name}`)" if name else "")
        if isinstance(sub, nn.modules.batchnorm._BatchNorm):
            raise ValueError(
                f"Engine cannot hook {where} with `batch_dim={batch_dim}`: `{type(sub).__name__}` "
                "mixes the samples of a batch through its batch statistics (and updates running "
                "statistics in place), so the rows of the Jacobian are not per-sample gradients. "
                "Replace it with a per-sample normalisation (GroupNorm, LayerNorm, "
                "InstanceNorm with track_running_stats=False), freeze its parameters so that it is "
                "not hooked, or use `batch_dim=None`."
            )
        if isinstance(sub, _RUNNING_STATS_NORMS) and getattr(sub, "track_running_stats", False):
            raise ValueError(
                f"Engine cannot hook {where} with `batch_dim={batch_dim}`: `{type(sub).__name__}` "
                "has `track_running_stats=True` and updates its running statistics in place during "
                "the forward pass, which the engine would repeat. Use `track_running_stats=False`, "
                "freeze its parameters so that it is not hooked, or use `batch_dim=None`."
            )
        if isinstance(sub, nn.RNNBase):
            raise ValueError(
                f"Engine cannot hook {where} with `batch_dim={batch_dim}`: recurrent modules keep "
                "a hidden state batched on dim 1, while the engine needs every tensor entering or "
                "leaving a hooked module to be batched on dim 0. Use `batch_dim=None` (or "
                "torchjd.autojac)."
            )
        if isinstance(sub, nn.MultiheadAttention) and not sub.batch_first:
            raise ValueError(
                f"Engine cannot hook {where} with `batch_dim={batch_dim}`: `MultiheadAttention` "
                "with `batch_first=False` takes inputs batched on dim 1, while the engine needs "
                "them batched on dim 0. Build it (or the Transformer layer containing it) with "
                "`batch_first=True`, or use `batch_dim=None`."
            )


class Engine:
    r"""Computes the Gramian of the Jacobian of an output w.r.t. the parameters of some modules.

    The engine hooks the given modules; each forward pass through them (with gradient enabled) is
    recorded, and :meth:`compute_gramian` then returns ``G = J J^T`` where ``J`` is the Jacobian of
    ``output.reshape(-1)`` w.r.t. the trainable parameters of the hooked modules, without ever
    holding ``J`` in memory (one block of parameters at a time, computed from the modules' inputs
    and output-gradients, see :mod:`torchjd.autogram._engine`). This is what makes instance-wise
    risk minimisation affordable: weights ``w = weighting(G)`` then give the update with an
    ordinary ``output.backward(w)``.

    >>> import torch
    >>> from torch import nn
    >>> from torchjd.autogram import Engine
    >>> model = nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 1))
    >>> engine = Engine(model, batch_dim=0)  # before the forward pass
    >>> losses = model(torch.randn(4, 5)).squeeze(1) ** 2  # one loss per sample
    >>> engine.compute_gramian(losses).shape
    torch.Size([4, 4])

    Which modules are hooked: a given module with a *direct* trainable parameter is hooked as one
    unit (its Jacobian is taken w.r.t. all its trainable parameters, its submodules included);
    otherwise its children are examined the same way. Modules without trainable parameters are
    never hooked. The given modules must not be nested in one another and must not share
    parameters. Hooks are removed when the engine is garbage-collected.

    :param modules: The modules whose parameters form the columns of ``J``.
    :param batch_dim: Keyword-only, required. The batch dimension of the ``output`` given to
        :meth:`compute_gramian` (negative values count from the end), or ``None`` when the rows of
        ``J`` have no batch structure. When not ``None``, every hooked module must process the
        samples of its inputs independently (no BatchNorm, no recurrent module), deterministically
        and without side effects, and every tensor entering or leaving it must be batched on dim 0
        with the same batch size as ``output``: rows of ``J`` are then per-sample gradients and
        the fast per-layer rules apply. ``None`` works with any model but is slower and uses more
        memory (one backward pass per entry of ``output``, vectorised).
    """

    def __init__(self, *modules: nn.Module, batch_dim: int | None) -> None:
        if batch_dim is not None and (
            isinstance(batch_dim, bool) or not isinstance(batch_dim, int)
        ):
            raise TypeError(f"`batch_dim` must be an int or None, got {batch_dim!r}.")
        for module in modules:
            if not isinstance(module, nn.Module):
                raise TypeError(
                    f"`modules` must be instances of torch.nn.Module, got {type(module).__name__}."
                )
        self._batch_dim = batch_dim

        units: list[nn.Module] = []
        for module in modules:
            units.extend(_find_units(module))
        seen: set[int] = set()
        for unit in units:
            if id(unit) in seen:
                raise ValueError(
                    f"Module `{type(unit).__name__}` would be hooked twice: the given modules must "
                    "not be nested in one another nor repeated."
                )
            seen.add(id(unit))
        for unit in units:
            for sub in unit.modules():
                if sub is not unit and id(sub) in seen:
                    raise ValueError(
                        f"Module `{type(sub).__name__}` is inside the hooked module "
                        f"`{type(unit).__name__}`: the given modules must not be nested in one "
                        "another."
                    )
        _check_no_shared_parameters(units)
        if batch_dim is not None:
            for unit in units:
                _check_batched_compatibility(unit, batch_dim)
        self._units = units

        self._recorder = _Recorder(keep_outputs=batch_dim is None)
        handles = [unit.register_forward_hook(self._recorder, with_kwargs=True) for unit in units]
        weakref.finalize(self, _remove_handles, handles)

    @property
    def batch_dim(self) -> int | None:
        """The batch dimension of the outputs given to :meth:`compute_gramian` (or ``None``)."""
        return self._batch_dim

    def compute_gramian(self, output: Tensor, /) -> Tensor:
        r"""Return the Gramian ``J J^T`` (``[m, m]``, ``m = output.numel()``) of the Jacobian of
        ``output.reshape(-1)`` w.r.t. the trainable parameters of the hooked modules.

        Rows follow ``output.flatten()``. The result does not require grad, has the dtype of the
        parameters and ``output``'s device; no ``.grad`` is written. The graph is kept, so
        ``output.backward(weights.reshape(output.shape))`` can follow.

        Consumes the forward calls recorded since the previous call: every grad-enabled forward
        pass through a hooked module must flow into ``output`` (do extra forward passes under
        :func:`torch.no_grad`), and a second call needs a new forward pass. Until then the engine
        keeps a reference to the arguments of each recorded call (they are needed to form the
        blocks of the Gramian).

        :param output: The tensor whose Jacobian is considered (e.g. the vector of per-sample
            losses). With ``batch_dim`` not ``None`` it must have at least one dimension.
        """
        records = self._recorder.records
        self._recorder.records = []
        return self._compute(output, records)

    def _compute(self, output: Tensor, records: list[_Record]) -> Tensor:
        if not isinstance(output, Tensor):
            raise TypeError(f"`output` must be a Tensor, got {type(output).__name__}.")
        if not output.requires_grad:
            raise RuntimeError(
                "`output` does not require grad: it must be computed, with gradient enabled, from "
                "the outputs of the hooked modules (is it detached or computed under no_grad?)."
            )
        if output.numel() == 0:
            raise ValueError(
                f"`output` must have at least one entry, got shape {tuple(output.shape)}."
            )

        batch_dim = self._batch_dim
        if batch_dim is None:
            m = output.numel()
            target = output.reshape(m, 1)
            rows = Rows(d=m, n_samples=1, batched=False)
            seed = _identity_seed(m, 1, output)
            half_shape = None
        else:
            if output.ndim == 0:
                raise ValueError(
                    f"With `batch_dim={batch_dim}`, `output` must have a batch dimension, got a "
                    "0-dim tensor. Use `batch_dim=None` for a scalar output."
                )
            if not -output.ndim <= batch_dim < output.ndim:
                raise IndexError(
                    f"`batch_dim` must be in [{-output.ndim}, {output.ndim}) for an output of "
                    f"shape {tuple(output.shape)}, got {batch_dim}."
                )
            k = batch_dim % output.ndim
            moved = output.movedim(k, -1)
            n_samples = moved.shape[-1]
            d = math.prod(moved.shape[:-1])
            target = moved.reshape(d, n_samples)
            rows = Rows(d=d, n_samples=n_samples, batched=True)
            seed = _identity_seed(d, n_samples, output)
            half_shape = (list(moved.shape), k) if output.ndim > 1 else None

        by_module, _ = output_gradients(target, seed, rows, records, [])
        gramian: Tensor | None = None
        with torch.no_grad(), _recording_paused():
            for module, items in by_module.items():
                block = module_gramian(module, items, rows)
                if block is None:
                    continue
                if gramian is None:
                    gramian = block
                else:
                    dtype = torch.promote_types(gramian.dtype, block.dtype)
                    gramian = gramian.to(dtype) + block.to(dtype)
        if gramian is None:
            # Every hooked module reached has all its parameters frozen now.
            raise RuntimeError(
                "The hooked modules that `output` depends on have no trainable parameter left."
            )

        if half_shape is not None:
            shape, k = half_shape
            gramian = reshape_gramian(gramian, shape)
            if k != len(shape) - 1:
                gramian = movedim_gramian(gramian, len(shape) - 1, k)
            gramian = flatten_gramian(gramian)
        return gramian.detach()


Deltas = dict[nn.Module, list[tuple[Call, tuple[Tensor, ...]]]]


def output_gradients(
    target: Tensor, seed: Tensor, rows: Rows, records: list[_Record], extra: list[Tensor]
) -> tuple[Deltas, list[Tensor | None]]:
    """One vectorised backward pass from ``target`` seeded with the rows of ``seed``, stopped at
    the recorded module outputs (and at the ``extra`` tensors): the output-gradients of every
    recorded call that reached ``target``, by module, and the stacked gradients of ``extra``."""
    if not records:
        raise RuntimeError(
            "No forward call of a hooked module was recorded since the previous "
            "compute_gramian: create the Engine before the forward pass, run a new forward "
            "pass (with gradient enabled) for each call, and make sure the hooked modules have "
            "trainable parameters and are called (not just their parameters read)."
        )

    edges: list[GradientEdge | Tensor] = [e for record in records for e in record.edges]
    specs = [spec for record in records for spec in record.call.output_specs]
    with _recording_paused():
        grads = stacked_vjps(
            [target], [*edges, *extra], [seed], [*specs, *map(TensorSpec.of, extra)]
        )

    by_module: Deltas = {}
    unused: dict[nn.Module, int] = {}
    counts: dict[nn.Module, int] = {}
    position = 0
    for record in records:
        call_grads = grads[position : position + len(record.edges)]
        position += len(record.edges)
        module = record.call.module
        counts[module] = counts.get(module, 0) + 1
        if all(g is None for g in call_grads):
            unused[module] = unused.get(module, 0) + 1
            continue
        deltas = tuple(
            spec.zeros(rows.d) if g is None else g
            for g, spec in zip(call_grads, record.call.output_specs)
        )
        by_module.setdefault(module, []).append((record.call, deltas))

    pending = [module for module in unused if module in by_module]
    if pending:
        described = ", ".join(
            f"`{type(module).__name__}` ({unused[module]} of {counts[module]} calls)"
            for module in pending
        )
        raise ValueError(
            "Some grad-enabled forward calls of hooked modules do not contribute to `output` "
            f"while other calls of the same modules do: {described}. Every forward pass run "
            "with gradient enabled since the previous compute_gramian must flow into `output`: "
            "run extra forward passes (evaluation, a plain training step) under "
            "torch.no_grad(), or call compute_gramian after each of them."
        )
    if not by_module:
        raise RuntimeError(
            "`output` does not depend on the outputs of any hooked module called since the "
            "previous compute_gramian."
        )

    return by_module, list(grads[position:])


def _identity_seed(d: int, n_samples: int, like: Tensor) -> Tensor:
    """The ``d`` seeds ``e_i (x) 1`` of the backward passes for a target viewed as
    ``[d, n_samples]``, stacked: ``[d, d, n_samples]``."""
    if d == 1:
        return torch.ones((1, 1, n_samples), dtype=like.dtype, device=like.device)
    eye = torch.eye(d, dtype=like.dtype, device=like.device)
    return eye.unsqueeze(-1).expand(d, d, n_samples).contiguous()

"""The four ways of partitioning parameters studied in Gradient Vaccine (Wang et al., ICLR 2021).

Each function returns the groups as a list of lists of parameters, in a deterministic order, with
each trainable parameter (``requires_grad``) in exactly one group. A parameter reachable from
several places (shared, tied) is kept at its first occurrence only, as
:meth:`torch.nn.Module.parameters` does.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def together(*modules: nn.Module) -> list[list[nn.Parameter]]:
    """One group holding every trainable parameter of ``modules``: the whole model is aggregated
    at once. This is ``whole_model`` in `Gradient Vaccine <https://arxiv.org/abs/2010.05874>`_
    (Wang et al., ICLR 2021), and what a single :func:`~torchjd.autojac.jac_to_grad` call does.

    :param modules: one or more modules, in order; their parameters are listed in the order of
        :meth:`~torch.nn.Module.parameters`, module after module.
    :return: ``[params]``, a list with one group.

    >>> from torch import nn
    >>> from torchjd.grouping import together
    >>> [[tuple(p.shape) for p in group] for group in together(nn.Linear(3, 2))]
    [[(2, 3), (2,)]]
    """
    _check_modules(modules, "modules", "together")
    params = _trainable(p for module in modules for p in module.parameters())
    _check_found(params, modules)
    return [params]


def per_network(*networks: nn.Module) -> list[list[nn.Parameter]]:
    """One group per network, in the order given: typically ``per_network(encoder, decoder)``.
    This is ``enc_dec`` in `Gradient Vaccine <https://arxiv.org/abs/2010.05874>`_ (Wang et al.,
    ICLR 2021), where the encoder and the decoder of a translation model are aggregated
    separately.

    To split a model into its direct children, use ``per_network(*model.children())``: children
    without any parameter (activations, pooling, dropout) are skipped. A parameter shared by two
    networks belongs to the first one.

    :param networks: the sub-networks. Each one that has parameters must own at least one
        trainable parameter that no earlier network owns.
    :return: one group per network that has parameters.
    :raises ValueError: if a network has parameters but none of them trainable and not already
        owned (a frozen network: leave it out), or if no network has any parameter.

    >>> from torch import nn
    >>> from torchjd.grouping import per_network
    >>> encoder, decoder = nn.Linear(4, 3), nn.Linear(3, 2)
    >>> [len(group) for group in per_network(encoder, decoder)]
    [2, 2]
    """
    _check_modules(networks, "networks", "per_network")
    seen: set[int] = set()
    groups = []
    for index, network in enumerate(networks):
        parameters = list(network.parameters())
        if not parameters:
            continue  # ReLU, MaxPool2d...: nothing to aggregate
        group = _trainable(parameters, seen)
        if not group:
            raise ValueError(
                f"Network {index} of `networks` ({type(network).__name__}) has no trainable "
                "parameter (requiring grad) that an earlier network does not already own: each "
                "network must give a non-empty group. Leave frozen networks out."
            )
        groups.append(group)
    if not groups:
        names = ", ".join(type(n).__name__ for n in networks)
        raise ValueError(
            f"None of `networks` ({names}) has any parameter: there is nothing to group. Give "
            "the networks that hold the trainable parameters."
        )
    return groups


def per_layer(*modules: nn.Module) -> list[list[nn.Parameter]]:
    """One group per layer: per module that owns trainable parameters directly. This is
    ``all_layer`` in `Gradient Vaccine <https://arxiv.org/abs/2010.05874>`_ (Wang et al., ICLR
    2021).

    The sub-modules are visited in the order of :meth:`~torch.nn.Module.modules` (a module before
    its children). Each one whose own parameters (``recurse=False``) include trainable ones gives
    one group. For the usual models these are the leaf modules (``Linear``, ``Conv2d``,
    ``LayerNorm``...), one group per layer; a container that also registers parameters of its own
    (e.g. :class:`~torch.nn.MultiheadAttention`'s input projection) gives one more group for them,
    placed before the groups of its children, so that no parameter is left out.

    :param modules: one or more modules, visited in order.
    :return: one group per module owning trainable parameters directly.

    >>> from torch import nn
    >>> from torchjd.grouping import per_layer
    >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> [[tuple(p.shape) for p in group] for group in per_layer(model)]
    [[(3, 4), (3,)], [(2, 3), (2,)]]
    """
    _check_modules(modules, "modules", "per_layer")
    seen_params: set[int] = set()
    seen_modules: set[int] = set()
    groups = []
    for module in modules:
        for sub in module.modules():
            if id(sub) in seen_modules:
                continue
            seen_modules.add(id(sub))
            group = _trainable(sub.parameters(recurse=False), seen_params)
            if group:
                groups.append(group)
    _check_found(groups, modules)
    return groups


def per_tensor(*modules: nn.Module) -> list[list[nn.Parameter]]:
    """One group per trainable parameter tensor (each weight matrix, each bias). This is
    ``all_matrix`` in `Gradient Vaccine <https://arxiv.org/abs/2010.05874>`_ (Wang et al., ICLR
    2021), the finest of the four partitions.

    :param modules: one or more modules; the tensors come in the order of
        :meth:`~torch.nn.Module.parameters`, module after module.
    :return: ``[[p] for p in params]``.

    >>> from torch import nn
    >>> from torchjd.grouping import per_tensor
    >>> [[tuple(p.shape) for p in group] for group in per_tensor(nn.Linear(3, 2))]
    [[(2, 3)], [(2,)]]
    """
    _check_modules(modules, "modules", "per_tensor")
    params = _trainable(p for module in modules for p in module.parameters())
    _check_found(params, modules)
    return [[p] for p in params]


# The names of the Gradient Vaccine paper.
whole_model = together
enc_dec = per_network
all_layer = per_layer
all_matrix = per_tensor


def _check_modules(modules: tuple[object, ...], name: str, function: str) -> None:
    if not modules:
        raise ValueError(f"`{name}` must contain at least one module, got none.")
    for i, module in enumerate(modules):
        if not isinstance(module, nn.Module):
            hint = ""
            if getattr(module, "__name__", None) in ("children", "modules"):
                hint = (
                    " To pass the children of a model, unpack them: "
                    f"`{function}(*model.children())` (note the `*`)."
                )
            elif not isinstance(module, str) and isinstance(module, Iterable):
                hint = " Give the modules themselves, not their parameters."
            raise TypeError(
                f"`{name}` must contain only torch.nn.Module objects, but element {i} is of type "
                f"{type(module).__name__}.{hint}"
            )


def _trainable(params: Iterable[nn.Parameter], seen: set[int] | None = None) -> list[nn.Parameter]:
    """The parameters that require grad, without repeats (also of those already in ``seen``,
    which is updated)."""
    seen = set() if seen is None else seen
    result = []
    for p in params:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            result.append(p)
    return result


def _check_found(found: list[object], modules: tuple[nn.Module, ...]) -> None:
    if not found:
        names = ", ".join(type(m).__name__ for m in modules)
        raise ValueError(
            f"The modules ({names}) have no trainable parameter (requiring grad): there is nothing "
            "to group."
        )

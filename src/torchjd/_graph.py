"""Walks of the autograd graph shared by the Jacobian and Gramian engines."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

from torch import Tensor


def infer_leaves(roots: Sequence[Tensor], excluded: Sequence[Tensor] = ()) -> list[Tensor]:
    """Leaves requiring grad reachable from ``roots``, in breadth-first discovery order.

    The walk never enters the ``grad_fn`` of an ``excluded`` tensor (an excluded root is not a
    start node), so only the paths through them are blocked. Every root and every excluded tensor
    must have a ``grad_fn`` (the caller checks it). Duplicate-free, ordered by first discovery.
    """
    excluded_nodes = {t.grad_fn for t in excluded}
    visited = set()
    queue = deque()
    for root in roots:
        node = root.grad_fn
        if node not in excluded_nodes and node not in visited:
            visited.add(node)
            queue.append(node)

    leaves: dict[int, Tensor] = {}
    while queue:
        node = queue.popleft()
        variable = getattr(node, "variable", None)
        if isinstance(variable, Tensor) and variable.requires_grad:
            leaves.setdefault(id(variable), variable)
        for child, _ in node.next_functions:
            if child is not None and child not in visited and child not in excluded_nodes:
                visited.add(child)
                queue.append(child)
    return list(leaves.values())


def any_node(roots: Sequence[Tensor], predicate: Callable[[object], bool]) -> bool:
    """Whether a node of the graph of ``roots`` satisfies ``predicate``; breadth first, so it
    stops early when such a node is close to the roots."""
    queue = deque({r.grad_fn for r in roots if r.grad_fn is not None})
    visited = set(queue)
    while queue:
        node = queue.popleft()
        if predicate(node):
            return True
        for child, _ in node.next_functions:
            if child is not None and child not in visited:
                visited.add(child)
                queue.append(child)
    return False

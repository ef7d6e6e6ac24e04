"""The training methods compared by the benchmark, and how to build their aggregators.

``sum`` is the usual baseline: one backward pass of the summed loss, no Jacobian. Every other
method computes the Jacobian of the task losses with respect to the trunk (``mtl_backward``) and
turns it into the trunk's update with an aggregator of ``torchjd.aggregation`` (``jac_to_grad``).
"""

from collections.abc import Callable
from dataclasses import dataclass

from torchjd import aggregation
from torchjd.aggregation import Aggregator


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    make: Callable[[int], Aggregator] | None  # m -> a fresh aggregator; None: summed loss


METHODS: dict[str, Method] = {
    method.key: method
    for method in (
        Method("sum", "Sum (summed loss)", None),
        Method("mean", "Mean", lambda m: aggregation.Mean()),
        Method("upgrad", "UPGrad", lambda m: aggregation.UPGrad()),
        Method("mgda", "MGDA", lambda m: aggregation.MGDA()),
        Method("pcgrad", "PCGrad", lambda m: aggregation.PCGrad()),
        Method("gradvac", "GradVac", lambda m: aggregation.GradVac()),
        Method("cagrad", "CAGrad(c=0.4)", lambda m: aggregation.CAGrad(c=0.4)),
        Method("nashmtl", "Nash-MTL", lambda m: aggregation.NashMTL(n_tasks=m)),
    )
}
GROUPABLE = tuple(key for key, method in METHODS.items() if method.make is not None)


def unavailable_reason(key: str, m: int) -> str | None:
    """Why the method cannot run here (missing class or optional dependency), or None if it can."""
    method = METHODS[key]
    if method.make is None:
        return None
    try:
        method.make(m)
    except (ImportError, AttributeError) as error:
        return f"{type(error).__name__}: {error}"
    return None

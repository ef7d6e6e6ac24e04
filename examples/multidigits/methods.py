"""The training methods compared by the benchmark, and how to build their aggregators.

``sum`` is the usual baseline: one backward pass of the summed loss, no Jacobian. Every other
method computes the Jacobian of the task losses with respect to the trunk (``mtl_backward``) and
turns it into the trunk's update with an aggregator of ``torchjd.aggregation`` (``jac_to_grad``);
GradNorm and DB-MTL also read the losses (``update_losses``). M-ConFIG has a training step of its
own: ``MConFIGBackward`` back-propagates one loss per step and writes the ConFIG direction of the
per-loss momenta into the ``.grad`` of every parameter, trunk and heads.
"""

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from torchjd import aggregation
from torchjd.aggregation import Aggregator, MConFIGBackward


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    make: Callable[[int], Aggregator] | None  # m -> a fresh aggregator; None: no Jacobian
    # parameters -> a training step of its own (M-ConFIG); with make None and no step: summed loss
    make_step: Callable[[list[nn.Parameter]], MConFIGBackward] | None = None


def _m_config(params: list[nn.Parameter]) -> MConFIGBackward:
    return MConFIGBackward(params, beta=0.5)


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
        Method("gradnorm", "GradNorm", lambda m: aggregation.GradNorm()),
        Method("dbmtl", "DB-MTL", lambda m: aggregation.DBMTL()),
        Method("moco", "MoCo", lambda m: aggregation.MoCo()),
        # Each momentum is refreshed every m steps and Adam adds its own momentum on top: the
        # paper's beta = 0.9 averages over too many steps for these short runs.
        Method("mconfig", "M-ConFIG(β=0.5)", None, make_step=_m_config),
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

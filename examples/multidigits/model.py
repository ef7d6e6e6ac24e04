"""The multi-task network: a small shared CNN trunk and one linear head per task.

The trunk is ``Sequential(encoder, decoder)`` so that the four grouping strategies of the Gradient
Vaccine paper (Wang et al., ICLR 2021, arXiv:2010.05874) give four different partitions of its six
parameter tensors:

=============  ================================================  =======
strategy       groups                                            count
=============  ================================================  =======
together       the whole trunk                                   1
per_network    encoder (both convolutions), decoder (linear)     2
per_layer      conv1, conv2, fc                                  3
per_tensor     every weight and bias on its own                  6
=============  ================================================  =======
"""

from collections import OrderedDict

from torch import nn

from .data import HEIGHT, WIDTH

GROUPINGS = ("together", "per_network", "per_layer", "per_tensor")
FEATURES = 64


def make_trunk() -> nn.Sequential:
    encoder = nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(1, 16, kernel_size=3, padding=1),
            relu1=nn.ReLU(),
            pool=nn.MaxPool2d(2),
            conv2=nn.Conv2d(16, 32, kernel_size=3, padding=1),
            relu2=nn.ReLU(),
        )
    )
    flat = 32 * (HEIGHT // 2) * (WIDTH // 2)
    decoder = nn.Sequential(
        OrderedDict(flatten=nn.Flatten(), fc=nn.Linear(flat, FEATURES), relu=nn.ReLU())
    )
    return nn.Sequential(OrderedDict(encoder=encoder, decoder=decoder))


def make_heads(outputs: list[int]) -> nn.ModuleList:
    """One linear head per task; ``outputs[t]`` is the output size of task ``t``."""
    return nn.ModuleList(nn.Linear(FEATURES, n) for n in outputs)


def parameter_groups(trunk: nn.Sequential, strategy: str) -> list[tuple[str, list[nn.Parameter]]]:
    """Partition the trunk's parameters into named groups, each aggregated on its own.

    Every parameter is in exactly one group, in the order of ``trunk.parameters()``.
    """
    if strategy == "together":
        return [("trunk", list(trunk.parameters()))]
    if strategy == "per_network":
        return [(name, list(net.parameters())) for name, net in trunk.named_children()]
    if strategy == "per_layer":
        return [
            (name.split(".")[-1], list(module.parameters()))
            for name, module in trunk.named_modules()
            if not list(module.children()) and list(module.parameters())
        ]
    if strategy == "per_tensor":
        return [(name.split(".", 1)[-1], [p]) for name, p in trunk.named_parameters()]
    raise ValueError(f"`strategy` must be one of {list(GROUPINGS)}, got {strategy!r}.")

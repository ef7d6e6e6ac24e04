"""Aggregate groups of parameters separately.

The Jacobian of a model can be aggregated as a whole, or group of parameters by group of
parameters: conflicts between the objectives are then measured and resolved within each group.
`Gradient Vaccine <https://arxiv.org/abs/2010.05874>`_ (Wang et al., ICLR 2021) compares four
partitions, available here under descriptive names and under the paper's names:

- :func:`together` (``whole_model``): one group, the whole model;
- :func:`per_network` (``enc_dec``): one group per sub-network, e.g. encoder and decoder;
- :func:`per_layer` (``all_layer``): one group per layer;
- :func:`per_tensor` (``all_matrix``): one group per parameter tensor.

A :class:`GroupedAggregator` holds one aggregator per group (each with its own state) and
aggregates every group in one call, batching the work of the groups whose weights come from the
Gramian.
"""

from torchjd.grouping._grouped_aggregator import GroupedAggregator
from torchjd.grouping._strategies import (
    all_layer,
    all_matrix,
    enc_dec,
    per_layer,
    per_network,
    per_tensor,
    together,
    whole_model,
)

__all__ = [
    "GroupedAggregator",
    "all_layer",
    "all_matrix",
    "enc_dec",
    "per_layer",
    "per_network",
    "per_tensor",
    "together",
    "whole_model",
]

"""Aggregators (matrix ``[m, n]`` to vector ``[n]``) and weightings (statistic to weights ``[m]``).

Each algorithm lives in its own module and is re-exported here.
"""

from torchjd.aggregation._bases import (
    Aggregator,
    GramianWeightedAggregator,
    WeightedAggregator,
    Weighting,
)
from torchjd.aggregation._constant import Constant, ConstantWeighting
from torchjd.aggregation._mean import Mean, MeanWeighting
from torchjd.aggregation._random import Random, RandomWeighting
from torchjd.aggregation._sum import Sum, SumWeighting

__all__ = [
    "Aggregator",
    "Constant",
    "ConstantWeighting",
    "GramianWeightedAggregator",
    "Mean",
    "MeanWeighting",
    "Random",
    "RandomWeighting",
    "Sum",
    "SumWeighting",
    "WeightedAggregator",
    "Weighting",
]

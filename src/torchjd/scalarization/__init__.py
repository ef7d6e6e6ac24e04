"""Scalarizers: turn a tensor of per-objective values (losses) into one scalar to back-propagate.

They are the loss-space baselines to the aggregators of :mod:`torchjd.aggregation`. Each
scalarizer lives in its own module and is re-exported here.
"""

from torchjd.scalarization._constant import Constant
from torchjd.scalarization._cosmos import COSMOS
from torchjd.scalarization._dwa import DWA
from torchjd.scalarization._famo import FAMO
from torchjd.scalarization._geometric_mean import GeometricMean
from torchjd.scalarization._imtll import IMTLL
from torchjd.scalarization._mean import Mean
from torchjd.scalarization._pbi import PBI
from torchjd.scalarization._random import Random
from torchjd.scalarization._scalarizer import Scalarizer
from torchjd.scalarization._stch import STCH
from torchjd.scalarization._sum import Sum
from torchjd.scalarization._uw import UW

__all__ = [
    "COSMOS",
    "DWA",
    "FAMO",
    "IMTLL",
    "PBI",
    "STCH",
    "UW",
    "Constant",
    "GeometricMean",
    "Mean",
    "Random",
    "Scalarizer",
    "Sum",
]

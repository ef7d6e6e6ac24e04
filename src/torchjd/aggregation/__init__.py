"""Aggregators (matrix ``[m, n]`` to vector ``[n]``) and weightings (statistic to weights ``[m]``).

Each algorithm lives in its own module and is re-exported here.

**Half precision.** For float16 and bfloat16 inputs, the small problems of an aggregation (the
``m x m`` Gramian, its normalisation, decompositions and solvers, and the weighted sum of the
rows) are computed in float32, where their epsilons mean something and nothing overflows; the
result is returned in the input's dtype. float32 and float64 inputs are computed in their own
dtype.

**Non-finite values.** An infinity or a NaN in the input gives a non-finite result: it is never
raised and never hidden (no uniform or zero weights in its place), so that a gradient scaler
such as :class:`torch.amp.GradScaler` sees it and skips the step. Nothing is checked on the host
to do so: no synchronisation with the device. Weightings give non-finite weights for a
non-finite input. After such a step, GradVac, GradNorm, PCD, MoDo and CRMOGM (around a
stateless weighting) continue from their previous state; ExcessMTL, DBMTL, MoCo, MomentumConFIG
and SDMGrad keep the non-finite value in their averages until :meth:`~torchjd.Stateful.reset`.
The exceptions are the robust aggregators: :class:`TrimmedMean` trims non-finite rows like any
outlier, and Krum's weights select rows (its aggregation ``w @ J`` still carries the NaN of the
matrix).
"""

from torchjd.aggregation._aligned_mtl import AlignedMTL, AlignedMTLWeighting
from torchjd.aggregation._bases import (
    Aggregator,
    GramianWeightedAggregator,
    WeightedAggregator,
    Weighting,
)
from torchjd.aggregation._cagrad import CAGrad, CAGradWeighting
from torchjd.aggregation._config import ConFIG
from torchjd.aggregation._constant import Constant, ConstantWeighting
from torchjd.aggregation._crmogm import CRMOGMWeighting
from torchjd.aggregation._db_mtl import DBMTL
from torchjd.aggregation._dualproj import DualProj, DualProjWeighting
from torchjd.aggregation._excess_mtl import ExcessMTL, ExcessMTLWeighting
from torchjd.aggregation._fairgrad import FairGrad, FairGradWeighting
from torchjd.aggregation._graddrop import GradDrop
from torchjd.aggregation._gradnorm import GradNorm, GradNormWeighting
from torchjd.aggregation._gradvac import GradVac, GradVacWeighting
from torchjd.aggregation._imtlg import IMTLG, IMTLGWeighting
from torchjd.aggregation._krum import Krum, KrumWeighting
from torchjd.aggregation._mean import Mean, MeanWeighting
from torchjd.aggregation._mgda import MGDA, MGDAWeighting
from torchjd.aggregation._moco import MoCo
from torchjd.aggregation._modo import MoDoWeighting
from torchjd.aggregation._momentum_config import MConFIGBackward, MomentumConFIG
from torchjd.aggregation._nash_mtl import NashMTL
from torchjd.aggregation._pcd import PCD, PCDWeighting
from torchjd.aggregation._pcgrad import PCGrad, PCGradWeighting
from torchjd.aggregation._random import Random, RandomWeighting
from torchjd.aggregation._sdmgrad import SDMGradWeighting
from torchjd.aggregation._sum import Sum, SumWeighting
from torchjd.aggregation._trimmed_mean import TrimmedMean
from torchjd.aggregation._upgrad import UPGrad, UPGradWeighting

__all__ = [
    "DBMTL",
    "IMTLG",
    "MGDA",
    "PCD",
    "Aggregator",
    "AlignedMTL",
    "AlignedMTLWeighting",
    "CAGrad",
    "CAGradWeighting",
    "CRMOGMWeighting",
    "ConFIG",
    "Constant",
    "ConstantWeighting",
    "DualProj",
    "DualProjWeighting",
    "ExcessMTL",
    "ExcessMTLWeighting",
    "FairGrad",
    "FairGradWeighting",
    "GradDrop",
    "GradNorm",
    "GradNormWeighting",
    "GradVac",
    "GradVacWeighting",
    "GramianWeightedAggregator",
    "IMTLGWeighting",
    "Krum",
    "KrumWeighting",
    "MConFIGBackward",
    "MGDAWeighting",
    "Mean",
    "MeanWeighting",
    "MoCo",
    "MoDoWeighting",
    "MomentumConFIG",
    "NashMTL",
    "PCDWeighting",
    "PCGrad",
    "PCGradWeighting",
    "Random",
    "RandomWeighting",
    "SDMGradWeighting",
    "Sum",
    "SumWeighting",
    "TrimmedMean",
    "UPGrad",
    "UPGradWeighting",
    "WeightedAggregator",
    "Weighting",
]

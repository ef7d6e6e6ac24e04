"""The registry of aggregators: one line per class, with the properties it claims.

The shared property tests (``test_registry.py``) are parametrised over ``AGGREGATORS``: the
entries below, then those that test modules of this folder declare in a module-level list
``ENTRIES`` (importing :class:`Entry` from ``tests.aggregation._entry``, never this module). A new
aggregator declares its entries in its own test module, next to its values worked out by hand.
"""

import importlib
import re
from pathlib import Path

import torch
from torch import Tensor

from torchjd.aggregation import (
    DBMTL,
    IMTLG,
    MGDA,
    PCD,
    Aggregator,
    AlignedMTL,
    CAGrad,
    ConFIG,
    Constant,
    CRMOGMWeighting,
    DualProj,
    ExcessMTL,
    FairGrad,
    GradDrop,
    GradNorm,
    GradVac,
    GramianWeightedAggregator,
    Krum,
    Mean,
    MeanWeighting,
    MoCo,
    MoDoWeighting,
    MomentumConFIG,
    NashMTL,
    PCGrad,
    Random,
    SDMGradWeighting,
    Sum,
    TrimmedMean,
    UPGrad,
    WeightedAggregator,
)
from torchjd.linalg import BlockPivotingProjector, QuadprogProjector

from ._entry import Entry


def _constant3() -> Aggregator:
    return Constant(torch.tensor([1.0, 2.0, 0.5]))


# Weightings without an aggregator of their own, wrapped as in TorchJD's "expected structure"
# tests. MoDo and SDMGrad take a cross-batch matrix J1 J2^T: the Gramian J J^T is the case J1 = J2.
# The wrappers are not Stateful themselves (their weighting is; tested in the weightings' files).
def _crmogm_mean() -> Aggregator:
    return WeightedAggregator(CRMOGMWeighting(MeanWeighting()))


def _crmogm_modo() -> Aggregator:
    return GramianWeightedAggregator(CRMOGMWeighting(MoDoWeighting()))


def _modo() -> Aggregator:
    return GramianWeightedAggregator(MoDoWeighting())


def _sdmgrad() -> Aggregator:
    return GramianWeightedAggregator(SDMGradWeighting())


def _fairgrad_1() -> Aggregator:
    return FairGrad(alpha=1.0)


def _fairgrad_01() -> Aggregator:
    return FairGrad(alpha=0.1, max_iters=100)


def _nash_mtl3() -> Aggregator:
    return NashMTL(n_tasks=3)


def _upgrad_pref3() -> Aggregator:
    return UPGrad(pref_vector=torch.tensor([1.0, 2.0, 0.5]))


def _upgrad_exact() -> Aggregator:
    return UPGrad(projector=BlockPivotingProjector(norm_eps=0.0, reg_eps=0.0))


def _upgrad_quadprog() -> Aggregator:
    return UPGrad(projector=QuadprogProjector())


def _aligned_mtl_median() -> Aggregator:
    return AlignedMTL(scale_mode="median")


def _aligned_mtl_rmse() -> Aggregator:
    return AlignedMTL(scale_mode="rmse")


def _cagrad_05() -> Aggregator:
    return CAGrad(c=0.5)


def _cagrad_2() -> Aggregator:
    return CAGrad(c=2.0)


def _config_pref3() -> Aggregator:
    return ConFIG(pref_vector=torch.tensor([1.0, 2.0, 0.5]))


def _dualproj_exact() -> Aggregator:
    return DualProj(projector=BlockPivotingProjector(norm_eps=0.0, reg_eps=0.0))


def _dualproj_pref3() -> Aggregator:
    return DualProj(pref_vector=torch.tensor([1.0, 2.0, 0.5]))


def _graddrop_leak3() -> Aggregator:
    return GradDrop(leak=torch.tensor([0.5, 0.0, 1.0]))


def _krum_0() -> Aggregator:
    return Krum(n_byzantine=0)


def _krum_1_2() -> Aggregator:
    return Krum(n_byzantine=1, n_selected=2)


def _trimmed_mean_1() -> Aggregator:
    return TrimmedMean(trim_number=1)


class _WithLosses(Aggregator):
    """Gives the wrapped aggregator loss values before each call, as a training loop does.

    The losses are made from the rows (``1 + ||g_i||``), so they are positive, finite on every
    input of the bank and follow a permutation of the rows."""

    def __init__(self, inner: Aggregator) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, matrix: Tensor, /) -> Tensor:
        self.inner.update_losses(1.0 + matrix.detach().norm(dim=1))  # type: ignore[operator]
        return self.inner(matrix)

    def __repr__(self) -> str:
        return f"WithLosses({self.inner!r})"


def _gradnorm() -> Aggregator:
    return _WithLosses(GradNorm())


def _gradnorm_0() -> Aggregator:
    return _WithLosses(GradNorm(alpha=0.0, lr=0.5))


def _db_mtl() -> Aggregator:
    return _WithLosses(DBMTL())


def _moco_rho() -> Aggregator:
    return MoCo(beta=0.9, gamma=1.0, rho=0.1)


AGGREGATORS: list[Entry] = [
    Entry("Mean", Mean, permutation_invariant=True, differentiable=True),
    Entry("Sum", Sum, permutation_invariant=True, differentiable=True),
    Entry("Constant", _constant3, differentiable=True, needs_fixed_m=3),
    Entry("Random", Random, randomised=True, differentiable=True),
    # MGDA's Frank-Wolfe stops at an approximate min-norm point: its conflict is bounded by
    # epsilon * max_k ||g_k||^2 (tested in test_mgda.py), not relatively to the output's norm.
    Entry("MGDA", MGDA, permutation_invariant=True, differentiable=True),
    Entry("PCGrad", PCGrad, randomised=True),
    Entry("GradVac", GradVac, randomised=True, stateful=True),
    # FairGrad and NashMTL conflict with no row only when the system G w = w^(-1/alpha) has a
    # root (e.g. full row rank); tested in their own files, not on the registry's rank-deficient
    # random matrices.
    Entry(
        "CRMOGM(Mean)", _crmogm_mean, permutation_invariant=True, differentiable=True, stateful=True
    ),
    Entry(
        "CRMOGM(MoDo)", _crmogm_modo, permutation_invariant=True, differentiable=True, stateful=True
    ),
    Entry("ExcessMTL", ExcessMTL, permutation_invariant=True, stateful=True),
    # GradNorm and DB-MTL need the loss values: the wrapper gives them before each call.
    Entry("GradNorm", _gradnorm, permutation_invariant=True, stateful=True),
    Entry("GradNorm(0, 0.5)", _gradnorm_0, permutation_invariant=True, stateful=True),
    Entry("DBMTL", _db_mtl, permutation_invariant=True, stateful=True),
    Entry("MoCo", MoCo, permutation_invariant=True, stateful=True),
    Entry("MoCo(rho)", _moco_rho, permutation_invariant=True, stateful=True),
    Entry("MomentumConFIG", MomentumConFIG, permutation_invariant=True, stateful=True),
    Entry("FairGrad(1)", _fairgrad_1, permutation_invariant=True),
    Entry("FairGrad(0.1)", _fairgrad_01, permutation_invariant=True),
    Entry("MoDo", _modo, permutation_invariant=True, differentiable=True, stateful=True),
    Entry("NashMTL", _nash_mtl3, permutation_invariant=True, stateful=True, needs_fixed_m=3),
    Entry("PCD", PCD, stateful=True),
    Entry("SDMGrad", _sdmgrad, permutation_invariant=True, differentiable=True, stateful=True),
    # UPGrad conflicts with no row, but the relative check above is meaningless when the exact
    # output is 0 (rows spanning opposite directions, n < m): the output is then rounding noise.
    # Its non-conflict is tested in test_upgrad.py on full-row-rank matrices.
    Entry("UPGrad", UPGrad, permutation_invariant=True),
    Entry("UPGrad(pref)", _upgrad_pref3, needs_fixed_m=3),
    Entry("UPGrad(exact)", _upgrad_exact, non_conflicting=True, permutation_invariant=True),
    Entry("UPGrad(quadprog)", _upgrad_quadprog, permutation_invariant=True),
    Entry("AlignedMTL", AlignedMTL, permutation_invariant=True, differentiable=True),
    Entry("AlignedMTL(median)", _aligned_mtl_median, differentiable=True),
    Entry("AlignedMTL(rmse)", _aligned_mtl_rmse, differentiable=True),
    Entry("CAGrad(0.5)", _cagrad_05),
    Entry("CAGrad(2)", _cagrad_2, non_conflicting=True),
    Entry("ConFIG", ConFIG, permutation_invariant=True),
    Entry("ConFIG(pref)", _config_pref3, needs_fixed_m=3),
    # DualProj's default projector averages a matrix with ||J||_F^2 < norm_eps (as TorchJD) and
    # conflicts with no row only up to O(reg_eps): its non-conflict is claimed with both at 0.
    Entry("DualProj", DualProj, permutation_invariant=True),
    Entry("DualProj(pref)", _dualproj_pref3, needs_fixed_m=3),
    Entry("DualProj(exact)", _dualproj_exact, non_conflicting=True, permutation_invariant=True),
    Entry("GradDrop", GradDrop, randomised=True),
    Entry("GradDrop(leak)", _graddrop_leak3, randomised=True, needs_fixed_m=3),
    Entry("IMTLG", IMTLG, permutation_invariant=True),
    Entry("Krum(0)", _krum_0, differentiable=True, min_rows=3),
    Entry("Krum(1, 2)", _krum_1_2, differentiable=True, min_rows=4),
    Entry(
        "TrimmedMean(1)",
        _trimmed_mean_1,
        permutation_invariant=True,
        differentiable=True,
        min_rows=3,
    ),
]


def _declared_in_test_modules() -> list[Entry]:
    """The ``ENTRIES`` of the test modules of this folder, in the order of their file names."""
    entries: list[Entry] = []
    for path in sorted(Path(__file__).parent.glob("test_*.py")):
        if re.search(r"^ENTRIES\b", path.read_text(), flags=re.MULTILINE):
            module = importlib.import_module(f"{__package__}.{path.stem}")
            entries.extend(module.ENTRIES)
    return entries


AGGREGATORS += _declared_in_test_modules()

"""Every aggregator, weighting and scalarizer of the registries on the hard-input bank.

Checks, in float64, float32, bfloat16 and float16: a finite input gives a finite output of the
input's dtype; a non-finite input gives a non-finite output, without raising (the policy stated
in :mod:`torchjd.aggregation`; TrimmedMean trims non-finite rows instead); on inputs with
cond(J Jᵀ) <= 1e3 the result is within the relative error of ``ACCURACY`` of the float64 result
on the same (rounded) input; and where non-conflict is claimed, ``J_i · d >= -τ ||J_i|| ||d||``
per row, with τ from ``CONFLICT`` (relative to ``||J|| ||d||`` when the row norms are more than
100 apart, where the regularisation of the projectors legitimately dominates), Pareto-stationary
inputs included.
"""

import os
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor

from tests.scalarization._registry import SCALARIZERS
from tests.scalarization._registry import Entry as ScalarizerEntry
from torchjd._precision import working_dtype
from torchjd.aggregation import (
    IMTLG,
    PCD,
    Aggregator,
    AlignedMTL,
    AlignedMTLWeighting,
    CAGrad,
    CAGradWeighting,
    ConFIG,
    CRMOGMWeighting,
    DualProjWeighting,
    GradDrop,
    GradVacWeighting,
    GramianWeightedAggregator,
    IMTLGWeighting,
    MeanWeighting,
    MoCo,
    MomentumConFIG,
    UPGrad,
    UPGradWeighting,
    Weighting,
)
from torchjd.linalg import BlockPivotingProjector, QuadprogProjector
from torchjd.linalg._gramian import compute_gramian
from torchjd.linalg._simplex import project_onto_simplex

from ._bank import ACCURACY, CONFLICT, DTYPE_IDS, DTYPES, Case, matrix_cases, value_cases
from ._entry import Entry
from ._registry import AGGREGATORS

# Known failures (strict xfail: each case must fail, and its entry is deleted once it passes).
# SDMGrad with its default step size jumps between vertices of the simplex: on the m = 128 case a
# relative change of 1e-12 in the input moves its float64 output by about 7e-6, so its float32
# and float16 results cannot be within the accuracy bound of the float64 one.
_SDMGRAD = "far from the float64 result at m = 128 or n = 4096 (relative error 1e-2 to 0.5)"
KNOWN_FAILURES: dict[tuple[str, str], str] = {
    ("SDMGrad", "accuracy[f32]"): _SDMGRAD,
    ("SDMGrad", "accuracy[f16]"): _SDMGRAD,
}

# Configurations whose result does not conflict with any row, and the extent of the claim:
# "always" (per row, whatever the row norms), or "close" (per row when the row norms are within a
# factor of 100; relative to ||J|| otherwise).
NON_CONFLICTING: dict[str, str] = {
    "MGDA": "always",
    "UPGrad": "close",
    "UPGrad(pref)": "close",
    "UPGrad(exact)": "close",
    "UPGrad(quadprog)": "close",
    "DualProj": "close",
    "DualProj(pref)": "close",
    "DualProj(exact)": "close",
    "CAGrad(2)": "close",
}

# Their random draws depend on the dtype (uniform numbers drawn in the input's dtype): a result
# in float32 cannot be compared with a float64 one drawn differently.
_DRAWS_IN_DTYPE = {"GradDrop", "GradDrop(leak)", "Random"}
# TrimmedMean is robust by design: it trims non-finite rows (documented exception).
_TRIMS_NON_FINITE = {"TrimmedMean(1)"}
# Weightings that select rows (Krum, robust by design) give finite weights from a non-finite
# Gramian; the aggregation w @ J still carries the infinity or NaN (0 * NaN is NaN). The
# normalised mean of test_normalised_mean.py is a user's example, not part of the library.
_SELECTS_ROWS = {"Krum(0)", "Krum(1, 2)", "NormalisedMean(test)"}
# A Gramian rounded to half precision need not be positive semi-definite: quadprog refuses it
# with a ValueError (BlockPivotingProjector retries with a ridge instead).
_REFUSES_INDEFINITE = {"UPGrad(quadprog)"}

# One quadratic program per row in Python: about a second per call at m = 128. Its m = 128 case
# runs in the finiteness check only.
_SLOW_AT_M128 = {"UPGrad(quadprog)"}

_CASES = matrix_cases()
_COUNT_FILE = os.environ.get("TORCHJD_BANK_COUNT")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """The bank's problems are small: more threads than cores only make them wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _count() -> None:
    """Record one call of the bank (to report its size, when TORCHJD_BANK_COUNT names a file)."""
    if _COUNT_FILE:
        with open(_COUNT_FILE, "a") as file:
            file.write("1\n")


def _marked(entry_id: str, check: str, dtype: torch.dtype) -> tuple:
    reason = KNOWN_FAILURES.get((entry_id, f"{check}[{DTYPE_IDS[dtype]}]"))
    return (pytest.mark.xfail(strict=True, reason=reason),) if reason else ()


def _params(entries: list, check: str, dtypes: tuple = DTYPES) -> list:
    return [
        pytest.param(
            entry, dtype, id=f"{entry.id}-{DTYPE_IDS[dtype]}", marks=_marked(entry.id, check, dtype)
        )
        for entry in entries
        for dtype in dtypes
    ]


def _fitting(entry: Entry, case: Case) -> Case | None:
    """The case cut to the number of rows the entry accepts, or None when it cannot be."""
    if entry.needs_fixed_m is not None:
        k = entry.needs_fixed_m
        return Case(case.name, case.matrix[:k]) if case.m >= k else None
    return case if case.m >= entry.min_rows else None


def _cases(entry: Entry, large: bool = False) -> list[Case]:
    """The cases the entry accepts; m = 128 only where ``large`` or the entry is fast there."""
    cases = [fitted for case in _CASES if (fitted := _fitting(entry, case)) is not None]
    if large or entry.id not in _SLOW_AT_M128:
        return cases
    return [case for case in cases if case.m <= 32]


def _aggregate(entry: Entry, matrix: Tensor) -> Tensor:
    _count()
    torch.manual_seed(0)
    return entry.make()(matrix)


_CONDITIONING: dict[tuple[str, int, torch.dtype], bool] = {}


def _well_conditioned(case: Case, dtype: torch.dtype) -> bool:
    """Whether the case rounded to ``dtype`` has cond(J Jᵀ) <= 1e3 (computed once)."""
    key = (case.name, case.m, dtype)
    if key not in _CONDITIONING:
        _CONDITIONING[key] = Case(case.name, case.matrix.to(dtype).double()).well_conditioned
    return _CONDITIONING[key]


def _failures(check: Callable[[Case], str | None], cases: list[Case]) -> list[str]:
    return [f"{case.name}: {message}" for case in cases if (message := check(case)) is not None]


@pytest.mark.parametrize(("entry", "dtype"), _params(AGGREGATORS, "finite"))
def test_finite_input_gives_finite_output_of_its_dtype(entry: Entry, dtype: torch.dtype) -> None:
    def check(case: Case) -> str | None:
        matrix = case.matrix.to(dtype)
        if not torch.isfinite(matrix).all():
            return None
        out = _aggregate(entry, matrix)
        if out.dtype != dtype:
            return f"dtype {out.dtype}"
        if not torch.isfinite(out).all():
            return "non-finite output"
        return None

    failures = _failures(check, _cases(entry, large=True))
    assert not failures, failures


@pytest.mark.parametrize(("entry", "dtype"), _params(AGGREGATORS, "non_finite"))
def test_non_finite_input_gives_non_finite_output(entry: Entry, dtype: torch.dtype) -> None:
    def check(case: Case) -> str | None:
        matrix = case.matrix.to(dtype)
        if torch.isfinite(matrix).all():
            return None
        try:
            out = _aggregate(entry, matrix)
        except Exception as error:  # the policy: never raised
            return f"raised {type(error).__name__}: {error}"
        if out.dtype != dtype:
            return f"dtype {out.dtype}"
        if entry.id in _TRIMS_NON_FINITE:
            return None
        return "finite output" if torch.isfinite(out).all() else None

    failures = _failures(check, _cases(entry))
    assert not failures, failures


@pytest.mark.parametrize(
    ("entry", "dtype"),
    _params(
        [e for e in AGGREGATORS if e.id not in _DRAWS_IN_DTYPE],
        "accuracy",
        (torch.float32, torch.bfloat16, torch.float16),
    ),
)
def test_accuracy_against_float64(entry: Entry, dtype: torch.dtype) -> None:
    def check(case: Case) -> str | None:
        matrix = case.matrix.to(dtype)
        rounded = Case(case.name, matrix.double())
        if not _well_conditioned(case, dtype):
            return None
        expected = _aggregate(entry, rounded.matrix)
        out = _aggregate(entry, matrix).double()
        if not expected.any():  # e.g. below a threshold on the norm: then exactly zero too
            return None if not out.any() else f"{out} where float64 gives 0"
        error = float((out - expected).norm() / expected.norm())
        return f"relative error {error:.2e}" if not error <= ACCURACY[dtype] else None

    failures = _failures(check, _cases(entry))
    assert not failures, failures


def _regularisation(aggregator: Aggregator, dtype: torch.dtype) -> float:
    """The multiple of the identity that the projector adds to the normalised Gramian: by the
    optimality conditions of its problems, ``(J d)_i >= -eps tr(G) w_i``."""
    projector = getattr(aggregator, "projector", None)
    if projector is None:
        return 0.0
    reg_eps = projector.reg_eps
    if isinstance(projector, BlockPivotingProjector):
        # Its documented floor on the diagonal, in the dtype in which the Gramian is normalised.
        reg_eps = max(reg_eps, min(16 * torch.finfo(working_dtype(dtype)).eps, 1e-6))
    return reg_eps


def _conflict(entry: Entry, case: Case, d: Tensor, dtype: torch.dtype) -> str | None:
    """The rows with which ``d`` conflicts beyond the tolerance (everything in float64)."""
    J = case.matrix
    products = J @ d
    row_norms = J.norm(dim=1)
    always = NON_CONFLICTING[entry.id] == "always"
    scale = row_norms if case.close_row_norms or always else J.norm()
    # The weights of d = Jᵀ w, from the float64 Gramian: they bound what rounding and the
    # regularisation of the projectors may add to the claim.
    aggregator = entry.make()
    assert isinstance(aggregator, GramianWeightedAggregator)
    w = aggregator.gramian_weighting(compute_gramian(J)).abs()
    # d is rounded to the dtype: allowed on top of the claim (a zero result is rounding noise).
    rounding = 8 * torch.finfo(dtype).eps * row_norms * (w @ row_norms)
    regularisation = _regularisation(aggregator, dtype) * J.norm() ** 2 * w
    bad = products < -(CONFLICT[dtype] * scale * d.norm() + rounding + regularisation)
    if bad.any():
        return f"conflicts with rows {bad.nonzero().flatten().tolist()}: {products.tolist()}"
    return None


@pytest.mark.parametrize(
    ("entry", "dtype"),
    _params([e for e in AGGREGATORS if e.id in NON_CONFLICTING], "non_conflict"),
)
def test_non_conflicting_where_claimed(entry: Entry, dtype: torch.dtype) -> None:
    def check(case: Case) -> str | None:
        matrix = case.matrix.to(dtype)
        if not torch.isfinite(matrix).all():
            return None
        rounded = Case(case.name, matrix.double())
        return _conflict(entry, rounded, _aggregate(entry, matrix).double(), dtype)

    failures = _failures(check, _cases(entry))
    assert not failures, failures


def test_every_non_conflict_claim_names_a_registry_entry() -> None:
    ids = {entry.id for entry in AGGREGATORS}
    assert set(NON_CONFLICTING) <= ids
    assert {e.id for e in AGGREGATORS if e.non_conflicting} <= set(NON_CONFLICTING)
    assert {key[0] for key in KNOWN_FAILURES} <= ids | {e.id for e in SCALARIZERS}


# The Gramian weightings, called directly on a Gramian of the input's dtype.
_GRAMIAN_ENTRIES = [e for e in AGGREGATORS if isinstance(e.make(), GramianWeightedAggregator)]


def _gramian(case: Case, dtype: torch.dtype) -> Tensor:
    return compute_gramian(case.matrix).to(dtype)


@pytest.mark.parametrize(("entry", "dtype"), _params(_GRAMIAN_ENTRIES, "weighting"))
def test_gramian_weighting_dtype_finiteness_and_non_finite_policy(
    entry: Entry, dtype: torch.dtype
) -> None:
    def check(case: Case) -> str | None:
        gramian = _gramian(case, dtype)
        aggregator = entry.make()
        assert isinstance(aggregator, GramianWeightedAggregator)
        _count()
        torch.manual_seed(0)
        finite = bool(torch.isfinite(gramian).all())
        try:
            weights = aggregator.gramian_weighting(gramian)
        except ValueError as error:
            if (
                finite
                and entry.id in _REFUSES_INDEFINITE
                and dtype in (torch.float16, torch.bfloat16)
            ):
                return None
            return f"raised ValueError: {error}"
        except Exception as error:
            return f"raised {type(error).__name__}: {error}"
        if weights.dtype != dtype:
            return f"dtype {weights.dtype}"
        if finite and not torch.isfinite(weights).all():
            return f"non-finite weights {weights}"
        if not finite and entry.id not in _SELECTS_ROWS and torch.isfinite(weights).all():
            return f"finite input: {bool(torch.isfinite(gramian).all())}, weights {weights}"
        return None

    failures = _failures(check, _cases(entry))
    assert not failures, failures


# Scalarizers: loss values instead of matrices.

# FAMO refuses values below its `min_losses` (a ValueError, as decided in the spec).
_REFUSES_BELOW = {"FAMO-min-losses": 0.1}


def _scalarize(entry: ScalarizerEntry, values: Tensor) -> Tensor:
    _count()
    torch.manual_seed(0)
    return entry.make(tuple(values.shape))(values)


@pytest.mark.parametrize(("entry", "dtype"), _params(SCALARIZERS, "scalarizer"))
def test_scalarizer_on_hard_values(entry: ScalarizerEntry, dtype: torch.dtype) -> None:
    failures = []
    for name, values64 in value_cases():
        values = values64.to(dtype)
        finite = bool(torch.isfinite(values).all())
        try:
            out = _scalarize(entry, values)
        except ValueError:
            # Scalarizers refuse non-finite loss values loudly (their documented contract, unlike
            # aggregators, which run where a gradient scaler expects non-finite values), and
            # those that take a logarithm refuse values that are not positive.
            refused = entry.takes_log and not bool((values > 0).all())
            refused |= entry.id in _REFUSES_BELOW and bool(
                (values < _REFUSES_BELOW[entry.id]).any()
            )
            if finite and not refused:
                failures.append(f"{name}: raised")
            continue
        if out.dtype != dtype:
            failures.append(f"{name}: dtype {out.dtype}")
        elif finite != bool(torch.isfinite(out).all()):
            failures.append(f"{name}: finite input {finite}, output {out}")
        elif finite and dtype in ACCURACY and not entry.randomised:
            expected = _scalarize(entry, values.double())
            # The float64 result rounded to the output's dtype is the best any implementation can
            # return (a result in float16's subnormal range has few significant bits).
            representable = expected.to(dtype).double()
            error = float((out.double() - representable).abs() / expected.abs().clamp(min=1e-300))
            if not error <= ACCURACY[dtype]:
                failures.append(f"{name}: relative error {error:.2e}")
    assert not failures, failures


# Regressions: the defects found on the bank, each on the input that showed it.

_HALF = [torch.float16, torch.bfloat16]


def _relative_error(out: Tensor, expected: Tensor) -> float:
    return float((out.double() - expected.double()).norm() / expected.double().norm())


@pytest.mark.parametrize("dtype", _HALF)
def test_config_in_half_precision_keeps_the_eigenvalues_it_resolves(dtype: torch.dtype) -> None:
    # The eigenvalue cut used the half-precision epsilon and returned zeros.
    torch.manual_seed(0)
    matrix = torch.randn(128, 64).to(dtype)
    expected = ConFIG()(matrix.float())
    assert _relative_error(ConFIG()(matrix), expected) <= 1e-2


@pytest.mark.parametrize("dtype", _HALF)
def test_pcd_in_half_precision_is_not_zero(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    matrix = torch.randn(128, 4096).to(dtype)
    assert _relative_error(PCD()(matrix), PCD()(matrix.float())) <= 1e-2


def test_cagrad_on_a_float16_gramian_whose_trace_overflows() -> None:
    # The trace of the float16 Gramian (about 5e5) overflowed and the weights were zeros.
    torch.manual_seed(0)
    matrix = torch.randn(128, 4096).half()
    expected = CAGrad(c=0.5)(matrix.float())
    assert _relative_error(CAGrad(c=0.5)(matrix), expected) <= 2e-3


@pytest.mark.parametrize("dtype", _HALF)
@pytest.mark.parametrize("make", [IMTLG, AlignedMTL], ids=["IMTLG", "AlignedMTL"])
def test_decompositions_run_in_half_precision(make: Callable, dtype: torch.dtype) -> None:
    # linalg.pinv and linalg.eigh are not implemented in half precision: they raised.
    torch.manual_seed(0)
    matrix = torch.randn(4, 6).to(dtype)
    tolerance = ACCURACY[dtype]
    assert _relative_error(make()(matrix), make()(matrix.double())) <= tolerance
    weighting = make().gramian_weighting
    gramian = compute_gramian(matrix.double())
    weights = weighting(gramian.to(dtype))
    assert weights.dtype == dtype
    assert _relative_error(weights, weighting(gramian.to(dtype).double())) <= tolerance


_NAN_MATRIX = torch.tensor([[1.0, 2.0, 3.0], [4.0, float("nan"), 6.0], [0.0, 1.0, -1.0]])
_NON_FINITE_GRAMIANS = {
    "nan": torch.full((3, 3), float("nan")),
    "inf_diagonal": torch.diag(torch.tensor([1.0, float("inf"), 2.0])),
    "nan_entry": torch.tensor([[1.0, float("nan"), 0.0], [float("nan"), 2.0, 0.0], [0, 0, 3]]),
}


def _weightings() -> dict[str, Callable[[], Weighting]]:
    return {
        "UPGrad": UPGradWeighting,
        "UPGrad(quadprog)": lambda: UPGradWeighting(projector=QuadprogProjector()),
        "DualProj": DualProjWeighting,
        "DualProj(quadprog)": lambda: DualProjWeighting(projector=QuadprogProjector()),
        "CAGrad": lambda: CAGradWeighting(c=0.5),
        "IMTLG": IMTLGWeighting,
        "AlignedMTL": AlignedMTLWeighting,
        "GradVac": GradVacWeighting,
        "CRMOGM(UPGrad)": lambda: CRMOGMWeighting(UPGradWeighting()),
    }


@pytest.mark.parametrize("gramian_id", list(_NON_FINITE_GRAMIANS))
@pytest.mark.parametrize("weighting_id", list(_weightings()))
def test_non_finite_gramian_gives_non_finite_weights(weighting_id: str, gramian_id: str) -> None:
    # Uniform weights, zeros, or a torch._LinAlgError before.
    weights = _weightings()[weighting_id]()(_NON_FINITE_GRAMIANS[gramian_id])
    assert not torch.isfinite(weights).any()


@pytest.mark.parametrize(
    "make", [IMTLG, AlignedMTL, ConFIG, MomentumConFIG, GradDrop, UPGrad, lambda: CAGrad(c=2.0)]
)
def test_non_finite_matrix_is_not_raised_nor_hidden(make: Callable[[], Aggregator]) -> None:
    out = make()(_NAN_MATRIX)
    assert torch.isnan(out[1])  # the column of the NaN


def test_crmogm_mean_gives_nan_and_keeps_its_average_on_a_non_finite_step() -> None:
    weighting = CRMOGMWeighting(MeanWeighting(), alpha=0.5)
    assert torch.isnan(weighting(_NAN_MATRIX)).all()  # the first call: no average yet
    first = weighting(torch.ones(3, 3))
    assert torch.isnan(weighting(_NAN_MATRIX)).all()
    torch.testing.assert_close(weighting(torch.ones(3, 3)), first)


def test_gradvac_keeps_its_targets_on_a_non_finite_step() -> None:
    weighting = GradVacWeighting()
    torch.manual_seed(0)
    gramian = compute_gramian(torch.randn(3, 5))
    weighting(gramian)
    targets = weighting.phi_hat.clone()
    assert torch.isnan(weighting(_NON_FINITE_GRAMIANS["nan_entry"])).all()
    torch.testing.assert_close(weighting.phi_hat, targets)


def test_simplex_projection_of_huge_entries_stays_on_the_simplex() -> None:
    # 1e17 - 1 rounds to 1e17: the threshold swallowed the constraint and every weight was 0.
    y = torch.tensor([-1.0e17, -1.2e17, -3.0e17])
    torch.testing.assert_close(project_onto_simplex(y), torch.tensor([1.0, 0.0, 0.0]))
    matrix = 1e8 * torch.randn(4, 7, generator=torch.Generator().manual_seed(0))
    assert MoCo(beta=0.9, gamma=1.0, rho=0.1)(matrix).any()

import pytest
import torch
from torch import Tensor

import torchjd
from torchjd import Stateful
from torchjd.scalarization import (
    COSMOS,
    DWA,
    FAMO,
    IMTLL,
    PBI,
    STCH,
    UW,
    Constant,
    GeometricMean,
    Mean,
    Random,
    Scalarizer,
    Sum,
)


def test_public_names() -> None:
    assert set(torchjd.scalarization.__all__) == {
        "Constant",
        "COSMOS",
        "DWA",
        "FAMO",
        "GeometricMean",
        "IMTLL",
        "Mean",
        "PBI",
        "Random",
        "Scalarizer",
        "STCH",
        "Sum",
        "UW",
    }
    assert len(torchjd.scalarization.__all__) == 13
    for name in torchjd.scalarization.__all__:
        assert hasattr(torchjd.scalarization, name)


def test_base_is_abstract() -> None:
    with pytest.raises(TypeError):
        Scalarizer()  # type: ignore[abstract]


def test_custom_subclass() -> None:
    class Max(Scalarizer):
        def forward(self, values: Tensor, /) -> Tensor:
            return values.max()

    scalarizer = Max()
    assert isinstance(scalarizer, torch.nn.Module)
    assert repr(scalarizer) == "Max()"
    assert str(scalarizer) == "Max"
    assert scalarizer(torch.tensor([1.0, 3.0, 2.0])) == 3.0


def test_values_are_positional_only() -> None:
    with pytest.raises(TypeError):
        Sum()(values=torch.ones(2))  # type: ignore[call-arg]


def test_exactly_the_stateful_ones_are_stateful() -> None:
    w = torch.ones(3)
    stateful = [DWA(), FAMO(3), IMTLL(3), UW(3)]
    stateless = [Constant(w), COSMOS(1.0, w), GeometricMean(), Mean(), PBI(1.0, w), Random()]
    stateless += [STCH(1.0), Sum()]
    assert all(isinstance(s, Stateful) for s in stateful)
    assert not any(isinstance(s, Stateful) for s in stateless)


def test_scalarizers_are_not_wrapped_in_no_grad() -> None:
    values = torch.ones(3, requires_grad=True)
    assert Mean()(values).requires_grad


def test_tensor_hyper_parameters_are_plain_attributes() -> None:
    w, z = torch.ones(2), torch.zeros(2)
    for scalarizer in [Constant(w), COSMOS(1.0, w), PBI(1.0, w, z), STCH(1.0, w, z)]:
        assert list(scalarizer.state_dict()) == []
        assert scalarizer.weights is w

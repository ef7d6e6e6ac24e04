"""The state of the stateful weightings follows the input's device (needs a CUDA device)."""

from collections.abc import Callable

import pytest
import torch
from torch import nn

from torchjd.aggregation import (
    PCD,
    CRMOGMWeighting,
    ExcessMTL,
    FairGrad,
    GramianWeightedAggregator,
    MoDoWeighting,
    NashMTL,
    SDMGradWeighting,
)

from ._matrices import J_B, J_B2

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

MAKERS: dict[str, Callable[[], nn.Module]] = {
    "CRMOGM(MoDo)": lambda: GramianWeightedAggregator(CRMOGMWeighting(MoDoWeighting())),
    "ExcessMTL": ExcessMTL,
    "FairGrad": lambda: FairGrad(1.0),
    "MoDo": lambda: GramianWeightedAggregator(MoDoWeighting()),
    "NashMTL": lambda: NashMTL(3),
    "PCD": PCD,
    "SDMGrad": lambda: GramianWeightedAggregator(SDMGradWeighting()),
}


@pytest.mark.parametrize("name", list(MAKERS))
def test_same_outputs_and_state_on_cuda(name: str) -> None:
    on_cpu, on_cuda = MAKERS[name](), MAKERS[name]()
    for matrix in (J_B, J_B2, J_B):
        expected = on_cpu(matrix.double())
        out = on_cuda(matrix.double().cuda())
        assert out.device.type == "cuda"
        torch.testing.assert_close(out.cpu(), expected)
    for value in on_cuda.state_dict().values():
        if isinstance(value, torch.Tensor) and value.numel() > 0:
            assert value.device.type == "cuda"
    # The state moves back with the input.
    torch.testing.assert_close(on_cuda(J_B2.double()), on_cpu(J_B2.double()))

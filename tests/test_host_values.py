import math

import pytest
import torch

from torchjd._host_values import host_tensor


def _values() -> list[float]:
    tiny = 2.0**-149  # the smallest float32 subnormal
    values = [1e300, -1e300, 3.4028235e38 * 1.0000001, 0.5 * tiny, 1.5 * tiny, -0.7 * tiny, 5e-324]
    values += [math.nan, -math.nan, math.inf, -math.inf, 0.0, -0.0, 0.1, 1 / 3, -2.5e-10]
    generator = torch.Generator().manual_seed(0)
    scales = torch.logspace(-45, 38, 200, dtype=torch.float64)
    return values + (torch.randn(200, generator=generator, dtype=torch.float64) * scales).tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("length", [0, 1, None])
def test_has_the_bits_of_torch_tensor(dtype: torch.dtype, length: int | None) -> None:
    # Rounded to the dtype as torch.tensor rounds: overflow, subnormals, NaN and signed zeros too.
    values = _values()[:length]
    actual = host_tensor(values, dtype)
    expected = torch.tensor(values, dtype=dtype)
    assert actual.dtype == dtype and actual.shape == expected.shape and actual.is_cpu
    assert torch.equal(actual.view(torch.uint8), expected.view(torch.uint8))


def test_owns_its_values() -> None:
    # The tensor keeps its buffer alive, and writing into it changes nothing else.
    values = [1.0, 2.0, 3.0]
    first, second = host_tensor(values, torch.float32), host_tensor(values, torch.float32)
    first.add_(1.0)
    assert first.tolist() == [2.0, 3.0, 4.0] and second.tolist() == values == [1.0, 2.0, 3.0]

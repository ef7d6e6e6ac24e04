"""Helpers shared by the tests of :mod:`torchjd.autojac`."""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

CHUNK_SIZES = [1, 2, None]


@contextmanager
def count_autograd_calls() -> Iterator[list[dict[str, Any]]]:
    """Record the options and number of outputs of every ``torch.autograd.grad`` call."""
    original = torch.autograd.grad
    calls: list[dict[str, Any]] = []

    def recording_grad(outputs: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        n_outputs = 1 if isinstance(outputs, torch.Tensor) else len(outputs)
        calls.append(
            {
                "n_outputs": n_outputs,
                "retain_graph": kwargs.get("retain_graph"),
                "is_grads_batched": kwargs.get("is_grads_batched", False),
            }
        )
        return original(outputs, inputs, *args, **kwargs)

    torch.autograd.grad = recording_grad
    try:
        yield calls
    finally:
        torch.autograd.grad = original

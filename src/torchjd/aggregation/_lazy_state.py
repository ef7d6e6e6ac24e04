"""State held in buffers whose shape and dtype are only known at the first call."""

import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module


class LazyStateMixin(nn.Module):
    """Lets a module keep state in buffers that are empty until the first call.

    Buffers are registered at construction (empty, so that ``state_dict()`` always has the same
    keys) and later replaced by tensors of the right shape, dtype and device. Loading a
    ``state_dict`` resizes them to the stored tensors, so that the state of a used object loads
    (``strict=True``) into a freshly constructed one. Python scalars of the state (step counters)
    go through ``get_extra_state`` / ``set_extra_state``: subclasses list their names in
    ``_extra_state_names``.
    """

    _extra_state_names: tuple[str, ...] = ()

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        for name, buffer in self._buffers.items():
            incoming = state_dict.get(prefix + name)
            if isinstance(incoming, Tensor) and buffer is not None:
                self._buffers[name] = torch.empty_like(incoming, device=buffer.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _store_buffer(self, name: str, value: Tensor) -> None:
        """``setattr(self, name, value)`` for the registered buffer ``name``. Unless a global
        buffer registration hook must see it, or the class overrides ``__setattr__`` or
        ``register_buffer``, the tensor is put in the buffer table directly: that is all the
        assignment does then, and going through ``nn.Module.__setattr__`` and ``register_buffer``
        is a good part of a small call's cost."""
        cls = type(self)
        if (
            _module._global_buffer_registration_hooks
            or name not in self._buffers
            or cls.__setattr__ is not nn.Module.__setattr__
            or cls.register_buffer is not nn.Module.register_buffer
        ):
            setattr(self, name, value)
        else:
            self._buffers[name] = value

    def get_extra_state(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._extra_state_names}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        for name in self._extra_state_names:
            setattr(self, name, state[name])


def warn_reinitialised(owner: str, old: str, new: str) -> None:
    """Warn that a state was discarded because the input changed (number of rows, dtype...)."""
    warnings.warn(
        f"{owner} re-initialises its state: it was built for an input with {old} and now "
        f"receives one with {new}. Use one instance per stream of inputs, or call `reset()`.",
        stacklevel=2,
    )

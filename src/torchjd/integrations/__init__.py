"""Jacobian descent inside training frameworks.

The frameworks are optional: this package imports none of them. Each integration lives in its
own module, which imports its framework and raises an ``ImportError`` naming the extra to install
when it is missing:

- :mod:`torchjd.integrations.lightning` (extra ``lightning``):
  :class:`~torchjd.integrations.lightning.JacobianDescentModule`, a
  ``LightningModule`` trained by Jacobian descent under automatic optimisation;
- :mod:`torchjd.integrations.transformers` (extra ``transformers``):
  :class:`~torchjd.integrations.transformers.JacobianDescentTrainer`, a Hugging Face ``Trainer``
  for models with several task losses.

Both weigh the task losses from their Gramian over the shared modules and compute the shared
parameters' update with :class:`~torchjd.autogram.MTLEngine`, then let the framework run its own
backward pass, which gives the heads their gradients and hands the shared parameters their
update: each task reads its own view of the features (:func:`task_views`).
"""

from torchjd.integrations._task_step import task_views

__all__ = ["task_views"]

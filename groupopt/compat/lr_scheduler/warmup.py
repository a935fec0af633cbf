"""The HuggingFace ``transformers`` warmup schedulers, as compat ``LambdaLR``s.

Same signatures as ``transformers.get_*_schedule_with_warmup``; the lambda is
a ``functools.partial`` of the factor function that the pure schedules in
:mod:`groupopt.schedules.warmup` use (so, as in ``transformers``, the
scheduler's ``state_dict`` stores ``{}`` for it, not ``None``). Arguments are
not validated, as in ``transformers``.
"""

from __future__ import annotations

from functools import partial

from ...schedules import warmup as _w
from ..optimizer import Optimizer
from .base import LambdaLR

__all__ = ["get_linear_schedule_with_warmup", "get_cosine_schedule_with_warmup", "get_constant_schedule_with_warmup"]


def get_linear_schedule_with_warmup(optimizer: Optimizer, num_warmup_steps: int, num_training_steps: int, last_epoch: int = -1) -> LambdaLR:
    """lr rises linearly from 0 to the group's lr over ``num_warmup_steps``, then falls linearly to 0 at ``num_training_steps``."""
    fn = partial(_w.warmup_linear_factor, warmup_steps=num_warmup_steps, total_steps=num_training_steps)
    return LambdaLR(optimizer, fn, last_epoch)


def get_cosine_schedule_with_warmup(
    optimizer: Optimizer, num_warmup_steps: int, num_training_steps: int, num_cycles: float = 0.5, last_epoch: int = -1
) -> LambdaLR:
    """Linear warmup, then cosine decay over ``num_cycles`` periods (0.5: down to 0 at ``num_training_steps``)."""
    fn = partial(_w.warmup_cosine_factor, warmup_steps=num_warmup_steps, total_steps=num_training_steps, num_cycles=num_cycles)
    return LambdaLR(optimizer, fn, last_epoch)


def get_constant_schedule_with_warmup(optimizer: Optimizer, num_warmup_steps: int, last_epoch: int = -1) -> LambdaLR:
    """Linear warmup from 0 to the group's lr over ``num_warmup_steps``, then constant."""
    fn = partial(_w.warmup_constant_factor, warmup_steps=num_warmup_steps)
    return LambdaLR(optimizer, fn, last_epoch)

"""``groupopt.compat.lr_scheduler``: torch.optim.lr_scheduler's schedulers.

A scheduler is a host-side driver: at each ``step()`` it evaluates a formula
from :mod:`groupopt.schedules` (closed form, or torch's recursive form that
multiplies the group's current lr) and writes ``group["lr"]``. The optimizer
passes the lr into its jitted step as data, so no scheduler step recompiles.
"""

from .base import ExponentialLR, LambdaLR, LRScheduler, MultiStepLR, StepLR

__all__ = ["LRScheduler", "LambdaLR", "StepLR", "MultiStepLR", "ExponentialLR"]

"""``groupopt.compat.lr_scheduler``: torch.optim.lr_scheduler's schedulers.

A scheduler is a host-side driver: at each ``step()`` it evaluates a formula
from :mod:`groupopt.schedules` (closed form, or torch's recursive form that
multiplies the group's current lr) and writes ``group["lr"]``. The optimizer
passes the lr into its jitted step as data, so no scheduler step recompiles.
"""

from .base import ExponentialLR, LambdaLR, LRScheduler, MultiStepLR, StepLR
from .base import ConstantLR, CosineAnnealingLR, CosineAnnealingWarmRestarts, LinearLR, MultiplicativeLR, PolynomialLR
from .composite import ChainedScheduler, SequentialLR
from .warmup import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup
from .cyclic import CyclicLR, OneCycleLR
from .plateau import ReduceLROnPlateau

__all__ = ["LRScheduler", "LambdaLR", "StepLR", "MultiStepLR", "ExponentialLR"]
__all__ += ["CyclicLR", "OneCycleLR", "ReduceLROnPlateau"]
__all__ += ["MultiplicativeLR", "ConstantLR", "LinearLR", "PolynomialLR", "CosineAnnealingLR", "CosineAnnealingWarmRestarts"]
__all__ += ["SequentialLR", "ChainedScheduler"]
__all__ += ["get_linear_schedule_with_warmup", "get_cosine_schedule_with_warmup", "get_constant_schedule_with_warmup"]

"""groupopt: per-parameter-group optimization for JAX, with torch.optim's numbers.

Functional core (pure Optax):

* :func:`grouped` -- one ``optax.GradientTransformation`` over parameter
  groups, each with its own update rule, hyperparameters and schedules
  (hyperparameters live in the state as arrays: editing them never recompiles).
* :func:`group`, :data:`ALL`, :func:`rest`, :func:`partition` -- selecting
  leaves (whole tree, NNX modules by identity, globs, regexes, predicates).
* :func:`sgd`, :func:`adam`, :func:`adamw` -- torch-exact optimizers as
  transformations (optionally grouped).
* :class:`SGDRule`, :class:`AdamRule`, :class:`AdamWRule` -- the update rules.
* :mod:`groupopt.schedules` -- jit-able ``count -> value`` schedules.
* :func:`layerwise_decay`, :func:`freeze_first` -- per-slice (per-layer)
  hyperparameter vectors for stacked parameters (:mod:`groupopt.slices`).

torch-shaped API: :mod:`groupopt.compat` (``import groupopt.compat as optim``).
"""

from . import schedules
from .accumulation import accumulate
from .plateau import reduce_on_plateau
from .report import report
from .slices import freeze_first, layerwise_decay
from .groups import ALL, GroupPlan, partition, rest
from .optimizers.adam import AdamRule, AdamWRule, adam, adamw
from .optimizers.base import Rule
from .optimizers.sgd import SGDRule, sgd
from .optimizers.rmsprop import RMSpropRule, rmsprop
from .optimizers.adagrad import AdagradRule, adagrad
from .optimizers.adadelta import AdadeltaRule, adadelta
from .optimizers.adamax import AdamaxRule, adamax
from .optimizers.nadam import NAdamRule, nadam
from .optimizers.radam import RAdamRule, radam
from .optimizers.rprop import RpropRule, rprop
from .optimizers.asgd import ASGDRule, asgd
from .optimizers.lbfgs import LBFGSSolver, lbfgs
from .transform import Group, GroupConfig, GroupedState, GroupedTransformation, GroupState, group, grouped

__version__ = "0.1.0"


__all__ = [
    "NAdamRule", "nadam", "RAdamRule", "radam", "RpropRule", "rprop", "ASGDRule", "asgd",
    "RMSpropRule", "rmsprop", "AdagradRule", "adagrad", "AdadeltaRule", "adadelta", "AdamaxRule", "adamax",
    "ALL", "GroupPlan", "partition", "rest", "group", "grouped", "Group", "GroupConfig", "GroupState",
    "GroupedState", "GroupedTransformation", "Rule", "SGDRule", "AdamRule", "AdamWRule",
    "sgd", "adam", "adamw", "schedules", "layerwise_decay", "freeze_first", "report",
    "accumulate", "reduce_on_plateau",
    "LBFGSSolver", "lbfgs",
]

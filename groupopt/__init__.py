"""groupopt: per-parameter-group optimization for JAX, with torch.optim's numbers.

Functional core (pure Optax):

* :func:`grouped` -- one ``optax.GradientTransformation`` over parameter
  groups, each with its own update rule, hyperparameters and schedules
  (hyperparameters live in the state as arrays: editing them never recompiles).
* :func:`group`, :data:`ALL`, :func:`rest`, :func:`partition` -- selecting
  leaves (whole tree, NNX modules by identity, globs, regexes, predicates).
* :func:`override` -- hyperparameters for a selection across groups
  (``weight_decay=0`` for biases over per-layer lr groups), resolved at build time.
* :func:`sgd`, :func:`adam`, :func:`adamw` -- torch-exact optimizers as
  transformations (optionally grouped).
* :class:`SGDRule`, :class:`AdamRule`, :class:`AdamWRule` -- the update rules.
* :mod:`groupopt.schedules` -- jit-able ``count -> value`` schedules.
* :func:`optax_rule` -- any Optax transformation (``optax.lion``, a chain) as a group's
  rule, its numeric hyperparameters in the state like every group's.
* :func:`clip_grad_norm`, :func:`clip_grad_norm_per_group`, :func:`clip_grad_value` --
  torch-exact gradient clipping as transformations (:mod:`groupopt.clipping`).
* :func:`get_hyperparams`, :func:`set_hyperparams`, :func:`hyperparams_for_logging` -- a group's
  hyperparameters by name through any Optax wrapper, a TrainState or an ``nnx.Optimizer``, in or out of ``jit``.
* :func:`layerwise_decay`, :func:`freeze_first` -- per-slice (per-layer)
  hyperparameter vectors for stacked parameters (:mod:`groupopt.slices`).

torch-shaped API: :mod:`groupopt.compat` (``import groupopt.compat as optim``).
"""

from . import schedules
from . import averaging
from .accumulation import accumulate
from .plateau import reduce_on_plateau
from .report import report
from .slices import freeze_first, layerwise_decay
from .groups import ALL, GroupPlan, named_parameters, of_type, partition, rest
from .optimizers.adam import AdamRule, AdamWRule, adam, adamw
from .optimizers.base import Rule
from .optimizers.optax_rule import OptaxRule, optax_rule
from .optimizers.sgd import SGDRule, sgd
from .optimizers.rmsprop import RMSpropRule, rmsprop
from .optimizers.adagrad import AdagradRule, adagrad
from .optimizers.adadelta import AdadeltaRule, adadelta
from .optimizers.adamax import AdamaxRule, adamax
from .optimizers.nadam import NAdamRule, nadam
from .optimizers.radam import RAdamRule, radam
from .optimizers.adafactor import AdafactorRule, adafactor
from .optimizers.rprop import RpropRule, rprop
from .optimizers.asgd import ASGDRule, asgd
from .optimizers.muon import MuonRule, muon
from .optimizers.lbfgs import LBFGSSolver, lbfgs
from .optimizers.sparse_adam import SparseAdamRule, sparse_adam, sparse_rows, sparse_rows_from_dense
from .transform import Group, GroupConfig, GroupedState, GroupedTransformation, GroupState, group, grouped
from .clipping import ClipGradNormState, clip_grad_norm, clip_grad_norm_per_group, clip_grad_value
from .overrides import Override, override
from .hyperparam_access import GroupInfo, get_hyperparams, grouped_state, hyperparams_for_logging, set_hyperparams

__version__ = "0.1.0"


__all__ = [
    "NAdamRule", "nadam", "RAdamRule", "radam", "RpropRule", "rprop", "ASGDRule", "asgd", "MuonRule", "muon",
    "RMSpropRule", "rmsprop", "AdagradRule", "adagrad", "AdadeltaRule", "adadelta", "AdamaxRule", "adamax",
    "ALL", "GroupPlan", "partition", "rest", "group", "grouped", "Group", "GroupConfig", "GroupState",
    "GroupedState", "GroupedTransformation", "Rule", "SGDRule", "AdamRule", "AdamWRule",
    "sgd", "adam", "adamw", "schedules", "layerwise_decay", "freeze_first", "report",
    "accumulate", "reduce_on_plateau",
    "OptaxRule", "optax_rule",
    "LBFGSSolver", "lbfgs",
    "SparseAdamRule", "sparse_adam", "sparse_rows", "sparse_rows_from_dense",
    "AdafactorRule", "adafactor",
    "clip_grad_norm", "clip_grad_norm_per_group", "clip_grad_value", "ClipGradNormState",
    "override", "Override",
]
__all__ += ["averaging"]
__all__ += ["of_type", "named_parameters"]
__all__ += ["get_hyperparams", "set_hyperparams", "hyperparams_for_logging", "grouped_state", "GroupInfo"]

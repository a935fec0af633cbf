"""torch.optim's API over groupopt's core: ``import groupopt.compat as optim``.

``optim.SGD``, ``optim.Adam``, ``optim.AdamW`` take torch's arguments (a
module, a list of Variables, or a list of group dicts) and keep torch's
``param_groups``, ``defaults``, ``state``, ``add_param_group``, ``zero_grad``,
``step``, ``state_dict`` and ``load_state_dict``; ``optim.lr_scheduler`` has
torch's schedulers. See :mod:`groupopt.compat.params` for how parameters and
gradients are matched.
"""

from . import lr_scheduler
from .adam import Adam, AdamW
from .optimizer import Optimizer, required
from .sgd import SGD
from .rmsprop import RMSprop
from .adagrad import Adagrad
from .adadelta import Adadelta
from .adamax import Adamax
from .nadam import NAdam
from .radam import RAdam
from .rprop import Rprop
from .asgd import ASGD
from .lbfgs import LBFGS
from .hooks import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from .optimizer import LoadReport
from .torch_interop import load_torch_checkpoint, to_numpy, to_torch

__all__ = ["LBFGS", "NAdam", "RAdam", "Rprop", "ASGD", "RMSprop", "Adagrad", "Adadelta", "Adamax", "Optimizer", "required", "SGD", "Adam", "AdamW", "lr_scheduler", "to_torch", "to_numpy", "load_torch_checkpoint",
           "register_optimizer_step_pre_hook", "register_optimizer_step_post_hook", "LoadReport"]

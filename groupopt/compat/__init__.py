"""torch.optim's API over groupopt's core: ``import groupopt.compat as optim``.

``optim.SGD``, ``optim.Adam``, ``optim.AdamW`` take torch's arguments (a
module, a list of Variables, or a list of group dicts) and keep torch's
``param_groups``, ``defaults``, ``state``, ``add_param_group``, ``zero_grad``,
``step``, ``state_dict`` and ``load_state_dict``; ``optim.lr_scheduler`` has
torch's schedulers. See :mod:`groupopt.compat.params` for how parameters and
gradients are matched.
"""

from . import lr_scheduler
from . import swa_utils
from .adam import Adam, AdamW
from .optimizer import Optimizer, required
from .sgd import SGD
from .rmsprop import RMSprop
from .adagrad import Adagrad
from .adadelta import Adadelta
from .adamax import Adamax
from .nadam import NAdam
from .radam import RAdam
from .adafactor import Adafactor
from .rprop import Rprop
from .asgd import ASGD
from .muon import Muon
from .lbfgs import LBFGS
from .sparse_adam import SparseAdam
from .hooks import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from .optimizer import LoadReport
from .torch_interop import load_torch_checkpoint, to_numpy, to_torch
from .clip_grad import clip_grad_norm, clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_, get_total_norm
from .param_groups import param_groups
from .torch_models import Continued, TorchName, TorchStateDicts, continue_from_torch, to_torch_state_dicts, torch_name_table

__all__ = ["LBFGS", "Muon", "SparseAdam", "NAdam", "RAdam", "Rprop", "ASGD", "RMSprop", "Adagrad", "Adadelta", "Adamax", "Optimizer", "required", "SGD", "Adam", "AdamW", "lr_scheduler", "to_torch", "to_numpy", "load_torch_checkpoint",
           "register_optimizer_step_pre_hook", "register_optimizer_step_post_hook", "LoadReport",
           "clip_grad_norm_", "clip_grad_norm", "clip_grad_value_", "get_total_norm", "clip_grads_with_norm_",
           "param_groups", "Adafactor"]
__all__ += ["swa_utils"]
__all__ += ["continue_from_torch", "to_torch_state_dicts", "torch_name_table", "TorchName", "Continued", "TorchStateDicts"]

"""``groupopt.compat.NAdam``: torch.optim.NAdam over :class:`groupopt.NAdamRule`.

Also holds :class:`_StrictLoad`, the ``load_state_dict`` check shared by the
compat NAdam, RAdam, Rprop and ASGD.
"""

from __future__ import annotations

import numpy as np

from ..optimizers.nadam import NAdamRule
from .optimizer import Optimizer

__all__ = ["NAdam"]

# Every key torch 2.13's built-in optimizers put in their defaults (TORCH_SEMANTICS §1.2).
_TORCH_OPTIMIZER_KEYS = frozenset(
    {
        "lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize", "foreach", "differentiable",
        "fused", "betas", "eps", "amsgrad", "capturable", "decoupled_weight_decay", "alpha", "centered",
        "lr_decay", "initial_accumulator_value", "rho", "momentum_decay", "etas", "step_sizes", "lambd", "t0",
        "max_iter", "max_eval", "tolerance_grad", "tolerance_change", "history_size", "line_search_fn",
    }
)


def _check_lr(lr):
    if hasattr(lr, "shape") and np.size(lr) != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")


class _StrictLoad:
    """``load_state_dict`` refuses another optimizer's state_dict.

    A saved param group must hold every numeric hyperparameter of this class
    and no hyperparameter key of another torch optimizer: an Adam state_dict
    has every state key and hyperparameter RAdam needs (plus ``amsgrad`` and
    ``fused``), and torch would load it silently. Checked before anything
    changes; the base class then does the rest.
    """

    def load_state_dict(self, state_dict, *args, **kwargs):
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if isinstance(groups, (list, tuple)):
            foreign = _TORCH_OPTIMIZER_KEYS - set(self.defaults)
            for i, g in enumerate(groups):
                if not isinstance(g, dict):
                    continue
                lacks = [k for k in self._rule_cls.hyperparams if k not in g]
                extra = [k for k in g if k in foreign]
                if lacks or extra:
                    what = []
                    if lacks:
                        what.append(f"lacks {lacks}")
                    if extra:
                        what.append(f"has {extra}, which {type(self).__name__} does not use")
                    raise ValueError(
                        f"loaded state dict was not saved by {type(self).__name__}: its param group {i} "
                        + " and ".join(what)
                    )
        return super().load_state_dict(state_dict, *args, **kwargs)


class NAdam(_StrictLoad, Optimizer):
    r"""torch.optim.NAdam.

    The update is :class:`groupopt.NAdamRule` (see there for the math); the
    signature, defaults, group keys, validation and state_dict layout
    (``step``, ``mu_product``, ``exp_avg``, ``exp_avg_sq``) are torch 2.13's.
    ``foreach``, ``capturable`` and ``differentiable`` are accepted and kept in
    the groups but change nothing: there is one jitted path.
    """

    _rule_cls = NAdamRule

    def __init__(
        self,
        params,
        lr=2e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0,
        momentum_decay=4e-3,
        decoupled_weight_decay=False,
        *,
        foreach=None,
        maximize=False,
        capturable=False,
        differentiable=False,
        model=None,
    ):
        _check_lr(lr)
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= momentum_decay:
            raise ValueError(f"Invalid momentum_decay value: {momentum_decay}")
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "momentum_decay": momentum_decay,
            "decoupled_weight_decay": decoupled_weight_decay,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
        }
        super().__init__(params, defaults, model=model)

"""``groupopt.compat.Rprop``: torch.optim.Rprop over :class:`groupopt.RpropRule`."""

from __future__ import annotations

from ..optimizers.rprop import RpropRule
from .optimizer import Optimizer
from .validation import check_lr, guarded

__all__ = ["Rprop"]


class Rprop(Optimizer):
    r"""torch.optim.Rprop.

    The update is :class:`groupopt.RpropRule` (see there for the math); the
    signature, defaults, group keys, validation and state_dict layout
    (``step``, ``prev``, ``step_size``) are torch 2.13's. As in torch, a
    group's ``lr`` only sets the initial ``step_size`` (at its first step);
    later edits of ``lr`` change nothing. ``foreach``, ``capturable`` and
    ``differentiable`` are accepted and kept in the groups but change nothing.
    """

    _rule_cls = RpropRule

    def __init__(
        self,
        params,
        lr=1e-2,
        etas=(0.5, 1.2),
        step_sizes=(1e-6, 50),
        *,
        capturable=False,
        foreach=None,
        maximize=False,
        differentiable=False,
        model=None,
    ):
        check_lr(lr)
        if not 0.0 < guarded(etas[0]) < 1.0 < guarded(etas[1]):
            raise ValueError(f"Invalid eta values: {etas[0]}, {etas[1]}")
        defaults = {
            "lr": lr,
            "etas": etas,
            "step_sizes": step_sizes,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
            "capturable": capturable,
        }
        super().__init__(params, defaults, model=model)

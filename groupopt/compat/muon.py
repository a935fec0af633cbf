"""``groupopt.compat.Muon``: torch.optim.Muon over :class:`groupopt.MuonRule`."""

from __future__ import annotations

import numbers

import numpy as np

from ..optimizers.muon import ADJUST_LR_FNS, MuonRule
from .optimizer import Optimizer
from .validation import guarded, is_tensor

__all__ = ["Muon"]

_KNOWN_ADJUST = ADJUST_LR_FNS[:3]  # what torch's constructor accepts


def _size(shape) -> str:
    return f"torch.Size({list(shape)})"


class Muon(Optimizer):
    r"""torch.optim.Muon: momentum orthogonalized by Newton-Schulz, for 2-D parameters.

    The update is :class:`groupopt.MuonRule` (see there for the math); the signature, defaults,
    group keys (``lr, weight_decay, momentum, nesterov, ns_coefficients, eps, ns_steps,
    adjust_lr_fn``), state (``momentum_buffer`` only) and errors are torch 2.13's, raised when
    torch raises them: the 2-D check after the groups are built (``add_param_group`` does not
    check; the step then raises ``Param gradient must be a 2D matrix``), ``ns_steps`` and the
    length of ``ns_coefficients`` at ``step``. A group's ``adjust_lr_fn`` other than torch's
    three values means ratio 1, as in torch.

    ``ns_dtype`` (keyword-only, ours): the dtype of the Newton-Schulz iteration, ``"bfloat16"``
    as torch (default), or ``"float32"``/``"float64"`` for the exact iteration. Other
    parameters are optimized with another optimizer (e.g. :class:`AdamW`), as with torch.
    Differences from torch: the step-time checks cover every member of a group (torch: those
    with a gradient) and run before any parameter changes (torch has updated the earlier ones).
    """

    _rule_cls = MuonRule

    def __init__(
        self,
        params,
        lr=1e-3,
        weight_decay=0.1,
        momentum=0.95,
        nesterov=True,
        ns_coefficients=(3.4445, -4.775, 2.0315),
        eps=1e-07,
        ns_steps=5,
        adjust_lr_fn=None,
        *,
        model=None,
        ns_dtype="bfloat16",
    ):
        if is_tensor(lr) and np.size(lr) != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
        if not 0.0 <= guarded(momentum):
            raise ValueError(f"momentum should be >= 0 but is: {momentum}")
        if not 0.0 <= guarded(weight_decay):
            raise ValueError(f"weight decay should be >= 0 but is: {weight_decay}")
        if adjust_lr_fn is not None and adjust_lr_fn not in _KNOWN_ADJUST:
            raise ValueError(f"Adjust learning rate function {adjust_lr_fn} is not supported")
        self._ns_dtype = MuonRule(ns_dtype=ns_dtype).ns_dtype  # validated here, before anything
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_coefficients": ns_coefficients,
            "eps": eps,
            "ns_steps": ns_steps,
            "adjust_lr_fn": adjust_lr_fn,
        }
        super().__init__(params, defaults, model=model)
        for group in self.param_groups:  # after the groups are built, as torch
            for value in self._binding.get(list(group["params"])):
                if value.ndim != 2:
                    raise ValueError(
                        f"Muon only supports 2D parameters whereas we found a parameter with size: {_size(value.shape)}"
                    )

    def _rule_for(self, group: dict, where: str) -> MuonRule:
        steps = group["ns_steps"]
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
            raise TypeError(f"{where}: ns_steps must be an int, got {steps!r}")
        fn = group["adjust_lr_fn"]
        if not any(fn is k or (isinstance(fn, str) and fn == k) for k in _KNOWN_ADJUST):
            fn = "unadjusted"  # torch's _adjust_lr: ratio 1.0 for any other value in a group
        return MuonRule(nesterov=bool(group["nesterov"]), ns_steps=int(steps), adjust_lr_fn=fn, ns_dtype=self._ns_dtype)

    def _numbers(self, group: dict, where: str) -> dict:
        coefs = group.get("ns_coefficients")
        if not _three(coefs):
            # torch accepts any ns_coefficients until a step uses them (then: "Coefficients must be a
            # tuple of exactly 3 values", raised by _structure before anything changes); the state
            # built meanwhile does not depend on them
            group = dict(group, ns_coefficients=MuonRule.hyperparams["ns_coefficients"])
        return super()._numbers(group, where)

    def _structure(self):
        # torch's step-time checks on the group's values (for a group with parameters): ns_steps, then
        # the number of coefficients. The rank check ("Param gradient must be a 2D matrix") is the
        # rule's, raised while the step is traced (before anything changes): no per-step host work.
        for group in self.param_groups:
            if not group["params"]:
                continue
            if group["ns_steps"] >= 100:
                raise ValueError("Number of steps must be less than 100 for computational efficiency")
            if not _three(group["ns_coefficients"]):
                raise ValueError("Coefficients must be a tuple of exactly 3 values")
        return super()._structure()


def _three(coefs) -> bool:
    return isinstance(coefs, (tuple, list)) and len(coefs) == 3

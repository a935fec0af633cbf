"""torch's constructor and ``load_state_dict`` checks, with torch's messages, shared by the compat optimizers.

Each compat optimizer calls these in the order its torch class does, so the
first error a user sees is torch's.
"""

from __future__ import annotations

import jax
import numpy as np

__all__ = [
    "is_tensor",
    "guarded",
    "check_lr",
    "check_nonneg",
    "check_betas",
    "check_adam_betas",
    "check_fused",
    "check_saved_groups",
    "TORCH_OPTIMIZER_KEYS",
]

# Every key torch 2.13's 15 built-in optimizers put in their defaults (TORCH_SEMANTICS §1.2).
TORCH_OPTIMIZER_KEYS = frozenset(
    {
        "lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize", "foreach", "differentiable",
        "fused", "betas", "eps", "amsgrad", "capturable", "decoupled_weight_decay", "alpha", "centered",
        "lr_decay", "initial_accumulator_value", "rho", "momentum_decay", "etas", "step_sizes", "lambd", "t0",
        "max_iter", "max_eval", "tolerance_grad", "tolerance_change", "history_size", "line_search_fn",
        "beta2_decay", "d", "ns_coefficients", "ns_steps", "adjust_lr_fn",  # Adafactor, Muon
    }
)


def is_tensor(x) -> bool:
    """A JAX or NumPy array: what plays a torch ``Tensor`` in torch's checks (``isinstance(x, Tensor)``).

    NumPy scalars (``np.float32(0.9)``) are not: torch treats them as numbers
    that are not ``float`` either.
    """
    return isinstance(x, (np.ndarray, jax.Array))


def guarded(x):
    """``x``, for a comparison in torch's checks: an array of size != 1 raises what ``bool(tensor)`` raises in torch.

    torch's ``0.0 <= value`` on a multi-element tensor fails with
    ``RuntimeError: Boolean value of Tensor with more than one value is
    ambiguous`` (NumPy and JAX raise a ``ValueError`` with their own text).
    """
    if is_tensor(x) and np.size(x) != 1:
        what = "no values" if np.size(x) == 0 else "more than one value"
        raise RuntimeError(f"Boolean value of Tensor with {what} is ambiguous")
    return x


def check_lr(lr) -> None:
    """``Tensor lr must be 1-element`` / ``Invalid learning rate: {lr}`` (lr = 0 is allowed)."""
    if is_tensor(lr) and np.size(lr) != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")


def check_nonneg(what: str, value) -> None:
    """``Invalid {what} value: {value}`` unless ``0 <= value`` (what: "epsilon", "momentum", ...)."""
    if not 0.0 <= guarded(value):
        raise ValueError(f"Invalid {what} value: {value}")


def check_betas(betas) -> None:
    """``Invalid beta parameter at index i: {beta}`` unless each beta is in [0, 1)."""
    if not 0.0 <= guarded(betas[0]) < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= guarded(betas[1]) < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")


def check_adam_betas(betas, foreach, capturable) -> tuple:
    """torch's Adam/AdamW rules for tensor betas (after :func:`check_betas`); returns ``betas`` as torch stores them.

    Both floats or both tensors (arrays); a tensor beta is refused with
    ``foreach=True, capturable=False`` and must have one element; tensors are
    then squeezed to 0-d (torch's ``_to_scalar``), floats kept.
    """
    if not (
        (isinstance(betas[0], float) and isinstance(betas[1], float)) or (is_tensor(betas[0]) and is_tensor(betas[1]))
    ):
        raise ValueError("betas must be either both floats or both Tensors")
    for i in (0, 1):
        if is_tensor(betas[i]):
            if not capturable and foreach:
                raise ValueError(f"betas[{i}] as a Tensor is not supported for capturable=False and foreach=True")
            if np.size(betas[i]) != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element")
    return tuple(b.reshape(()) if is_tensor(b) and np.ndim(b) != 0 else b for b in betas)


def check_fused(fused, foreach, differentiable) -> None:
    """torch's checks of the (inert here) implementation flags."""
    if fused and differentiable:
        raise RuntimeError("`fused` does not support `differentiable`")
    if fused and foreach:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")


def check_saved_groups(opt, state_dict) -> None:
    """Refuse another optimizer's state_dict before anything changes.

    A saved param group must hold every numeric hyperparameter of ``opt``'s
    rule and no hyperparameter key that only another torch optimizer has: an
    Adam state_dict has everything RAdam needs (plus ``amsgrad``), and torch
    would load it silently, or fail later with a bare ``KeyError``.
    """
    foreign = TORCH_OPTIMIZER_KEYS - set(opt.defaults)
    for i, group in enumerate(state_dict["param_groups"]):
        if not isinstance(group, dict):
            raise ValueError(f"loaded state dict's param group {i} is a {type(group).__name__}, not a dict")
        lacks = [k for k in opt._rule_cls.hyperparams if k not in group]
        extra = [k for k in group if k in foreign]
        if lacks or extra:
            what = []
            if lacks:
                what.append(f"lacks {lacks}")
            if extra:
                what.append(f"has {extra}, which {type(opt).__name__} does not use")
            raise ValueError(
                f"loaded state dict's param group {i} {' and '.join(what)}: "
                f"is it from a different optimizer than {type(opt).__name__}?"
            )

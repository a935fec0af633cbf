"""``groupopt.compat.SparseAdam``: torch.optim.SparseAdam over :class:`groupopt.SparseAdamRule`."""

from __future__ import annotations

from ..optimizers.sparse_adam import SparseAdamRule
from .optimizer import Optimizer
from .validation import guarded, is_tensor

__all__ = ["SparseAdam"]


class SparseAdam(Optimizer):
    r"""torch.optim.SparseAdam.

    The update is :class:`groupopt.SparseAdamRule` (see there for the math); the signature,
    defaults, group keys (``lr``, ``betas``, ``eps``, ``maximize``), validation (``lr = 0`` is
    refused) and state (``step`` a Python int, ``exp_avg``, ``exp_avg_sq``) are torch 2.13's.

    The gradient of each parameter is a ``jax.experimental.sparse.BCOO`` (build it with
    :func:`groupopt.sparse_rows` from the gradient of the looked-up rows, as
    ``nn.Embedding(sparse=True)`` gives torch); a dense one raises torch's ``RuntimeError:
    SparseAdam does not support dense gradients, please consider Adam instead`` before anything
    changes (torch would already have counted a step for the earlier parameters of the group).
    :meth:`accumulate_grad` concatenates sparse gradients (torch's uncoalesced sum) and
    ``zero_grad(set_to_none=False)`` leaves them with no entries, as torch does.

    A sparse or complex parameter is refused by the base class's check (only dense real
    floating point arrays can be optimized), with its own message rather than torch's
    ``Sparse params at indices ...`` / ``Complex params at indices ...``.
    """

    _rule_cls = SparseAdamRule

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, maximize=False, *, model=None):
        if is_tensor(lr) and lr.size != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 < guarded(lr):
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 < guarded(eps):
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= guarded(betas[0]) < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= guarded(betas[1]) < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "maximize": maximize}
        super().__init__(params, defaults, model=model)

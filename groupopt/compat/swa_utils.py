"""torch.optim.swa_utils over Flax NNX: ``AveragedModel``, ``SWALR``, ``update_bn`` and the averaging functions.

torch 2.13's signatures, defaults, checks and messages; the averaging math is
:mod:`groupopt.averaging`'s (one implementation), the SWALR formula is
:func:`groupopt.averaging.swa_lr_next`.

What differs from torch, and why:

* **Parameters and buffers.** Parameters are the model's ``nnx.Param``
  Variables; buffers are its other Variables (``nnx.BatchStat``, custom
  Variable types) except the random-number state (``nnx.RngState``: keys and
  counts), which each model keeps for itself (never copied or averaged).
  They are matched by path; a model whose parameters (or buffers) have other
  paths or shapes is refused with an error naming them (torch zips the two
  lists and silently ignores the surplus).
* **Averaging functions** are traced into one jitted function (compiled once,
  ``num_compiles`` counts it): ``avg_fn(a, x, n)`` returns the new value as in
  torch; ``multi_avg_fn(as, xs, n)`` must *return* the list of new values
  (JAX arrays cannot be updated in place). ``n`` is an integer array (the count
  before this update). The functions returned by ``get_*_avg_fn`` follow this.
* **Default SWA** is torch's CPU path on every device (``get_swa_avg_fn``: an
  exact mean); torch uses ``get_swa_multi_avg_fn`` on CUDA (a float32 weight).
  ``get_swa_multi_avg_fn`` reproduces that float32-weight lerp when asked for.
* **update_bn** uses NNX's BatchNorm, whose running variance is the *biased*
  batch variance (torch stores the unbiased one): the running mean is torch's,
  the running variance is the mean over batches of ``var_biased`` (torch's
  times ``(n_k - 1) / n_k`` batch by batch). Sub-module modes are restored as
  they were (torch's ``model.train(was_training)`` flattens them).
* **SWALR** checks everything before writing ``swa_lr`` into the groups, so a
  failed construction leaves the optimizer as it was (torch writes ``swa_lr``
  first and leaves it after a failure).
"""

from __future__ import annotations

from collections import namedtuple
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import averaging
from ..groups import flatten_with_paths
from .lr_scheduler.base import LRScheduler, _atomic, _warn_get_lr_called_within_step
from .lr_scheduler.cyclic import _format_param
from .optimizer import Optimizer

__all__ = [
    "AveragedModel",
    "update_bn",
    "SWALR",
    "get_ema_multi_avg_fn",
    "get_swa_multi_avg_fn",
    "get_ema_avg_fn",
    "get_swa_avg_fn",
]

_INT_ADDCDIV = (
    "Integer division with addcdiv is no longer supported, and in a future  release addcdiv will perform a true "
    "division of tensor1 and tensor2. The historic addcdiv behavior can be implemented as (input + value * "
    "torch.trunc(tensor1 / tensor2)).to(input.dtype) for integer inputs and as (input + value * tensor1 / tensor2) "
    "for float inputs. The future addcdiv behavior is just the latter implementation: (input + value * tensor1 / "
    "tensor2), for all dtypes."
)


# ------------------------------------------------------------------ averaging functions


def get_ema_multi_avg_fn(decay=0.999):
    """torch's EMA over lists of arrays: ``lerp(a, x, 1 - decay)`` (integers: ``a*decay + x*(1-decay)``).

    Returns ``fn(averaged_list, current_list, n) -> new averaged_list`` (the new
    values are returned, not written in place). ``decay`` outside [0, 1] raises
    torch's ``ValueError``.
    """
    averaging.check_decay(decay)

    def ema_update(ema_param_list, current_param_list, _):
        return [averaging.ema_lerp(a, x, decay) for a, x in zip(ema_param_list, current_param_list, strict=True)]

    return ema_update


def get_swa_multi_avg_fn():
    """torch's SWA over lists of arrays: ``lerp(a, x, 1 / (n + 1))`` with the weight in float32.

    As in torch (its CUDA default), float64 leaves are thus averaged with a
    float32 weight (the mean of 3 is off by ~1e-8); integer leaves raise
    torch's ``RuntimeError``. Returns the new values.
    """

    def swa_update(averaged_param_list, current_param_list, num_averaged):
        if averaged_param_list and not jnp.issubdtype(jnp.result_type(averaged_param_list[0]), jnp.inexact):
            raise RuntimeError(_INT_ADDCDIV)
        return [averaging.swa_lerp(a, x, num_averaged) for a, x in zip(averaged_param_list, current_param_list, strict=True)]

    return swa_update


def get_ema_avg_fn(decay=0.999):
    """torch's per-array EMA: ``decay * a + (1 - decay) * x``; ``decay`` outside [0, 1] raises ``ValueError``."""
    averaging.check_decay(decay)

    def ema_update(ema_param, current_param, num_averaged):
        return averaging.ema(ema_param, current_param, decay)

    return ema_update


def get_swa_avg_fn():
    """torch's per-array SWA: ``a + (x - a) / (n + 1)`` (an exact running mean)."""

    def swa_update(averaged_param, current_param, num_averaged):
        return averaging.swa_mean(averaged_param, current_param, num_averaged)

    return swa_update


# ------------------------------------------------------------------ AveragedModel


class AveragedCount(nnx.Variable):
    """``AveragedModel.n_averaged``: how many models have been averaged (an integer scalar)."""


def _pieces(module) -> tuple[dict, dict]:
    """``({path: Param}, {path: buffer Variable})`` of an NNX module (random-number state left out)."""
    paths, leaves, _ = flatten_with_paths(nnx.state(module))
    params, buffers = {}, {}
    for path, var in zip(paths, leaves):
        if not isinstance(var, nnx.Variable) or isinstance(var, nnx.RngState):
            continue
        value = var.get_value()
        if not isinstance(value, (jax.Array, np.ndarray)):
            continue
        (params if isinstance(var, nnx.Param) else buffers)[path] = var
    return params, buffers


def _strong(x):
    """``x`` without JAX's weak type (``jnp.asarray(3)``), so that a Python-number assignment never retraces."""
    if getattr(x, "weak_type", False):
        return jnp.asarray(x).astype(x.dtype)
    return x


def _match(kind: str, mine: dict, theirs: dict) -> list[str]:
    """The common paths, in ``mine``'s order; a clear error when the names or shapes differ."""
    missing = [p for p in mine if p not in theirs]
    extra = [p for p in theirs if p not in mine]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing from the model: {missing}")
        if extra:
            parts.append(f"not in the averaged model: {extra}")
        raise ValueError(f"update_parameters: the model's {kind} do not match the averaged model's ({'; '.join(parts)})")
    for p, var in mine.items():
        want, got = np.shape(var.get_value()), np.shape(theirs[p].get_value())
        if want != got:
            raise ValueError(f"update_parameters: {kind[:-1]} {p!r} has shape {got}, the averaged model's has {want}")
    return list(mine)


class _AveragingStep:
    """The jitted averaging work of one AveragedModel: ``(mine, theirs, n, synced) -> (new, n + 1, copies)``."""

    def __init__(self, avg_fn, multi_avg_fn) -> None:
        self.avg_fn, self.multi_avg_fn = avg_fn, multi_avg_fn
        self.num_compiles = 0
        self._jitted = jax.jit(self._step)

    def _step(self, mine, theirs, n, synced):
        self.num_compiles += 1  # runs once per trace, i.e. per compilation
        state = averaging.AveragedState(avg=mine, n=n)
        if self.multi_avg_fn is not None:
            new = averaging.update_with(state, theirs, multi_avg_fn=self.multi_avg_fn)
        elif self.avg_fn is not None:
            new = averaging.update_with(state, theirs, avg_fn=self.avg_fn)
        else:
            new = averaging.update(state, theirs, method="swa")
        return new.avg, new.n, [jnp.array(x, copy=True) for x in synced]

    def __call__(self, mine, theirs, n, synced):
        return self._jitted(mine, theirs, n, synced)


_IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])


class AveragedModel(nnx.Module):
    """torch.optim.swa_utils.AveragedModel for a Flax NNX module: SWA / EMA of its parameters.

    ``AveragedModel(model, device=None, avg_fn=None, multi_avg_fn=None,
    use_buffers=False)`` holds a copy of ``model`` (``self.module``, its own
    arrays) and ``n_averaged``; calling it calls the copy.
    ``update_parameters(model)``: the first call copies ``model``'s parameters;
    later calls average them (``avg_fn`` per array, ``multi_avg_fn`` per dtype,
    else the equal-weight SWA mean), ``n`` being the count before the call.
    Buffers (non-``Param`` Variables, e.g. ``BatchStat``) are copied from
    ``model`` at every call, or averaged like the parameters with
    ``use_buffers=True`` (integer buffers truncated, as in torch). The work is
    one jitted function, compiled once (``num_compiles``); a bad averaging
    function fails at the first call (it is traced then), where torch fails at
    the second. ``n_averaged`` is an ``AveragedCount`` Variable holding an
    integer scalar (``int(swa.n_averaged[...])``). See the module docstring for
    the differences from torch.
    """

    def __init__(
        self,
        model: nnx.Module,
        device=None,
        avg_fn: Callable | None = None,
        multi_avg_fn: Callable | None = None,
        use_buffers: bool = False,
    ) -> None:
        if avg_fn is not None and multi_avg_fn is not None:
            raise AssertionError("Only one of avg_fn and multi_avg_fn should be provided")
        if not isinstance(model, nnx.Module):
            raise TypeError(f"AveragedModel: model must be a Flax NNX Module, got {type(model).__name__}")
        module = nnx.clone(model)
        paths, leaves, _ = flatten_with_paths(nnx.state(module))
        for var in leaves:  # own copies: never aliased with the source model's (donated) arrays
            value = var.get_value()
            if isinstance(value, (jax.Array, np.ndarray)):
                value = jnp.array(value, copy=True)
                var.set_value(jax.device_put(value, device) if device is not None else value)
        self.module = module
        count = jnp.zeros((), jax.dtypes.canonicalize_dtype(jnp.int64))
        self.n_averaged = AveragedCount(jax.device_put(count, device) if device is not None else count)
        self.avg_fn = avg_fn
        self.multi_avg_fn = multi_avg_fn
        self.use_buffers = use_buffers
        self.device = device
        self._averager = _AveragingStep(avg_fn, multi_avg_fn)

    def __call__(self, *args, **kwargs):
        """The forward pass of the averaged copy (``self.module(*args, **kwargs)``)."""
        return self.module(*args, **kwargs)

    @property
    def num_compiles(self) -> int:
        """How many times the averaging work was traced (compiled): once, unless shapes or dtypes change."""
        return self._averager.num_compiles

    def update_parameters(self, model: nnx.Module) -> None:
        """Average ``model``'s parameters (and buffers with ``use_buffers``) into this one; ``n_averaged += 1``.

        Everything is checked first (same parameter/buffer paths and shapes,
        else a ``ValueError`` naming them); nothing changes on an error.
        """
        if not isinstance(model, nnx.Module):
            raise TypeError(f"update_parameters: model must be a Flax NNX Module, got {type(model).__name__}")
        my_params, my_buffers = _pieces(self.module)
        their_params, their_buffers = _pieces(model)
        p_paths = _match("parameters", my_params, their_params)
        b_paths = _match("buffers", my_buffers, their_buffers)
        avg_vars = [my_params[p] for p in p_paths]
        src_vars = [their_params[p] for p in p_paths]
        sync_vars, sync_src = [], []
        if self.use_buffers:
            avg_vars += [my_buffers[p] for p in b_paths]
            src_vars += [their_buffers[p] for p in b_paths]
        else:
            sync_vars = [my_buffers[p] for p in b_paths]
            sync_src = [their_buffers[p] for p in b_paths]
        theirs = [_strong(v.get_value()) for v in src_vars]
        synced = [_strong(v.get_value()) for v in sync_src]
        if self.device is not None:
            theirs, synced = jax.device_put((theirs, synced), self.device)
        new_avg, new_n, new_sync = self._averager([_strong(v.get_value()) for v in avg_vars], theirs, self.n_averaged.get_value(), synced)
        for var, value in zip(avg_vars, new_avg):
            var.set_value(value)
        for var, value in zip(sync_vars, new_sync):
            var.set_value(value)
        self.n_averaged.set_value(new_n)

    # -------------------------------------------------------------- state_dict

    def _entries(self) -> dict[str, nnx.Variable]:
        paths, leaves, _ = flatten_with_paths(nnx.state(self.module))
        return {
            "module." + path.replace("/", "."): var
            for path, var in zip(paths, leaves)
            if isinstance(var, nnx.Variable) and isinstance(var.get_value(), (jax.Array, np.ndarray))
        }

    def state_dict(self) -> dict[str, Any]:
        """``n_averaged`` first, then ``"module." + path`` (NNX path, ``/`` -> ``.``) for every Variable of the copy.

        E.g. ``n_averaged, module.bn.bias, module.bn.mean, ..., module.lin.kernel``
        (NNX's names, in ``nnx.state`` order, NNX layouts: a Linear ``kernel`` is
        ``(in, out)``). The averaging functions are not saved (as in torch).
        """
        out = {"n_averaged": self.n_averaged.get_value()}
        out.update({name: var.get_value() for name, var in self._entries().items()})
        return out

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True):
        """Load ``state_dict()``'s entries (values cast to each Variable's dtype, as torch's ``copy_``).

        Checked first (torch's messages for missing / unexpected keys with
        ``strict``, and for a shape mismatch); nothing changes on an error.
        Returns ``(missing_keys, unexpected_keys)``.
        """
        entries = self._entries()
        targets = {"n_averaged": self.n_averaged, **entries}
        missing = [k for k in targets if k not in state_dict]
        unexpected = [k for k in state_dict if k not in targets]
        errors = []
        if strict:
            if missing:
                errors.append("Missing key(s) in state_dict: {}. ".format(", ".join(f'"{k}"' for k in missing)))
            if unexpected:
                errors.append("Unexpected key(s) in state_dict: {}. ".format(", ".join(f'"{k}"' for k in unexpected)))
        new = {}
        for key, var in targets.items():
            if key not in state_dict:
                continue
            value = np.asarray(state_dict[key]) if not isinstance(state_dict[key], jax.Array) else state_dict[key]
            old = var.get_value()
            if np.shape(value) != np.shape(old):
                errors.append(
                    f"size mismatch for {key}: copying a param with shape {tuple(np.shape(value))} from checkpoint, "
                    f"the shape in current model is {tuple(np.shape(old))}."
                )
                continue
            new[key] = jax.device_put(jnp.asarray(value).astype(old.dtype), old.sharding if isinstance(old, jax.Array) else None)
        if errors:
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}:\n\t" + "\n\t".join(errors))
        for key, value in new.items():
            targets[key].set_value(value)
        return _IncompatibleKeys(missing, unexpected)


# ------------------------------------------------------------------ update_bn


@jax.jit
def _fold(running, batch, factor):
    """torch's cumulative running statistics: ``factor * batch + (1 - factor) * running``, in each one's dtype."""
    return [
        (factor.astype(r.dtype) * b.astype(r.dtype) + (1 - factor).astype(r.dtype) * r).astype(r.dtype)
        for r, b in zip(running, batch)
    ]


def update_bn(loader: Iterable[Any], model: nnx.Module, device=None) -> None:
    """Recompute the running statistics of every ``nnx.BatchNorm`` of ``model`` with one pass over ``loader``.

    As torch: the statistics are reset (mean 0, var 1); without any BatchNorm
    the loader is not iterated; the model runs in train mode (``model.train()``:
    BatchNorms use batch statistics, Dropouts are active); a list/tuple item
    is replaced by ``item[0]`` (moved to ``device`` if given); each batch counts
    equally (torch's ``momentum=None``: the cumulative average
    ``r_k = (1 - 1/k) r_{k-1} + (1/k) b_k``). Afterwards every module's
    ``momentum``, ``use_running_average`` and ``deterministic`` are put back
    as they were, per module (torch flattens sub-module modes).

    NNX's batch variance ``b_k`` is the *biased* one (torch's running variance
    averages unbiased batch variances, ``n_k / (n_k - 1)`` times larger); the
    running mean equals torch's. On an error (raised by the loader or the
    model) the statistics and modes are put back as they were.
    """
    bns = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)]
    if not bns:
        return
    saved_stats = [(bn.mean.get_value(), bn.var.get_value()) for bn in bns]
    modes = [
        (m, name, getattr(m, name))
        for _, m in nnx.iter_modules(model)
        for name in ("use_running_average", "deterministic")
        if hasattr(m, name)
    ]
    momenta = [bn.momentum for bn in bns]
    resets = [(jnp.zeros_like(m), jnp.ones_like(v)) for m, v in saved_stats]  # torch's reset_running_stats
    sums = [list(r) for r in resets]
    ok = False
    try:
        model.train()
        for bn in bns:
            bn.momentum = 0.0  # the module stores the batch statistics; the average is kept here
        count = 0
        for item in loader:
            if isinstance(item, (list, tuple)):
                item = item[0]
            if device is not None:
                item = jax.device_put(item, device)
            for bn, (m, v) in zip(bns, resets):
                bn.mean.set_value(m)
                bn.var.set_value(v)
            model(item)
            count += 1
            factor = np.float64(1.0 / float(count))  # torch: exponential_average_factor = 1 / num_batches_tracked
            for acc, bn in zip(sums, bns):
                acc[:] = _fold(acc, [bn.mean.get_value(), bn.var.get_value()], factor)
        ok = True
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        for m, name, value in modes:
            setattr(m, name, value)
        for bn, acc, (m, v) in zip(bns, sums, saved_stats):
            bn.mean.set_value(acc[0] if ok else m)
            bn.var.set_value(acc[1] if ok else v)


# ------------------------------------------------------------------ SWALR


class SWALR(LRScheduler):
    """torch.optim.swa_utils.SWALR: anneal each group's lr to ``swa_lr`` over ``anneal_epochs`` steps.

    ``SWALR(optimizer, swa_lr, anneal_epochs=10, anneal_strategy='cos',
    last_epoch=-1)``; ``swa_lr`` is one value or one per group (written to
    ``group["swa_lr"]``). At its ``k``-th ``step()`` (it follows
    ``_step_count``, not ``last_epoch``) the lr becomes
    ``swa_lr * f(k/E) + L * (1 - f(k/E))`` where ``L`` is re-derived from the
    group's current lr at each step (another scheduler's changes are absorbed),
    ``f`` the cos / linear curve (:func:`groupopt.averaging.swa_lr_next`).
    ``state_dict`` keys are torch's (no ``anneal_func``). Unlike torch, a
    construction that fails leaves no ``swa_lr`` key in the groups.
    """

    def __init__(self, optimizer: Optimizer, swa_lr, anneal_epochs=10, anneal_strategy="cos", last_epoch=-1) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(optimizer).__name__} is not an Optimizer")
        swa_lrs = _format_param("swa_lr", optimizer, swa_lr)
        if anneal_strategy not in ["cos", "linear"]:
            raise ValueError(f"anneal_strategy must be one of 'cos' or 'linear', instead got {anneal_strategy}")
        if not isinstance(anneal_epochs, int) or anneal_epochs < 0:
            raise ValueError(f"anneal_epochs must be equal or greater than 0, got {anneal_epochs}")
        with _atomic(self, optimizer):
            for value, group in zip(swa_lrs, optimizer.param_groups, strict=True):
                group["swa_lr"] = value
            self._set_anneal_func(anneal_strategy)
            self.anneal_epochs = anneal_epochs
            super().__init__(optimizer, last_epoch)

    @staticmethod
    def _linear_anneal(t):
        return averaging.swa_anneal_factor(t, "linear")

    @staticmethod
    def _cosine_anneal(t):
        return averaging.swa_anneal_factor(t, "cos")

    def _set_anneal_func(self, anneal_strategy: str) -> None:
        self._anneal_strategy = anneal_strategy
        self.anneal_func = self._cosine_anneal if anneal_strategy == "cos" else self._linear_anneal

    def get_lr(self) -> list:
        """The next lr of each group (torch's ``SWALR.get_lr``; use ``get_last_lr()`` to read the current one)."""
        _warn_get_lr_called_within_step(self)
        step = self._step_count - 1
        return [
            averaging.swa_lr_next(group["lr"], group["swa_lr"], step, self.anneal_epochs, self.anneal_func)
            for group in self.optimizer.param_groups
        ]

    def state_dict(self) -> dict[str, Any]:
        """Every attribute but the optimizer and ``anneal_func`` (torch's keys)."""
        return {key: value for key, value in self.__dict__.items() if key not in ("optimizer", "anneal_func")}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load ``state_dict()``'s entries and rebuild ``anneal_func`` (the strategy is checked first)."""
        strategy = state_dict.get("_anneal_strategy", self.__dict__.get("_anneal_strategy"))
        if strategy not in ("cos", "linear"):
            raise ValueError(f"anneal_strategy must be one of 'cos' or 'linear', instead got {strategy}")
        self.__dict__.update(state_dict)
        self._set_anneal_func(strategy)

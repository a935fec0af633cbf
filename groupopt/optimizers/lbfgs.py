r"""L-BFGS, as torch.optim.LBFGS (torch 2.13), over a flat parameter vector.

L-BFGS is not elementwise and calls the objective many times per step, so it
is not a :class:`~groupopt.optimizers.base.Rule`. It is a host-driven loop
(torch's data-dependent control flow, kept line by line) around jitted vector
math: the objective ``value_and_grad_fn`` is jit-compiled once, the two-loop
recursion is one jitted call per iteration, and scalar decisions are taken on
the host on numpy scalars of the parameter dtype (where torch has 0-d tensors)
or Python floats (where torch has Python floats), so the type promotion of
every scalar expression is torch's.

Functional API::

    solver = groupopt.lbfgs(lr=1, max_iter=20, line_search_fn="strong_wolfe")
    state = solver.init(params)
    loss, params, state = solver.step(params, state, jax.value_and_grad(f))

The objective contract: ``value_and_grad_fn(params) -> (loss, grads)`` is a
*pure function of params* (a pytree shaped like ``params``; ``grads`` has the
same structure), not a torch closure that reads mutated globals. ``step``
jit-compiles it once per (function, parameter structure) and returns the loss
of the *first* evaluation, like torch.

Algorithm (one ``step``; ``x`` is the flattened parameter vector, ``g`` its
gradient; the state persists across steps):

1. Evaluate ``f(x), g``. If :math:`\max|g| \le` ``tolerance_grad``, return.
2. Repeat at most ``max_iter`` times (``n_iter`` counts iterations over all steps):

   * direction: on the first iteration ever :math:`d = -g`, :math:`H_0 = 1`.
     Otherwise :math:`y = g - g_{prev}`, :math:`s = t d`; if :math:`y^\top s > 10^{-10}`
     push :math:`(y, s, \rho = 1/y^\top s)` into the history (FIFO of
     ``history_size``) and set :math:`H_0 = y^\top s / y^\top y`. The two-loop
     recursion then gives :math:`d = -H g`:

     .. math::
        q &\leftarrow -g; \quad \text{for } i = m-1, \dots, 0:\;
            \alpha_i = \rho_i\, s_i^\top q,\; q \leftarrow q - \alpha_i y_i \\
        r &\leftarrow H_0 q; \quad \text{for } i = 0, \dots, m-1:\;
            \beta_i = \rho_i\, y_i^\top r,\; r \leftarrow r + (\alpha_i - \beta_i) s_i;
            \quad d = r

   * step length: :math:`t = \min(1, 1/\|g\|_1)\cdot lr` on the first
     iteration ever, else :math:`t = lr`. Stop if :math:`g^\top d > -` ``tolerance_change``.
   * ``line_search_fn=None``: :math:`x \leftarrow x + t d`, then re-evaluate
     (except on the last iteration).
     ``line_search_fn="strong_wolfe"``: torch's ``_strong_wolfe`` (More-Thuente
     style bracketing then zoom with safeguarded cubic interpolation,
     :math:`c_1 = 10^{-4}`, :math:`c_2 = 0.9`, at most ``max_eval`` minus the
     evaluations already used) picks :math:`t` satisfying
     :math:`f(x+td) \le f(x) + c_1 t\, g^\top d` and
     :math:`|g(x+td)^\top d| \le -c_2\, g^\top d`; then :math:`x \leftarrow x + t d`.
   * stop when ``max_iter`` iterations or ``max_eval`` evaluations were used in
     this step, :math:`\max|g| \le` ``tolerance_grad``,
     :math:`\max|t d| \le` ``tolerance_change`` or
     :math:`|f - f_{prev}| <` ``tolerance_change``.

State: a plain dict mirroring torch's ``state[first param]`` (same keys,
same insertion order): ``func_evals``, ``n_iter`` (ints), ``d``,
``prev_flat_grad`` (flat arrays), ``t``, ``H_diag`` (scalars: a numpy scalar
where torch has a 0-d tensor, a Python number where torch has one),
``prev_loss`` (float), and the history as fixed-capacity buffers
``old_dirs``/``old_stps`` (``[history_size, n]``), ``ro`` and ``al``
(``[history_size]``) whose first ``num_old`` rows are torch's lists (one
compiled two-loop for every history length). :func:`state_to_torch` and
:func:`state_from_torch` convert to and from torch's layout (lists).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

__all__ = ["LBFGSSolver", "lbfgs", "minimize_flat", "state_to_torch", "state_from_torch", "TORCH_STATE_KEYS"]

#: torch's keys of ``state[first param]`` (``al`` appears once a second iteration ran).
TORCH_STATE_KEYS = ("func_evals", "n_iter", "al", "d", "t", "old_dirs", "old_stps", "ro", "H_diag", "prev_flat_grad", "prev_loss")

# ---------------------------------------------------------------------------- jitted vector math


def _host(x):
    """A 0-d array as a numpy scalar of its dtype (torch's 0-d tensor on the host)."""
    return np.asarray(x)[()]


@jax.jit
def _abs_max(v):
    return jnp.max(jnp.abs(v))


@jax.jit
def _abs_sum(v):
    return jnp.sum(jnp.abs(v))


@jax.jit
def _dot(a, b):
    return jnp.dot(a, b)


def _scalar_arg(v, dtype):
    """A host scalar as a 0-d array of the vector dtype (torch casts scalar operands to the
    tensor's dtype); one dtype and no weak type, so the jitted helpers compile once."""
    return np.asarray(v, dtype=dtype)


@jax.jit
def _axpy(x, t, d):
    """``x + t * d`` (torch's ``p.add_(d, alpha=t)``)."""
    return x + t * d


@jax.jit
def _scaled_abs_max(d, t):
    """``d.mul(t).abs().max()``."""
    return jnp.max(jnp.abs(d * t))


@jax.jit
def _direction(flat_grad, prev_flat_grad, d, t, old_dirs, old_stps, ro, num_old, h_diag, al):
    """Memory update and two-loop recursion (torch's ``else`` branch of the direction).

    Returns ``(d, old_dirs, old_stps, ro, num_old, h_diag, al, updated)``.
    """
    dt = flat_grad.dtype
    cap = old_dirs.shape[0]
    y = flat_grad - prev_flat_grad
    s = d * t
    ys = jnp.dot(y, s)
    updated = ys > 1e-10
    full = num_old == cap

    def push(buf, v):
        shifted = jnp.concatenate([buf[1:], v[None]], axis=0)
        inserted = lax.dynamic_update_index_in_dim(buf, v, jnp.minimum(num_old, cap - 1), 0)
        return jnp.where(updated, jnp.where(full, shifted, inserted), buf)

    old_dirs = push(old_dirs, y)
    old_stps = push(old_stps, s)
    ro = push(ro, (1.0 / ys).astype(dt))
    num_old = jnp.where(updated & ~full, num_old + 1, num_old)
    h_diag = jnp.where(updated, ys / jnp.dot(y, y), h_diag)

    def first(j, carry):
        q, al = carry
        i = num_old - 1 - j
        a = jnp.dot(old_stps[i], q) * ro[i]
        return q + (-a) * old_dirs[i], al.at[i].set(a)

    q, al = lax.fori_loop(0, num_old, first, (-flat_grad, al))
    r = q * h_diag

    def second(i, r):
        be_i = jnp.dot(old_dirs[i], r) * ro[i]
        return r + (al[i] - be_i) * old_stps[i]

    r = lax.fori_loop(0, num_old, second, r)
    return r, old_dirs, old_stps, ro, num_old, h_diag, al, updated


# ---------------------------------------------------------------------------- torch's line search (host)


def _sqrt(x):
    return np.sqrt(x) if isinstance(x, np.generic) else math.sqrt(x)


def _div(a, b):
    """``a / b`` with torch's operator semantics: Python number / 0-d tensor is ``b.reciprocal() * a``."""
    if isinstance(b, np.generic) and not isinstance(a, np.generic):
        return np.reciprocal(b) * a
    return a / b


def _cubic_interpolate(x1, f1, g1, x2, f2, g2, bounds=None):
    """torch.optim.lbfgs._cubic_interpolate (minimum of the cubic through two points with slopes)."""
    if bounds is not None:
        xmin_bound, xmax_bound = bounds
    else:
        xmin_bound, xmax_bound = (x1, x2) if x1 <= x2 else (x2, x1)
    d1 = g1 + g2 - _div(3 * (f1 - f2), x1 - x2)
    d2_square = d1**2 - g1 * g2
    if d2_square >= 0:
        d2 = _sqrt(d2_square)
        if x1 <= x2:
            min_pos = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
        else:
            min_pos = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
        return min(max(min_pos, xmin_bound), xmax_bound)
    return (xmin_bound + xmax_bound) / 2.0


def _strong_wolfe(obj_func, x, t, d, f, g, gtd, c1=1e-4, c2=0.9, tolerance_change=1e-9, max_ls=25):
    """torch.optim.lbfgs._strong_wolfe: returns ``(f_new, g_new, t, ls_func_evals)``."""
    if max_ls < 0:
        raise ValueError(
            f"LBFGS: max_eval leaves no function evaluation for the line search (max_ls={max_ls}); "
            "max_eval must be at least the evaluations already used in this step"
        )
    d_norm = _host(_abs_max(d))
    f_new, g_new = obj_func(x, t, d)
    ls_func_evals = 1
    gtd_new = _host(_dot(g_new, d))

    t_prev, f_prev, g_prev, gtd_prev = 0, f, g, gtd
    done = False
    ls_iter = 0
    while ls_iter < max_ls:
        if f_new > (f + c1 * t * gtd) or (ls_iter > 1 and f_new >= f_prev):
            bracket = [t_prev, t]
            bracket_f = [f_prev, f_new]
            bracket_g = [g_prev, g_new]
            bracket_gtd = [gtd_prev, gtd_new]
            break
        if abs(gtd_new) <= -c2 * gtd:
            bracket = [t]
            bracket_f = [f_new]
            bracket_g = [g_new]
            done = True
            break
        if gtd_new >= 0:
            bracket = [t_prev, t]
            bracket_f = [f_prev, f_new]
            bracket_g = [g_prev, g_new]
            bracket_gtd = [gtd_prev, gtd_new]
            break
        min_step = t + 0.01 * (t - t_prev)
        max_step = t * 10
        tmp = t
        t = _cubic_interpolate(t_prev, f_prev, gtd_prev, t, f_new, gtd_new, bounds=(min_step, max_step))
        t_prev = tmp
        f_prev = f_new
        g_prev = g_new
        gtd_prev = gtd_new
        f_new, g_new = obj_func(x, t, d)
        ls_func_evals += 1
        gtd_new = _host(_dot(g_new, d))
        ls_iter += 1

    if ls_iter == max_ls:
        bracket = [0, t]
        bracket_f = [f, f_new]
        bracket_g = [g, g_new]

    insuf_progress = False
    low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[-1] else (1, 0)
    while not done and ls_iter < max_ls:
        if abs(bracket[1] - bracket[0]) * d_norm < tolerance_change:
            break
        t = _cubic_interpolate(bracket[0], bracket_f[0], bracket_gtd[0], bracket[1], bracket_f[1], bracket_gtd[1])
        eps = 0.1 * (max(bracket) - min(bracket))
        if min(max(bracket) - t, t - min(bracket)) < eps:
            if insuf_progress or t >= max(bracket) or t <= min(bracket):
                if abs(t - max(bracket)) < abs(t - min(bracket)):
                    t = max(bracket) - eps
                else:
                    t = min(bracket) + eps
                insuf_progress = False
            else:
                insuf_progress = True
        else:
            insuf_progress = False

        f_new, g_new = obj_func(x, t, d)
        ls_func_evals += 1
        gtd_new = _host(_dot(g_new, d))
        ls_iter += 1

        if f_new > (f + c1 * t * gtd) or f_new >= bracket_f[low_pos]:
            bracket[high_pos] = t
            bracket_f[high_pos] = f_new
            bracket_g[high_pos] = g_new
            bracket_gtd[high_pos] = gtd_new
            low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[1] else (1, 0)
        else:
            if abs(gtd_new) <= -c2 * gtd:
                done = True
            elif gtd_new * (bracket[high_pos] - bracket[low_pos]) >= 0:
                bracket[high_pos] = bracket[low_pos]
                bracket_f[high_pos] = bracket_f[low_pos]
                bracket_g[high_pos] = bracket_g[low_pos]
                bracket_gtd[high_pos] = bracket_gtd[low_pos]
            bracket[low_pos] = t
            bracket_f[low_pos] = f_new
            bracket_g[low_pos] = g_new
            bracket_gtd[low_pos] = gtd_new

    return bracket_f[low_pos], bracket_g[low_pos], bracket[low_pos], ls_func_evals


# ---------------------------------------------------------------------------- the step


def _check_number(name, v, *, integer=False):
    ok = isinstance(v, (int, np.integer)) if integer else isinstance(v, (int, float, np.integer, np.floating))
    if isinstance(v, bool) or not ok:
        raise TypeError(f"LBFGS: {name} must be {'an int' if integer else 'a number'}, got {v!r}")


class LBFGSSolver:
    """torch.optim.LBFGS's algorithm (see the module docstring); build it with :func:`lbfgs`."""

    def __init__(
        self,
        lr=1,
        max_iter=20,
        max_eval=None,
        tolerance_grad=1e-7,
        tolerance_change=1e-9,
        history_size=100,
        line_search_fn=None,
    ):
        if hasattr(lr, "shape"):  # torch's _to_scalar: a 1-element tensor lr is read as a Python number
            if np.size(lr) != 1:
                raise ValueError("Tensor lr must be 1-element")
            lr = np.asarray(lr).reshape(()).item()
        _check_number("lr", lr)
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        _check_number("max_iter", max_iter, integer=True)
        if max_eval is None:
            max_eval = max_iter * 5 // 4
        _check_number("max_eval", max_eval, integer=True)
        _check_number("tolerance_grad", tolerance_grad)
        _check_number("tolerance_change", tolerance_change)
        _check_number("history_size", history_size, integer=True)
        if history_size < 1:
            raise ValueError(f"LBFGS: history_size must be >= 1, got {history_size}")
        if line_search_fn not in (None, "strong_wolfe"):
            raise RuntimeError("only 'strong_wolfe' is supported")
        self.lr = lr
        self.max_iter = max_iter
        self.max_eval = max_eval
        self.tolerance_grad = tolerance_grad
        self.tolerance_change = tolerance_change
        self.history_size = history_size
        self.line_search_fn = line_search_fn
        self._evals: dict = {}

    def __repr__(self):
        keys = ("lr", "max_iter", "max_eval", "tolerance_grad", "tolerance_change", "history_size", "line_search_fn")
        return "lbfgs(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in keys) + ")"

    def init(self, params) -> dict:
        """The state before the first step (torch's, after its first ``setdefault``s)."""
        flat, _ = ravel_pytree(params)
        _check_flat(flat)
        return {"func_evals": 0, "n_iter": 0}

    def _evaluator(self, params, value_and_grad_fn):
        """``(flatten, unflatten, evaluate)`` jitted once per (function, parameter structure)."""
        leaves, treedef = jax.tree.flatten(params)
        key = (value_and_grad_fn, treedef, tuple((jnp.shape(x), jnp.result_type(x)) for x in leaves))
        fns = self._evals.get(key)
        if fns is None:
            _, unravel = ravel_pytree(params)

            def evaluate(v):
                loss, grads = value_and_grad_fn(unravel(v))
                g, _ = ravel_pytree(grads)
                if g.shape != v.shape:
                    raise ValueError(
                        f"LBFGS: value_and_grad_fn returned gradients with {g.shape[0]} elements for "
                        f"{v.shape[0]} parameters; grads must have the structure of params"
                    )
                return loss, g.astype(v.dtype)

            if len(self._evals) >= 8:  # pass the same function object at every step to compile once
                self._evals.pop(next(iter(self._evals)))
            fns = self._evals[key] = (jax.jit(lambda p: ravel_pytree(p)[0]), jax.jit(unravel), jax.jit(evaluate))
        return fns

    def step(self, params, state: dict, value_and_grad_fn: Callable):
        """One torch ``LBFGS.step``: returns ``(loss, new_params, new_state)``.

        ``value_and_grad_fn(params) -> (loss, grads)`` is a pure function of the
        parameters; ``loss`` is that of the first evaluation (at ``params``).
        """
        flatten, unravel, evaluate = self._evaluator(params, value_and_grad_fn)
        loss, x, new_state = minimize_flat(self, flatten(params), state, evaluate)
        return loss, unravel(x), new_state


def lbfgs(lr=1, max_iter=20, max_eval=None, tolerance_grad=1e-7, tolerance_change=1e-9, history_size=100, line_search_fn=None):
    """torch.optim.LBFGS as a functional solver: ``init(params)`` and ``step(params, state, value_and_grad_fn)``.

    See :mod:`groupopt.optimizers.lbfgs` for the algorithm and the objective contract.
    ``max_eval`` defaults to ``max_iter * 5 // 4``; ``line_search_fn`` is None or ``"strong_wolfe"``.
    """
    return LBFGSSolver(lr, max_iter, max_eval, tolerance_grad, tolerance_change, history_size, line_search_fn)


def _check_flat(flat):
    if jnp.issubdtype(flat.dtype, jnp.complexfloating):
        raise TypeError("LBFGS: complex parameters are not supported (torch views them as real pairs; groupopt does not)")
    if not jnp.issubdtype(flat.dtype, jnp.floating):
        raise TypeError(f"LBFGS: parameters must be floating point, got {flat.dtype}")


def _check_state(solver, state, n, dtype):
    if not isinstance(state, dict) or "func_evals" not in state or "n_iter" not in state:
        raise ValueError("LBFGS: state must be the dict returned by init() or a previous step()")
    for k in ("d", "prev_flat_grad"):
        v = state.get(k)
        if v is not None and tuple(v.shape) != (n,):
            raise ValueError(f"LBFGS: state {k!r} has shape {tuple(v.shape)}, but the parameters have {n} elements")
    if state["n_iter"] > 0 and state.get("d") is None:
        raise ValueError("LBFGS: state has n_iter > 0 but no direction 'd'; it is not a state this solver made")
    buf = state.get("old_dirs")
    if buf is not None and tuple(buf.shape) != (solver.history_size, n):
        raise ValueError(
            f"LBFGS: state 'old_dirs' has shape {tuple(buf.shape)}, expected {(solver.history_size, n)} "
            "(history_size or the parameters changed since the state was made)"
        )


def minimize_flat(solver: LBFGSSolver, x, state: dict, evaluate: Callable):
    """torch's ``LBFGS.step`` body on a flat vector ``x``.

    ``evaluate(x) -> (loss, flat_grad)`` (any host callable; the compat layer's
    sets parameters and calls a torch-style closure). Returns
    ``(first_loss, new_x, new_state)``; ``state`` is not modified.
    """
    _check_flat(x)
    n, dtype = x.shape[0], x.dtype
    _check_state(solver, state, n, dtype)
    lr = solver.lr
    max_iter, max_eval = solver.max_iter, solver.max_eval
    tolerance_grad, tolerance_change = solver.tolerance_grad, solver.tolerance_change
    line_search_fn, history_size = solver.line_search_fn, solver.history_size

    state = dict(state)

    def run(x):
        orig_loss, flat_grad = evaluate(x)
        loss = float(orig_loss)
        current_evals = 1
        state["func_evals"] += 1
        opt_cond = _host(_abs_max(flat_grad)) <= tolerance_grad
        if opt_cond:
            return orig_loss, x

        d = state.get("d")
        t = state.get("t")
        old_dirs = state.get("old_dirs")
        old_stps = state.get("old_stps")
        ro = state.get("ro")
        num_old = state.get("num_old", 0)
        H_diag = state.get("H_diag")
        prev_flat_grad = state.get("prev_flat_grad")
        prev_loss = state.get("prev_loss")

        n_iter = 0
        while n_iter < max_iter:
            n_iter += 1
            state["n_iter"] += 1

            if state["n_iter"] == 1:
                d = -flat_grad
                old_dirs = jnp.zeros((history_size, n), dtype)
                old_stps = jnp.zeros((history_size, n), dtype)
                ro = jnp.zeros((history_size,), dtype)
                num_old = 0
                H_diag = 1
            else:
                if "al" not in state:
                    state["al"] = jnp.zeros((history_size,), dtype)
                d, old_dirs, old_stps, ro, num_old_a, h_new, al, updated = _direction(
                    flat_grad, prev_flat_grad, d, _scalar_arg(t, dtype), old_dirs, old_stps, ro,
                    np.asarray(num_old, np.int32), _scalar_arg(H_diag, dtype), state["al"],
                )
                state["al"] = al
                if bool(updated):
                    H_diag = _host(h_new)
                    num_old = int(num_old_a)

            prev_flat_grad = flat_grad
            prev_loss = loss

            if state["n_iter"] == 1:
                t = min(1.0, 1.0 / _host(_abs_sum(flat_grad))) * lr
            else:
                t = lr

            gtd = _host(_dot(flat_grad, d))
            if gtd > -tolerance_change:
                break

            ls_func_evals = 0
            if line_search_fn is not None:

                def obj_func(x, t, d):
                    out_loss, g = evaluate(_axpy(x, _scalar_arg(t, dtype), d))
                    return float(out_loss), g

                loss, flat_grad, t, ls_func_evals = _strong_wolfe(
                    obj_func, x, t, d, loss, flat_grad, gtd, max_ls=max_eval - current_evals
                )
                x = _axpy(x, _scalar_arg(t, dtype), d)
                opt_cond = _host(_abs_max(flat_grad)) <= tolerance_grad
            else:
                x = _axpy(x, _scalar_arg(t, dtype), d)
                if n_iter != max_iter:
                    out_loss, flat_grad = evaluate(x)
                    loss = float(out_loss)
                    opt_cond = _host(_abs_max(flat_grad)) <= tolerance_grad
                    ls_func_evals = 1

            current_evals += ls_func_evals
            state["func_evals"] += ls_func_evals

            if n_iter == max_iter:
                break
            if current_evals >= max_eval:
                break
            if opt_cond:
                break
            if _host(_scaled_abs_max(d, _scalar_arg(t, dtype))) <= tolerance_change:
                break
            if abs(loss - prev_loss) < tolerance_change:
                break

        state["d"] = d
        state["t"] = t
        state["old_dirs"] = old_dirs
        state["old_stps"] = old_stps
        state["ro"] = ro
        state["H_diag"] = H_diag
        state["prev_flat_grad"] = prev_flat_grad
        state["prev_loss"] = prev_loss
        state["num_old"] = num_old
        return orig_loss, x

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        orig_loss, x = run(x)
    return orig_loss, x, state


# ---------------------------------------------------------------------------- torch's state layout


def _export_scalar(v):
    """A numpy scalar (torch: 0-d tensor) as a 0-d array; Python numbers and None as they are."""
    if isinstance(v, (np.generic, np.ndarray, jax.Array)):
        return np.array(v, copy=True)
    return v


def state_to_torch(state: dict) -> dict:
    """The state in torch's ``state[first param]`` layout: numpy arrays, lists for the history.

    ``old_dirs``/``old_stps``: lists of ``num_old`` flat arrays; ``ro``: list of
    0-d arrays; ``al``: list of ``history_size`` entries, ``None`` where torch
    never wrote one. Key order is torch's (insertion order).
    """
    out = {}
    k = int(state.get("num_old", 0))
    for key, v in state.items():
        if key == "num_old":
            continue
        if key in ("old_dirs", "old_stps") and v is not None:
            arr = np.asarray(v)
            out[key] = [arr[i].copy() for i in range(k)]
        elif key == "ro" and v is not None:
            arr = np.asarray(v)
            out[key] = [np.array(arr[i]) for i in range(k)]
        elif key == "al" and v is not None:
            arr = np.asarray(v)
            out[key] = [np.array(arr[i]) if i < k else None for i in range(arr.shape[0])]
        elif key in ("func_evals", "n_iter"):
            out[key] = int(v)
        else:
            out[key] = _export_scalar(v)
    return out


def _np(v):
    if hasattr(v, "detach") and hasattr(v, "numpy"):  # a torch tensor (torch is not imported here)
        return v.detach().cpu().numpy()
    return np.asarray(v)


def state_from_torch(entry: dict, n: int, dtype, history_size: int, where: str = "LBFGS state") -> dict:
    """Inverse of :func:`state_to_torch`; accepts real torch state (tensors) too.

    Float arrays are cast to ``dtype`` (torch casts loaded state to the
    parameter dtype). Everything is validated; errors name the key.
    """
    dtype = np.dtype(dtype)
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a dict, got {type(entry).__name__}")
    missing = [k for k in ("func_evals", "n_iter") if k not in entry]
    if missing:
        raise ValueError(f"{where}: lacks {missing} (has {sorted(entry)}); is it from a different optimizer than LBFGS?")
    has_history = "d" in entry and entry["d"] is not None
    if has_history:
        missing = [k for k in ("t", "old_dirs", "old_stps", "ro", "H_diag", "prev_flat_grad", "prev_loss") if k not in entry]
        if missing:
            raise ValueError(f"{where}: lacks {missing} (has {sorted(entry)})")

    def count(key):
        v = entry[key]
        if isinstance(v, bool) or not isinstance(v, (int, np.integer, float)) and not (hasattr(v, "shape") and np.size(v) == 1):
            raise ValueError(f"{where}: {key!r} must be an int, got {v!r}")
        return int(v)

    def float_array(key, v, shape):
        a = _np(v)
        if not (np.issubdtype(a.dtype, np.floating)):
            raise ValueError(f"{where}: {key} has dtype {a.dtype}, expected floating")
        if tuple(a.shape) != shape:
            raise ValueError(f"{where}: {key} has shape {tuple(a.shape)}, expected {shape}")
        return a.astype(dtype)

    def scalar(key, v):
        if v is None or isinstance(v, bool):
            raise ValueError(f"{where}: {key!r} must be a number, got {v!r}")
        if isinstance(v, (int, float)) and not isinstance(v, np.generic):
            return v  # a Python number, as torch keeps it
        return float_array(key, v, ())[()]

    out: dict = {}
    for key, v in entry.items():
        if key in ("func_evals", "n_iter"):
            out[key] = count(key)
    if "al" in entry and entry["al"] is not None:
        al = entry["al"]
        if not isinstance(al, (list, tuple)) or len(al) > history_size:
            raise ValueError(f"{where}: 'al' must be a list of at most history_size={history_size} entries")
        buf = np.zeros((history_size,), dtype)
        for i, a in enumerate(al):
            if a is not None:
                buf[i] = float_array(f"'al'[{i}]", a, ())
        out["al"] = jnp.asarray(buf)
    if not has_history:  # torch returned before its first iteration (or max_iter == 0): no history yet
        for key in TORCH_STATE_KEYS:
            if key in entry and entry[key] is None and key not in out:
                out[key] = None
        return out
    out["d"] = jnp.asarray(float_array("'d'", entry["d"], (n,)))
    out["t"] = scalar("t", entry["t"])
    lists = {}
    for key in ("old_dirs", "old_stps", "ro"):
        v = entry[key]
        if not isinstance(v, (list, tuple)):
            raise ValueError(f"{where}: {key!r} must be a list, got {type(v).__name__}")
        lists[key] = v
    k = len(lists["old_dirs"])
    if len(lists["old_stps"]) != k or len(lists["ro"]) != k:
        raise ValueError(
            f"{where}: old_dirs, old_stps and ro have different lengths "
            f"({k}, {len(lists['old_stps'])}, {len(lists['ro'])})"
        )
    if k > history_size:
        raise ValueError(f"{where}: the saved history has {k} entries, more than history_size={history_size}")
    for key in ("old_dirs", "old_stps"):
        buf = np.zeros((history_size, n), dtype)
        for i, a in enumerate(lists[key]):
            buf[i] = float_array(f"{key!r}[{i}]", a, (n,))
        out[key] = jnp.asarray(buf)
    ro = np.zeros((history_size,), dtype)
    for i, a in enumerate(lists["ro"]):
        ro[i] = float_array(f"'ro'[{i}]", a, ())
    out["ro"] = jnp.asarray(ro)
    out["H_diag"] = scalar("H_diag", entry["H_diag"])
    out["prev_flat_grad"] = jnp.asarray(float_array("'prev_flat_grad'", entry["prev_flat_grad"], (n,)))
    pl = entry["prev_loss"]
    if isinstance(pl, bool) or not isinstance(pl, (int, float)) and not (hasattr(pl, "shape") and np.size(pl) == 1):
        raise ValueError(f"{where}: 'prev_loss' must be a float, got {pl!r}")
    out["prev_loss"] = float(pl)
    out["num_old"] = k
    # torch's insertion order
    order = [key for key in entry if key in out] + [key for key in out if key not in entry]
    return {key: out[key] for key in order}

r"""SparseAdam, as torch.optim.SparseAdam, with a JAX sparse gradient (a BCOO).

torch's SparseAdam takes the sparse COO gradient that ``nn.Embedding(sparse=True)`` produces and
updates only the entries it holds. The JAX form of that gradient is a
``jax.experimental.sparse.BCOO`` with ``n_batch=0``:

* **rows** (``n_sparse=1``, trailing dims dense): ``indices`` of shape ``(nse, 1)`` name rows of an
  embedding table, ``data`` of shape ``(nse, dim)`` their gradients;
* **elements** (``n_sparse=param.ndim``): ``indices`` of shape ``(nse, ndim)``, ``data`` ``(nse,)``;
* any ``n_sparse`` in between (the leading ``n_sparse`` axes are indexed, the rest dense).

Build it with :func:`sparse_rows` from the gradient with respect to the gathered rows (the
embedding recipe below) or with :func:`sparse_rows_from_dense` from a dense gradient and the rows
that were looked up. As in torch, entries need not be unique nor sorted (duplicates are summed),
an entry whose value is an explicit 0 still counts as touched (its moments decay), and an entry
whose index is out of range (``BCOO``'s padding convention, e.g. what ``sum_duplicates(nse=...)``
adds) changes nothing. The number of entries ``nse`` is static: one trace per ``nse``.

The embedding recipe (differentiate with respect to the looked-up rows, not the table)::

    def loss_fn(rows, dense_params, batch):            # rows = table[batch["ids"]]
        ...

    rows = params["embed"][batch["ids"]]
    g_rows, g_dense = jax.grad(loss_fn, argnums=(0, 1))(rows, params["dense"], batch)
    grads = {"embed": groupopt.sparse_rows(g_rows, batch["ids"], num_rows=params["embed"].shape[0]),
             "dense": g_dense}

A dense gradient for a SparseAdam parameter is refused with torch's ``RuntimeError: SparseAdam
does not support dense gradients, please consider Adam instead`` (and every other rule refuses a
sparse one with torch's ``"<Name> does not support sparse gradients"``), when the step is traced,
before anything changes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.sparse import BCOO

from ..grad_checks import is_sparse
from .base import Rule, stored

__all__ = ["SparseAdamRule", "sparse_adam", "sparse_rows", "sparse_rows_from_dense"]

_DENSE_MESSAGE = "SparseAdam does not support dense gradients, please consider Adam instead"


@dataclasses.dataclass(frozen=True)
class SparseAdamRule(Rule):
    r"""torch.optim.SparseAdam's update, per parameter, with a sparse (BCOO) gradient:

    .. math::
        t &\leftarrow t + 1 \quad\text{(counted even when the gradient has no entries)} \\
        I, g_I &= \mathrm{coalesce}(-\nabla \text{ if maximize else } \nabla)
            \quad\text{(duplicate indices summed; only these entries change)} \\
        m_I &\leftarrow m_I + (1 - \beta_1)(g_I - m_I), \quad
        v_I \leftarrow v_I + (1 - \beta_2)(g_I^2 - v_I) \\
        p_I &\leftarrow p_I - \eta\,\frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t} \cdot
            \frac{m_I}{\sqrt{v_I} + \epsilon}

    ``t`` is the parameter's step count, not the row's: a row first touched at ``t = 5`` is
    bias-corrected with 5. ``eps`` is added to the *un-corrected* ``sqrt(v)``; there is no weight
    decay; rows outside ``I`` keep ``p``, ``m`` and ``v`` exactly.

    Work is proportional to the number of entries: the entries are sorted once
    (``jnp.unique`` with a static size), their values summed per index
    (``segment_sum``, in entry order: torch's ``coalesce`` order on CPU; on GPU the order of a
    scatter-add is not fixed, so float32 sums of three or more duplicates may differ by an ulp),
    then ``m``, ``v`` and ``p`` are gathered at the touched rows, updated with torch's operation
    order, and scattered back.
    """

    maximize: bool = False

    name: ClassVar[str] = "SparseAdam"
    hyperparams: ClassVar[dict] = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}

    def slot_names(self):
        return ("exp_avg", "exp_avg_sq")

    def grad_error(self, grad):
        """torch's message for a dense gradient; a sparse one must be a BCOO without batch dimensions."""
        if not is_sparse(grad):
            return _DENSE_MESSAGE
        if not isinstance(grad, BCOO):
            return (f"SparseAdam takes a BCOO sparse gradient, got a {type(grad).__name__} "
                    "(convert it with its .to_bcoo())")
        if grad.n_batch:
            return (f"SparseAdam takes a BCOO gradient without batch dimensions, got n_batch={grad.n_batch} "
                    "(jax.experimental.sparse.bcoo_update_layout(grad, n_batch=0))")
        return None

    # torch keeps ``step`` as a Python int
    def torch_scalars(self, step, scalars):
        if int(step) == 0:
            return None
        return {"step": int(step)}

    def from_torch_scalars(self, entry):
        v = np.asarray(entry["step"])
        if v.size != 1:
            raise ValueError(f"SparseAdam state 'step' must be an integer, got shape {v.shape}")
        f = float(v.reshape(()))
        if not (f >= 0 and f == int(f)):
            raise ValueError(f"SparseAdam state 'step' must be a non-negative integer, got {f}")
        return int(f), {}

    def prepare(self, hp, step, scalars):
        lr, (b1, b2), eps = hp["lr"], hp["betas"], hp["eps"]
        bc1 = 1 - b1**step
        bc2 = 1 - b2**step
        coef = {
            "neg_step_size": -(lr * jnp.sqrt(bc2) / bc1),
            "eps": eps,
            "one_minus_b1": 1 - b1,
            "one_minus_b2": 1 - b2,
        }
        return coef, scalars

    def apply(self, grad, p, slots, c):
        if not isinstance(grad, BCOO):  # the door (grad_error) refuses these first
            raise TypeError(_DENSE_MESSAGE)
        if grad.nse == 0:  # torch: "Skip update for empty grad" (the step was still counted)
            return p, dict(slots)
        rows, vals, n_rows = _coalesce(grad, p.shape)
        g = -vals if self.maximize else vals
        flat = lambda x: x.reshape((n_rows,) + vals.shape[1:])  # noqa: E731 - touched axes -> one row axis
        at = lambda x: flat(x).at[rows].get(mode="fill", fill_value=0, indices_are_sorted=True)  # noqa: E731
        m0, v0, p0 = at(slots["exp_avg"]), at(slots["exp_avg_sq"]), at(p)
        # torch: d1 = (g - m)(1 - b1); m += d1; d2 = (g^2 - v)(1 - b2); v += d2;
        # numer = d1 + m_old; denom = sqrt(d2 + v_old) + eps; p += (numer / denom) * (-step_size)
        # (``stored``: each product rounded before the add, as torch's separate kernels do)
        d1 = stored((g - m0) * c["one_minus_b1"], g)
        d2 = stored((stored(g * g, g) - v0) * c["one_minus_b2"], g)
        m1 = m0 + d1
        v1 = v0 + d2
        p1 = p0 + stored(m1 / (jnp.sqrt(v1) + c["eps"]) * c["neg_step_size"], g)
        put = lambda x, new: flat(x).at[rows].set(new, mode="drop", indices_are_sorted=True).reshape(x.shape)  # noqa: E731
        return put(p, p1), {"exp_avg": put(slots["exp_avg"], m1), "exp_avg_sq": put(slots["exp_avg_sq"], v1)}


def _coalesce(grad: BCOO, shape: tuple):
    """torch's ``coalesce`` with a static size: ``(rows, values, n_rows)``.

    The leading ``n_sparse`` axes of ``shape`` are flattened into ``n_rows`` rows; ``rows`` holds
    the distinct touched rows, sorted, padded to ``nse`` with ``n_rows`` (out of range: gathers
    give 0, scatters drop it); ``values[i]`` is the sum of the entries of ``rows[i]`` (in entry order).
    Entries with an index out of range are padding and touch nothing.
    """
    k = grad.n_sparse
    sparse_shape = tuple(shape[:k])
    n_rows = math.prod(sparse_shape)
    x64 = jax.config.jax_enable_x64
    if n_rows >= 2**31 - 1 and not x64:
        raise ValueError(f"SparseAdam: {n_rows} indexed positions need 64-bit indices: enable jax_enable_x64")
    it = jnp.int64 if x64 else jnp.int32
    idx = grad.indices.astype(it)
    nse = idx.shape[0]
    strides = np.array([math.prod(sparse_shape[j + 1:]) for j in range(k)], dtype=np.int64)
    lin = jnp.sum(idx * jnp.asarray(strides, it), axis=1) if k else jnp.zeros((nse,), it)
    valid = jnp.all((idx >= 0) & (idx < jnp.asarray(sparse_shape, it)), axis=1) if k else jnp.ones((nse,), bool)
    lin = jnp.where(valid, lin, n_rows)
    rows, inv = jnp.unique(lin, size=nse, fill_value=n_rows, return_inverse=True)
    values = jax.ops.segment_sum(grad.data, inv.reshape(-1), num_segments=nse)
    return rows, values, n_rows


def sparse_rows(rows_grad, indices, num_rows: int) -> BCOO:
    """The sparse gradient of a table of ``num_rows`` rows, from the gradient with respect to the rows
    gathered at ``indices`` (``table[indices]``, an embedding lookup): torch's
    ``nn.Embedding(sparse=True)`` gradient.

    Args:
      rows_grad: shape ``indices.shape + row_shape`` (e.g. ``(batch, seq, dim)``).
      indices: integer row ids, any shape (e.g. ``(batch, seq)``); repeated ids are fine (summed
        at the step, as torch's ``coalesce``). Ids out of ``[0, num_rows)`` touch nothing (note
        that ``table[ids]`` clamps them: keep ids in range).
      num_rows: the table's number of rows (static).

    Returns a ``BCOO`` of shape ``(num_rows,) + row_shape`` with ``indices.size`` entries
    (``n_sparse=1``, the row dims dense). Jit-able; no host sync.
    """
    rows_grad = jnp.asarray(rows_grad)
    indices = jnp.asarray(indices)
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise TypeError(f"sparse_rows: indices must be integers, got {indices.dtype}")
    lead = indices.ndim
    if tuple(rows_grad.shape[:lead]) != tuple(indices.shape):
        raise ValueError(
            f"sparse_rows: rows_grad has shape {tuple(rows_grad.shape)}; it must start with the indices' "
            f"shape {tuple(indices.shape)} (one gradient row per looked-up id)"
        )
    row_shape = tuple(rows_grad.shape[lead:])
    data = rows_grad.reshape((-1,) + row_shape)
    return BCOO((data, indices.reshape(-1, 1)), shape=(int(num_rows),) + row_shape)


def sparse_rows_from_dense(grad, indices) -> BCOO:
    """The rows ``indices`` of a dense gradient, as a sparse gradient touching exactly those rows.

    For a table whose dense gradient is at hand (e.g. ``jax.grad`` of the whole table) and the ids
    that were looked up: torch would have touched exactly those rows, with the summed gradient that
    the dense one holds. Each distinct id gives one entry (duplicates are dropped, not summed again);
    the result has ``indices.size`` entries, the unused ones padding (out of range). Jit-able.
    """
    grad = jnp.asarray(grad)
    n = grad.shape[0]
    flat = jnp.asarray(indices).reshape(-1)
    if not jnp.issubdtype(flat.dtype, jnp.integer):
        raise TypeError(f"sparse_rows_from_dense: indices must be integers, got {flat.dtype}")
    flat = jnp.where((flat >= 0) & (flat < n), flat, n)
    rows = jnp.unique(flat, size=flat.shape[0], fill_value=n)
    data = grad.at[rows].get(mode="fill", fill_value=0)
    return BCOO((data, rows[:, None]), shape=grad.shape)


def sparse_adam(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, *, maximize=False, params=None, groups=None):
    r"""torch.optim.SparseAdam as an Optax transformation (see :class:`SparseAdamRule`).

    The gradients of its parameters must be BCOO (:func:`sparse_rows`). To train an embedding with
    SparseAdam and the rest with Adam, give groups their own rules::

        tx = groupopt.grouped(params, [groupopt.group("embed", rule=groupopt.SparseAdamRule),
                                       groupopt.group(groupopt.rest(), rule=groupopt.AdamRule)],
                              rule=groupopt.AdamRule, lr=1e-3)
    """
    from ..transform import grouped

    return grouped(params, groups, rule=SparseAdamRule(maximize=maximize), lr=lr, betas=betas, eps=eps)

"""Muon (momentum orthogonalized by Newton-Schulz), as torch.optim.Muon (torch 2.13)."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from .base import Rule, lerp, stored

__all__ = ["MuonRule", "muon", "newton_schulz", "lr_ratio", "ADJUST_LR_FNS", "NS_DTYPES"]

#: ``adjust_lr_fn`` values: torch's constructor accepts the first three; ``"unadjusted"`` (ratio 1)
#: is what torch's ``_adjust_lr`` does for any other value set in a param group.
ADJUST_LR_FNS = (None, "original", "match_rms_adamw", "unadjusted")
#: dtypes the Newton-Schulz iteration can run in (torch: always bfloat16).
NS_DTYPES = ("bfloat16", "float32", "float64")

_HIGHEST = jax.lax.Precision.HIGHEST


def _opmath(dtype):
    """torch's ``opmath_type``: reduced-precision floats compute in float32."""
    return jnp.float32 if jnp.finfo(dtype).bits < 32 else jnp.dtype(dtype)


def lr_ratio(adjust_lr_fn, shape) -> float:
    """torch's ``_adjust_lr`` ratio for a parameter of ``shape`` (``A, B = shape[:2]``), a Python float."""
    a, b = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, a / b))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(a, b))
    return 1.0


def newton_schulz(g, coefficients, steps: int, eps, dtype="bfloat16"):
    r"""torch's ``_zeropower_via_newtonschulz`` with the iteration dtype as a parameter.

    ``X = g`` cast to ``dtype`` (transposed when it has more rows than columns), divided by
    ``max(||X||_F, eps)``, then ``steps`` times: ``A = X X^T``, ``B = b A + c A A``,
    ``X = a X + B X``; transposed back. Matrix products accumulate in float32 for bfloat16
    (torch's CPU/GPU kernels do the same) and each torch operation (``@``, ``addmm``, ``norm``,
    ``div_``) rounds its result to ``dtype`` once. Returns an array of ``dtype``.
    """
    nd = jnp.dtype(dtype)
    acc = _opmath(nd)
    a, b, c = (jnp.asarray(x).astype(acc) for x in coefficients)
    x = g.astype(nd)
    tall = g.shape[0] > g.shape[1]
    if tall:
        x = x.T
    norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(acc)))).astype(nd)
    norm = jnp.maximum(norm, jnp.asarray(eps).astype(nd))
    x = (x.astype(acc) / norm.astype(acc)).astype(nd)
    def body(_, x):
        gram = jnp.matmul(x, x.T, precision=_HIGHEST, preferred_element_type=acc).astype(nd)
        gram2 = jnp.matmul(gram, gram, precision=_HIGHEST, preferred_element_type=acc)
        upd = (b * gram.astype(acc) + c * gram2).astype(nd)
        return (a * x.astype(acc) + jnp.matmul(upd, x, precision=_HIGHEST, preferred_element_type=acc)).astype(nd)

    if steps > 0:  # a loop, not unrolled: compile time does not grow with ns_steps
        x = jax.lax.fori_loop(0, steps, body, x)
    return x.T if tall else x


@dataclasses.dataclass(frozen=True)
class MuonRule(Rule):
    r"""torch.optim.Muon's update, per 2-D parameter (torch 2.13's ``_single_tensor_muon``):

    .. math::
        B &\leftarrow \mathrm{lerp}(B, g, 1 - \mu) = \mu B + (1 - \mu) g
            \quad\text{(an EMA; } B_0 = 0\text{)} \\
        u &= \mathrm{lerp}(g, B, \mu) \text{ if nesterov else } B \\
        O &= \mathrm{NS}^{(a,b,c)}_{k}(u; \epsilon)
            \quad\text{(Newton-Schulz, in } \texttt{ns\_dtype}\text{)} \\
        p &\leftarrow p (1 - \eta\lambda) \quad\text{(decoupled decay, with the un-adjusted lr)} \\
        p &\leftarrow p - \eta\, r(\text{shape})\, O

    (``lr`` :math:`\eta`, ``weight_decay`` :math:`\lambda`, ``momentum`` :math:`\mu`,
    ``ns_coefficients`` :math:`(a, b, c)`, ``ns_steps`` :math:`k`, ``eps`` :math:`\epsilon`).
    :math:`\mathrm{NS}` is :func:`newton_schulz`: :math:`X = u / \max(\|u\|_F, \epsilon)`, then
    :math:`k` times :math:`X \leftarrow aX + (bA + cA^2)X` with :math:`A = XX^T`, on the
    transpose for tall matrices. The ratio :math:`r` of an :math:`(A, B)` matrix is
    :math:`\sqrt{\max(1, A/B)}` (``adjust_lr_fn`` None or ``"original"``),
    :math:`0.2\sqrt{\max(A, B)}` (``"match_rms_adamw"``) or 1 (``"unadjusted"``: torch's
    ``_adjust_lr`` for any other value in a param group); :math:`\eta r` is formed in the
    hyperparameter dtype (torch: Python floats), then cast.

    Structural options (fields): ``nesterov``, ``ns_steps``, ``adjust_lr_fn`` and ``ns_dtype``,
    the dtype of the Newton-Schulz iteration: ``"bfloat16"`` as torch (bit for bit on CPU for small
    matrices; on large ones the float32 accumulation order of the products differs from oneDNN's,
    which flips a rare bfloat16 rounding that the iterations spread: ~0.3-0.7% of the update's
    norm), ``"float32"`` or ``"float64"`` for the exact iteration (bfloat16 is
    1-3% off the float64 result on full-rank inputs, much more on rank-deficient ones).
    Everything else -- the buffer, ``u``, the parameter -- stays in the parameter's dtype, with
    float32 arithmetic for bfloat16/float16 parameters as in torch.

    Only 2-D parameters: a gradient of another rank raises torch's ``Param gradient must be a
    2D matrix`` and ``ns_steps >= 100`` torch's ``Number of steps must be less than 100 for
    computational efficiency``, when the step is traced (before anything changes). State: the
    ``momentum_buffer``; no step count.
    """

    nesterov: bool = True
    ns_steps: int = 5
    adjust_lr_fn: str | None = None
    ns_dtype: str = "bfloat16"

    name: ClassVar[str] = "Muon"
    hyperparams: ClassVar[dict] = {
        "lr": 1e-3,
        "weight_decay": 0.1,
        "momentum": 0.95,
        "ns_coefficients": (3.4445, -4.775, 2.0315),
        "eps": 1e-7,
    }
    cast_coefs: ClassVar[bool] = False

    def __post_init__(self):
        dt = name = self.ns_dtype
        if not isinstance(dt, str):
            try:
                name = jnp.dtype(dt).name
            except TypeError:
                name = None
        if name not in NS_DTYPES:
            raise ValueError(f"MuonRule: ns_dtype must be one of {NS_DTYPES}, got {dt!r}")
        object.__setattr__(self, "ns_dtype", name)
        if isinstance(self.ns_steps, bool) or not isinstance(self.ns_steps, int):
            raise TypeError(f"MuonRule: ns_steps must be an int, got {self.ns_steps!r}")
        if self.adjust_lr_fn not in ADJUST_LR_FNS:
            raise ValueError(f"Adjust learning rate function {self.adjust_lr_fn} is not supported")

    def slot_names(self):
        return ("momentum_buffer",)

    def counts_steps(self):
        return False

    def from_torch_scalars(self, entry):
        # torch keeps no step; the engine's count only records that the buffer exists (>= 1)
        return 1, {}

    def prepare(self, hp, step, scalars):
        lr, mu = hp["lr"], hp["momentum"]
        a, b, c = hp["ns_coefficients"]
        coef = {
            "lr": lr,
            "decay": 1 - lr * hp["weight_decay"],
            "momentum": mu,
            "one_minus_momentum": 1 - mu,
            "a": a,
            "b": b,
            "c": c,
            "eps": hp["eps"],
        }
        return coef, scalars

    def apply(self, grad, p, slots, c):
        if grad.ndim != 2:
            raise ValueError("Param gradient must be a 2D matrix")
        if self.ns_steps >= 100:
            raise ValueError("Number of steps must be less than 100 for computational efficiency")
        for k, what in (("a", "ns_coefficients"), ("b", "ns_coefficients"), ("c", "ns_coefficients"), ("eps", "eps")):
            if jnp.ndim(c[k]) != 0:
                raise ValueError(f"Muon: {what} must be numbers, not per-slice vectors (NS acts on the whole matrix)")
        dt = p.dtype
        op = _opmath(dt)
        g = grad.astype(op)
        buf = lerp(slots["momentum_buffer"].astype(op), g, c["one_minus_momentum"].astype(op)).astype(dt)
        u = lerp(g, buf.astype(op), c["momentum"].astype(op)).astype(dt) if self.nesterov else buf
        o = newton_schulz(u, (c["a"], c["b"], c["c"]), self.ns_steps, c["eps"], self.ns_dtype)
        step = (c["lr"] * lr_ratio(self.adjust_lr_fn, p.shape)).astype(op)
        o = o.astype(dt).astype(op)  # O.to(p.dtype)
        # p.mul_(1 - lr * wd) rounds before p.add_(O, alpha=-adjusted_lr) (an FMA): `stored` keeps
        # XLA from fusing the decay product instead (where O is NaN the result is NaN either way)
        p = stored(p.astype(op) * c["decay"].astype(op), o).astype(dt)
        p = p.astype(op) - step * o
        return p.astype(dt), {"momentum_buffer": buf}


def muon(
    lr=1e-3,
    weight_decay=0.1,
    momentum=0.95,
    nesterov=True,
    ns_coefficients=(3.4445, -4.775, 2.0315),
    eps=1e-7,
    ns_steps=5,
    adjust_lr_fn=None,
    *,
    ns_dtype="bfloat16",
    params=None,
    groups=None,
):
    r"""torch.optim.Muon as an Optax transformation (see :class:`MuonRule` for the update).

    For 2-D parameters only: group the hidden matrices with Muon and the rest (embeddings, head,
    biases, norms) with another rule, e.g. ``groupopt.grouped(params, [groupopt.group(hidden,
    rule=groupopt.MuonRule()), groupopt.group(groupopt.rest(), rule=groupopt.AdamWRule())],
    rule=groupopt.AdamWRule())``. ``ns_dtype`` selects the Newton-Schulz dtype (``"bfloat16"``:
    torch's numbers; ``"float32"``/``"float64"``: the exact iteration).
    """
    from ..transform import grouped

    if adjust_lr_fn not in ADJUST_LR_FNS[:3]:
        raise ValueError(f"Adjust learning rate function {adjust_lr_fn} is not supported")
    return grouped(
        params, groups, rule=MuonRule(nesterov=nesterov, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn, ns_dtype=ns_dtype),
        lr=lr, weight_decay=weight_decay, momentum=momentum, ns_coefficients=ns_coefficients, eps=eps,
    )

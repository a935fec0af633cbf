"""``optimizers.base.lerp`` (Adam's, Adamax's, Muon's and Adafactor's moving averages) against ``torch.lerp`` with a
scalar weight, bit for bit: both of torch's branches (``|w| < 0.5`` and not), signed zeros, subnormals, Inf and NaN,
as the jitted step computes it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from groupopt.optimizers.base import lerp

SPECIAL = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1.0, -1.0, 3.4e38, -3.4e38, 1.2e-38, -1.2e-38], np.float32)
TINY = np.finfo(np.float32).tiny  # XLA on CPU flushes subnormals to zero (docs/core.md): none among the inputs


def _values(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    wide = (rng.standard_normal(4000) * 10.0 ** rng.integers(-30, 30, 4000)).astype(np.float32)
    return np.concatenate([wide, rng.standard_normal(4000).astype(np.float32), SPECIAL])


def _bits(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return np.where(np.isnan(x), np.uint32(0x7FC00000), x.view(np.uint32))  # every NaN alike


@pytest.mark.parametrize("weight", [0.1, 0.0, 0.25, 0.49999997, 0.5, 0.75, 0.9, 1.0, -0.2, 1.5])
def test_lerp_is_torch_lerp_bit_for_bit(weight):
    start = _values(0)
    end = np.random.default_rng(1).permutation(_values(2))
    ours = jax.jit(lerp)(jnp.asarray(start), jnp.asarray(end), jnp.float32(weight))
    theirs = torch.lerp(torch.from_numpy(start), torch.from_numpy(end), weight).numpy()
    ours = np.asarray(ours)
    flushed = (np.abs(theirs) < TINY) & (theirs != 0) & (ours == 0)  # a subnormal result, flushed
    mismatch = np.flatnonzero((_bits(ours) != _bits(theirs)) & ~flushed)
    assert mismatch.size == 0, (weight, start[mismatch[:5]], end[mismatch[:5]], ours[mismatch[:5]],
                                theirs[mismatch[:5]])

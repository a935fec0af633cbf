"""Per-slice hyperparameters for stacked (scan-over-layers) parameters.

A group hyperparameter given as a 1-D array of length ``L`` applies along
axis 0 of every member leaf (each must have a leading axis of size ``L``): the
update of slice ``i`` uses value ``i``, inside one fused elementwise update.
This is how a 48-layer ``nnx.scan`` / linen ``scan`` stack gets layer-wise lr
decay, frozen first layers (lr 0: the slice's values never change) or a
weight decay per layer, at the compile cost of one layer::

    lrs = groupopt.layerwise_decay(1e-3, 0.9, num_layers=48)
    tx = groupopt.adamw(lr=lrs, weight_decay=groupopt.freeze_first(2, 48, 0.05))

Vectors are hyperparameters like any other: they live in the state and can be
replaced with ``set_hyperparams`` (same length) without recompiling.
"""

from __future__ import annotations

import numpy as np

__all__ = ["layerwise_decay", "freeze_first"]


def layerwise_decay(lr: float, decay: float, num_layers: int) -> np.ndarray:
    """``lr_i = lr * decay ** (num_layers - i)`` for layers ``i = 0 .. num_layers - 1`` (deeper layers: larger lr)."""
    if num_layers <= 0:
        raise ValueError(f"num_layers must be positive, got {num_layers}")
    i = np.arange(num_layers, dtype=np.float64)
    return lr * decay ** (num_layers - i)


def freeze_first(k: int, num_layers: int, value) -> np.ndarray:
    """A per-slice vector equal to ``value`` (a number or a vector) with its first ``k`` entries 0.

    As an ``lr`` it freezes the first ``k`` layers of a stack: their slices keep their values exactly.
    """
    if not 0 <= k <= num_layers:
        raise ValueError(f"k must be in [0, {num_layers}], got {k}")
    out = np.broadcast_to(np.asarray(value, dtype=np.float64), (num_layers,)).copy()
    out[:k] = 0.0
    return out

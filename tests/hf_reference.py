"""HF transformers' warmup lambdas, written out as the reference the warmup helpers are tested against."""

import math


def _hf_linear(s, W, N):
    if s < W:
        return float(s) / float(max(1, W))
    return max(0.0, float(N - s) / float(max(1, N - W)))


def _hf_cosine(s, W, N, num_cycles):
    if s < W:
        return float(s) / float(max(1, W))
    progress = float(s - W) / float(max(1, N - W))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)))


def _hf_constant(s, W):
    if s < W:
        return float(s) / float(max(1.0, W))
    return 1.0

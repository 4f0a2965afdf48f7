"""A learned collapse of the n streams at a chain's exit (``MHCConfig.collapse="learned"``).

Where the residual leaves a chain the default reduce takes the mean of the streams. The learned collapse
weighs them per token instead, with a gate computed from the streams themselves, as DeepSeek-V4's
hyper-head does before its final norm (the idea; this is our own formulation, in the paper's notation):

    v = vec(X)                              # [..., n·C], float32
    z = (v @ phi) / rms(v)                  # [..., n]
    w = sigmoid(alpha · z + bias)           # [..., n], one weight per stream
    y = sum_i w_i X_i                       # [..., C]

``bias = logit(1/n)`` and ``alpha = 0`` make ``w = 1/n``: the mean, so a converted model still computes the
original function; ``phi`` is small and random so that ``alpha`` has a gradient from the first step. The
weights are not forced to sum to 1: like the paper's ``H_pre``, they may learn a scale. Plain PyTorch ops,
so autograd, ``torch.export`` and ``torch.compile`` see through it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .coefficients import rms
from .sinkhorn import compute_dtype


def learned_collapse(streams: torch.Tensor, phi: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Reduce ``streams [..., n, C]`` to ``[..., C]`` with per-token sigmoid weights; see the module docstring.

    Args:
        streams: ``[..., n, C]``.  phi: ``[n·C, n]``.  alpha: ``[1]``.  bias: ``[n]``.
    Returns:
        ``[..., C]`` in the dtype of ``streams`` (the gate is computed in float32, float64 for float64).
    """
    acc = compute_dtype(streams.dtype)
    v = streams.flatten(-2).to(acc)
    z = (v @ phi.to(acc)) / rms(v)  # the traceable RMS: this function runs inside graphs, not behind an op
    weights = torch.sigmoid(alpha.to(acc) * z + bias.to(acc))
    return (weights.unsqueeze(-1) * streams.to(acc)).sum(dim=-2).to(streams.dtype)


class CollapseParams(nn.Module):
    """Parameters of one learned collapse: ``phi [n·C, n]``, ``alpha [1]``, ``bias [n]``, initialised to the mean.

    Args:
        n: number of streams.  channels: C.  module_path: the exit's site, kept for display.
        device: where the parameters live.
    """

    def __init__(self, n: int, channels: int, module_path: str = "", device: torch.device | None = None):
        super().__init__()
        self.n, self.channels, self.module_path = n, channels, module_path
        self.phi = nn.Parameter(torch.randn(n * channels, n, device=device) / math.sqrt(n * channels))
        self.alpha = nn.Parameter(torch.zeros(1, device=device))
        self.bias = nn.Parameter(torch.full((n,), -math.log(n - 1), device=device))  # sigmoid = 1/n

    def extra_repr(self) -> str:
        return f"n={self.n}, channels={self.channels}, module_path={self.module_path!r}"

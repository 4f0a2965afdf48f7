"""Sinkhorn-Knopp projection of n x n logits onto (nearly) doubly-stochastic matrices.

Reference implementation and its registration as ``torch.ops.mhc.sinkhorn_knopp``.

    M(0) = exp(L - max(L))          # one shift per matrix: scaling M by a constant changes nothing below
    repeat iters times:
        M = M / column_sums(M)      # columns sum to 1
        M = M / row_sums(M)         # rows sum to 1 (exact after the last step)

The math runs in float32 (float64 inputs stay float64) whatever the input dtype.
The backward recomputes the unrolled iterations and differentiates through all of them (exact, as in the
paper's §4.3), derived by hand in :func:`sinkhorn_knopp_backward_ref`.
"""

from __future__ import annotations

import torch

# A column (or row) whose entries all underflow to zero is divided by this instead of by zero.
_TINY = 1e-30


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the coefficient and Sinkhorn math runs in: float64 stays float64, all else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sinkhorn_knopp_ref(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Pure-PyTorch Sinkhorn-Knopp; differentiable through every iteration.

    Args:
        logits: ``[..., n, n]`` in any float dtype.
        iters: number of (column, row) normalisation rounds (the paper uses 20).
    Returns:
        ``[..., n, n]`` in float32 (float64 for float64 input): non-negative, rows sum to 1,
        columns to 1 within the convergence of ``iters`` rounds.
    """
    x = logits.to(compute_dtype(logits.dtype))
    shift = x.detach().amax(dim=(-2, -1), keepdim=True)
    m = torch.exp(x - shift)
    for _ in range(iters):
        m = m / m.sum(dim=-2, keepdim=True).clamp_min(_TINY)
        m = m / m.sum(dim=-1, keepdim=True).clamp_min(_TINY)
    return m


@torch.library.custom_op("mhc::sinkhorn_knopp", mutates_args=())
def sinkhorn_knopp(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Sinkhorn-Knopp of ``logits [..., n, n]``; see :func:`sinkhorn_knopp_ref`."""
    return sinkhorn_knopp_ref(logits, iters)


@sinkhorn_knopp.register_fake
def _(logits, iters):
    return logits.new_empty(logits.shape, dtype=compute_dtype(logits.dtype))


def sinkhorn_knopp_backward_ref(grad: torch.Tensor, logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Exact gradient of :func:`sinkhorn_knopp_ref` w.r.t. ``logits``, recomputing the iterations.

    Work with gradients w.r.t. the logarithms, ``G = dL/dlog(M) = dL/dM * M``. A normalisation
    ``Y = M / s`` with ``s = sum_dim(M)`` is ``log Y = log M - log s``, and ``dlog s / dlog M_j = Y_j``, so

        G_M = G_Y - Y * sum_dim(G_Y)

    with no division: every quantity stays bounded even where entries underflow (a division-based backward
    overflows there). The forward is replayed once to keep each normalisation's output Y; then
    ``G = grad * M_final``, each step is reversed, and ``dL/dlogits = G_M0`` since ``log M0 = logits - max``
    (the max is a constant shift that no normalised result depends on).
    """
    x = logits.to(compute_dtype(logits.dtype))
    m = torch.exp(x - x.amax(dim=(-2, -1), keepdim=True))
    outputs = []
    for _ in range(iters):
        for dim in (-2, -1):
            m = m / m.sum(dim=dim, keepdim=True).clamp_min(_TINY)
            outputs.append((m, dim))
    g = grad.to(x.dtype) * m
    for out, dim in reversed(outputs):
        g = g - out * g.sum(dim=dim, keepdim=True)
    return g.to(logits.dtype)


@torch.library.custom_op("mhc::sinkhorn_knopp_backward", mutates_args=())
def sinkhorn_knopp_backward(grad: torch.Tensor, logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Gradient of :func:`sinkhorn_knopp` w.r.t. ``logits``; see :func:`sinkhorn_knopp_backward_ref`."""
    return sinkhorn_knopp_backward_ref(grad, logits, iters)


@sinkhorn_knopp_backward.register_fake
def _(grad, logits, iters):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output):
    logits, iters = inputs
    ctx.save_for_backward(logits)
    ctx.iters = iters


def _backward(ctx, grad):
    (logits,) = ctx.saved_tensors
    return torch.ops.mhc.sinkhorn_knopp_backward(grad, logits, ctx.iters), None


sinkhorn_knopp.register_autograd(_backward, setup_context=_setup_context)

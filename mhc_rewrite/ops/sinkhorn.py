"""Sinkhorn-Knopp projection of n x n logits onto (nearly) doubly-stochastic matrices.

Reference implementation and its registration as ``torch.ops.mhc.sinkhorn_knopp``.

    round 1, in the log domain (exact for any logit scale):
        l = L - logsumexp_columns(L)        # columns sum to 1
        M = exp(l - logsumexp_rows(l))      # rows sum to 1
    repeat iters - 1 times:
        M = M / column_sums(M)
        M = M / row_sums(M)                 # rows sum to 1 (exact after the last step)

This is the paper's iteration (§4.2: ``M(0) = exp(L)``, alternating column and row normalisation) with its first
round taken in logarithms. The first round is where large logits would underflow: with one shift per matrix,
``exp(L - max L)`` rounds whole rows to zero once a row's logits sit ~100 below the matrix maximum (fp32), and
those rows stay zero. After the log-domain round every entry is at most 1, every row sums to 1 and every column
sums to at least ``1/n²`` (a column's largest entry is at least ``-log n`` after its normalisation and each row
lost at most ``log n``); each later normalisation divides by a sum between ``1/n`` and ``n``, so no row or column
can vanish and no division by zero can happen. For ordinary logits the result is the plain iteration's, up to
rounding. Guarantees: entries in ``[0, 1]``, rows sum to 1 (rounding), no all-zero row or column; columns sum to 1
only as far as ``iters`` rounds converge (slowly when logits are large: see BENCHMARKS.md).

The math runs in float32 (float64 inputs stay float64) whatever the input dtype. The backward recomputes the
rounds and differentiates through all of them (exact, as in the paper's §4.3), derived in
:func:`sinkhorn_knopp_backward_ref`. The op itself runs :func:`sinkhorn_forward` / :func:`sinkhorn_backward`, the
same arithmetic with the tokens on the last, contiguous axis, so that every step is one vectorised op.
"""

from __future__ import annotations

from typing import Optional

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the coefficient and Sinkhorn math runs in: float64 stays float64, all else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_iters(iters: int) -> None:
    if iters < 1:
        raise ValueError(f"Sinkhorn-Knopp needs at least one round, got iters={iters}")


def sinkhorn_knopp_ref(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Pure-PyTorch Sinkhorn-Knopp, written plainly; differentiable through every round.

    Args:
        logits: ``[..., n, n]`` in any float dtype.
        iters: number of (column, row) normalisation rounds (the paper uses 20), at least 1.
    Returns:
        ``[..., n, n]`` in float32 (float64 for float64 input): entries in ``[0, 1]``, rows sum to 1,
        columns to 1 within the convergence of ``iters`` rounds and never to 0.
    """
    _check_iters(iters)
    x = logits.to(compute_dtype(logits.dtype))
    x = x - torch.logsumexp(x, dim=-2, keepdim=True)
    m = torch.exp(x - torch.logsumexp(x, dim=-1, keepdim=True))
    for _ in range(iters - 1):
        m = m / m.sum(dim=-2, keepdim=True)
        m = m / m.sum(dim=-1, keepdim=True)
    return m


def sinkhorn_knopp_backward_ref(grad: torch.Tensor, logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Exact gradient of :func:`sinkhorn_knopp_ref` w.r.t. ``logits``, recomputing the rounds.

    Work with gradients w.r.t. the logarithms, ``G = dL/dlog(M) = dL/dM * M``. A normalisation
    ``Y = M / s`` with ``s = sum_dim(M)`` is ``log Y = log M - log s``, and ``dlog s / dlog M_j = Y_j``, so

        G_M = G_Y - Y * sum_dim(G_Y)

    with no division: every quantity stays bounded even where entries underflow. The same step holds for the
    log-domain first round (``logsumexp`` is ``log s``). The forward is replayed once to keep each
    normalisation's output Y; then ``G = grad * M_final``, each step is reversed, and ``dL/dlogits = G_M0``
    since ``log M0 = logits``.
    """
    _check_iters(iters)
    x = logits.to(compute_dtype(logits.dtype))
    l_col = x - torch.logsumexp(x, dim=-2, keepdim=True)
    m = torch.exp(l_col - torch.logsumexp(l_col, dim=-1, keepdim=True))
    outputs = [(torch.exp(l_col), -2), (m, -1)]
    for _ in range(iters - 1):
        for dim in (-2, -1):
            m = m / m.sum(dim=dim, keepdim=True)
            outputs.append((m, dim))
    g = grad.to(x.dtype) * m
    for out, dim in reversed(outputs):
        g = g - out * g.sum(dim=dim, keepdim=True)
    return g.to(logits.dtype)


# --- the fast path: tokens last ------------------------------------------------------------------------
# A [T, n, n] batch reduces over axes of size n; laid out as [n (row), n (column), T] every column sum (over
# axis 0) and row sum (over axis 1) is a sum of n contiguous length-T vectors, which vectorises, and each
# step is one in-place op. The arithmetic is the reference's, step for step.


def _token_last(x: torch.Tensor) -> torch.Tensor:
    """``[..., n, n]`` -> ``[n, n, T]`` contiguous, in the compute dtype."""
    n = x.shape[-1]
    return x.to(compute_dtype(x.dtype)).reshape(-1, n, n).permute(1, 2, 0).contiguous()


def _token_first(m: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``[n, n, T]`` -> ``[..., n, n]`` contiguous."""
    return m.permute(2, 0, 1).reshape(shape).contiguous()


def _rounds(x: torch.Tensor, iters: int, steps: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sinkhorn of token-last logits ``x [n, n, T]``; writes each step's output to ``steps[s]`` if given."""
    l_col = x - torch.logsumexp(x, dim=0, keepdim=True)
    if steps is not None:
        torch.exp(l_col, out=steps[0])
    m = torch.exp(l_col.sub_(torch.logsumexp(l_col, dim=1, keepdim=True)), out=None if steps is None else steps[1])
    col_sum = m.new_empty((1, *m.shape[1:]))
    row_sum = m.new_empty((m.shape[0], 1, m.shape[2]))
    for r in range(1, iters):
        torch.sum(m, dim=0, keepdim=True, out=col_sum)
        m = torch.div(m, col_sum, out=steps[2 * r]) if steps is not None else m.div_(col_sum)
        torch.sum(m, dim=1, keepdim=True, out=row_sum)
        m = torch.div(m, row_sum, out=steps[2 * r + 1]) if steps is not None else m.div_(row_sum)
    return m


def sinkhorn_forward(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """:func:`sinkhorn_knopp_ref` without autograd, in a handful of large ops per round (same results)."""
    _check_iters(iters)
    return _token_first(_rounds(_token_last(logits), iters), logits.shape)


def sinkhorn_backward(grad: torch.Tensor, logits: torch.Tensor, iters: int) -> torch.Tensor:
    """:func:`sinkhorn_knopp_backward_ref` in batched ops: one replay keeping the steps, then two ops per step."""
    _check_iters(iters)
    x = _token_last(logits)
    steps = x.new_empty((2 * iters, *x.shape))
    m = _rounds(x, iters, steps)
    g = _token_last(grad) * m  # never in place: for one matrix, _token_last may return a view of grad
    col_sum = g.new_empty((1, *g.shape[1:]))
    row_sum = g.new_empty((g.shape[0], 1, g.shape[2]))
    for s in reversed(range(2 * iters)):
        total = torch.sum(g, dim=0 if s % 2 == 0 else 1, keepdim=True, out=col_sum if s % 2 == 0 else row_sum)
        g.addcmul_(steps[s], total, value=-1)
    return _token_first(g, logits.shape).to(logits.dtype)


@torch.library.custom_op("mhc::sinkhorn_knopp", mutates_args=())
def sinkhorn_knopp(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Sinkhorn-Knopp of ``logits [..., n, n]``; see :func:`sinkhorn_knopp_ref`."""
    return sinkhorn_forward(logits, iters)


@sinkhorn_knopp.register_fake
def _(logits, iters):
    return logits.new_empty(logits.shape, dtype=compute_dtype(logits.dtype))


@torch.library.custom_op("mhc::sinkhorn_knopp_backward", mutates_args=())
def sinkhorn_knopp_backward(grad: torch.Tensor, logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Gradient of :func:`sinkhorn_knopp` w.r.t. ``logits``; see :func:`sinkhorn_knopp_backward_ref`."""
    return sinkhorn_backward(grad, logits, iters)


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

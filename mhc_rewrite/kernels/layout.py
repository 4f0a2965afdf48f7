"""Shared Triton helpers: the flat layout of one token's mHC logits, gates, and Sinkhorn-Knopp in registers.

A token's ``M = n² + 2n`` logits live in one register row of width ``MP`` (a power of two >= 16, so that ``tl.dot``
applies): columns ``[0, n)`` are pre, ``[n, 2n)`` post, ``[2n, 2n + n²)`` the row-major n x n res matrix, the rest
padding. Row and column sums of the res block are products with constant 0/1 matrices ``same_row`` / ``same_col``
(``[MP, MP]``): ``(m @ same_col)[t, k]`` is the sum of the column that ``k`` belongs to, broadcast back to ``k``.
The dots use ``input_precision="ieee"``: TF32 would round the entries and break the exact row sums.
"""

import triton
import triton.language as tl


@triton.jit
def flat_layout(N: tl.constexpr, MP: tl.constexpr):
    """Column index ``k`` of the flat row and its masks; ``row``/``col`` of the res entries (-1/-2 elsewhere)."""
    k = tl.arange(0, MP)
    is_pre = k < N
    is_post = (k >= N) & (k < 2 * N)
    is_res = (k >= 2 * N) & (k < 2 * N + N * N)
    row = tl.where(is_res, (k - 2 * N) // N, -1)
    col = tl.where(is_res, (k - 2 * N) % N, -2)
    return k, is_pre, is_post, is_res, row, col


@triton.jit
def group_matrices(is_res, row, col):
    """``same_row[a, b]``, ``same_col[a, b]``: 1.0 where res entries a and b share a row (a column)."""
    both = is_res[:, None] & is_res[None, :]
    same_row = ((row[:, None] == row[None, :]) & both).to(tl.float32)
    same_col = ((col[:, None] == col[None, :]) & both).to(tl.float32)
    return same_row, same_col


@triton.jit
def _group_logsumexp(x, group, is_res):
    """``logsumexp`` of each res entry's group (row or column, by ``group``), broadcast back to the entry."""
    # the group's largest entry: over a of x[t, a] where group[a, b], a [BLOCK_T, MP, MP] register tile
    peak = tl.max(tl.where(group[None, :, :] > 0, x[:, :, None], -float("inf")), axis=1)
    peak = tl.where(is_res[None, :], peak, 0.0)
    e = tl.where(is_res[None, :], tl.exp(x - peak), 0.0)
    return peak + tl.log(tl.where(is_res[None, :], tl.dot(e, group, input_precision="ieee"), 1.0))


@triton.jit
def sinkhorn_first_round(logits, is_res, same_row, same_col):
    """The log-domain first round of ops/sinkhorn.py on the res block: ``(Y_col, M)``, the outputs of its column
    step and of its row step (zero outside the res block). Exact for any logit scale: no entry is rounded to 0
    before it is normalised."""
    x = tl.where(is_res[None, :], logits, 0.0)
    x = tl.where(is_res[None, :], x - _group_logsumexp(x, same_col, is_res), 0.0)
    y_col = tl.where(is_res[None, :], tl.exp(x), 0.0)
    x = x - _group_logsumexp(x, same_row, is_res)
    return y_col, tl.where(is_res[None, :], tl.exp(x), 0.0)


@triton.jit
def normalise(m, group, is_res):
    """Divide each res entry by the sum of its group (row or column, by ``group``); after the first round every
    such sum lies in [1/n, n] (ops/sinkhorn.py), so the division is safe."""
    sums = tl.dot(m, group, input_precision="ieee")
    return tl.where(is_res[None, :], m / tl.where(is_res[None, :], sums, 1.0), 0.0)


@triton.jit
def gains(ALPHA, is_pre, is_post, is_res):
    """The per-column gain: ``a_pre``, ``a_post`` or ``a_res``."""
    a_pre = tl.load(ALPHA)
    a_post = tl.load(ALPHA + 1)
    a_res = tl.load(ALPHA + 2)
    return tl.where(is_pre, a_pre, tl.where(is_post, a_post, tl.where(is_res, a_res, 0.0)))


@triton.jit
def tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0

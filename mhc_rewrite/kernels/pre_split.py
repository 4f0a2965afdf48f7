"""Triton kernels: the fused pre-mix as a split-K projection on tensor cores plus a tail (the forward).

The one-pass kernel of ``fused_pre.py`` does everything per 32-token block over the whole of K = n·C (512 programs at
16384 tokens) with a float32 ``tl.dot`` on CUDA cores. Here the work is split the way the fast training kernels split
it (issue 24; X is read twice, the traffic floor of a two-pass design):

  1. ``_project``: grid (token blocks, SPLIT_K). A program reads a ``[BLOCK_M, BLOCK_K]`` tile of ``vec(X)`` at a
     time over its share of K, takes the sum of squares from the tile it loaded (overflow-safe, as ``_add_squares``)
     and multiplies the tile with phi on tensor cores (``tf32.dot``, float32 accuracy by default). It writes its
     partial ``u = vec(x) @ phi`` to ``[SPLIT_K, T, MP]`` and its ``(scale, sumsq)`` to ``[SPLIT_K, T]``, float32.
  2. ``_tail``: grid (token blocks,). Sums the partials in split order, divides by the RMS, applies gains and bias,
     the gates and the log-domain-first Sinkhorn of ``layout.py`` (the one-pass kernel's, ``ITERS`` rounds), stores
     ``H_pre/H_post/H_res`` (float32) and aggregates ``y = sum_i H_pre[i] x[i]`` over C in blocks.

Deterministic partials, not atomics (the default, and the only mode built): every run gives the same bits, and the
cost is small at the benchmark shape (16384 tokens, n = 4, C = 4096): the partials are SPLIT_K·T·MP·4 bytes (8 MB at
SPLIT_K = 4), 1.5 % of the 537 MB the projection must read, written once and read once by the tail. Atomics would
need a zeroed output (one more launch), make the coefficients differ in their last bits from run to run, and could
not carry the overflow-safe ``(scale, sumsq)`` pair. The "deterministic is 1.7x slower" of a public Triton
implementation came from a variant with one K block per token block (few programs), not from partials.

The backward is in ``pre_split_backward.py``. Reached through ``mhc::fused_pre_mix`` when ``MHC_PRE_MIX_KERNEL=split``
(``ops/fused.py``); the one-pass kernel stays the default until this pair beats it on a GPU in the same run.
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..constants import RMS_EPS
from .layout import flat_layout, gains, group_matrices, normalise, sinkhorn_first_round, tanh
from .tf32 import PRECISIONS, TF32_EXACT, dot


def padded_width(n: int) -> int:
    """The flat logit row's width MP: n² + 2n padded to a power of two >= 16 (``layout.py``)."""
    return max(16, triton.next_power_of_2(n * n + 2 * n))

@triton.jit
def _add_squares(scale, sumsq, x):
    """Running ``sum((x / scale)²)`` per row with ``scale = max(1, largest |x| so far)`` (as fused_pre.py): no
    overflow for any finite x, the plain sum while |x| <= 1."""
    new_scale = tl.maximum(scale, tl.max(tl.abs(x), axis=1))
    ratio = scale / new_scale
    xs = x * (1.0 / new_scale)[:, None]
    return new_scale, sumsq * ratio * ratio + tl.sum(xs * xs, axis=1)


@triton.jit
def _project(
    X,  # [T, K] the streams of each token flattened (K = N*C), contiguous, any float dtype
    PHI,  # [K, M] float32 projection [pre | post | res]
    DY,  # [T, C] gradient of the block input (WITH_DY), else unused
    PART,  # [SPLIT_K, T, MP] float32 out: partial vec(x) @ phi
    GPART,  # [SPLIT_K, T, MP] float32 out (WITH_DY): partial sum_c dy[c]·x[i, c] in column i < N
    SCALE, SUMSQ,  # [SPLIT_K, T] float32 out: the partial sum of squares, (scale, sum((x/scale)²))
    T, C, K_PER_SPLIT,  # tokens, channels, K entries per split (a multiple of BLOCK_K)
    N: tl.constexpr, MP: tl.constexpr,  # streams, padded logit width
    WITH_DY: tl.constexpr,
    X_EXACT: tl.constexpr,  # whether X's dtype is exact in TF32 (bf16, fp16)
    PRECISION: tl.constexpr, EMULATE: tl.constexpr,  # see tf32.dot
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,  # BLOCK_K <= C: a tile spans at most two streams
):
    M: tl.constexpr = N * N + 2 * N
    K = N * C
    pid_k = tl.program_id(1)
    t = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    tmask = t < T
    rows = t.to(tl.int64)
    col = tl.arange(0, MP)
    cmask = col < M
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(K, k_lo + K_PER_SPLIT)
    acc = tl.zeros([BLOCK_M, MP], dtype=tl.float32)
    g = tl.zeros([BLOCK_M, MP], dtype=tl.float32)
    scale = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    sumsq = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < k_hi
        mask = tmask[:, None] & kmask[None, :]
        x = tl.load(X + rows[:, None] * K + kk[None, :], mask=mask, other=0.0).to(tl.float32)
        scale, sumsq = _add_squares(scale, sumsq, x)
        phi = tl.load(PHI + kk[:, None] * M + col[None, :], mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = dot(x, phi, acc, X_EXACT, False, PRECISION, EMULATE)
        if WITH_DY:
            dy = tl.load(DY + rows[:, None] * C + (kk % C)[None, :], mask=mask, other=0.0).to(tl.float32)
            xdy = x * dy
            first = k0 // C  # the stream of the tile's first entry; the rest lie in it or the next one
            in_first = tl.sum(tl.where((kk < (first + 1) * C)[None, :], xdy, 0.0), axis=1)
            rest = tl.sum(xdy, axis=1) - in_first
            g += in_first[:, None] * (col == first).to(tl.float32)[None, :]
            g += rest[:, None] * (col == first + 1).to(tl.float32)[None, :]
    out = (pid_k * T + rows)[:, None] * MP + col[None, :]
    tl.store(PART + out, acc, mask=tmask[:, None])
    tl.store(SCALE + pid_k * T + rows, scale, mask=tmask)
    tl.store(SUMSQ + pid_k * T + rows, sumsq, mask=tmask)
    if WITH_DY:
        tl.store(GPART + out, g, mask=tmask[:, None] & (col < N)[None, :])


@triton.jit
def sum_partials(PART, SCALE, SUMSQ, t, tmask, T, SPLIT_K, D, EPS: tl.constexpr, MP: tl.constexpr,
                  BLOCK_T: tl.constexpr):
    """``(u [BLOCK_T, MP], rms [BLOCK_T])`` from the projection's partials, the splits summed in order."""
    col = tl.arange(0, MP)
    rows = t.to(tl.int64)
    u = tl.zeros([BLOCK_T, MP], dtype=tl.float32)
    scale = tl.full([BLOCK_T], 1.0, dtype=tl.float32)
    sumsq = tl.zeros([BLOCK_T], dtype=tl.float32)
    for s in range(0, SPLIT_K):
        u += tl.load(PART + (s * T + rows)[:, None] * MP + col[None, :], mask=tmask[:, None], other=0.0)
        s_scale = tl.load(SCALE + s * T + rows, mask=tmask, other=1.0)
        s_sumsq = tl.load(SUMSQ + s * T + rows, mask=tmask, other=0.0)
        new_scale = tl.maximum(scale, s_scale)
        old_ratio, s_ratio = scale / new_scale, s_scale / new_scale
        sumsq = sumsq * old_ratio * old_ratio + s_sumsq * s_ratio * s_ratio
        scale = new_scale
    return u, scale * tl.sqrt(sumsq / D + EPS / scale / scale)


@triton.jit
def _tail(
    X,  # [T, N, C] streams
    PART, SCALE, SUMSQ,  # the projection's partials (_project)
    ALPHA,  # [3] float32 gains (pre, post, res)
    BIAS,  # [M] float32
    Y,  # [T, C] out: the block input, X's dtype
    HPRE, HPOST, HRES,  # [T, N], [T, N], [T, N*N] out, float32
    T, C, SPLIT_K,
    EPS: tl.constexpr,  # RMSNorm epsilon (constexpr: Inductor passes a Python float as fp64)
    N: tl.constexpr, NP: tl.constexpr, MP: tl.constexpr,  # streams, next power of 2, padded logit width
    ITERS: tl.constexpr, MODE: tl.constexpr,  # Sinkhorn rounds; 0: mhc, 1: hc
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    M: tl.constexpr = N * N + 2 * N
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < T
    rows = t.to(tl.int64)
    k, is_pre, is_post, is_res, row, col = flat_layout(N, MP)
    kmask = k < M
    u, rms = sum_partials(PART, SCALE, SUMSQ, t, tmask, T, SPLIT_K, N * C, EPS, MP, BLOCK_T)
    z = u / rms[:, None]
    gain = gains(ALPHA, is_pre, is_post, is_res)
    b = tl.load(BIAS + k, mask=kmask, other=0.0)
    if MODE == 0:
        logits = z * gain[None, :] + b[None, :]
        sig = tl.sigmoid(logits)
        same_row, same_col = group_matrices(is_res, row, col)
        _y_col, m = sinkhorn_first_round(logits, is_res, same_row, same_col)
        for _round in range(ITERS - 1):
            m = normalise(m, same_col, is_res)
            m = normalise(m, same_row, is_res)
        h = tl.where(is_pre[None, :], sig, tl.where(is_post[None, :], 2.0 * sig, m))
    else:
        h = b[None, :] + gain[None, :] * tanh(z)
    tk = tmask[:, None]
    tl.store(HPRE + rows[:, None] * N + k[None, :], h, mask=tk & is_pre[None, :])
    tl.store(HPOST + rows[:, None] * N + (k[None, :] - N), h, mask=tk & is_post[None, :])
    tl.store(HRES + rows[:, None] * (N * N) + (k[None, :] - 2 * N), h, mask=tk & is_res[None, :])
    # H_pre in the stream layout [BLOCK_T, NP], picked out of the flat row in registers (exact: one 1.0 per column)
    i = tl.arange(0, NP)
    imask = i < N
    pick = ((k[:, None] == i[None, :]) & imask[None, :]).to(tl.float32)  # [MP, NP]
    h_pre = tl.sum(h[:, :, None] * pick[None, :, :], axis=1)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < C
        offs = rows[:, None, None] * (N * C) + i[None, :, None] * C + c[None, None, :]
        xmask = tmask[:, None, None] & imask[None, :, None] & cmask[None, None, :]
        x = tl.load(X + offs, mask=xmask, other=0.0).to(tl.float32)
        y = tl.sum(h_pre[:, :, None] * x, axis=1)
        tl.store(Y + rows[:, None] * C + c[None, :], y.to(Y.dtype.element_ty), mask=tk & cmask[None, :])


# --- launchers ---------------------------------------------------------------------------------------------------

# Defaults by the padded logit width MP (``padded_width(n)``: 16 for n <= 3, 32 for n = 4, 128 for n = 8), chosen
# without a GPU from ptxas's registers and spills for sm_90 (``compile_for_gpu.py --sweep``, BENCHMARKS.md): the
# largest tiles tried that spill nothing. The accumulators are [BLOCK_M, MP] (two of them with d_y) and the tail's
# Sinkhorn tile is [BLOCK_T, MP, MP], so both shrink as MP grows. SPLIT_K / SPLIT_M aim at ~1024 programs. Not yet
# timed on a GPU.
def default_blocks(n: int) -> tuple[dict, dict, dict]:
    """``(project, tail, dx)`` blocks for ``n`` streams."""
    mp = padded_width(n)
    project = dict(block_m=64 if mp <= 32 else 32, block_k=32, programs=1024, num_warps=4)
    tail = dict(block_t=min(16, max(1, 8192 // (mp * mp))), block_c=128, num_warps=4)
    dx = dict(block_m=min(32, 2048 // mp), block_k=32, programs=1024, num_warps=4)
    return project, tail, dx


def _block_k(C: int, block_k: int) -> int:
    """The largest power of two <= block_k and <= C (a tile then spans at most two streams), at least 16."""
    fit = 1 << (max(C, 1).bit_length() - 1)
    return max(16, min(block_k, fit))


def supports(C: int) -> bool:
    """Whether the split kernels take this width (tiles of 16 entries of K must span at most two streams)."""
    return C >= 16


def split_k_of(T: int, K: int, C: int, blocks: dict) -> tuple[int, int, int]:
    """``(split_k, k_per_split, block_k)`` of the projection for ``T`` tokens of ``K = n·C`` entries."""
    block_k = _block_k(C, blocks["block_k"])
    token_blocks = triton.cdiv(T, blocks["block_m"])
    split_k = blocks.get("split_k") or triton.cdiv(blocks["programs"], token_blocks)
    split_k = max(1, min(triton.cdiv(K, block_k), split_k))
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k
    return triton.cdiv(K, k_per_split), k_per_split, block_k


def projection(x, phi, d_y, n, precision, emulate, blocks):
    """Launch ``_project`` on ``x [T, n, C]``: ``(part, gpart, scale, sumsq, split_k)``; ``gpart`` is None without
    ``d_y [T, C]`` (the backward's recompute passes it)."""
    assert precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {precision!r}"
    T, C = x.shape[0], x.shape[2]
    K, mp = n * C, padded_width(n)
    split_k, k_per_split, block_k = split_k_of(T, K, C, blocks)
    f32 = dict(device=x.device, dtype=torch.float32)
    part = torch.empty((split_k, T, mp), **f32)
    gpart = torch.zeros((split_k, T, mp), **f32) if d_y is not None else part
    scale, sumsq = torch.empty((split_k, T), **f32), torch.empty((split_k, T), **f32)
    wrap_triton(_project)[(triton.cdiv(T, blocks["block_m"]), split_k)](
        x, phi, x if d_y is None else d_y, part, gpart, scale, sumsq, T, C, k_per_split, N=n, MP=mp,
        WITH_DY=d_y is not None, X_EXACT=x.dtype in TF32_EXACT, PRECISION=precision, EMULATE=emulate,
        BLOCK_M=blocks["block_m"], BLOCK_K=block_k, num_warps=blocks["num_warps"])
    return part, (gpart if d_y is not None else None), scale, sumsq, split_k


def pre_mix_split_fwd(streams, phi, alpha, bias, n, iters, mode, precision="split", emulate_tf32=False,
                      project_blocks=None, tail_blocks=None):
    """Launch the forward pair (dynamic sites).

    Args:
        streams: ``[..., n, C]`` (C >= 16), any float dtype.  phi: ``[n·C, n²+2n]`` float32, contiguous.
        alpha: ``[3]``.  bias: ``[n²+2n]``.  iters: Sinkhorn rounds.  mode: "mhc" or "hc".
        precision: the projection's products (``tf32.py``): "split" (default), "tf32", "ieee".
        emulate_tf32: truncate TF32 operands as the tensor core does (for the interpreter's tests).
        project_blocks / tail_blocks: overrides of ``default_blocks(n)`` (``split_k`` may be given).

    Returns:
        ``(y [..., C] in the streams' dtype, h_pre [..., n], h_post [..., n], h_res [..., n, n])``, coefficients
        float32.
    """
    assert streams.shape[-2] == n, f"expected {n} streams, got shape {tuple(streams.shape)}"
    lead, C = streams.shape[:-2], streams.shape[-1]
    assert supports(C), f"the split pre-mix needs C >= 16, got {C}"
    assert phi.shape == (n * C, n * n + 2 * n) and phi.dtype == torch.float32 and phi.is_contiguous()
    x = streams.reshape(-1, n, C).contiguous()
    T = x.shape[0]
    project, tail, _ = default_blocks(n)
    part, _, scale, sumsq, split_k = projection(x, phi, None, n, precision, emulate_tf32,
                                                {**project, **(project_blocks or {})})
    tb = {**tail, **(tail_blocks or {})}
    block_c = min(tb["block_c"], triton.next_power_of_2(C))
    f32 = dict(device=x.device, dtype=torch.float32)
    y = torch.empty((T, C), device=x.device, dtype=x.dtype)
    h_pre, h_post, h_res = torch.empty((T, n), **f32), torch.empty((T, n), **f32), torch.empty((T, n * n), **f32)
    wrap_triton(_tail)[(triton.cdiv(T, tb["block_t"]),)](
        x, part, scale, sumsq, alpha.float().contiguous(), bias.float().contiguous(), y, h_pre, h_post, h_res,
        T, C, split_k, EPS=RMS_EPS, N=n, NP=triton.next_power_of_2(n), MP=padded_width(n), ITERS=iters,
        MODE=0 if mode == "mhc" else 1, BLOCK_T=tb["block_t"], BLOCK_C=block_c, num_warps=tb["num_warps"])
    return y.reshape(*lead, C), h_pre.reshape(*lead, n), h_post.reshape(*lead, n), h_res.reshape(*lead, n, n)


__all__ = ["default_blocks", "pre_mix_split_fwd", "projection", "split_k_of", "supports"]

"""Triton kernels: the fused pre-mix as a split-K projection on tensor cores plus a tail (forward and backward).

The one-pass kernel of ``fused_pre.py`` does everything per 32-token block over the whole of K = n·C (512 programs at
16384 tokens) with an fp32 ``tl.dot`` on CUDA cores. Here the work is split the way the fast training kernels split
it (BENCHMARKS.md, "Two-kernel pre-mix"):

Forward
  1. ``_project``: grid (token blocks, SPLIT_K). A program reads a ``[BLOCK_M, BLOCK_K]`` tile of ``vec(X)`` at a
     time over its share of K, takes the sum of squares from the tile it loaded (overflow-safe, as ``_add_squares``)
     and multiplies it with phi on tensor cores. It writes its partial ``u = vec(x) @ phi`` to ``[SPLIT_K, T, MP]``
     and its ``(scale, sumsq)`` to ``[SPLIT_K, T]``, all float32.
  2. ``_tail``: grid (token blocks,). Sums the partials, divides by the RMS, applies gains and bias, the gates and
     the log-domain-first Sinkhorn (``layout.py``), stores ``H_pre/H_post/H_res`` (float32) and aggregates
     ``y = sum_i H_pre[i] x[i]`` over C in blocks.

Deterministic partials, not atomics (the default and the only mode): every run gives the same bits, and the cost is
small at the benchmark shape: the partials are SPLIT_K·T·MP·4 bytes (8 MB at SPLIT_K = 4), 1.5 % of the 537 MB that
the projection must read, written once and read once by the tail. Atomics would need a zeroed output (one more
launch), would make the coefficients differ in their last bits from run to run, and cannot carry the overflow-safe
``(scale, sumsq)`` pair. TensorRT's and TE's "deterministic is 1.7x slower" came from a variant with one K block
(few programs), not from the partials themselves.

Tensor cores at fp32 accuracy (``_dot``): a TF32 product reads 10 mantissa bits of each operand. A 16-bit stream is
exact in TF32 (bf16: 7 bits, fp16: 10); phi and the fp32 gradients are not, and a single TF32 product rounds the
projection by ~2^-11, 50x the coefficients' tolerance. ``PRECISION="split"`` writes each inexact operand as
``hi + lo`` (``hi`` its TF32 truncation, ``lo`` the exact remainder) and sums the products ``hi·hi + hi·lo + lo·hi``:
2 TF32 products for a 16-bit stream, 3 for fp32, an error of ~2^-20. The projection stays memory-bound: 2 x 17 GFLOP
at the benchmark shape is ~70 µs of TF32 on an H100, under the 130 µs its 537 MB take to read.

Backward (``d_streams`` written once, in one kernel)
  1. ``_project`` with ``WITH_DY``: the same split-K pass recomputes u and the RMS and, from the same loaded tiles,
     the pre-mix's share of dH_pre, ``sum_c dy[c]·x[i, c]``, as partials.
  2. ``_tail_backward``: sums them, recomputes the gates and Sinkhorn (the steps kept in a scratch row per token,
     read back in reverse), writes ``du = d(logits)·gain / rms``, the RMS's coefficient and per-block partial sums
     of ``d_bias`` and ``d_alpha``'s terms.
  3. ``_dx_dphi``: grid (K blocks, SPLIT_M). A program keeps its ``[MP, BLOCK_K]`` slice of phi and walks its share
     of the tokens: ``dx = du @ phiᵀ + dr·x/(D·r) + H_pre[i]·dy`` (+ an optional gradient to accumulate) is summed
     in fp32 registers and stored once in the stream dtype; ``d_phi`` partials ``x_tileᵀ @ du`` accumulate over its
     tokens and are written to ``[SPLIT_M, K, MP]`` (deterministic, summed after). ``WRITE_DX`` / ``WRITE_DPHI``
     give the two halves as separate kernels (to time them apart); the default runs both in one pass over X.
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .layout import flat_layout, gains, group_matrices, normalise, sinkhorn_first_round, tanh


def _mp(n: int) -> int:
    return max(16, triton.next_power_of_2(n * n + 2 * n))


@triton.jit
def _tf32_hi(x):
    """``x`` with its low 13 mantissa bits cleared: exactly representable in TF32, and ``x - hi`` is exact."""
    return (x.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def _tf32_dot(a, b, acc, EMULATE: tl.constexpr):
    """``acc + a @ b`` on TF32 tensor cores; ``EMULATE`` truncates the operands as the tensor core reads them (the CPU
    interpreter computes every dot in fp32: the tests use it to check the TF32 error itself)."""
    if EMULATE:
        a = _tf32_hi(a)
        b = _tf32_hi(b)
    return tl.dot(a, b, acc, input_precision="tf32")


@triton.jit
def _dot(a, b, acc, A_EXACT: tl.constexpr, B_EXACT: tl.constexpr, PRECISION: tl.constexpr, EMULATE: tl.constexpr):
    """``acc + a @ b`` in fp32 accuracy. ``PRECISION``: "split" (TF32 tensor cores, ``hi + lo`` for each operand not
    ``*_EXACT`` in TF32), "tf32" (one TF32 product), "ieee" (fp32 on CUDA cores)."""
    if PRECISION == "ieee":
        out = tl.dot(a, b, acc, input_precision="ieee")
    elif PRECISION == "tf32":
        out = _tf32_dot(a, b, acc, EMULATE)
    else:
        a_hi = a if A_EXACT else _tf32_hi(a)
        b_hi = b if B_EXACT else _tf32_hi(b)
        out = acc
        if not B_EXACT:  # the small terms first
            out = _tf32_dot(a_hi, b - b_hi, out, EMULATE)
        if not A_EXACT:
            out = _tf32_dot(a - a_hi, b_hi, out, EMULATE)
        out = _tf32_dot(a_hi, b_hi, out, EMULATE)
    return out


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
    PRECISION: tl.constexpr, EMULATE: tl.constexpr,  # see _dot
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
        acc = _dot(x, phi, acc, X_EXACT, False, PRECISION, EMULATE)
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
def _sum_partials(PART, SCALE, SUMSQ, t, tmask, T, SPLIT_K, D, EPS: tl.constexpr, MP: tl.constexpr,
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
    u, rms = _sum_partials(PART, SCALE, SUMSQ, t, tmask, T, SPLIT_K, N * C, EPS, MP, BLOCK_T)
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


# Backward of the coefficients (as fused_pre.py's, whose derivation it follows): with g the gradient of the flat
# coefficients (pre columns: dH_pre + sum_c dy·x), the logits' gradient is g·s(1-s) (pre), g·2s(1-s) (post), and for
# res the log-domain Sinkhorn backward of ops/sinkhorn.py, G = g·M_final, then per step in reverse
# G -= Y·groupsum(G). hc: g_logits = g, dz = g·a·(1-tanh²). With dz = g_logits·gain, z = u / r:
#     du = dz / r,   dr/D = -sum_k dz_k z_k / r / D,   dx = du @ phiᵀ + (dr/D)·x / r + H_pre[i]·dy
# d_bias = sum_t g_logits and d_alpha = segment sums of g_logits·z (hc: g_logits·tanh z) are summed per block here.
@triton.jit
def _tail_backward(
    PART, SCALE, SUMSQ, GPART,  # the backward projection's partials (_project with WITH_DY)
    ALPHA, BIAS,  # as in the forward
    DHPRE, DHPOST, DHRES,  # [T, N], [T, N], [T, N*N] float32 gradients of the coefficients
    DU,  # [T, MP] float32 out (zero in the padding)
    DR, INV_RMS,  # [T] float32 out: dr/D and 1/r
    DBIAS, DGAIN,  # [programs, MP] float32 out: this block's sums of g_logits and of its gain term
    SCRATCH,  # [T, 2*ITERS, MP] float32 workspace: the Sinkhorn steps
    T, C, SPLIT_K, EPS: tl.constexpr,
    N: tl.constexpr, MP: tl.constexpr, ITERS: tl.constexpr, MODE: tl.constexpr, BLOCK_T: tl.constexpr,
):
    M: tl.constexpr = N * N + 2 * N
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < T
    rows = t.to(tl.int64)
    tk = tmask[:, None]
    k, is_pre, is_post, is_res, row, col = flat_layout(N, MP)
    kmask = k < M
    u, rms = _sum_partials(PART, SCALE, SUMSQ, t, tmask, T, SPLIT_K, N * C, EPS, MP, BLOCK_T)
    z = u / rms[:, None]
    g = tl.zeros([BLOCK_T, MP], dtype=tl.float32)
    for s in range(0, SPLIT_K):
        g += tl.load(GPART + (s * T + rows)[:, None] * MP + k[None, :], mask=tk & is_pre[None, :], other=0.0)
    g += tl.load(DHPRE + rows[:, None] * N + k[None, :], mask=tk & is_pre[None, :], other=0.0)
    g += tl.load(DHPOST + rows[:, None] * N + (k[None, :] - N), mask=tk & is_post[None, :], other=0.0)
    g += tl.load(DHRES + rows[:, None] * (N * N) + (k[None, :] - 2 * N), mask=tk & is_res[None, :], other=0.0)
    gain = gains(ALPHA, is_pre, is_post, is_res)
    b = tl.load(BIAS + k, mask=kmask, other=0.0)
    if MODE == 0:
        logits = z * gain[None, :] + b[None, :]
        sig = tl.sigmoid(logits)
        same_row, same_col = group_matrices(is_res, row, col)
        scratch = SCRATCH + rows[:, None] * (2 * ITERS * MP) + k[None, :]
        y_col, m = sinkhorn_first_round(logits, is_res, same_row, same_col)
        tl.store(scratch, y_col, mask=tk)
        tl.store(scratch + MP, m, mask=tk)
        for s in range(1, ITERS):
            m = normalise(m, same_col, is_res)
            tl.store(scratch + (2 * s) * MP, m, mask=tk)
            m = normalise(m, same_row, is_res)
            tl.store(scratch + (2 * s + 1) * MP, m, mask=tk)
        tl.debug_barrier()  # the steps are read back in reverse below
        big = g * m
        for q in range(2 * ITERS):
            s = 2 * ITERS - 1 - q
            y = tl.load(scratch + s * MP, mask=tk, other=0.0)
            odd = (s % 2).to(tl.float32)
            group_sum = odd * tl.dot(big, same_row, input_precision="ieee") + (1.0 - odd) * tl.dot(
                big, same_col, input_precision="ieee")
            big = big - y * group_sum
        d_sig = g * sig * (1.0 - sig)
        g_logits = tl.where(is_pre[None, :], d_sig,
                            tl.where(is_post[None, :], 2.0 * d_sig, tl.where(is_res[None, :], big, 0.0)))
        dz = g_logits * gain[None, :]
        d_gain = g_logits * z
    else:
        th = tanh(z)
        g_logits = tl.where(kmask[None, :], g, 0.0)
        dz = g_logits * gain[None, :] * (1.0 - th * th)
        d_gain = g_logits * th
    g_logits = tl.where(tk, g_logits, 0.0)
    d_gain = tl.where(tk, d_gain, 0.0)
    tl.store(DU + rows[:, None] * MP + k[None, :], dz / rms[:, None], mask=tk)
    tl.store(DR + rows, -tl.sum(dz * z, axis=1) / rms / (N * C), mask=tmask)
    tl.store(INV_RMS + rows, 1.0 / rms, mask=tmask)
    block = tl.program_id(0) * MP + k
    tl.store(DBIAS + block, tl.sum(g_logits, axis=0))
    tl.store(DGAIN + block, tl.sum(d_gain, axis=0))


@triton.jit
def _dx_dphi(
    X,  # [T, K] streams flattened
    PHI,  # [K, M] float32
    DY,  # [T, C] gradient of the block input
    HPRE,  # [T, N] float32 (saved by the forward)
    DU,  # [T, MP] float32 (_tail_backward)
    DR, INV_RMS,  # [T] float32 (_tail_backward)
    ACC,  # [T, K] a gradient of the streams to add (ACCUMULATE), any float dtype, else unused
    DX,  # [T, K] out (WRITE_DX), X's dtype
    DPHI,  # [SPLIT_M, K, MP] float32 out (WRITE_DPHI): partial vec(X)ᵀ @ du over each split's tokens
    T, C, T_PER_SPLIT,  # tokens, channels, tokens per split (a multiple of BLOCK_M)
    N: tl.constexpr, MP: tl.constexpr,
    WRITE_DX: tl.constexpr, WRITE_DPHI: tl.constexpr, ACCUMULATE: tl.constexpr,
    X_EXACT: tl.constexpr, PRECISION: tl.constexpr, EMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    M: tl.constexpr = N * N + 2 * N
    K = N * C
    kk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = kk < K
    col = tl.arange(0, MP)
    stream, c = kk // C, kk % C
    phi_t = tl.load(PHI + kk[None, :] * M + col[:, None], mask=kmask[None, :] & (col < M)[:, None], other=0.0)
    d_phi = tl.zeros([BLOCK_K, MP], dtype=tl.float32)
    t_lo = tl.program_id(1) * T_PER_SPLIT
    t_hi = tl.minimum(T, t_lo + T_PER_SPLIT)
    for t0 in range(t_lo, t_hi, BLOCK_M):
        t = t0 + tl.arange(0, BLOCK_M)
        tmask = t < t_hi
        rows = t.to(tl.int64)
        mask = tmask[:, None] & kmask[None, :]
        x = tl.load(X + rows[:, None] * K + kk[None, :], mask=mask, other=0.0).to(tl.float32)
        du = tl.load(DU + rows[:, None] * MP + col[None, :], mask=tmask[:, None], other=0.0)
        if WRITE_DX:
            dy = tl.load(DY + rows[:, None] * C + c[None, :], mask=mask, other=0.0).to(tl.float32)
            h_pre = tl.load(HPRE + rows[:, None] * N + stream[None, :], mask=mask, other=0.0)
            dr = tl.load(DR + rows, mask=tmask, other=0.0)
            inv_rms = tl.load(INV_RMS + rows, mask=tmask, other=0.0)
            # the RMS's share dr/D·x first, then 1/r: no underflow for huge x (fused_pre.py)
            dx = (dr[:, None] * x) * inv_rms[:, None] + h_pre * dy
            if ACCUMULATE:
                dx += tl.load(ACC + rows[:, None] * K + kk[None, :], mask=mask, other=0.0).to(tl.float32)
            dx = _dot(du, phi_t, dx, False, False, PRECISION, EMULATE)
            tl.store(DX + rows[:, None] * K + kk[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if WRITE_DPHI:
            d_phi = _dot(tl.trans(x), du, d_phi, X_EXACT, False, PRECISION, EMULATE)
    if WRITE_DPHI:
        out = (tl.program_id(1) * K + kk.to(tl.int64))[:, None] * MP + col[None, :]
        tl.store(DPHI + out, d_phi, mask=kmask[:, None])


# --- launchers ---------------------------------------------------------------------------------------------------

# Defaults, not yet measured on a GPU (benchmarks/kernel_blocks.py sweeps them): the projection's tiles follow TE's
# (64 tokens x 64 of K per step), SPLIT_K aims at ~1024 programs; the tail takes 16 tokens (its Sinkhorn tile is
# [BLOCK_T, MP, MP]) and 128 channels per step; the dx/d_phi kernel 64 tokens x 64 of K per step, SPLIT_M aims at
# ~1024 programs.
PROJECT_BLOCKS = dict(block_m=64, block_k=64, programs=1024, num_warps=4)
TAIL_BLOCKS = dict(block_t=16, block_c=128, num_warps=4)
DX_BLOCKS = dict(block_m=64, block_k=64, programs=1024, num_warps=4)

# the stream dtypes exact in TF32 (at most 10 explicit mantissa bits): one operand of the split product needs no lo
_TF32_EXACT = (torch.bfloat16, torch.float16)


def _block_k(C: int, block_k: int) -> int:
    """The largest power of two <= block_k and <= C (a tile then spans at most two streams), at least 16."""
    fit = 1 << (max(C, 1).bit_length() - 1)
    return max(16, min(block_k, fit))


def supports(C: int) -> bool:
    """Whether the split kernels take this width (tiles of 16 entries of K must span at most two streams)."""
    return C >= 16


def _projection(x, phi, d_y, n, precision, emulate, blocks):
    """Launch ``_project``: returns ``(part, gpart, scale, sumsq, split_k)``; ``gpart`` is None without ``d_y``."""
    T, K = x.shape[0], x.shape[1] * x.shape[2]
    C, mp = x.shape[2], _mp(n)
    block_m, block_k = blocks["block_m"], _block_k(C, blocks["block_k"])
    token_blocks = triton.cdiv(T, block_m)
    split_k = max(1, min(triton.cdiv(K, block_k), blocks.get("split_k") or triton.cdiv(blocks["programs"],
                                                                                        token_blocks)))
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k
    split_k = triton.cdiv(K, k_per_split)
    f32 = dict(device=x.device, dtype=torch.float32)
    part = torch.empty((split_k, T, mp), **f32)
    gpart = torch.zeros((split_k, T, mp), **f32) if d_y is not None else part
    scale, sumsq = torch.empty((split_k, T), **f32), torch.empty((split_k, T), **f32)
    wrap_triton(_project)[(token_blocks, split_k)](
        x, phi, x if d_y is None else d_y, part, gpart, scale, sumsq, T, C, k_per_split, N=n, MP=mp,
        WITH_DY=d_y is not None, X_EXACT=x.dtype in _TF32_EXACT, PRECISION=precision, EMULATE=emulate,
        BLOCK_M=block_m, BLOCK_K=block_k, num_warps=blocks["num_warps"])
    return part, (gpart if d_y is not None else None), scale, sumsq, split_k


def pre_mix_split_fwd(streams, phi, alpha, bias, n, iters, mode, eps, precision="split", emulate_tf32=False,
                      project_blocks=None, tail_blocks=None):
    """Launch the forward pair. ``streams [..., n, C]`` (C >= 16), ``phi [n·C, n²+2n]`` float32 contiguous,
    ``alpha [3]``, ``bias [n²+2n]``; ``eps`` the RMSNorm epsilon.

    Returns ``(y [..., C], h_pre [..., n], h_post [..., n], h_res [..., n, n])``, the coefficients float32.
    """
    assert streams.shape[-2] == n, f"expected {n} streams, got shape {tuple(streams.shape)}"
    lead, C = streams.shape[:-2], streams.shape[-1]
    assert supports(C), f"the split pre-mix needs C >= 16, got {C}"
    assert phi.shape == (n * C, n * n + 2 * n) and phi.dtype == torch.float32 and phi.is_contiguous()
    x = streams.reshape(-1, n, C).contiguous()
    T = x.shape[0]
    part, _, scale, sumsq, split_k = _projection(x, phi, None, n, precision, emulate_tf32,
                                                 {**PROJECT_BLOCKS, **(project_blocks or {})})
    tb = {**TAIL_BLOCKS, **(tail_blocks or {})}
    block_c = min(tb["block_c"], triton.next_power_of_2(C))
    f32 = dict(device=x.device, dtype=torch.float32)
    y = torch.empty((T, C), device=x.device, dtype=x.dtype)
    h_pre, h_post, h_res = torch.empty((T, n), **f32), torch.empty((T, n), **f32), torch.empty((T, n * n), **f32)
    wrap_triton(_tail)[(triton.cdiv(T, tb["block_t"]),)](
        x, part, scale, sumsq, alpha.float().contiguous(), bias.float().contiguous(), y, h_pre, h_post, h_res,
        T, C, split_k, EPS=eps, N=n, NP=triton.next_power_of_2(n), MP=_mp(n), ITERS=iters,
        MODE=0 if mode == "mhc" else 1, BLOCK_T=tb["block_t"], BLOCK_C=block_c, num_warps=tb["num_warps"])
    return y.reshape(*lead, C), h_pre.reshape(*lead, n), h_post.reshape(*lead, n), h_res.reshape(*lead, n, n)


def pre_mix_split_bwd(streams, phi, alpha, bias, h_pre, d_y, d_h_pre, d_h_post, d_h_res, n, iters, mode, eps,
                      grad_acc=None, precision="split", emulate_tf32=False, project_blocks=None, tail_blocks=None,
                      dx_blocks=None, fuse_dx_dphi=True):
    """Launch the backward: ``(d_streams, d_phi, d_alpha, d_bias)`` of :func:`pre_mix_split_fwd`'s outputs.

    ``d_h_pre`` may be None (zero). ``grad_acc`` (like ``streams``, any float dtype, optional): a gradient of the
    streams from elsewhere (the post-mix's, say), added inside the dx kernel in fp32, so that the streams' gradient is
    written once instead of being summed from two tensors. ``fuse_dx_dphi=False`` runs dx and d_phi as two kernels.
    """
    lead, C = streams.shape[:-2], streams.shape[-1]
    assert supports(C), f"the split pre-mix needs C >= 16, got {C}"
    x = streams.reshape(-1, n, C).contiguous()
    T, K, M, mp = x.shape[0], n * C, n * n + 2 * n, _mp(n)
    f32 = dict(device=x.device, dtype=torch.float32)
    dy = d_y.reshape(T, C).contiguous()

    def rows(g, width):
        return torch.zeros((T, width), **f32) if g is None else g.reshape(T, width).float().contiguous()

    part, gpart, scale, sumsq, split_k = _projection(x, phi, dy, n, precision, emulate_tf32,
                                                     {**PROJECT_BLOCKS, **(project_blocks or {})})
    tb = {**TAIL_BLOCKS, **(tail_blocks or {})}
    programs = triton.cdiv(T, tb["block_t"])
    du = torch.empty((T, mp), **f32)
    dr, inv_rms = torch.empty(T, **f32), torch.empty(T, **f32)
    d_bias_part, d_gain_part = torch.empty((programs, mp), **f32), torch.empty((programs, mp), **f32)
    scratch = torch.empty((T, 2 * iters, mp), **f32) if mode == "mhc" else du
    wrap_triton(_tail_backward)[(programs,)](
        part, scale, sumsq, gpart, alpha.float().contiguous(), bias.float().contiguous(), rows(d_h_pre, n),
        rows(d_h_post, n), rows(d_h_res, n * n), du, dr, inv_rms, d_bias_part, d_gain_part, scratch, T, C, split_k,
        EPS=eps, N=n, MP=mp, ITERS=iters, MODE=0 if mode == "mhc" else 1, BLOCK_T=tb["block_t"],
        num_warps=tb["num_warps"])
    db = {**DX_BLOCKS, **(dx_blocks or {})}
    block_m, block_k = db["block_m"], db["block_k"]
    k_blocks = triton.cdiv(K, block_k)
    split_m = max(1, min(triton.cdiv(T, block_m), db.get("split_m") or triton.cdiv(db["programs"], k_blocks)))
    t_per_split = triton.cdiv(triton.cdiv(T, split_m), block_m) * block_m
    split_m = triton.cdiv(T, t_per_split)
    d_x = torch.empty_like(x)
    d_phi_part = torch.empty((split_m, K, mp), **f32)
    acc = grad_acc.reshape(T, n, C).contiguous() if grad_acc is not None else x
    h_pre = rows(h_pre, n)
    passes = [(True, True)] if fuse_dx_dphi else [(True, False), (False, True)]
    for write_dx, write_dphi in passes:
        wrap_triton(_dx_dphi)[(k_blocks, split_m)](
            x, phi, dy, h_pre, du, dr, inv_rms, acc, d_x, d_phi_part, T, C, t_per_split, N=n, MP=mp,
            WRITE_DX=write_dx, WRITE_DPHI=write_dphi, ACCUMULATE=grad_acc is not None,
            X_EXACT=x.dtype in _TF32_EXACT, PRECISION=precision, EMULATE=emulate_tf32, BLOCK_M=block_m,
            BLOCK_K=block_k, num_warps=db["num_warps"])
    d_phi = d_phi_part.sum(0)[:, :M]
    d_gain = d_gain_part.sum(0)
    d_alpha = torch.stack([d_gain[:n].sum(), d_gain[n:2 * n].sum(), d_gain[2 * n:M].sum()])
    return (d_x.reshape(*lead, n, C), d_phi.contiguous(), d_alpha.to(alpha.dtype),
            d_bias_part.sum(0)[:M].to(bias.dtype))


__all__ = ["pre_mix_split_bwd", "pre_mix_split_fwd", "supports"]

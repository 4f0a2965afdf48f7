"""Triton kernels: the mHC coefficients of a token fused with its pre-mix (forward and backward).

Forward, one program per ``BLOCK_T`` tokens (``X [T, n, C]`` contiguous, ``phi [n·C, M]``, ``M = n² + 2n``):
  pass 1 over C: the sum of squares (overflow-safe, see ``_add_squares``) and ``u = vec(x) @ phi`` from one read
  of the stream block;
  then ``z = u / rms``, the gates and Sinkhorn-Knopp in registers (see ``layout.py``), stores ``H_pre/H_post/H_res``;
  pass 2 over C: ``y = sum_i H_pre[i] x[i]`` (the block input), in the stream's dtype.
Static mode (``DYNAMIC=False``) runs pass 2 only, with ``H_pre [n]`` shared by all tokens.
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..constants import RMS_EPS
from . import layout
from .layout import flat_layout, gains, group_matrices, normalise, sinkhorn_first_round, tanh


def _mp(n: int) -> int:
    return max(16, triton.next_power_of_2(n * n + 2 * n))


@triton.jit
def _load_tile(X, t, tmask, i, imask, c0, C, N: tl.constexpr, BLOCK_C: tl.constexpr):
    """The ``[BLOCK_T, NP, BLOCK_C]`` stream tile at channel ``c0`` in float32, its offsets, mask and channels."""
    c = c0 + tl.arange(0, BLOCK_C)
    cmask = c < C
    offs = t[:, None, None] * (N * C) + i[None, :, None] * C + c[None, None, :]
    mask = tmask[:, None, None] & imask[None, :, None] & cmask[None, None, :]
    return tl.load(X + offs, mask=mask, other=0.0).to(tl.float32), offs, mask, c, cmask


@triton.jit
def _add_squares(scale, sumsq, x):
    """Running ``sum((x / scale)²)`` per token with ``scale = max(1, largest |x| so far)``, rescaled as the scale
    grows (one pass, as LAPACK's nrm2 does): no overflow for any finite x, and the plain sum while |x| <= 1."""
    new_scale = tl.maximum(scale, tl.max(tl.max(tl.abs(x), axis=2), axis=1))
    ratio = scale / new_scale
    xs = x / new_scale[:, None, None]
    return new_scale, sumsq * ratio * ratio + tl.sum(tl.sum(xs * xs, axis=2), axis=1)


@triton.jit
def _rms(scale, sumsq, D, EPS):
    """``sqrt(mean(x²) + eps)`` from the scaled sum of squares, as ``rms`` in ops/coefficients.py."""
    return scale * tl.sqrt(sumsq / D + EPS / scale / scale)


@triton.jit
def _phi_rows(PHI, i, imask, c, cmask, k, kmask, C, M: tl.constexpr, NP: tl.constexpr, BLOCK_C: tl.constexpr):
    """The ``[NP·BLOCK_C, MP]`` rows of phi for the (stream, channel) pairs of a tile."""
    rows = tl.reshape(i[:, None] * C + c[None, :], [NP * BLOCK_C])
    rmask = tl.reshape(imask[:, None] & cmask[None, :], [NP * BLOCK_C])
    return tl.load(PHI + rows[:, None] * M + k[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)


@triton.jit
def _project(X, PHI, t, tmask, i, imask, k, kmask, C, N: tl.constexpr, NP: tl.constexpr, M: tl.constexpr,
             MP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """One read of the token block: ``(scale, sumsq)`` of the RMS [BLOCK_T] and ``vec(x) @ phi`` [BLOCK_T, MP]."""
    scale = tl.full([BLOCK_T], 1.0, dtype=tl.float32)
    sumsq = tl.zeros([BLOCK_T], dtype=tl.float32)
    u = tl.zeros([BLOCK_T, MP], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        x, _offs, _mask, c, cmask = _load_tile(X, t, tmask, i, imask, c0, C, N, BLOCK_C)
        scale, sumsq = _add_squares(scale, sumsq, x)
        phi = _phi_rows(PHI, i, imask, c, cmask, k, kmask, C, M, NP, BLOCK_C)
        u += tl.dot(tl.reshape(x, [BLOCK_T, NP * BLOCK_C]), phi, input_precision="ieee")
    return scale, sumsq, u


@triton.jit
def _fused_pre_mix_fwd(
    X,  # [T, N, C] streams, contiguous, any float dtype
    PHI,  # [N*C, M] float32 projection [pre | post | res]
    ALPHA,  # [3] float32 gains (pre, post, res)
    BIAS,  # [M] float32
    Y,  # [T, C] out: the block input, X's dtype
    HPRE, HPOST, HRES,  # [T, N], [T, N], [T, N*N] out, float32 (read-only HPRE [N] when not DYNAMIC)
    T, C,  # tokens, channels
    EPS: tl.constexpr,  # RMSNorm epsilon (constexpr: Inductor passes a Python float as fp64, which would make the
    # whole coefficient path float64)
    N: tl.constexpr, NP: tl.constexpr, MP: tl.constexpr,  # streams, next power of 2, padded logit width
    ITERS: tl.constexpr,  # Sinkhorn rounds
    MODE: tl.constexpr,  # 0: mhc, 1: hc
    DYNAMIC: tl.constexpr,  # False: only the pre-mix, with a static H_pre [N]
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    M: tl.constexpr = N * N + 2 * N
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < T
    i = tl.arange(0, NP)
    imask = i < N
    if DYNAMIC:
        k, is_pre, is_post, is_res, row, col = flat_layout(N, MP)
        kmask = k < M
        scale, sumsq, u = _project(X, PHI, t, tmask, i, imask, k, kmask, C, N, NP, M, MP, BLOCK_T, BLOCK_C)
        z = u / _rms(scale, sumsq, N * C, EPS)[:, None]
        gain = gains(ALPHA, is_pre, is_post, is_res)
        b = tl.load(BIAS + k, mask=kmask, other=0.0)
        if MODE == 0:
            logits = z * gain[None, :] + b[None, :]
            sig = tl.sigmoid(logits)
            same_row, same_col = group_matrices(is_res, row, col)
            _, m = sinkhorn_first_round(logits, is_res, same_row, same_col)
            for _round in range(ITERS - 1):
                m = normalise(m, same_col, is_res)
                m = normalise(m, same_row, is_res)
            h = tl.where(is_pre[None, :], sig, tl.where(is_post[None, :], 2.0 * sig, m))
        else:
            h = b[None, :] + gain[None, :] * tanh(z)
        tk = tmask[:, None]
        tl.store(HPRE + t[:, None] * N + k[None, :], h, mask=tk & is_pre[None, :])
        tl.store(HPOST + t[:, None] * N + (k[None, :] - N), h, mask=tk & is_post[None, :])
        tl.store(HRES + t[:, None] * (N * N) + (k[None, :] - 2 * N), h, mask=tk & is_res[None, :])
        tl.debug_barrier()  # H_pre is read back below in the stream layout
        h_pre = tl.load(HPRE + t[:, None] * N + i[None, :], mask=tmask[:, None] & imask[None, :], other=0.0)
    else:
        h_pre = tl.load(HPRE + i[None, :] + 0 * t[:, None], mask=tmask[:, None] & imask[None, :], other=0.0)
    for c0 in range(0, C, BLOCK_C):
        x, _offs, _mask, c, cmask = _load_tile(X, t, tmask, i, imask, c0, C, N, BLOCK_C)
        y = tl.sum(h_pre[:, :, None] * x, axis=1)
        tl.store(Y + t[:, None] * C + c[None, :], y.to(Y.dtype.element_ty), mask=tmask[:, None] & cmask[None, :])


# Backward. With g the gradient of the flat coefficients (pre columns: dH_pre plus the pre-mix's
# dy·x summed over channels), the logits' gradient is g·s(1-s) (pre), g·2s(1-s) (post), and for res the
# log-domain Sinkhorn backward of ops/sinkhorn.py, G = g·M_final, then per step in reverse G -= Y·groupsum(G)
# (the steps' Y are recomputed and kept in a global scratch row per token). hc: g_logits = g, dz = g·a·(1-tanh²).
# With dz = g_logits·gain and u = vec(x) @ phi, z = u / r, r = sqrt(mean(x²) + eps) over D = n·C entries:
#     du = dz / r,   dr = -sum_k dz_k z_k / r,   dx = du @ phiᵀ + dr·x / (D·r) + H_pre[i]·dy     (pass 2)
# (+ ACC, the streams' gradient from the site's post-mix when the lowering links them: stored once, see ops/fused.py)
# d_phi = vec(X)ᵀ @ du, d_bias = sum_t g_logits and d_alpha = segment sums of g_logits·z are reductions over
# tokens, left to torch (the kernel writes du, g_logits, g_logits·z per token).
@triton.jit
def _fused_pre_mix_bwd(
    X, PHI, ALPHA, BIAS,  # as in the forward
    HPRE,  # [T, N] float32, saved by the forward
    DY,  # [T, C] gradient of the block input
    DHPRE, DHPOST, DHRES,  # [T, N], [T, N], [T, N*N] gradients of the coefficients (float32)
    ACC,  # [T, N, C] a gradient of X from elsewhere, added to dx when ACCUMULATE (any float dtype)
    DX,  # [T, N, C] out, X's dtype
    DU, DLOGITS, DGAIN,  # [T, M] out, float32
    SCRATCH,  # [T, 2*ITERS, MP] float32 workspace
    T, C, EPS: tl.constexpr,
    N: tl.constexpr, NP: tl.constexpr, MP: tl.constexpr, ITERS: tl.constexpr, MODE: tl.constexpr,
    ACCUMULATE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    M: tl.constexpr = N * N + 2 * N
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < T
    i = tl.arange(0, NP)
    imask = i < N
    k, is_pre, is_post, is_res, row, col = flat_layout(N, MP)
    kmask = k < M
    tk = tmask[:, None]
    # pass 1: sum(x²), u = vec(x) @ phi, and the pre-mix's gradient of H_pre, sum_c dy[c]·x[i, c], in flat layout
    stream_of_row = tl.reshape(i[:, None] + 0 * tl.arange(0, BLOCK_C)[None, :], [NP * BLOCK_C])
    select = ((stream_of_row[:, None] == k[None, :]) & is_pre[None, :]).to(tl.float32)  # [NP*BLOCK_C, MP]
    scale = tl.full([BLOCK_T], 1.0, dtype=tl.float32)
    sumsq = tl.zeros([BLOCK_T], dtype=tl.float32)
    u = tl.zeros([BLOCK_T, MP], dtype=tl.float32)
    g = tl.zeros([BLOCK_T, MP], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        x, _offs, _mask, c, cmask = _load_tile(X, t, tmask, i, imask, c0, C, N, BLOCK_C)
        dy = tl.load(DY + t[:, None] * C + c[None, :], mask=tk & cmask[None, :], other=0.0).to(tl.float32)
        scale, sumsq = _add_squares(scale, sumsq, x)
        phi = _phi_rows(PHI, i, imask, c, cmask, k, kmask, C, M, NP, BLOCK_C)
        u += tl.dot(tl.reshape(x, [BLOCK_T, NP * BLOCK_C]), phi, input_precision="ieee")
        g += tl.dot(tl.reshape(x * dy[:, None, :], [BLOCK_T, NP * BLOCK_C]), select, input_precision="ieee")
    rms = _rms(scale, sumsq, N * C, EPS)
    z = u / rms[:, None]
    gain = gains(ALPHA, is_pre, is_post, is_res)
    b = tl.load(BIAS + k, mask=kmask, other=0.0)
    g += tl.load(DHPRE + t[:, None] * N + k[None, :], mask=tk & is_pre[None, :], other=0.0)
    g += tl.load(DHPOST + t[:, None] * N + (k[None, :] - N), mask=tk & is_post[None, :], other=0.0)
    g += tl.load(DHRES + t[:, None] * (N * N) + (k[None, :] - 2 * N), mask=tk & is_res[None, :], other=0.0)
    if MODE == 0:
        logits = z * gain[None, :] + b[None, :]
        sig = tl.sigmoid(logits)
        same_row, same_col = group_matrices(is_res, row, col)
        scratch = SCRATCH + t[:, None] * (2 * ITERS * MP) + k[None, :]
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
    out = t[:, None] * M + k[None, :]
    du = dz / rms[:, None]
    tl.store(DU + out, du, mask=tk & kmask[None, :])
    tl.store(DLOGITS + out, g_logits, mask=tk & kmask[None, :])
    tl.store(DGAIN + out, d_gain, mask=tk & kmask[None, :])
    # the RMS's share of dx is dr·x/(D·r); dr/D times x comes first, so that it cannot underflow for huge x
    dr_per_entry = -tl.sum(dz * z, axis=1) / rms / (N * C)
    h_pre = tl.load(HPRE + t[:, None] * N + i[None, :], mask=tk & imask[None, :], other=0.0)
    # pass 2: dx = du @ phiᵀ + dr·x/(D·r) + H_pre ⊗ dy
    for c0 in range(0, C, BLOCK_C):
        x, offs, xmask, c, cmask = _load_tile(X, t, tmask, i, imask, c0, C, N, BLOCK_C)
        dy = tl.load(DY + t[:, None] * C + c[None, :], mask=tk & cmask[None, :], other=0.0).to(tl.float32)
        rows = tl.reshape(i[:, None] * C + c[None, :], [NP * BLOCK_C])
        rmask = tl.reshape(imask[:, None] & cmask[None, :], [NP * BLOCK_C])
        phi_t = tl.load(PHI + rows[None, :] * M + k[:, None], mask=rmask[None, :] & kmask[:, None], other=0.0)
        dx = tl.reshape(tl.dot(du, phi_t, input_precision="ieee"), [BLOCK_T, NP, BLOCK_C])
        dx += dr_per_entry[:, None, None] * x / rms[:, None, None] + h_pre[:, :, None] * dy[:, None, :]
        if ACCUMULATE:
            dx += tl.load(ACC + offs, mask=xmask, other=0.0).to(tl.float32)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=xmask)


# The projection tile is [NP·BLOCK_C, MP] float32 and sits in shared memory for tl.dot. The cap is the tile of n=4 at
# BLOCK_C=64 (4·64·32 elements: 80 KB forward, 112 KB backward at BLOCK_T=16, within a Hopper block's 227 KB); larger n
# shrinks BLOCK_C to stay under it (n=8 at BLOCK_C=64 needed 557 KB / 819 KB and could not launch). Compiled sizes of
# every variant: tests/kernels/compile_for_gpu.py.
TILE_ELEMENTS = 4 * 64 * 32


# Default blocks, from benchmarks/kernel_blocks.py on an H200 (16384 tokens, n=4, C=4096, bf16; 2026-11-26): forward
# 1.14 ms at (32, 32) against 1.33 at (16, 64) and 2.01 at (16, 32); backward 4.50 ms against 19.3 and 11.3, and 66 ms
# at (32, 64) (not inspected; register spills are the likely cause). Other n and GPUs not measured yet.
BLOCK_T, BLOCK_C = 32, 32


def _blocks(C: int, n: int, block_t: int, block_c: int):
    fit = max(8, TILE_ELEMENTS // (triton.next_power_of_2(n) * _mp(n)))
    return block_t, min(block_c, fit, triton.next_power_of_2(C))


def fused_pre_mix_fwd(streams, phi, alpha, bias, h_pre_static, n, iters, mode, block_t=BLOCK_T, block_c=BLOCK_C,
                      num_warps=4):
    """Launch the forward. ``streams [..., n, C]``; dynamic when ``phi`` is given, else ``h_pre_static [n]``.

    Returns ``(y [..., C], h_pre, h_post, h_res)`` (coefficients float32, ``[..., n]``/``[..., n, n]``;
    in static mode ``h_pre`` is the given one and the others are None).
    """
    assert streams.shape[-2] == n, f"expected {n} streams, got shape {tuple(streams.shape)}"
    lead, C = streams.shape[:-2], streams.shape[-1]
    x = streams.reshape(-1, n, C).contiguous()
    T = x.shape[0]
    block_t, block_c = _blocks(C, n, block_t, block_c)
    y = torch.empty((T, C), device=x.device, dtype=x.dtype)
    dynamic = phi is not None
    if dynamic:
        assert phi.shape == (n * C, n * n + 2 * n) and phi.dtype == torch.float32 and phi.is_contiguous()
        h_pre = torch.empty((T, n), device=x.device, dtype=torch.float32)
        h_post = torch.empty((T, n), device=x.device, dtype=torch.float32)
        h_res = torch.empty((T, n * n), device=x.device, dtype=torch.float32)
        args = (phi, alpha.float().contiguous(), bias.float().contiguous())
    else:
        h_pre = h_pre_static.float().contiguous()
        h_post = h_res = h_pre  # unused by the kernel in static mode
        args = (h_pre, h_pre, h_pre)
    grid = (triton.cdiv(T, block_t),)
    wrap_triton(_fused_pre_mix_fwd)[grid](
        x, *args, y, h_pre, h_post, h_res, T, C, EPS=RMS_EPS, N=n, NP=triton.next_power_of_2(n), MP=_mp(n), ITERS=iters,
        MODE=0 if mode == "mhc" else 1, DYNAMIC=dynamic, BLOCK_T=block_t, BLOCK_C=block_c, num_warps=num_warps)
    y = y.reshape(*lead, C)
    if not dynamic:
        return y, h_pre_static, None, None
    return y, h_pre.reshape(*lead, n), h_post.reshape(*lead, n), h_res.reshape(*lead, n, n)


def fused_pre_mix_bwd(streams, phi, alpha, bias, h_pre, d_y, d_h_pre, d_h_post, d_h_res, n, iters, mode,
                      grad_acc=None, block_t=BLOCK_T, block_c=BLOCK_C, num_warps=4):
    """Launch the backward of the dynamic fused op; returns ``(d_streams, d_phi, d_alpha, d_bias)``.

    ``grad_acc``: optional ``[..., n, C]`` gradient of the streams from elsewhere (the site's post-mix), any float
    dtype, added to ``d_streams`` in float32 before its one store (as ``pre_split_backward.pre_mix_split_bwd``).
    """
    lead, C = streams.shape[:-2], streams.shape[-1]
    x = streams.reshape(-1, n, C).contiguous()
    T, M = x.shape[0], n * n + 2 * n
    block_t, block_c = _blocks(C, n, block_t, block_c)
    f32 = dict(device=x.device, dtype=torch.float32)

    def rows(g, width):
        return torch.zeros((T, width), **f32) if g is None else g.reshape(T, width).float().contiguous()

    d_x = torch.empty_like(x)
    acc = grad_acc.reshape(T, n, C).contiguous() if grad_acc is not None else x
    du, d_logits, d_gain = (torch.empty((T, M), **f32) for _ in range(3))
    scratch = torch.empty((T, 2 * iters, _mp(n)), **f32) if mode == "mhc" else du
    grid = (triton.cdiv(T, block_t),)
    wrap_triton(_fused_pre_mix_bwd)[grid](
        x, phi, alpha.float().contiguous(), bias.float().contiguous(), rows(h_pre, n), d_y.reshape(T, C).contiguous(),
        rows(d_h_pre, n), rows(d_h_post, n), rows(d_h_res, n * n), acc, d_x, du, d_logits, d_gain, scratch, T, C,
        EPS=RMS_EPS, N=n, NP=triton.next_power_of_2(n), MP=_mp(n), ITERS=iters, MODE=0 if mode == "mhc" else 1,
        ACCUMULATE=grad_acc is not None, BLOCK_T=block_t, BLOCK_C=block_c, num_warps=num_warps)
    d_phi = x.reshape(T, n * C).float().T @ du
    d_alpha = torch.stack([part.sum() for part in d_gain.split([n, n, n * n], dim=1)])
    d_bias = d_logits.sum(0)
    return d_x.reshape(*lead, n, C), d_phi, d_alpha.to(alpha.dtype), d_bias.to(bias.dtype)


__all__ = ["fused_pre_mix_bwd", "fused_pre_mix_fwd", "layout"]

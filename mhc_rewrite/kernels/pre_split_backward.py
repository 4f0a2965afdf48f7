"""Triton kernels: the backward of the split pre-mix (``pre_split.py``).

``d_streams`` is written once, by one kernel, in the streams' dtype:
  1. ``pre_split.projection`` with ``d_y``: the forward's split-K pass recomputes u and the RMS and, from the same
     loaded tiles, the pre-mix's share of dH_pre, ``sum_c dy[c]·x[i, c]``, as partials.
  2. ``_tail_backward``: sums them, recomputes the gates and Sinkhorn (the steps kept in a scratch row per token, read
     back in reverse; nothing is saved from the forward but ``H_pre``), writes ``du = d(logits)·gain / rms``, the
     RMS's coefficient and per-block partial sums of ``d_bias`` and ``d_alpha``'s terms.
  3. ``_dx_dphi``: grid (K blocks, SPLIT_M), split-M. A program keeps its ``[MP, BLOCK_K]`` slice of phi and walks its
     share of the tokens: ``dx = du @ phiᵀ + dr·x/(D·r) + H_pre[i]·dy`` (+ an optional gradient of the streams from
     elsewhere, ``grad_acc``) is summed in float32 registers and stored once; ``d_phi`` partials ``x_tileᵀ @ du``
     accumulate over its tokens and are written to ``[SPLIT_M, K, MP]`` (deterministic, summed after).
     ``WRITE_DX`` / ``WRITE_DPHI`` give the two halves as separate kernels (to time them apart); the default runs
     both in one pass over X.
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..constants import RMS_EPS
from .layout import flat_layout, gains, group_matrices, normalise, sinkhorn_first_round, tanh
from .pre_split import default_blocks, padded_width, projection, sum_partials, supports
from .tf32 import TF32_EXACT, dot


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
    u, rms = sum_partials(PART, SCALE, SUMSQ, t, tmask, T, SPLIT_K, N * C, EPS, MP, BLOCK_T)
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
            dx = dot(du, phi_t, dx, False, False, PRECISION, EMULATE)
            tl.store(DX + rows[:, None] * K + kk[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if WRITE_DPHI:
            d_phi = dot(tl.trans(x), du, d_phi, X_EXACT, False, PRECISION, EMULATE)
    if WRITE_DPHI:
        out = (tl.program_id(1) * K + kk.to(tl.int64))[:, None] * MP + col[None, :]
        tl.store(DPHI + out, d_phi, mask=kmask[:, None])


def split_m_of(T: int, K: int, blocks: dict) -> tuple[int, int]:
    """``(split_m, t_per_split)`` of the dx/d_phi kernel for ``T`` tokens of ``K`` entries."""
    block_m = blocks["block_m"]
    k_blocks = triton.cdiv(K, blocks["block_k"])
    split_m = blocks.get("split_m") or triton.cdiv(blocks["programs"], k_blocks)
    split_m = max(1, min(triton.cdiv(T, block_m), split_m))
    t_per_split = triton.cdiv(triton.cdiv(T, split_m), block_m) * block_m
    return triton.cdiv(T, t_per_split), t_per_split


def pre_mix_split_bwd(streams, phi, alpha, bias, h_pre, d_y, d_h_pre, d_h_post, d_h_res, n, iters, mode,
                      grad_acc=None, precision="split", emulate_tf32=False, project_blocks=None, tail_blocks=None,
                      dx_blocks=None, fuse_dx_dphi=True):
    """Launch the backward: ``(d_streams, d_phi, d_alpha, d_bias)`` of :func:`pre_split.pre_mix_split_fwd`'s outputs.

    Args:
        streams, phi, alpha, bias, n, iters, mode: as in the forward.  h_pre: ``[..., n]``, the forward's.
        d_y: ``[..., C]``.  d_h_pre (may be None: zero), d_h_post: ``[..., n]``.  d_h_res: ``[..., n, n]``.
        grad_acc: optional ``[..., n, C]`` gradient of the streams from elsewhere (the post-mix's, say), any float
            dtype, added inside the dx kernel in float32: the streams' gradient is then written once, in the streams'
            dtype, instead of being summed by autograd from two tensors.
        precision, emulate_tf32, *_blocks: as in the forward (``dx_blocks``: the third of ``default_blocks(n)``;
            ``split_m`` may be given).
        fuse_dx_dphi: False runs dx and d_phi as two kernels (two reads of X).

    Returns:
        ``d_streams`` like ``streams``; ``d_phi [n·C, n²+2n]`` float32; ``d_alpha``, ``d_bias`` in their dtypes.
    """
    lead, C = streams.shape[:-2], streams.shape[-1]
    assert supports(C), f"the split pre-mix needs C >= 16, got {C}"
    x = streams.reshape(-1, n, C).contiguous()
    T, K, M, mp = x.shape[0], n * C, n * n + 2 * n, padded_width(n)
    f32 = dict(device=x.device, dtype=torch.float32)
    dy = d_y.reshape(T, C).contiguous()

    def rows(g, width):
        return torch.zeros((T, width), **f32) if g is None else g.reshape(T, width).float().contiguous()

    project, tail, dx = default_blocks(n)
    part, gpart, scale, sumsq, split_k = projection(x, phi, dy, n, precision, emulate_tf32,
                                                    {**project, **(project_blocks or {})})
    tb = {**tail, **(tail_blocks or {})}
    programs = triton.cdiv(T, tb["block_t"])
    du = torch.empty((T, mp), **f32)
    dr, inv_rms = torch.empty(T, **f32), torch.empty(T, **f32)
    d_bias_part, d_gain_part = torch.empty((programs, mp), **f32), torch.empty((programs, mp), **f32)
    scratch = torch.empty((T, 2 * iters, mp), **f32) if mode == "mhc" else du
    wrap_triton(_tail_backward)[(programs,)](
        part, scale, sumsq, gpart, alpha.float().contiguous(), bias.float().contiguous(), rows(d_h_pre, n),
        rows(d_h_post, n), rows(d_h_res, n * n), du, dr, inv_rms, d_bias_part, d_gain_part, scratch, T, C, split_k,
        EPS=RMS_EPS, N=n, MP=mp, ITERS=iters, MODE=0 if mode == "mhc" else 1, BLOCK_T=tb["block_t"],
        num_warps=tb["num_warps"])
    db = {**dx, **(dx_blocks or {})}
    split_m, t_per_split = split_m_of(T, K, db)
    d_x = torch.empty_like(x)
    d_phi_part = torch.empty((split_m, K, mp), **f32)
    acc = grad_acc.reshape(T, n, C).contiguous() if grad_acc is not None else x
    h_pre = rows(h_pre, n)
    passes = [(True, True)] if fuse_dx_dphi else [(True, False), (False, True)]
    for write_dx, write_dphi in passes:
        wrap_triton(_dx_dphi)[(triton.cdiv(K, db["block_k"]), split_m)](
            x, phi, dy, h_pre, du, dr, inv_rms, acc, d_x, d_phi_part, T, C, t_per_split, N=n, MP=mp,
            WRITE_DX=write_dx, WRITE_DPHI=write_dphi, ACCUMULATE=grad_acc is not None,
            X_EXACT=x.dtype in TF32_EXACT, PRECISION=precision, EMULATE=emulate_tf32, BLOCK_M=db["block_m"],
            BLOCK_K=db["block_k"], num_warps=db["num_warps"])
    d_phi = d_phi_part.sum(0)[:, :M]
    d_gain = d_gain_part.sum(0)
    d_alpha = torch.stack([d_gain[:n].sum(), d_gain[n:2 * n].sum(), d_gain[2 * n:M].sum()])
    return (d_x.reshape(*lead, n, C), d_phi.contiguous(), d_alpha.to(alpha.dtype),
            d_bias_part.sum(0)[:M].to(bias.dtype))


__all__ = ["pre_mix_split_bwd", "split_m_of"]

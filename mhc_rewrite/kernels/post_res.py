"""Triton kernels: the post + residual mix ``X' = H_res · X + H_post^T · f`` (forward and backward).

Forward: one program per (``BLOCK_T`` tokens, ``BLOCK_C`` channels): reads the n streams and ``f`` once, writes the
n new streams once, i.e. (n+1)·C in and n·C out per token (the paper's fused figure). The mix walks the source
streams one at a time (``static_range``), so the registers hold ``[BLOCK_T, n, BLOCK_C]``, never an n x n x C tile.
Static coefficients (``[n]``, ``[n, n]``) are read with a token stride of 0.
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton


@triton.jit
def _post_res_mix_fwd(
    X,  # [T, N, C] streams
    F,  # [T, C] branch output
    HPOST,  # [T, N] (or [N] with H_STRIDE = 0), float32
    HRES,  # [T, N, N] (or [N, N]), float32
    OUT,  # [T, N, C] out, X's dtype
    T, C,
    H_STRIDE,  # N for per-token coefficients, 0 for static ones
    N: tl.constexpr, NP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    i = tl.arange(0, NP)
    tmask, cmask, imask = t < T, c < C, i < N
    pmask = tmask[:, None] & imask[None, :]
    f = tl.load(F + t[:, None] * C + c[None, :], mask=tmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    p = tl.load(HPOST + t[:, None] * H_STRIDE + i[None, :], mask=pmask, other=0.0)
    out = p[:, :, None] * f[:, None, :]  # [BLOCK_T, NP (i), BLOCK_C]
    for j in tl.static_range(N):  # one source stream at a time: registers stay [BLOCK_T, NP, BLOCK_C]
        x_j = tl.load(X + t[:, None] * (N * C) + j * C + c[None, :], mask=tmask[:, None] & cmask[None, :],
                      other=0.0).to(tl.float32)
        r_j = tl.load(HRES + t[:, None] * (H_STRIDE * N) + i[None, :] * N + j, mask=pmask, other=0.0)  # h_res[:, j]
        out += r_j[:, :, None] * x_j[:, None, :]
    offs = t[:, None, None] * (N * C) + i[None, :, None] * C + c[None, None, :]
    xmask = tmask[:, None, None] & imask[None, :, None] & cmask[None, None, :]
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=xmask)

# Backward, one program per BLOCK_T tokens looping over C (the coefficient gradients sum over channels):
#   dX[j, c] = sum_i h_res[i, j] dY[i, c]      df[c] = sum_i h_post[i] dY[i, c]
#   dh_res[i, j] = sum_c dY[i, c] X[j, c]      dh_post[i] = sum_c dY[i, c] f[c]
@triton.jit
def _post_res_mix_bwd(
    X, F, HPOST, HRES,  # as in the forward
    DOUT,  # [T, N, C] gradient of the output
    DX, DF,  # [T, N, C], [T, C] out, the inputs' dtypes
    DHPOST, DHRES,  # [T, N], [T, N, N] out, float32 (per token, also in static mode: torch sums them)
    T, C, H_STRIDE,
    N: tl.constexpr, NP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    i = tl.arange(0, NP)
    tmask, imask = t < T, i < N
    pmask = tmask[:, None] & imask[None, :]
    p = tl.load(HPOST + t[:, None] * H_STRIDE + i[None, :], mask=pmask, other=0.0)
    d_p = tl.zeros([BLOCK_T, NP], dtype=tl.float32)
    d_r = tl.zeros([BLOCK_T, NP, NP], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < C
        tc = tmask[:, None] & cmask[None, :]
        xmask = tmask[:, None, None] & imask[None, :, None] & cmask[None, None, :]
        g = tl.load(DOUT + t[:, None, None] * (N * C) + i[None, :, None] * C + c[None, None, :], mask=xmask,
                    other=0.0).to(tl.float32)  # [BLOCK_T, NP (i), BLOCK_C]
        f = tl.load(F + t[:, None] * C + c[None, :], mask=tc, other=0.0).to(tl.float32)
        tl.store(DF + t[:, None] * C + c[None, :], tl.sum(p[:, :, None] * g, axis=1).to(DF.dtype.element_ty), mask=tc)
        d_p += tl.sum(g * f[:, None, :], axis=2)
        for j in tl.static_range(N):
            x_j = tl.load(X + t[:, None] * (N * C) + j * C + c[None, :], mask=tc, other=0.0).to(tl.float32)
            r_j = tl.load(HRES + t[:, None] * (H_STRIDE * N) + i[None, :] * N + j, mask=pmask, other=0.0)
            d_x_j = tl.sum(r_j[:, :, None] * g, axis=1)
            tl.store(DX + t[:, None] * (N * C) + j * C + c[None, :], d_x_j.to(DX.dtype.element_ty), mask=tc)
            d_r_j = tl.sum(g * x_j[:, None, :], axis=2)  # [BLOCK_T, NP (i)]: column j of dh_res
            d_r += d_r_j[:, :, None] * (i[None, None, :] == j).to(tl.float32)
    tl.store(DHPOST + t[:, None] * N + i[None, :], d_p, mask=pmask)
    tl.store(DHRES + t[:, None, None] * (N * N) + i[None, :, None] * N + i[None, None, :], d_r,
             mask=tmask[:, None, None] & imask[None, :, None] & imask[None, None, :])

def _shapes(streams, h_post):
    n, C = streams.shape[-2], streams.shape[-1]
    x = streams.reshape(-1, n, C).contiguous()
    static = h_post.dim() == 1
    return x, x.shape[0], n, C, static


def post_res_mix_fwd(streams, branch, h_post, h_res, block_t=16, block_c=64):
    """Launch the forward: ``streams [..., n, C]``, ``branch [..., C]``, ``h_post [..., n]``, ``h_res [..., n, n]``
    (static coefficients: ``[n]``, ``[n, n]``). Returns the new streams, like ``streams``."""
    x, T, n, C, static = _shapes(streams, h_post)
    assert branch.shape[-1] == C and branch.numel() == T * C, "branch must be [..., C] like one stream"
    out = torch.empty_like(x)
    block_c = min(block_c, triton.next_power_of_2(C))
    grid = (triton.cdiv(T, block_t), triton.cdiv(C, block_c))
    wrap_triton(_post_res_mix_fwd)[grid](
        x, branch.reshape(T, C).contiguous(), h_post.float().contiguous(), h_res.float().contiguous(), out, T, C,
        0 if static else n, N=n, NP=triton.next_power_of_2(n), BLOCK_T=block_t, BLOCK_C=block_c)
    return out.reshape(streams.shape)


def post_res_mix_bwd(streams, branch, h_post, h_res, grad, block_t=16, block_c=None):
    """Returns ``(d_streams, d_branch, d_h_post, d_h_res)`` shaped like the inputs.

    ``block_c`` defaults to ``128 // NP`` (NP: n padded to a power of two), so the ``[BLOCK_T, NP, BLOCK_C]`` tile
    holds 2048 values whatever n: at 16 tokens the largest tile that ptxas compiles for sm_90 without spilling
    (n = 4: 64 channels spilled 1348 B at 255 registers, 32 none; n = 8: 32 spilled 648 B, 16 none; BENCHMARKS.md).
    """
    x, T, n, C, static = _shapes(streams, h_post)
    if block_c is None:
        block_c = max(16, 128 // triton.next_power_of_2(n))
    f = branch.reshape(T, C).contiguous()
    d_x, d_f = torch.empty_like(x), torch.empty_like(f)
    d_p = torch.empty((T, n), device=x.device, dtype=torch.float32)
    d_r = torch.empty((T, n, n), device=x.device, dtype=torch.float32)
    block_c = min(block_c, triton.next_power_of_2(C))
    wrap_triton(_post_res_mix_bwd)[(triton.cdiv(T, block_t),)](
        x, f, h_post.float().contiguous(), h_res.float().contiguous(), grad.reshape(T, n, C).contiguous(), d_x, d_f,
        d_p, d_r, T, C, 0 if static else n, N=n, NP=triton.next_power_of_2(n), BLOCK_T=block_t, BLOCK_C=block_c)
    if static:
        d_p, d_r = d_p.sum(0), d_r.sum(0)
    return (d_x.reshape(streams.shape), d_f.reshape(branch.shape), d_p.reshape(h_post.shape).to(h_post.dtype),
            d_r.reshape(h_res.shape).to(h_res.dtype))

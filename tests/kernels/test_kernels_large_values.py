"""The fused Triton pre-mix kernel (under TRITON_INTERPRET=1) at large logits and at stream values ~1e20.

Large logits: a_res = scale turns N(0, 1) projections into res logits of that scale; the projection must keep
rows summing to 1 and no row or column all zero, with finite gradients. Large values: the kernel's RMS must not
overflow; it is compared with the plain formula in float64.
"""

import pytest
import torch

import mhc_rewrite  # noqa: F401

pytest.importorskip("triton", reason="the Triton kernels need the triton package (Linux)")
from mhc_rewrite.kernels.fused_pre import fused_pre_mix_bwd, fused_pre_mix_fwd  # noqa: E402

import paper
from devices import on_device
from tolerances import assert_close

N, C = 4, 16


def _inputs(scale, magnitude=1.0, dtype=torch.float32, tokens=40):
    g = torch.Generator().manual_seed(5)
    streams = (magnitude * torch.randn(tokens, N, C, generator=g)).to(dtype)
    phi = torch.randn(N * C, N * N + 2 * N, generator=g) / (N * C) ** 0.5
    alpha = torch.tensor([1.0, 1.0, scale])
    bias = 0.1 * torch.randn(N * N + 2 * N, generator=g)
    return streams, phi, alpha, bias


@pytest.mark.parametrize("scale", [1.0, 1e2, 1e4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_logits_keep_every_row_and_column(scale, dtype):
    streams, phi, alpha, bias = _inputs(scale, dtype=dtype)
    y, h_pre, h_post, h_res = on_device(fused_pre_mix_fwd, streams, phi, alpha, bias, None, N, 20, "mhc",
                                        block_c=16)
    assert torch.isfinite(h_res).all() and (h_res >= 0).all()
    assert_close(h_res.sum(-1), torch.ones(len(streams), N), "sinkhorn_rows")
    assert (h_res.amax(-1) > 0).all() and (h_res.amax(-2) > 0).all()
    # the reference op on the same inputs agrees (both are exact up to rounding in the logits)
    ref = torch.ops.mhc.coefficients(streams, phi, alpha, bias, N, 20, "mhc")[2]
    if scale == 1.0:
        assert_close(h_res, ref, "few_roundings")
    g = torch.Generator().manual_seed(6)
    d_y = torch.randn(y.shape, generator=g).to(dtype)
    grads = on_device(fused_pre_mix_bwd, streams, phi, alpha, bias, h_pre, d_y, None,
                      torch.randn(h_post.shape, generator=g), torch.randn(h_res.shape, generator=g), N, 20, "mhc",
                      block_c=16)
    assert all(torch.isfinite(gr).all() for gr in grads)


def test_streams_at_1e20_match_float64():
    streams, phi, alpha, bias = _inputs(0.5, magnitude=1e20)
    _, h_pre, h_post, h_res = on_device(fused_pre_mix_fwd, streams, phi, alpha, bias, None, N, 20, "mhc",
                                        block_c=16)
    v = streams.double().flatten(-2)
    z = (v @ phi.double()) / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6)
    logits = z * torch.cat([alpha[0].repeat(N), alpha[1].repeat(N), alpha[2].repeat(N * N)]).double() + bias.double()
    assert_close(h_pre, torch.sigmoid(logits[:, :N]), "coefficients")
    assert_close(h_post, 2 * torch.sigmoid(logits[:, N:2 * N]), "coefficients")
    want_res = paper.sinkhorn(logits[:, 2 * N:].unflatten(-1, (N, N)).double(), 20)
    assert_close(h_res, want_res, "coefficients")
    # backward: the gradient of the streams against float64 autograd of the same formula
    v = v.requires_grad_()
    z = (v @ phi.double()) / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6)
    pre = torch.sigmoid(z[:, :N] + bias[:N].double())
    d_y = torch.zeros(len(streams), C)
    d_pre = torch.randn(len(streams), N, generator=torch.Generator().manual_seed(7))
    (want,) = torch.autograd.grad(pre, v, d_pre.double())
    d_x = on_device(fused_pre_mix_bwd, streams, phi, alpha, bias, h_pre, d_y, d_pre, torch.zeros(len(streams), N),
                    torch.zeros(len(streams), N, N), N, 20, "mhc", block_c=16)[0]
    assert torch.isfinite(d_x).all()
    assert_close(d_x.flatten(-2), want, "streams", torch.float32)

"""The Triton kernels against the float64 reference, outputs and every gradient, under TRITON_INTERPRET=1.

Shapes x dtypes with stated tolerances (errors are relative to the largest reference value). Grids stay small:
the interpreter's cost is per program instance.
"""

import pytest
import torch

import mhc_rewrite  # noqa: F401
from mhc_rewrite.ops import coefficients_ref, post_res_mix_ref, pre_mix_ref, use_triton

pytest.importorskip("triton", reason="the Triton kernels need the triton package (Linux)")
from mhc_rewrite.kernels.fused_pre import fused_pre_mix_bwd, fused_pre_mix_fwd  # noqa: E402
from mhc_rewrite.kernels.post_res import post_res_mix_bwd, post_res_mix_fwd  # noqa: E402

# (leading dims, n, C): n=3 exercises the padding of n to a power of two, C=40 a partial channel block
SHAPES = [((2, 9), 4, 40), ((20,), 2, 16), ((3, 5), 3, 24), ((17,), 8, 16)]
# dtype of the streams -> tolerance on stream-dtype outputs and their gradients (coefficients stay float32)
DTYPES = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
COEFF_TOL = 2e-5


def rel_err(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


def test_kernels_run_under_the_interpreter():
    assert use_triton(torch.empty(1)), "conftest sets TRITON_INTERPRET=1, so the kernels run on CPU tensors"


def _dynamic_inputs(lead, n, C, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    streams = torch.randn(*lead, n, C, generator=g).to(dtype)
    phi = torch.randn(n * C, n * n + 2 * n, generator=g) / (n * C) ** 0.5
    alpha = 0.5 * torch.randn(3, generator=g)
    bias = torch.randn(n * n + 2 * n, generator=g)
    return streams, phi, alpha, bias


@pytest.mark.parametrize("lead,n,C", SHAPES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mode", ["mhc", "hc"])
def test_fused_pre_mix_forward_and_backward(lead, n, C, dtype, mode):
    streams, phi, alpha, bias = _dynamic_inputs(lead, n, C, dtype)
    y, h_pre, h_post, h_res = fused_pre_mix_fwd(streams, phi, alpha, bias, None, n, 20, mode, block_c=16)
    # reference in float64 on the same (rounded) inputs
    ref_in = [t.double().requires_grad_() for t in (streams, phi, alpha, bias)]
    r_pre, r_post, r_res = coefficients_ref(*ref_in, n, 20, mode)
    r_y = pre_mix_ref(ref_in[0], r_pre)
    assert y.dtype == dtype and h_pre.dtype == h_post.dtype == h_res.dtype == torch.float32
    assert rel_err(y, r_y) <= DTYPES[dtype]
    for got, want in ((h_pre, r_pre), (h_post, r_post), (h_res, r_res)):
        assert got.shape == want.shape and rel_err(got, want) <= COEFF_TOL

    g = torch.Generator().manual_seed(1)
    d_y = torch.randn(r_y.shape, generator=g).to(dtype)
    d_post, d_res = torch.randn(r_post.shape, generator=g), torch.randn(r_res.shape, generator=g)
    want = torch.autograd.grad((r_y, r_post, r_res), ref_in, (d_y.double(), d_post.double(), d_res.double()))
    got = fused_pre_mix_bwd(streams, phi, alpha, bias, h_pre, d_y, None, d_post, d_res, n, 20, mode, block_c=16)
    assert got[0].dtype == dtype
    for name, gt, wt, tol in zip(("d_streams", "d_phi", "d_alpha", "d_bias"), got, want,
                                 (DTYPES[dtype], 1e-4, 1e-4, 1e-4)):
        assert gt.shape == wt.shape, name
        assert rel_err(gt, wt) <= max(tol, DTYPES[dtype]), name


@pytest.mark.parametrize("lead,n,C", SHAPES[:2])
def test_static_pre_mix(lead, n, C):
    streams = torch.randn(*lead, n, C)
    h_pre = torch.rand(n)
    y, *_ = fused_pre_mix_fwd(streams, None, None, None, h_pre, n, 20, "mhc", block_c=16)
    assert rel_err(y, pre_mix_ref(streams.double(), h_pre.double())) <= 1e-6


@pytest.mark.parametrize("lead,n,C", SHAPES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("static", [False, True])
def test_post_res_mix_forward_and_backward(lead, n, C, dtype, static):
    g = torch.Generator().manual_seed(2)
    streams, branch = torch.randn(*lead, n, C, generator=g).to(dtype), torch.randn(*lead, C, generator=g).to(dtype)
    coeff_lead = () if static else lead
    h_post, h_res = torch.rand(*coeff_lead, n, generator=g), torch.rand(*coeff_lead, n, n, generator=g)
    out = post_res_mix_fwd(streams, branch, h_post, h_res, block_c=16)
    ref_in = [t.double().requires_grad_() for t in (streams, branch, h_post, h_res)]
    ref = post_res_mix_ref(*ref_in)
    assert out.dtype == dtype and rel_err(out, ref) <= DTYPES[dtype]
    grad = torch.randn(ref.shape, generator=g).to(dtype)
    want = torch.autograd.grad(ref, ref_in, grad.double())
    got = post_res_mix_bwd(streams, branch, h_post, h_res, grad, block_c=16)
    for name, gt, wt in zip(("d_streams", "d_branch", "d_h_post", "d_h_res"), got, want):
        assert gt.shape == wt.shape, name
        assert rel_err(gt, wt) <= DTYPES[dtype], name


def test_identity_init_is_exact_through_the_kernels():
    """Function preservation needs rows of H_res and weights of H_pre summing to 1 to fp32 precision."""
    n, C = 4, 32
    params = mhc_rewrite.MHCSiteParams(mhc_rewrite.MHCConfig(n=n), C, site_index=1)
    x = torch.randn(6, C)
    streams = x.unsqueeze(-2).expand(6, n, C).contiguous()
    y, h_pre, h_post, h_res = fused_pre_mix_fwd(streams, params.phi.detach(), params.alpha.detach(),
                                                params.bias.detach(), None, n, 20, "mhc")
    torch.testing.assert_close(y, x, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(h_res.sum(-1), torch.ones(6, n), atol=1e-6, rtol=0)
    f = torch.randn(6, C)
    out = post_res_mix_fwd(streams, f, h_post, h_res)
    torch.testing.assert_close(out, (x + f).unsqueeze(-2).expand(6, n, C), atol=1e-5, rtol=1e-5)

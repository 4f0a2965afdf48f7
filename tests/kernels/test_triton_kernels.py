"""The Triton kernels against the paper's equations in float64 (tests/paper.py), outputs and every gradient,
under TRITON_INTERPRET=1 (or compiled on a GPU: tests/devices.py).

Shapes x dtypes, tolerances from tests/tolerances.py (errors relative to the largest reference value). Grids stay
small: the interpreter's cost is per program instance.
"""

import pytest
import torch

import mhc_rewrite  # noqa: F401
from mhc_rewrite.ops import use_triton

import paper
from devices import DEVICE, on_device
from tolerances import assert_close

pytest.importorskip("triton", reason="the Triton kernels need the triton package (Linux)")
from mhc_rewrite.kernels.fused_pre import fused_pre_mix_bwd, fused_pre_mix_fwd  # noqa: E402
from mhc_rewrite.kernels.post_res import post_res_mix_bwd, post_res_mix_fwd  # noqa: E402

# (leading dims, n, C): n=3 exercises the padding of n to a power of two, C=40 a partial channel block
SHAPES = [((2, 9), 4, 40), ((20,), 2, 16), ((3, 5), 3, 24), ((17,), 8, 16)]
# dtypes of the streams (the coefficients stay float32)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _paper_coefficients(inputs, n, mode):
    return paper.coefficients(*inputs, n, 20) if mode == "mhc" else paper.hc_coefficients(*inputs, n)


def test_the_kernels_run_here():
    """On CPU the conftest sets TRITON_INTERPRET=1 so the kernels run under the interpreter; on a GPU they compile."""
    assert use_triton(torch.empty(1, device=DEVICE))


def _dynamic_inputs(lead, n, C, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    streams = torch.randn(*lead, n, C, generator=g).to(dtype)
    phi = torch.randn(n * C, n * n + 2 * n, generator=g) / (n * C) ** 0.5
    alpha = 0.5 * torch.randn(3, generator=g)
    bias = torch.randn(n * n + 2 * n, generator=g)
    return streams, phi, alpha, bias


@pytest.mark.parametrize("lead,n,C", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["mhc", "hc"])
def test_fused_pre_mix_forward_and_backward(lead, n, C, dtype, mode):
    streams, phi, alpha, bias = _dynamic_inputs(lead, n, C, dtype)
    y, h_pre, h_post, h_res = on_device(fused_pre_mix_fwd, streams, phi, alpha, bias, None, n, 20, mode, block_c=16)
    # reference in float64 on the same (rounded) inputs
    ref_in = [t.double().requires_grad_() for t in (streams, phi, alpha, bias)]
    r_pre, r_post, r_res = _paper_coefficients(ref_in, n, mode)
    r_y = paper.pre_mix(ref_in[0], r_pre)
    assert y.dtype == dtype and h_pre.dtype == h_post.dtype == h_res.dtype == torch.float32
    assert_close(y, r_y, "streams", dtype)
    for got, want in ((h_pre, r_pre), (h_post, r_post), (h_res, r_res)):
        assert_close(got, want, "coefficients")

    g = torch.Generator().manual_seed(1)
    d_y = torch.randn(r_y.shape, generator=g).to(dtype)
    d_post, d_res = torch.randn(r_post.shape, generator=g), torch.randn(r_res.shape, generator=g)
    want = torch.autograd.grad((r_y, r_post, r_res), ref_in, (d_y.double(), d_post.double(), d_res.double()))
    got = on_device(fused_pre_mix_bwd, streams, phi, alpha, bias, h_pre, d_y, None, d_post, d_res, n, 20, mode,
                    block_c=16)
    assert got[0].dtype == dtype
    assert_close(got[0], want[0], "streams", dtype, msg="d_streams")
    for name, gt, wt in zip(("d_phi", "d_alpha", "d_bias"), got[1:], want[1:]):
        assert_close(gt, wt, "coefficient_grads", msg=name)  # float32 whatever the stream dtype


@pytest.mark.parametrize("lead,n,C,dtype", [(*SHAPES[0], torch.bfloat16), (*SHAPES[1], torch.float32),
                                             (*SHAPES[3], torch.bfloat16)])
def test_fused_pre_mix_backward_adds_the_post_mix_gradient(lead, n, C, dtype):
    """``grad_acc`` (the site's post-mix gradient of the streams, handed over through the link, ops/fused.py) is
    added in float32 before the one store of ``d_streams``: the float64 gradient plus the same tensor."""
    streams, phi, alpha, bias = _dynamic_inputs(lead, n, C, dtype, seed=2)
    y, h_pre, h_post, h_res = on_device(fused_pre_mix_fwd, streams, phi, alpha, bias, None, n, 20, "mhc", block_c=16)
    ref_in = [t.double().requires_grad_() for t in (streams, phi, alpha, bias)]
    r_pre, r_post, r_res = _paper_coefficients(ref_in, n, "mhc")
    g = torch.Generator().manual_seed(4)
    d_y = torch.randn(y.shape, generator=g).to(dtype)
    d_post, d_res = torch.randn(h_post.shape, generator=g), torch.randn(h_res.shape, generator=g)
    acc = torch.randn(streams.shape, generator=g).to(dtype)
    (want,) = torch.autograd.grad((paper.pre_mix(ref_in[0], r_pre), r_post, r_res), ref_in[:1],
                                  (d_y.double(), d_post.double(), d_res.double()))
    got = on_device(fused_pre_mix_bwd, streams, phi, alpha, bias, h_pre, d_y, None, d_post, d_res, n, 20, "mhc",
                    grad_acc=acc, block_c=16)[0]
    assert got.dtype == dtype
    assert_close(got, want + acc.double(), "streams", dtype)


@pytest.mark.parametrize("lead,n,C", SHAPES[:2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_static_pre_mix(lead, n, C, dtype):
    """The kernel's static mode (one H_pre [n] for every token), in every stream dtype, against float64.

    It has no backward kernel of its own: a static site's pre-mix backward is mhc::pre_mix's (tests/ops), and a
    lowered static model's gradients are checked in tests/kernels/test_fused_ops.py.
    """
    g = torch.Generator().manual_seed(n)
    streams = torch.randn(*lead, n, C, generator=g).to(dtype)
    h_pre = torch.rand(n, generator=g)
    y, *_ = on_device(fused_pre_mix_fwd, streams, None, None, None, h_pre, n, 20, "mhc", block_c=16)
    assert y.dtype == dtype
    assert_close(y, paper.pre_mix(streams.double(), h_pre.double()), "streams", dtype)


@pytest.mark.parametrize("lead,n,C", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("static", [False, True])
def test_post_res_mix_forward_and_backward(lead, n, C, dtype, static):
    g = torch.Generator().manual_seed(2)
    streams, branch = torch.randn(*lead, n, C, generator=g).to(dtype), torch.randn(*lead, C, generator=g).to(dtype)
    coeff_lead = () if static else lead
    h_post, h_res = torch.rand(*coeff_lead, n, generator=g), torch.rand(*coeff_lead, n, n, generator=g)
    out = on_device(post_res_mix_fwd, streams, branch, h_post, h_res, block_c=16)
    ref_in = [t.double().requires_grad_() for t in (streams, branch, h_post, h_res)]
    ref = paper.post_res_mix(*ref_in)
    assert out.dtype == dtype
    assert_close(out, ref, "streams", dtype)
    grad = torch.randn(ref.shape, generator=g).to(dtype)
    want = torch.autograd.grad(ref, ref_in, grad.double())
    got = on_device(post_res_mix_bwd, streams, branch, h_post, h_res, grad, block_c=16)
    for name, gt, wt in zip(("d_streams", "d_branch", "d_h_post", "d_h_res"), got, want):
        assert_close(gt, wt, "streams", dtype, msg=name)


def test_identity_init_is_exact_through_the_kernels():
    """Function preservation needs rows of H_res and weights of H_pre summing to 1 to fp32 precision."""
    n, C = 4, 32
    params = mhc_rewrite.MHCSiteParams(mhc_rewrite.MHCConfig(n=n), C, site_index=1)
    x = torch.randn(6, C)
    streams = x.unsqueeze(-2).expand(6, n, C).contiguous()
    y, h_pre, h_post, h_res = on_device(fused_pre_mix_fwd, streams, params.phi.detach(), params.alpha.detach(),
                                        params.bias.detach(), None, n, 20, "mhc")
    assert_close(y, x, "few_roundings")
    assert_close(h_res.sum(-1), torch.ones(6, n), "few_roundings")
    f = torch.randn(6, C)
    out = on_device(post_res_mix_fwd, streams, f, h_post, h_res)
    assert_close(out, (x + f).unsqueeze(-2).expand(6, n, C), "few_roundings")
